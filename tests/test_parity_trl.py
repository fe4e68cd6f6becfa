"""Our losses and advantages against TRL 1.16's own code on identical inputs (fp32, within 1e-5; values and grads)."""

import os
from types import MethodType, SimpleNamespace

import pytest
import torch

from stages.core import advantages, losses
from tests.trl_oracle import (
    FusedLM,
    grpo_advantages,
    kto_weight_warning,
    layout,
    rl_inputs,
    rl_self,
    rloo_advantages,
    trainer_self,
)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # SimPO (CPO) and ORPO live in trl.experimental
trl = pytest.importorskip("trl")
TOL = 1e-5


def grads(loss, *leaves):
    return torch.autograd.grad(loss, leaves)


@pytest.fixture
def paired():
    """3 pairs of completions (rows: chosen then rejected) with ragged lengths, per-token log-probs."""
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0],
                         [1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    policy = (-2 * torch.rand(6, 5, generator=g)).requires_grad_()
    ref = -2 * torch.rand(6, 5, generator=g)
    return mask, policy, ref


def trl_dpo_family_loss(paired, beta: float, loss_type: str):
    """DPOTrainer._compute_loss on 3 chosen + 3 rejected rows with precomputed reference log-probs
    → (loss, the metrics it logged)."""
    from trl import DPOTrainer

    mask, policy, ref = paired
    ids, am, cm = layout(mask)
    s = trainer_self(beta=beta, loss_types=[loss_type], loss_weights=[1.0], ld_alpha=None,
                     precompute_ref_logps=True, f_divergence_type="reverse_kl", label_smoothing=0.0,
                     use_weighting=False)
    ref_seq = (ref * mask).sum(1)
    inputs = dict(input_ids=ids, attention_mask=am, completion_mask=cm,
                  ref_chosen_logps=ref_seq[:3], ref_rejected_logps=ref_seq[3:])
    return DPOTrainer._compute_loss(s, FusedLM([(ids, policy)]), inputs, return_outputs=False), last_metrics(s)


def assert_pair_loss_matches(ours, r_c, r_r, trl_loss, m, policy):
    """Same loss, same gradient w.r.t. the policy log-probs, same rewards/* as TRL logged."""
    assert ours.item() == pytest.approx(trl_loss.item(), abs=TOL)
    assert torch.allclose(grads(ours, policy)[0], grads(trl_loss, policy)[0], atol=TOL)
    assert r_c.mean().item() == pytest.approx(m["rewards/chosen"], abs=TOL)
    assert r_r.mean().item() == pytest.approx(m["rewards/rejected"], abs=TOL)
    assert (r_c - r_r).mean().item() == pytest.approx(m["rewards/margins"], abs=TOL)
    assert (r_c > r_r).float().mean().item() == pytest.approx(m["rewards/accuracies"], abs=TOL)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_trl(paired, beta):
    mask, policy, ref = paired
    trl_loss, trl_metrics = trl_dpo_family_loss(paired, beta, "sigmoid")
    pi, ref_seq = (policy * mask).sum(1), (ref * mask).sum(1)
    per_pair, r_c, r_r = losses.dpo_loss(pi[:3], pi[3:], ref_seq[:3], ref_seq[3:], beta)
    assert_pair_loss_matches(per_pair.mean(), r_c, r_r, trl_loss, trl_metrics, policy)


@pytest.mark.parametrize("center", [None, 0.01])
@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry_matches_trl_reward_trainer(center, with_margin):
    from trl import RewardTrainer

    g = torch.Generator().manual_seed(1)
    scores = torch.randn(8, generator=g).requires_grad_()  # rows: 4 chosen then 4 rejected (TRL's layout)
    margin = torch.tensor([0.5, 0.0, 1.0, 0.2])

    class ScoreModel(torch.nn.Module):
        def forward(self, **_):
            return SimpleNamespace(logits=scores[:, None])

    s = trainer_self()
    s.args = SimpleNamespace(center_rewards_coefficient=center)
    inputs = dict(input_ids=torch.ones(8, 3, dtype=torch.long), attention_mask=torch.ones(8, 3, dtype=torch.long))
    if with_margin:
        inputs["margin"] = margin
    trl_loss = RewardTrainer.compute_loss(s, ScoreModel(), inputs)
    per_pair, _ = losses.bradley_terry_loss(scores[:4], scores[4:], margin if with_margin else None, center or 0.0)
    ours = per_pair.mean()
    assert ours.item() == pytest.approx(trl_loss.item(), abs=TOL)
    assert torch.allclose(grads(ours, scores)[0], grads(trl_loss, scores)[0], atol=TOL)


def last_metrics(s) -> dict:
    return {k: v[-1] for k, v in s._metrics["train"].items()}


# ----------------------------------------------------------------------------------------------------------- IPO

@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_matches_trl(paired, beta):
    """ipo_loss(length_normalize=True) vs DPOTrainer._compute_loss(loss_types=["ipo"]): loss, grads, rewards/*."""
    mask, policy, ref = paired
    trl_loss, trl_metrics = trl_dpo_family_loss(paired, beta, "ipo")
    pi, ref_seq = (policy * mask).sum(1), (ref * mask).sum(1)
    n = mask.sum(1)  # TRL gets per-token log-probs and divides by the lengths itself
    per_pair, r_c, r_r = losses.ipo_loss(pi[:3], pi[3:], ref_seq[:3], ref_seq[3:], n[:3], n[3:], beta)
    # TRL logs β·ρ with the SUMMED ρ for ipo too, as we return
    assert_pair_loss_matches(per_pair.mean(), r_c, r_r, trl_loss, trl_metrics, policy)


# ----------------------------------------------------------------------------------------------------------- KTO

@pytest.mark.parametrize("kl_shift", [0.4, -0.4], ids=["z0>0", "z0_clamped"])
def test_kto_matches_trl(kl_shift):
    """kto_loss vs KTOTrainer._compute_loss (calculate_KL, λ_D ≠ λ_U): loss, grads, z0 = logged kl, rewards/*."""
    from trl import KTOTrainer

    g = torch.Generator().manual_seed(2)
    desirable = torch.tensor([True, False, True, True, False, False, True])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0],
                         [1, 1, 1, 1]])
    kl_mask = mask.roll(1, 0)  # TRL's mismatched pairs (x_i, y_{i-1}): completions rotated by one
    policy = (-3 * torch.rand(7, 4, generator=g)).requires_grad_()
    ref = -3 * torch.rand(7, 4, generator=g)
    ref_kl = -3 * torch.rand(7, 4, generator=g)
    policy_kl = ref_kl + kl_shift + 0.3 * torch.randn(7, 4, generator=g)  # sign of the mismatched log-ratio mean
    beta, w_d, w_u = 0.1, 1.3, 0.7

    ids, am, cm = layout(mask)
    kl_ids, kl_am, kl_cm = layout(kl_mask, offset=1000)
    s = trainer_self(beta=beta, desirable_weight=w_d, undesirable_weight=w_u, loss_type="kto", calculate_KL=True,
                     precompute_ref_logps=False, ref_model=FusedLM([(ids, ref), (kl_ids, ref_kl)]))
    s._compute_kl_logps = MethodType(KTOTrainer._compute_kl_logps, s)
    inputs = dict(input_ids=ids, attention_mask=am, completion_mask=cm, label=desirable,
                  KL_input_ids=kl_ids, KL_attention_mask=kl_am, KL_completion_mask=kl_cm)
    trl_loss = KTOTrainer._compute_loss(s, FusedLM([(ids, policy), (kl_ids, policy_kl)]), inputs, return_outputs=False)

    pi_kl, ref_kl_seq = (policy_kl * kl_mask).sum(1), (ref_kl * kl_mask).sum(1)
    assert ((pi_kl - ref_kl_seq).mean() > 0) == (kl_shift > 0)  # the case is the one its id says
    per_example, rewards, z0 = losses.kto_loss((policy * mask).sum(1), (ref * mask).sum(1), desirable, pi_kl,
                                               ref_kl_seq, beta, w_d, w_u)
    ours = per_example.mean()  # = TRL's mean over cat(λ_D L_D, λ_U L_U)
    assert ours.item() == pytest.approx(trl_loss.item(), abs=TOL)
    assert torch.allclose(grads(ours, policy)[0], grads(trl_loss, policy)[0], atol=TOL)
    m = last_metrics(s)
    assert z0.item() == pytest.approx(m["kl"], abs=TOL)
    assert (z0.item() == 0.0) == (kl_shift < 0)
    assert rewards[desirable].mean().item() == pytest.approx(m["rewards/chosen"], abs=TOL)
    assert rewards[~desirable].mean().item() == pytest.approx(m["rewards/rejected"], abs=TOL)
    assert (rewards[desirable].mean() - rewards[~desirable].mean()).item() == pytest.approx(m["rewards/margins"],
                                                                                           abs=TOL)


