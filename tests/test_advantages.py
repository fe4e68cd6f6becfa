"""Advantage estimators against values worked out by hand."""

import math

import pytest
import torch

from stages.core import advantages as adv

T = torch.tensor
nan = float("nan")


def test_group_advantages_by_hand():
    """Group [1, 0, 0, 1]: mean 0.5, unbiased std = sqrt(4·0.25/3) = 0.5773503;
    A = ±0.5/(0.5773503 + 1e-4) = ±0.8658753. An all-equal group gets 0."""
    a = adv.group_advantages(T([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]), 4)
    assert a[:4].tolist() == pytest.approx([0.8658753, -0.8658753, -0.8658753, 0.8658753], abs=1e-6)
    assert a[4:].tolist() == [0.0] * 4


def test_group_advantages_batch_and_none_scaling():
    """Rewards [1, 0 | 3, 1]: group means 0.5 and 2 → centred [0.5, −0.5, 1, −1].
    none: those. batch: divided by the std of all four, sqrt(((1−1.25)² + 1.25² + 1.75² + 0.25²)/3) = 1.2583057."""
    r = T([1.0, 0.0, 3.0, 1.0])
    assert adv.group_advantages(r, 2, "none").tolist() == [0.5, -0.5, 1.0, -1.0]
    std = math.sqrt((0.25**2 + 1.25**2 + 1.75**2 + 0.25**2) / 3)
    expect = [x / (std + 1e-4) for x in (0.5, -0.5, 1.0, -1.0)]
    assert adv.group_advantages(r, 2, "batch").tolist() == pytest.approx(expect, abs=1e-6)


def test_no_reward_is_excluded_not_zero():
    """[1, NaN, 0, 1]: statistics over the three scored: mean 2/3, std sqrt(((1/3)²·2 + (2/3)²)/2) = 0.5773503.
    The NaN row gets A = 0; a 0 reward would have moved the mean to 0.5."""
    a = adv.group_advantages(T([1.0, nan, 0.0, 1.0]), 4)
    assert a.tolist() == pytest.approx([(1 / 3) / 0.5774503, 0.0, (-2 / 3) / 0.5774503, (1 / 3) / 0.5774503], abs=1e-5)


def test_leave_one_out_by_hand():
    """[1, 0, 0, 1]: b_i = (2 − r_i)/3 → A = 1 − 1/3 = 2/3 for the ones, 0 − 2/3 for the zeros.
    With a NaN: [1, NaN, 0, 1] over 3 scored: A(1) = 1 − (2 − 1)/2 = 0.5, A(0) = 0 − 2/2 = −1, A(NaN) = 0."""
    assert adv.leave_one_out_advantages(T([1.0, 0.0, 0.0, 1.0]), 4).tolist() == pytest.approx(
        [2 / 3, -2 / 3, -2 / 3, 2 / 3])
    assert adv.leave_one_out_advantages(T([1.0, nan, 0.0, 1.0]), 4).tolist() == pytest.approx([0.5, 0.0, -1.0, 0.5])


def test_kl_in_reward_by_hand():
    """r = 1, logp_old − logp_ref = 2 (summed), β = 0.05 → 1 − 0.1 = 0.9."""
    assert adv.rewards_with_kl(T([1.0]), T([-3.0]), T([-5.0]), 0.05).item() == pytest.approx(0.9)


def test_gae_by_hand():
    """r = [0, 0, 1], V = [0.5, 0.6, 0.7], γ = 1, λ = 0.95:
    δ2 = 1 − 0.7 = 0.3 → Â2 = 0.3; δ1 = 0.7 − 0.6 = 0.1 → Â1 = 0.1 + 0.95·0.3 = 0.385;
    δ0 = 0.6 − 0.5 = 0.1 → Â0 = 0.1 + 0.95·0.385 = 0.46575; returns Â + V = [0.96575, 0.985, 1.0].
    A padded fourth token changes nothing and stays 0."""
    a, ret = adv.gae(T([[0.0, 0.0, 1.0, 5.0]]), T([[0.5, 0.6, 0.7, 9.0]]), T([[1, 1, 1, 0]]), 1.0, 0.95)
    assert a.tolist()[0] == pytest.approx([0.46575, 0.385, 0.3, 0.0])
    assert ret.tolist()[0] == pytest.approx([0.96575, 0.985, 1.0, 0.0])


def test_whiten():
    """[1, 2, 3] (4th masked): mean 2, unbiased var 1 → [−1, 0, 1].
    [2, 4, 6]: mean 4, unbiased var 4 → [−1, 0, 1]; without the shift the mean is put back: [3, 4, 5]."""
    x, m = T([[1.0, 2.0, 3.0, 100.0]]), T([[1, 1, 1, 0]])
    assert adv.whiten(x, m)[0, :3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)
    x2 = T([[2.0, 4.0, 6.0, 100.0]])
    assert adv.whiten(x2, m)[0, :3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)
    assert adv.whiten(x2, m, shift_mean=False)[0, :3].tolist() == pytest.approx([3.0, 4.0, 5.0], abs=1e-6)


