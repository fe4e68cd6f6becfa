"""Every loss against a value worked out by hand (the arithmetic is in each docstring)."""

import math

import pytest
import torch

from stages.core import losses

T = torch.tensor


def test_sft_loss_counts_response_tokens_only():
    """Token log-probs [[-1, -2, pad], [-0.5, pad, pad]]: NLL = (1 + 2 + 0.5) / 3 tokens = 1.1666667."""
    logps = T([[-1.0, -2.0, -9.0], [-0.5, -9.0, -9.0]])  # the -9s sit on padding and must not count
    mask = T([[1, 1, 0], [1, 0, 0]])
    assert losses.sft_loss(logps, mask).item() == pytest.approx(3.5 / 3, abs=1e-6)


def test_bradley_terry_by_hand():
    """r_c = 2, r_r = 0.5: −log σ(1.5) = log(1 + e^−1.5) = log 1.2231302 = 0.2014133.
    Margin 1: −log σ(0.5) = log 1.6065307 = 0.4740770. Centering c = 0.01 adds 0.01·2.5² = 0.0625."""
    chosen, rejected = T([2.0]), T([0.5])
    loss, acc = losses.bradley_terry_loss(chosen, rejected)
    assert loss.item() == pytest.approx(0.2014133, abs=1e-6)
    assert acc.item() == 1.0
    loss, _ = losses.bradley_terry_loss(chosen, rejected, margin=T([1.0]))
    assert loss.item() == pytest.approx(0.4740770, abs=1e-6)
    loss, _ = losses.bradley_terry_loss(chosen, rejected, center_coef=0.01)
    assert loss.item() == pytest.approx(0.2014133 + 0.0625, abs=1e-6)


def test_bradley_terry_accuracy_is_strict():
    _, acc = losses.bradley_terry_loss(T([1.0, 1.0]), T([1.0, 0.0]))
    assert acc.tolist() == [0.0, 1.0]


def test_dpo_by_hand():
    """π_c = −1, π_r = −2, ref_c = ref_r = −1.5: ρ_c = 0.5, ρ_r = −0.5, Δ = 1, βΔ = 0.1.
    L = −log σ(0.1) = log(1 + e^−0.1) = log 1.9048374 = 0.6443967; rewards β ρ = ±0.05.
    Conservative ε = 0.25: 0.75·0.6443967 + 0.25·log(1 + e^0.1) = 0.4832975 + 0.25·0.7443967 = 0.6693967."""
    args = (T([-1.0]), T([-2.0]), T([-1.5]), T([-1.5]))
    loss, r_c, r_r = losses.dpo_loss(*args, beta=0.1)
    assert loss.item() == pytest.approx(0.6443967, abs=1e-6)
    assert (r_c.item(), r_r.item()) == (pytest.approx(0.05), pytest.approx(-0.05))
    loss, _, _ = losses.dpo_loss(*args, beta=0.1, label_smoothing=0.25)
    assert loss.item() == pytest.approx(0.6693967, abs=1e-6)


def test_dpo_at_reference_is_log2_and_gradient_pushes_chosen_up():
    """At π = π_ref, Δ = 0 and L = log 2; dL/dπ_c = −β σ(−βΔ) = −β/2 < 0, dL/dπ_r = +β/2."""
    pi_c, pi_r = T([-3.0], requires_grad=True), T([-3.0], requires_grad=True)
    loss, _, _ = losses.dpo_loss(pi_c, pi_r, T([-3.0]), T([-3.0]), beta=0.2)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    loss.sum().backward()
    assert pi_c.grad.item() == pytest.approx(-0.1, abs=1e-6)
    assert pi_r.grad.item() == pytest.approx(0.1, abs=1e-6)


def test_masked_mean():
    """(1 + 3) / 2 over the unmasked; per row along dim 1: [1, 4]."""
    x, m = T([[1.0, 2.0], [4.0, 3.0]]), T([[1, 0], [1, 0]])
    assert losses.masked_mean(x, T([[1, 0], [0, 1]])).item() == pytest.approx(2.0)
    assert losses.masked_mean(x, m, dim=1).tolist() == [1.0, 4.0]