@pytest.mark.parametrize("n_d, n_u, w_d, w_u", [
    (3, 7, 1.0, 1.0),   # ratio 0.43: both flag
    (3, 7, 2.5, 1.0),   # 1.07: both accept
    (3, 7, 3.0, 1.0),   # 1.29: both accept
    (3, 7, 3.2, 1.0),   # 1.37: both flag
    (7, 3, 1.0, 2.0),   # 1.17: both accept
    (7, 3, 1.0, 1.0),   # 2.33: both flag
    (7, 3, 1.0, 2.5),   # 0.93: both flag
    (2, 5, 2.0, 0.75),  # 1.07: both accept
    (10, 3, 0.3, 1.0),  # 1.00 exactly: both accept
])
def test_kto_weight_ratio_agrees_with_trl_warning(n_d, n_u, w_d, w_u):
    """kto_weight_ratio_ok vs whether KTOTrainer._prepare_dataset's (exec'd) weight check warns, n_D ≠ n_U."""
    ok, _ = losses.kto_weight_ratio_ok(n_d, n_u, w_d, w_u)
    assert ok == (not kto_weight_warning([True] * n_d + [False] * n_u, w_d, w_u))


def test_kto_weight_ratio_known_differences_from_trl():
    """Documents where kto_weight_ratio_ok and TRL's warning part: equal counts, and TRL's 2-decimal bounds.

    TRL only checks when n_D ≠ n_U (λ_D = 1, λ_U = 2 on 5/5 examples gives no warning; ours says ratio 0.5 is out),
    and it rounds its bounds to 2 decimals with 1.33 for 4/3, so ratios within ~0.005 of the ends can differ:
    n = 3/7, λ_D = 2.33, λ_U = 1 is ratio 0.9986, below 1 for us, but TRL's lower bound round(7/3, 2) = 2.33 accepts it.
    """
    assert not kto_weight_warning([True] * 5 + [False] * 5, 1.0, 2.0)
    assert losses.kto_weight_ratio_ok(5, 5, 1.0, 2.0) == (False, 0.5)
    assert not kto_weight_warning([True] * 3 + [False] * 7, 2.33, 1.0)
    ok, ratio = losses.kto_weight_ratio_ok(3, 7, 2.33, 1.0)
    assert not ok and ratio == pytest.approx(0.99857, abs=1e-5)