def test_whiten_with_nothing_scored_is_zero_not_nan():
    """A rollout where every completion had no reward leaves an all-zero mask: no signal, 0 advantages."""
    assert adv.whiten(T([[1.0, 2.0]]), T([[0, 0]])).tolist() == [[0.0, 0.0]]


def test_reinforce_pp_by_hand():
    """R = 1, 0; per-token k1 KL 0.1, 0.2, 0.3 and 0.5, −0.5 (the second has 2 tokens); β = 0.1. Token rewards
    −0.01, −0.02, −0.03 + 1 and −0.05, +0.05 + 0; returns Σ_{s≥t}: 0.94, 0.95, 0.97 and 0.0, 0.05. Over the 5 valid
    tokens: mean 0.582, std (n − 1) 0.5088910 → 0.7034906, 0.7231412, 0.7624423, −1.1436635, −1.0454106."""
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, -0.5, 9.0]])  # 9 sits on padding
    a = adv.reinforce_pp_advantages(torch.tensor([1.0, 0.0]), mask, kl, beta=0.1)
    expected = [[0.7034906, 0.7231412, 0.7624423], [-1.1436635, -1.0454106, 0.0]]
    assert torch.allclose(a, torch.tensor(expected), atol=1e-5)


def reinforce_pp_reference(rewards, masks, kls, beta, group):
    """REINFORCE++ from the paper's equations in plain Python (lists, loops), independent of the tensor code."""
    if group:
        base = []
        for i in range(0, len(rewards), group):
            g = rewards[i:i + group]
            base += [r - sum(g) / len(g) for r in g]
        rewards = base
    returns = []
    for r, m, k in zip(rewards, masks, kls):
        n = int(sum(m))
        step_rewards = [-beta * k[t] + (r if t == n - 1 else 0.0) for t in range(n)]
        returns.append([sum(step_rewards[t:]) for t in range(n)])
    flat = [g for row in returns for g in row]
    mean = sum(flat) / len(flat)
    std = (sum((g - mean) ** 2 for g in flat) / (len(flat) - 1)) ** 0.5
    return [[(g - mean) / std for g in row] + [0.0] * (len(m) - len(row)) for row, m in zip(returns, masks)]


@pytest.mark.parametrize("group", [None, 4])
def test_reinforce_pp_matches_the_papers_equations(group):
    """8 completions of ragged lengths, random rewards and KLs: the tensor code equals the plain-Python one
    (plain REINFORCE++ and the group-mean baseline)."""
    g = torch.Generator().manual_seed(3)
    lengths = [5, 3, 1, 4, 2, 5, 5, 3]
    mask = torch.tensor([[1.0] * n + [0.0] * (5 - n) for n in lengths])
    kl = torch.randn(8, 5, generator=g) * 0.3
    rewards = torch.rand(8, generator=g)
    ours = adv.reinforce_pp_advantages(rewards, mask, kl * mask, beta=0.05, group_size=group)
    ref = reinforce_pp_reference(rewards.tolist(), mask.tolist(), kl.tolist(), 0.05, group)
    assert torch.allclose(ours, torch.tensor(ref), atol=1e-5)


def test_distill_by_hand():
    """Student log-probs −1, −2 | −0.5 (second row: one token), teacher −1.5, −1 | −0.5; coef 2. Per-token
    reverse-KL samples d = 0.5, −1, 0; batch mean −1/6; A = −2·(d + 1/6) = −4/3, 5/3, −1/3, 0 on padding."""
    student = torch.tensor([[-1.0, -2.0], [-0.5, -7.0]])
    teacher = torch.tensor([[-1.5, -1.0], [-0.5, 3.0]])  # the padding's values must not count
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    a = adv.distill_advantages(student, teacher, mask, coef=2.0)
    assert torch.allclose(a, torch.tensor([[-4 / 3, 5 / 3], [-1 / 3, 0.0]]), atol=1e-6)


def distill_reference(student, teacher, masks, coef):
    """tinker-cookbook's incorporate_kl_penalty (on-policy distillation, discount 0) in plain Python: each
    token's advantage coef·(avg_diff − diff), diff = logp_student − logp_teacher, avg over every valid token."""
    diffs = [[(s - t) * m for s, t, m in zip(rs, rt, rm)] for rs, rt, rm in zip(student, teacher, masks)]
    avg = sum(map(sum, diffs)) / sum(map(sum, masks))
    return [[coef * m * (avg - d) for d, m in zip(rd, rm)] for rd, rm in zip(diffs, masks)]


def test_distill_matches_the_cookbooks_formula():
    g = torch.Generator().manual_seed(5)
    mask = torch.tensor([[1.0] * n + [0.0] * (6 - n) for n in [6, 2, 4, 1, 5, 3]])
    student, teacher = -torch.rand(6, 6, generator=g) * 3, -torch.rand(6, 6, generator=g) * 3
    ours = adv.distill_advantages(student, teacher, mask, coef=0.7)
    ref = distill_reference(student.tolist(), teacher.tolist(), mask.tolist(), 0.7)
    assert torch.allclose(ours, torch.tensor(ref), atol=1e-6)