def test_ipo_by_hand():
    """π_c = −1, π_r = −2, ref = −1.5 both: ρ_c = 0.5, ρ_r = −0.5; |y_c| = 2, |y_r| = 4; β = 0.1 → 1/(2β) = 5.
    Length-normalised: h = 0.25 + 0.125 = 0.375, L = (0.375 − 5)² = 21.390625.
    Summed: h = 1, L = (1 − 5)² = 16."""
    args = (T([-1.0]), T([-2.0]), T([-1.5]), T([-1.5]), T([2.0]), T([4.0]))
    loss, r_c, r_r = losses.ipo_loss(*args, beta=0.1)
    assert loss.item() == pytest.approx(21.390625, abs=1e-5)
    assert (r_c.item(), r_r.item()) == (pytest.approx(0.05), pytest.approx(-0.05))
    loss, _, _ = losses.ipo_loss(*args, beta=0.1, length_normalize=False)
    assert loss.item() == pytest.approx(16.0, abs=1e-5)


def test_kto_by_hand():
    """β = 0.1, λ_D = 1, λ_U = 1.5; ρ = [1.0 (desirable), −2.0 (undesirable)];
    mismatched log-ratios [0.4, 0.2] → z0 = max(0, 0.3) = 0.3.
    L_D = 1 − σ(0.1·0.7) = 1 − σ(0.07) = 1 − 1/(1 + e^−0.07) = 1 − 0.5174929 = 0.4825071
    L_U = 1.5·(1 − σ(0.1·2.3)) = 1.5·(1 − 1/(1 + e^−0.23)) = 1.5·(1 − 0.5572478) = 0.6641283"""
    loss, rewards, z0 = losses.kto_loss(T([0.0, -3.0]), T([-1.0, -1.0]), T([True, False]),
                                        T([-1.0, -2.0]), T([-1.4, -2.2]), beta=0.1, undesirable_weight=1.5)
    assert z0.item() == pytest.approx(0.3, abs=1e-6)
    assert loss.tolist() == [pytest.approx(0.4825071, abs=1e-6), pytest.approx(0.6641283, abs=1e-6)]
    assert rewards.tolist() == [pytest.approx(0.1), pytest.approx(-0.2)]


def test_kto_reference_point_is_clamped_at_zero():
    """Mismatched log-ratios [−0.4, 0.2] average −0.1 → z0 = 0; ρ = 0 then gives L = 1 − σ(0) = 0.5."""
    loss, _, z0 = losses.kto_loss(T([-1.0]), T([-1.0]), T([True]), T([-1.4, -1.8]), T([-1.0, -2.0]), beta=0.1)
    assert z0.item() == 0.0 and loss.item() == pytest.approx(0.5)


def test_kto_weight_ratio_range():
    assert losses.kto_weight_ratio_ok(100, 100, 1.0, 1.0) == (True, 1.0)
    ok, ratio = losses.kto_weight_ratio_ok(100, 50, 1.0, 1.0)
    assert not ok and ratio == 2.0
    assert losses.kto_weight_ratio_ok(100, 80, 1.0, 1.0)[0]  # 1.25 is inside [1, 4/3]


def test_k3_and_k1_by_hand():
    """logp = −1, ref = −2: k1 = 1; k3 = e^−1 − (−1) − 1 = 0.3678794. Equal log-probs: both 0."""
    assert losses.kl_k1(T([-1.0]), T([-2.0])).item() == 1.0
    assert losses.kl_k3(T([-1.0]), T([-2.0])).item() == pytest.approx(0.3678794, abs=1e-6)
    assert losses.kl_k3(T([-0.5]), T([-0.5])).item() == 0.0


def test_clipped_surrogate_by_hand():
    """r = 1.5, ε = 0.2. A = +1: min(1.5, 1.2) = 1.2 → loss −1.2 (clipped). A = −1: min(−1.5, −1.2) = −1.5 →
    loss 1.5 (the unclipped term: PPO never clips a change that makes things worse)."""
    loss, clipped = losses.clipped_surrogate(T([1.5, 1.5]), T([1.0, -1.0]), 0.2, 0.2)
    assert loss.tolist() == [pytest.approx(-1.2), pytest.approx(1.5)]
    assert clipped.tolist() == [1.0, 0.0]


def test_grpo_aggregations_by_hand():
    """Ratio 1 (logp = old), β = 0, A = [1, −1], lengths 2 and 1 → per-token losses [[−1, −1], [1, pad]].
    grpo: mean(−2/2, 1/1) = 0; bnpo: (−1 −1 +1)/3 = −1/3; dr_grpo (max length 4): −1/(2·4) = −0.125;
    dapo over 6 tokens in the generation batch: −1/6."""
    logps = T([[-0.5, -0.7], [-0.2, 0.0]])
    mask = T([[1, 1], [1, 0]])
    adv = T([1.0, -1.0])
    expect = {"grpo": 0.0, "bnpo": -1 / 3, "dr_grpo": -0.125, "dapo": -1 / 6}
    for loss_type, value in expect.items():
        loss, stats = losses.grpo_loss(logps, logps, None, adv, mask, 0.2, 0.2, 0.0, loss_type,
                                       max_completion_length=4, batch_tokens=6)
        assert loss.item() == pytest.approx(value, abs=1e-6), loss_type
        assert stats["clipfrac"] == 0.0