# ---------------------------------------------------------------------------------------------------------- GRPO

@pytest.fixture
def rollout():
    """6 completions with ragged masks; current, old (≠ current, so the clip binds) and reference per-token logps."""
    g = torch.Generator().manual_seed(4)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0],
                         [1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
    old = -2 * torch.rand(6, 6, generator=g)
    policy = (old + 0.3 * torch.randn(6, 6, generator=g)).requires_grad_()
    ref = old + 0.2 * torch.randn(6, 6, generator=g)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5, 0.7, -0.2])
    return mask, policy, old, ref, adv


def grpo_trl(rollout, loss_type, bias_correction_kl=False, ga=1, steps_per_generation=1, num_items=None,
             level="token", epsilon_low=0.2, epsilon_high=0.28):
    """GRPOTrainer._compute_loss on the rollout (β = 0.04, ε = 0.2/0.28, max_completion_length 8) → (loss, self)."""
    from trl import GRPOTrainer

    mask, policy, old, ref, adv = rollout
    s = rl_self(GRPOTrainer, loss_type=loss_type, beta=0.04, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                importance_sampling_level=level, current_gradient_accumulation_steps=ga, max_completion_length=8)
    s.args = SimpleNamespace(use_bias_correction_kl=bias_correction_kl, delta=None,
                             steps_per_generation=steps_per_generation, gradient_checkpointing_kwargs=None)
    ids, inputs = rl_inputs(mask, advantages=adv, old_per_token_logps=old, ref_per_token_logps=ref,
                            num_items_in_batch=torch.tensor(float(mask.sum()) if num_items is None else num_items))
    return GRPOTrainer._compute_loss(s, FusedLM([(ids, policy)]), inputs), s


