"""PPO pieces (GAE, whitening, clipped policy and value losses, k1/k3) against plain-Python textbook references.

TRL 1.16 has no PPO trainer, so the references here are written from the formulas (Schulman et al. 2016 for GAE,
2017 for the clipped losses, Schulman 2020 for k1/k3): for-loops over Python floats, no torch ops, on random ragged
batches (trailing padding) for several seeds. Gradients are checked against the formulas' analytic derivatives.
"""

import math

import pytest
import torch

from stages.core import advantages, losses

SEEDS = [0, 1, 2, 3]
TOL = 1e-5


def ragged(seed: int, b: int = 5, t: int = 7):
    """A generator and a [b, t] trailing-padding mask with one full row, one 1-token row and random lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0], lengths[1] = t, 1
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    return g, mask


def rows(x: torch.Tensor) -> list[list[float]]:
    return x.tolist()


def valid(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(row, position) of every unmasked token, in order."""
    return [(i, j) for i, row in enumerate(mask.tolist()) for j, m in enumerate(row) if m]


def assert_close_at(ours: torch.Tensor, ref: list[list[float]], where: list[tuple[int, int]], tol: float = TOL):
    got = ours.tolist()
    for i, j in where:
        assert got[i][j] == pytest.approx(ref[i][j], abs=tol, rel=tol), (i, j)


# ------------------------------------------------------------------------------------------- textbook references

def ref_gae(rewards, values, mask, gamma, lam):
    """Per sequence over its valid tokens: δ_t = r_t + γV_{t+1} − V_t (V after the last valid token is 0),
    Â_t = δ_t + γλÂ_{t+1}, R_t = Â_t + V_t; 0 on padding."""
    adv = [[0.0] * len(row) for row in mask]
    ret = [[0.0] * len(row) for row in mask]
    for i, row in enumerate(mask):
        n = sum(row)
        following = 0.0
        for t in range(n - 1, -1, -1):
            next_value = values[i][t + 1] if t + 1 < n else 0.0
            delta = rewards[i][t] + gamma * next_value - values[i][t]
            following = delta + gamma * lam * following
            adv[i][t] = following
            ret[i][t] = following + values[i][t]
    return adv, ret


def ref_whiten(x, mask, shift_mean):
    """(x − mean)/sqrt(var + 1e-8) over the masked entries, var unbiased; mean added back if not shift_mean."""
    xs = [x[i][j] for i, row in enumerate(mask) for j, m in enumerate(row) if m]
    mean = sum(xs) / len(xs)
    var = sum((v - mean) ** 2 for v in xs) / (len(xs) - 1)
    scale = 1.0 / math.sqrt(var + 1e-8)
    return [[(v - mean) * scale + (0.0 if shift_mean else mean) for v in row] for row in x]


def ref_policy_loss(logps, old_logps, adv, mask, eps):
    """masked mean of max(−Â r, −Â clip(r, 1−ε, 1+ε)), r = exp(logp − logp_old) → (loss, clipfrac, d loss/d logp)."""
    n = sum(map(sum, mask))
    total, clipped = 0.0, 0
    grad = [[0.0] * len(row) for row in mask]
    for i, row in enumerate(mask):
        for t, m in enumerate(row):
            if not m:
                continue
            r = math.exp(logps[i][t] - old_logps[i][t])
            a = adv[i][t]
            unclipped_term, clipped_term = -a * r, -a * min(max(r, 1 - eps), 1 + eps)
            total += max(unclipped_term, clipped_term)
            if clipped_term > unclipped_term:
                clipped += 1  # clip(r) is constant there: no gradient
            else:
                grad[i][t] = -a * r / n
    return total / n, clipped / n, grad


def ref_value_loss(values, old_values, returns, mask, eps_v):
    """0.5 · masked mean of max((V − R)², (clip(V, V_old − ε_v, V_old + ε_v) − R)²) → (loss, clipfrac, d loss/d V)."""
    n = sum(map(sum, mask))
    total, clipped = 0.0, 0
    grad = [[0.0] * len(row) for row in mask]
    for i, row in enumerate(mask):
        for t, m in enumerate(row):
            if not m:
                continue
            v, v_old, ret = values[i][t], old_values[i][t], returns[i][t]
            v_clipped = min(max(v, v_old - eps_v), v_old + eps_v)
            err, err_clipped = (v - ret) ** 2, (v_clipped - ret) ** 2
            total += max(err, err_clipped)
            if err_clipped > err:
                clipped += 1
                if v_old - eps_v < v < v_old + eps_v:
                    grad[i][t] = (v_clipped - ret) / n
            else:
                grad[i][t] = (v - ret) / n
    return 0.5 * total / n, clipped / n, grad


def ref_k1(logp, ref):
    return logp - ref


def ref_k3(logp, ref):
    return math.exp(ref - logp) - (ref - logp) - 1