def test_grpo_aggregation_skips_sequences_with_no_reward():
    """A second row with no reward has an all-zero mask: grpo averages over the one scored row
    (per-token losses [−1, −1] with A = 1 → −2/2 = −1), not over two rows (−0.5); bnpo likewise −1."""
    logps, mask, adv = T([[-0.5, -0.7], [-0.2, -0.1]]), T([[1, 1], [0, 0]]), T([1.0, 0.0])
    for loss_type in ("grpo", "bnpo"):
        loss, _ = losses.grpo_loss(logps, logps, None, adv, mask, 0.2, 0.2, 0.0, loss_type)
        assert loss.item() == pytest.approx(-1.0, abs=1e-6), loss_type


def test_grpo_kl_term_by_hand():
    """One token, ratio 1, A = 0, logp = −1, ref = −2, β = 0.04: ℓ = 0.04·0.3678794 = 0.0147152."""
    loss, stats = losses.grpo_loss(T([[-1.0]]), T([[-1.0]]), T([[-2.0]]), T([0.0]), T([[1]]), 0.2, 0.2, 0.04, "bnpo")
    assert loss.item() == pytest.approx(0.0147152, abs=1e-6)
    assert stats["kl"] == pytest.approx(0.3678794, abs=1e-6)


def test_rloo_loss_by_hand():
    """Sequence ratio e^{ln 1.5} = 1.5 with A = 2 and ε = 0.2: −min(3, 2.4) = −2.4."""
    loss, clipped = losses.rloo_loss(T([math.log(1.5) - 3.0]), T([-3.0]), T([2.0]), 0.2, 0.2)
    assert loss.item() == pytest.approx(-2.4, abs=1e-6) and clipped.item() == 1.0


def test_ppo_losses_by_hand():
    """Policy: r = 1.5 on two tokens with Â = [1, −1] → [−1.2, 1.5], masked mean 0.15.
    Value: V = 1.0, V_old = 0.5, R = 0, ε_v = 0.2 → clipped V = 0.7; max(1.0², 0.7²) = 1 → 0.5·1 = 0.5."""
    pg, clipfrac = losses.ppo_policy_loss(T([[math.log(1.5), math.log(1.5)]]), T([[0.0, 0.0]]), T([[1.0, -1.0]]),
                                          T([[1, 1]]), 0.2)
    assert pg.item() == pytest.approx(0.15, abs=1e-6) and clipfrac == 0.5
    vf, vclip = losses.ppo_value_loss(T([[1.0]]), T([[0.5]]), T([[0.0]]), T([[1]]), 0.2)
    assert vf.item() == pytest.approx(0.5) and vclip == 0.0


def test_truncated_importance_weight_by_hand():
    """Trainer p = (0.5, 0.2 | 0.3), sampler p = (0.25, 0.4 | 0.1), cap 1.5.
    token:    ratios 2.0, 0.5 | 3.0 → weights 1.5 (capped), 0.5 | 1.5 (capped); 2 of 3 capped, mean 7/6;
              mean |Δ log p| = (ln 2 + ln 2 + ln 3) / 3.
    sequence: 2.0 · 0.5 = 1.0 | 3.0 → 1.0 | 1.5 (capped); 1 of 2 capped, mean 1.25."""
    ln = math.log
    trainer = torch.tensor([[ln(0.5), ln(0.2), 0.0], [ln(0.3), 0.0, 0.0]])
    sampler = torch.tensor([[ln(0.25), ln(0.4), -9.0], [ln(0.1), -9.0, -9.0]])  # padding ignored
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    w, st = losses.truncated_is_weight(trainer, sampler, mask, 1.5, "token")
    assert torch.allclose(w, torch.tensor([[1.5, 0.5, 0.0], [1.5, 0.0, 0.0]]))
    assert st["rollout/tis_capped"] == pytest.approx(2 / 3) and st["rollout/tis_weight"] == pytest.approx(7 / 6)
    assert st["rollout/sampler_logp_gap"] == pytest.approx((2 * ln(2) + ln(3)) / 3, rel=1e-6)
    w, st = losses.truncated_is_weight(trainer, sampler, mask, 1.5, "sequence")
    assert torch.allclose(w, torch.tensor([[1.0], [1.5]]))
    assert st["rollout/tis_capped"] == pytest.approx(0.5) and st["rollout/tis_weight"] == pytest.approx(1.25)