@pytest.mark.parametrize("loss_type, ga, spg, num_items", [
    ("grpo", 1, 1, None), ("bnpo", 1, 1, None), ("dr_grpo", 1, 1, None), ("dapo", 1, 1, None),
    ("dapo", 2, 4, 60.0),  # a generation batch of 60 tokens feeding 4 micro-batches, 2 per optimizer step
])
def test_grpo_matches_trl(rollout, loss_type, ga, spg, num_items):
    """grpo_loss vs GRPOTrainer._compute_loss (use_bias_correction_kl=False): loss, grads, clipfrac and kl stats.

    dapo's normaliser: our batch_tokens = TRL's num_items_in_batch / num_processes · GA / steps_per_generation
    (the generation batch's tokens over the optimizer steps it feeds). grpo/bnpo/dr_grpo run with GA = 1 (TRL divides
    those by GA itself; we leave that to the caller)."""
    mask, policy, old, ref, adv = rollout
    trl_loss, s = grpo_trl(rollout, loss_type, ga=ga, steps_per_generation=spg, num_items=num_items)
    batch_tokens = (float(mask.sum()) if num_items is None else num_items) / 1 * ga / spg
    ours, stats = losses.grpo_loss(policy, old, ref, adv, mask, 0.2, 0.28, 0.04, loss_type,
                                   max_completion_length=8, batch_tokens=batch_tokens)
    assert ours.item() == pytest.approx(trl_loss.item(), abs=TOL)
    assert torch.allclose(grads(ours, policy)[0], grads(trl_loss, policy)[0], atol=TOL)
    m = last_metrics(s)
    assert 0 < stats["clipfrac"] < 1  # the clip binds on some tokens, not all
    assert stats["clipfrac"] == pytest.approx(m["clip_ratio/region_mean"], abs=TOL)
    assert stats["kl"] == pytest.approx(m["kl"], abs=TOL)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_gspo_matches_trl_sequence_level(rollout, loss_type):
    """GSPO = grpo_loss(level="sequence") vs GRPOTrainer._compute_loss with importance_sampling_level="sequence":
    loss and grads (grpo: TRL's GSPO recipe; dapo: the length-weighted form TRL warns about, same arithmetic).
    ε = 0.05/0.07, so that the sequence ratios (means of token ratios, closer to 1) are clipped on some rows."""
    mask, policy, old, ref, adv = rollout
    trl_loss, s = grpo_trl(rollout, loss_type, level="sequence", epsilon_low=0.05, epsilon_high=0.07)
    ours, stats = losses.grpo_loss(policy, old, ref, adv, mask, 0.05, 0.07, 0.04, loss_type, max_completion_length=8,
                                   batch_tokens=float(mask.sum()), level="sequence")
    assert ours.item() == pytest.approx(trl_loss.item(), abs=TOL)
    assert torch.allclose(grads(ours, policy)[0], grads(trl_loss, policy)[0], atol=TOL)
    assert 0 < stats["clipfrac"] < 1
    token_level, _ = losses.grpo_loss(policy, old, ref, adv, mask, 0.05, 0.07, 0.04, loss_type, max_completion_length=8,
                                      batch_tokens=float(mask.sum()))
    assert abs(token_level.item() - ours.item()) > 1e-3  # the sequence ratio is not the token one on these inputs


