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