def test_grpo_importance_weight_scales_the_policy_term_not_the_kl():
    """logp = old = 0 (ratio 1, nothing clipped), A = 2, weights (1.5, 0.5), bnpo mean over 2 tokens:
    policy term −A·w = (−3, −1) → −2, its gradient −A·w/2 = (−1.5, −0.5); with β = 1 and logp_ref = ln 2,
    each token adds k3 = 2 − ln 2 − 1, unweighted."""
    logps = torch.zeros(1, 2, requires_grad=True)
    w = torch.tensor([[1.5, 0.5]])
    loss, _ = losses.grpo_loss(logps, logps.detach(), None, torch.tensor([2.0]), torch.ones(1, 2), 0.2, 0.2, 0.0,
                               "bnpo", is_weight=w)
    loss.backward()
    assert loss.item() == pytest.approx(-2.0)
    assert torch.allclose(logps.grad, torch.tensor([[-1.5, -0.5]]))
    ref = torch.full((1, 2), math.log(2))
    with_kl, _ = losses.grpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), ref, torch.tensor([2.0]), torch.ones(1, 2),
                                  0.2, 0.2, 1.0, "bnpo", is_weight=w)
    assert with_kl.item() == pytest.approx(-2.0 + 1 - math.log(2))


def test_rloo_and_ppo_take_the_importance_weight():
    seq, adv = torch.zeros(2), torch.tensor([1.0, -1.0])
    per_seq, _ = losses.rloo_loss(seq, seq, adv, 0.2, 0.2, torch.tensor([2.0, 0.5]))
    assert torch.allclose(per_seq, torch.tensor([-2.0, 0.5]))
    loss, _ = losses.ppo_policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), 0.2,
                                     torch.tensor([[2.0, 0.0]]))
    assert loss.item() == pytest.approx(-1.0)


def test_simpo_by_hand():
    """logp_c = −2 over 4 tokens (mean −0.5), logp_r = −6 over 3 (mean −2); β = 2, γ = 1: βh − γ = 2·1.5 − 1 = 2,
    L = log(1 + e^−2) = 0.1269280; rewards β·mean = −1, −4. dL/dlogp_c = −σ(−2)·β/|y_c| = −0.1192029·2/4 =
    −0.0596015, dL/dlogp_r = +0.1192029·2/3 = 0.0794686. No reference enters."""
    pi_c, pi_r = T([-2.0], requires_grad=True), T([-6.0], requires_grad=True)
    loss, r_c, r_r = losses.simpo_loss(pi_c, pi_r, T([4.0]), T([3.0]), beta=2.0, gamma=1.0)
    assert loss.item() == pytest.approx(0.1269280, abs=1e-6)
    assert (r_c.item(), r_r.item()) == (pytest.approx(-1.0), pytest.approx(-4.0))
    loss.sum().backward()
    assert pi_c.grad.item() == pytest.approx(-0.0596015, abs=1e-6)
    assert pi_r.grad.item() == pytest.approx(0.0794686, abs=1e-6)


def test_orpo_by_hand():
    """The same pair, λ = 0.1. p̄_c = e^−0.5 = 0.6065307, p̄_r = e^−2 = 0.1353353; log odds = log(p̄/(1 − p̄)):
    0.4337808 and −1.8535579, difference 2.2873387. L = 0.5 (the SFT term, −mean logp_c) − 0.1·log σ(2.2873387)
    = 0.5 + 0.1·0.0967059 = 0.5096706. d log odds / d mean = 1/(1 − p̄): dL/dlogp_c = (−1 − 0.1·σ(−2.2873387)/
    0.3934693)/4 = −0.2558567, dL/dlogp_r = 0.1·σ(−2.2873387)/0.8646647/3 = 0.0035535."""
    pi_c, pi_r = T([-2.0], requires_grad=True), T([-6.0], requires_grad=True)
    loss, r_c, r_r = losses.orpo_loss(pi_c, pi_r, T([4.0]), T([3.0]), lam=0.1)
    assert loss.item() == pytest.approx(0.5096706, abs=1e-6)
    assert (r_c.item(), r_r.item()) == (pytest.approx(-0.05), pytest.approx(-0.2))
    loss.sum().backward()
    assert pi_c.grad.item() == pytest.approx(-0.2558567, abs=1e-6)
    assert pi_r.grad.item() == pytest.approx(0.0035535, abs=1e-6)