@pytest.mark.parametrize("ga, spg, num_items", [(1, 1, None), (2, 4, 60.0)])
def test_cispo_matches_trl(rollout, ga, spg, num_items):
    """cispo_loss vs GRPOTrainer._compute_loss with loss_type="cispo" (ε_max = epsilon_high = 1.2, so some weights are
    capped): loss, grads and TRL's cispo_clip_ratio; the normaliser as dapo's."""
    mask, policy, old, ref, adv = rollout
    trl_loss, s = grpo_trl(rollout, "cispo", ga=ga, steps_per_generation=spg, num_items=num_items, epsilon_high=1.2)
    batch_tokens = (float(mask.sum()) if num_items is None else num_items) * ga / spg
    ours, stats = losses.cispo_loss(policy, old, ref, adv, mask, 1.2, 0.04, "dapo", batch_tokens=batch_tokens)
    assert ours.item() == pytest.approx(trl_loss.item(), abs=TOL)
    assert torch.allclose(grads(ours, policy)[0], grads(trl_loss, policy)[0], atol=TOL)
    assert 0 < stats["clipfrac"] < 1
    assert stats["clipfrac"] == pytest.approx(last_metrics(s)["cispo_clip_ratio"], abs=TOL)


def test_grpo_bias_corrected_kl_is_a_known_difference(rollout):
    """TRL's default use_bias_correction_kl=True weighs k3 by the (undetached) ratio r; ours is textbook k3.

    The gap is exactly β · aggregate((r − 1) · k3): here −6.7e-4 on a loss of −0.2183 (grpo); gradients differ too."""
    mask, policy, old, ref, adv = rollout
    corrected, _ = grpo_trl(rollout, "grpo", bias_correction_kl=True)
    ours, _ = losses.grpo_loss(policy, old, ref, adv, mask, 0.2, 0.28, 0.04, "grpo")
    gap = 0.04 * losses.aggregate_tokens((torch.exp(policy - old) - 1) * losses.kl_k3(policy, ref), mask, "grpo")
    assert abs(corrected.item() - ours.item()) > 1e-4
    assert corrected.item() - ours.item() == pytest.approx(gap.item(), abs=TOL)
    assert not torch.allclose(grads(ours, policy)[0], grads(corrected, policy)[0], atol=TOL)


NAN = float("nan")


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl(scale):
    """group_advantages vs GRPOTrainer's inline advantage block (exec'd), rewards with NaN (no reward) rows.

    Groups of 4: full, one NaN, all equal, a single scored reward, all NaN. TRL marks unscorable rows NaN, keeps
    them out of the nan-aware mean/std and zeroes their advantage after; ours gives the same, 0 on those rows."""
    g = torch.Generator().manual_seed(5)
    rewards = torch.randn(20, generator=g)
    rewards[5] = NAN
    rewards[8:12] = 0.5
    rewards[13:] = NAN
    trl_adv = grpo_advantages(rewards, 4, scale)
    ours = advantages.group_advantages(rewards, 4, scale)
    assert torch.allclose(ours, trl_adv, atol=TOL)
    assert ours[rewards.isnan()].eq(0).all() and ours[:4].abs().min() > 0.05


# ---------------------------------------------------------------------------------------------------------- RLOO

@pytest.fixture
def rloo_batch():
    """4 prompts × 4 completions: rewards, ragged masks, per-token logps at sampling time (old) and of the reference."""
    g = torch.Generator().manual_seed(6)
    mask = (torch.rand(16, 5, generator=g) > 0.3).long()
    mask[:, 0] = 1
    old = -2 * torch.rand(16, 5, generator=g)
    ref = old + 0.3 * torch.randn(16, 5, generator=g)
    return torch.randn(16, generator=g), mask, old, ref


def our_rloo_advantages(rewards, mask, old, ref, norm):
    r = advantages.rewards_with_kl(rewards, (old * mask).sum(1), (ref * mask).sum(1), 0.05)
    return advantages.leave_one_out_advantages(r, 4, normalize_batch=norm)