# ------------------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_matches_textbook(seed, gamma, lam):
    """advantages.gae vs the textbook recursion per sequence: advantages and returns on valid tokens, 0 on padding."""
    g, mask = ragged(seed)
    rewards = torch.randn(mask.shape, generator=g)  # padding holds garbage that must be ignored
    values = torch.randn(mask.shape, generator=g)
    adv, ret = advantages.gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = ref_gae(rows(rewards), rows(values), rows(mask), gamma, lam)
    everywhere = [(i, j) for i in range(mask.shape[0]) for j in range(mask.shape[1])]
    assert_close_at(adv, ref_adv, everywhere)
    assert_close_at(ret, ref_ret, everywhere)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_textbook(seed, shift_mean):
    """advantages.whiten vs (x − mean)/sqrt(var_unbiased + 1e-8) over masked entries (+ mean if not shift_mean).

    Compared on the masked entries only: whiten also transforms padding positions (it does not zero them)."""
    g, mask = ragged(seed)
    x = 3 * torch.randn(mask.shape, generator=g) + 1.5
    ours = advantages.whiten(x, mask, shift_mean=shift_mean)
    assert_close_at(ours, ref_whiten(rows(x), rows(mask), shift_mean), valid(mask))


@pytest.mark.parametrize("seed", SEEDS)
def test_ppo_policy_loss_matches_textbook(seed):
    """losses.ppo_policy_loss vs the textbook clipped surrogate: loss, clipfrac, gradient w.r.t. logps (ε = 0.2)."""
    g, mask = ragged(seed)
    old = -2 * torch.rand(mask.shape, generator=g)
    logps = (old + 0.3 * torch.randn(mask.shape, generator=g)).requires_grad_()
    adv = torch.randn(mask.shape, generator=g)
    loss, clipfrac = losses.ppo_policy_loss(logps, old, adv, mask, 0.2)
    ref_loss, ref_clipfrac, ref_grad = ref_policy_loss(rows(logps.detach()), rows(old), rows(adv), rows(mask), 0.2)
    assert 0 < ref_clipfrac < 1  # both branches are exercised
    assert loss.item() == pytest.approx(ref_loss, abs=TOL)
    assert clipfrac == pytest.approx(ref_clipfrac, abs=TOL)
    (grad,) = torch.autograd.grad(loss, logps)
    assert_close_at(grad, ref_grad, [(i, j) for i in range(mask.shape[0]) for j in range(mask.shape[1])])


@pytest.mark.parametrize("seed", SEEDS)
def test_ppo_value_loss_matches_textbook(seed):
    """losses.ppo_value_loss vs 0.5·masked mean of max((V−R)², (clip(V, V_old ± ε_v)−R)²): loss, clipfrac, d/dV."""
    g, mask = ragged(seed)
    old_values = torch.randn(mask.shape, generator=g)
    values = (old_values + 0.5 * torch.randn(mask.shape, generator=g)).requires_grad_()
    returns = old_values + 0.5 * torch.randn(mask.shape, generator=g)
    loss, clipfrac = losses.ppo_value_loss(values, old_values, returns, mask, 0.2)
    ref_loss, ref_clipfrac, ref_grad = ref_value_loss(rows(values.detach()), rows(old_values), rows(returns),
                                                      rows(mask), 0.2)
    assert 0 < ref_clipfrac < 1
    assert loss.item() == pytest.approx(ref_loss, abs=TOL)
    assert clipfrac == pytest.approx(ref_clipfrac, abs=TOL)
    (grad,) = torch.autograd.grad(loss, values)
    assert_close_at(grad, ref_grad, [(i, j) for i in range(mask.shape[0]) for j in range(mask.shape[1])])


@pytest.mark.parametrize("seed", SEEDS)
def test_kl_estimators_match_textbook(seed):
    """losses.kl_k1 / kl_k3 vs logp − logp_ref and exp(d) − d − 1 (d = logp_ref − logp), values and d/d logp."""
    g, mask = ragged(seed)
    ref = -2 * torch.rand(mask.shape, generator=g)
    logps = (ref + 0.5 * torch.randn(mask.shape, generator=g)).requires_grad_()
    everywhere = [(i, j) for i in range(mask.shape[0]) for j in range(mask.shape[1])]
    lp, rf = rows(logps.detach()), rows(ref)
    for ours_fn, ref_fn, ref_grad_fn in [
        (losses.kl_k1, ref_k1, lambda a, b: 1.0),
        (losses.kl_k3, ref_k3, lambda a, b: 1.0 - math.exp(b - a)),
    ]:
        ours = ours_fn(logps, ref)
        assert_close_at(ours, [[ref_fn(a, b) for a, b in zip(x, y)] for x, y in zip(lp, rf)], everywhere)
        (grad,) = torch.autograd.grad(ours.sum(), logps)
        assert_close_at(grad, [[ref_grad_fn(a, b) for a, b in zip(x, y)] for x, y in zip(lp, rf)], everywhere)
    assert min(v for row in rows(losses.kl_k3(logps, ref)) for v in row) >= 0  # k3 is never negative