def test_orpo_of_a_certain_completion_is_finite():
    """A chosen completion whose every token has log-prob 0 in fp32: log(1 − p̄) would be −inf; capped, finite."""
    pi_c = T([0.0], requires_grad=True)
    loss, _, _ = losses.orpo_loss(pi_c, T([-6.0]), T([4.0]), T([3.0]), lam=0.1)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(pi_c.grad).all()


def test_gspo_sequence_ratio_by_hand():
    """Sequence 1: token log-ratios 0.1, 0.3 → s = e^0.2 = 1.2214028, A = 1: clipped to 1.2 (ε 0.2), loss −1.2 on each
    token and no gradient. Sequence 2: one token, log-ratio −0.1 → s = 0.9048374, A = −1: inside the range, loss
    +0.9048374. loss_type grpo: (−1.2 + 0.9048374)/2 = −0.1475813; clipfrac 2 of 3 tokens; the gradient on sequence
    2's token is d(s/2)/dlogp = s/(2·|y|) = 0.4524187, and 0 on sequence 1's (clipped)."""
    mask = T([[1.0, 1.0], [1.0, 0.0]])
    old = T([[-1.0, -2.0], [-1.0, -3.0]])
    logps = (old + T([[0.1, 0.3], [-0.1, 0.7]])).requires_grad_()  # 0.7 sits on padding
    loss, stats = losses.grpo_loss(logps, old, None, T([1.0, -1.0]), mask, 0.2, 0.2, 0.0, "grpo", level="sequence")
    assert loss.item() == pytest.approx(-0.1475813, abs=1e-6)
    assert stats["clipfrac"] == pytest.approx(2 / 3)
    loss.backward()
    assert logps.grad.tolist() == [[0.0, 0.0], [pytest.approx(0.4524187, abs=1e-6), 0.0]]


def test_cispo_keeps_the_gradient_of_a_capped_token():
    """Token ratios e^0.1 = 1.1051709 and e^2 = 7.389 (capped at ε_max 5), A = 1, logp = −1, −0.5: ℓ = −w·A·logp =
    1.1051709 and 2.5; dapo over 2 tokens: 1.8025855. The gradient is −w·A/2: −0.5525855 and −2.5, so the capped
    token still learns (PPO's clip would give it 0); clipfrac 1/2."""
    logps = T([[-1.0, -0.5]], requires_grad=True)
    old = T([[-1.1, -2.5]])
    loss, stats = losses.cispo_loss(logps, old, None, T([1.0]), T([[1.0, 1.0]]), 5.0, 0.0, "dapo", batch_tokens=2.0)
    assert loss.item() == pytest.approx(1.8025855, abs=1e-6)
    assert stats["clipfrac"] == pytest.approx(0.5)
    loss.backward()
    assert logps.grad[0].tolist() == [pytest.approx(-0.5525855, abs=1e-6), pytest.approx(-2.5, abs=1e-6)]


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_generalized_jsd_by_hand(beta):
    """GKD's JSD_β of two 2-token distributions written out: M = β·T + (1 − β)·S, β·KL(T‖M) + (1 − β)·KL(S‖M);
    β = 0 and 1 are the forward and reverse KL (TRL's ends). Its gradient reaches the student only."""
    s_p, t_p = torch.tensor([0.8, 0.2]), torch.tensor([0.4, 0.6])
    student = s_p.log().clone().requires_grad_()
    teacher = t_p.log().clone().requires_grad_()

    def kl(p, q):
        return sum(p[i] * math.log(p[i] / q[i]) for i in range(2))

    m = [beta * t_p[i] + (1 - beta) * s_p[i] for i in range(2)]
    want = {0.0: kl(t_p, s_p), 1.0: kl(s_p, t_p)}.get(beta, beta * kl(t_p, m) + (1 - beta) * kl(s_p, m))
    got = losses.generalized_jsd(student[None], teacher[None], beta)
    assert got.item() == pytest.approx(float(want), abs=1e-6)
    got.sum().backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_generalized_jsd_is_zero_for_equal_distributions():
    lp = torch.log_softmax(torch.randn(2, 3, 7), -1)
    for beta in (0.0, 0.5, 1.0):
        assert losses.generalized_jsd(lp, lp.clone(), beta).abs().max() < 1e-6