@pytest.mark.parametrize("norm", [False, True])
def test_rloo_advantages_match_trl(rloo_batch, norm):
    """rewards_with_kl (k1 summed, β = 0.05) → leave_one_out_advantages (normalised or not) vs RLOOTrainer's block."""
    rewards, mask, old, ref = rloo_batch
    trl_adv = rloo_advantages(rewards, 4, 0.05, old, ref, mask, normalize_advantages=norm)
    ours = our_rloo_advantages(rewards, mask, old, ref, norm)
    assert torch.allclose(ours, trl_adv, atol=TOL)
    without_kl = rloo_advantages(rewards, 4, 0.0, old, ref, mask, normalize_advantages=norm)
    assert not torch.allclose(without_kl, trl_adv, atol=1e-3)  # the KL term matters on these inputs


def test_rloo_advantages_with_no_reward_rows(rloo_batch):
    """RLOO with no-reward rows vs TRL, normalised or not: rows without a reward or without a scored sibling
    get 0 and stay out of the normalisation statistics (counting them as zeros shrank the std from 0.571 to
    0.361 on this batch and gave a largest |advantage| of 2.952 instead of TRL's 1.867)."""
    rewards, mask, old, ref = rloo_batch
    rewards = rewards.clone()
    rewards[5] = NAN
    rewards[9:12] = NAN  # one scored completion left in this group: no baseline, A = 0
    rewards[12:] = NAN
    trl_plain = rloo_advantages(rewards, 4, 0.05, old, ref, mask, normalize_advantages=False)
    assert torch.allclose(our_rloo_advantages(rewards, mask, old, ref, False), trl_plain, atol=TOL)

    trl_norm = rloo_advantages(rewards, 4, 0.05, old, ref, mask, normalize_advantages=True)
    ours = our_rloo_advantages(rewards, mask, old, ref, True)
    assert trl_norm.abs().max().item() == pytest.approx(1.867, abs=1e-3)
    assert torch.allclose(ours, trl_norm, atol=TOL)
    assert (ours[12:] == 0).all()


def test_rloo_loss_matches_trl(rloo_batch):
    """rloo_loss (per-sequence, mean taken here) vs RLOOTrainer._compute_loss: loss, grads, clipped share."""
    from trl import RLOOTrainer

    _, mask, old, _ = rloo_batch
    g = torch.Generator().manual_seed(7)
    policy = (old + 0.15 * torch.randn(16, 5, generator=g)).requires_grad_()
    adv = torch.randn(16, generator=g)
    old_seq = (old * mask).sum(1)
    s = rl_self(RLOOTrainer, epsilon_low=0.2, epsilon_high=0.28)
    ids, inputs = rl_inputs(mask, old_logps=old_seq, advantages=adv)
    trl_loss = RLOOTrainer._compute_loss(s, FusedLM([(ids, policy)]), inputs)

    per_seq, clipped = losses.rloo_loss((policy * mask).sum(1), old_seq, adv, 0.2, 0.28)
    ours = per_seq.mean()
    assert ours.item() == pytest.approx(trl_loss.item(), abs=TOL)
    assert torch.allclose(grads(ours, policy)[0], grads(trl_loss, policy)[0], atol=TOL)
    assert 0 < clipped.mean().item() < 1
    assert clipped.mean().item() == pytest.approx(last_metrics(s)["clip_ratio/region_mean"], abs=TOL)


# ------------------------------------------------------------------------------------------------ SimPO and ORPO

def chosen_rejected_logits(equal_lengths: bool):
    """3 chosen + 3 rejected sequences of 7 positions over a 11-token vocabulary: logits [6, 7, 11], labels with -100
    on the 2-token prompt and the padding (ragged completions unless equal_lengths) → (logits, labels, our per-token
    log-probs [6, 6] and completion mask [6, 6] in the shifted frame TRL uses)."""
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(6, 7, 11, generator=g).requires_grad_()
    labels = torch.randint(0, 11, (6, 7), generator=g)
    labels[:, :2] = -100
    lengths = [5] * 6 if equal_lengths else [5, 3, 4, 2, 5, 1]
    for i, n in enumerate(lengths):
        labels[i, 2 + n:] = -100
    target = labels[:, 1:]
    mask = (target != -100).float()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1) * mask
    return logits, labels, logps, mask


def test_simpo_matches_trl_cpo_trainer():
    """simpo_loss vs CPOTrainer (loss_type="simpo", cpo_alpha 0 so no NLL term) from the same logits: TRL's own
    get_batch_logps(average_log_prob=True) and cpo_loss; loss, grads w.r.t. the logits, rewards."""
    from trl.experimental.cpo import CPOTrainer

    logits, labels, logps, mask = chosen_rejected_logits(equal_lengths=False)
    avg = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    s = trainer_self(alpha=0.0, loss_type="simpo", simpo_gamma=1.0, beta=2.0, label_smoothing=0.1)
    trl_losses, trl_c, trl_r = CPOTrainer.cpo_loss(s, avg[:3], avg[3:])
    seq, lengths = logps.sum(-1), mask.sum(-1)
    ours, r_c, r_r = losses.simpo_loss(seq[:3], seq[3:], lengths[:3], lengths[3:], 2.0, 1.0, label_smoothing=0.1)
    assert torch.allclose(ours, trl_losses, atol=TOL)
    assert torch.allclose(grads(ours.mean(), logits)[0], grads(trl_losses.mean(), logits)[0], atol=TOL)
    assert torch.allclose(r_c, trl_c, atol=TOL) and torch.allclose(r_r, trl_r, atol=TOL)


@pytest.mark.parametrize("equal_lengths", [True, False])
def test_orpo_matches_trl_orpo_trainer(equal_lengths):
    """orpo_loss vs ORPOTrainer from the same logits: its get_batch_logps(average_log_prob=True), odds_ratio_loss
    and, for the SFT term, the cross-entropy over the chosen completions' tokens its concatenated_forward takes.
    The odds-ratio term and the rewards always match; the SFT term matches when the chosen completions have equal
    lengths. With ragged ones TRL's token mean over the batch weighs long completions more than our per-pair mean
    (the paper's form)."""
    from trl.experimental.orpo import ORPOTrainer

    logits, labels, logps, mask = chosen_rejected_logits(equal_lengths)
    avg = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    s = trainer_self(beta=0.1)
    trl_or, trl_c, trl_r, _, _ = ORPOTrainer.odds_ratio_loss(s, avg[:3], avg[3:])
    nll = torch.nn.functional.cross_entropy(logits[:3, :-1].reshape(-1, 11), labels[:3, 1:].reshape(-1),
                                            ignore_index=-100)
    trl_loss = nll - trl_or.mean()
    seq, lengths = logps.sum(-1), mask.sum(-1)
    per_pair, r_c, r_r = losses.orpo_loss(seq[:3], seq[3:], lengths[:3], lengths[3:], 0.1)
    ours = per_pair.mean()
    odds_term = per_pair + seq[:3] / lengths[:3]  # ours without its SFT term: −λ log σ(log odds ratio)
    assert torch.allclose(odds_term, -trl_or, atol=TOL)
    assert torch.allclose(r_c, trl_c, atol=TOL) and torch.allclose(r_r, trl_r, atol=TOL)
    if equal_lengths:
        assert ours.item() == pytest.approx(trl_loss.item(), abs=TOL)
        assert torch.allclose(grads(ours, logits)[0], grads(trl_loss, logits)[0], atol=TOL)
    else:
        assert abs(ours.item() - trl_loss.item()) > 1e-3


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_generalized_jsd_matches_trl_gkd_trainer(beta):
    """Distillation's jsd divergence against GKDTrainer.generalized_jsd_loss on the same logits: TRL's mean over
    unmasked positions is our dapo aggregation over one batch's tokens (values and gradients)."""
    from trl.experimental.gkd import GKDTrainer

    g = torch.Generator().manual_seed(0)
    student = torch.randn(3, 5, 11, generator=g, requires_grad=True)
    teacher = torch.randn(3, 5, 11, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    labels = torch.where(mask.bool(), torch.zeros_like(mask), torch.full_like(mask, -100))
    theirs = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta)
    per_token = losses.generalized_jsd(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1), beta)
    ours = losses.aggregate_tokens(per_token, mask, "dapo", batch_tokens=float(mask.sum()))
    assert ours.item() == pytest.approx(theirs.item(), abs=TOL)
    for a, b in zip(grads(ours, student), grads(theirs, student)):
        assert (a - b).abs().max() < TOL
