"""Pieces of the online loops that need no model run: no-reward batches, the ratio's denominator, dropout."""

from types import SimpleNamespace

import torch

from stages.core import models
from stages.methods import online

T = torch.tensor


def test_rloo_loss_with_nothing_scored_is_zero_not_nan():
    """Every completion without a reward: the mask is all zero, the loss 0 with a (zero) gradient."""
    logps = T([[-1.0, -2.0], [-0.5, -0.5]], requires_grad=True)
    b = SimpleNamespace(mask=torch.zeros(2, 2), old_logps=None, engine=None)
    cfg = SimpleNamespace(epsilon=0.2, epsilon_high=0.2)
    loss, stats = online.rloo_loss(logps, b, torch.arange(2), T([1.0, -1.0]), cfg, None)
    loss.backward()
    assert loss.item() == 0.0 and stats["clipfrac"] == 0.0
    assert torch.equal(logps.grad, torch.zeros(2, 2))


def test_without_stored_old_logps_the_ratio_is_exactly_one():
    """One update per batch: the denominator is the detached current log-probs (TRL), so nothing clips
    and the gradient is A·∇logp: for A = [2] on one token, d loss / d logp = −2 (bnpo)."""
    logps = T([[-1.3]], requires_grad=True)
    b = SimpleNamespace(old_logps=None, ref_logps=None, mask=T([[1.0]]), engine=None)
    assert online.old_logps(logps, b, [0]).requires_grad is False
    cfg = SimpleNamespace(epsilon=0.2, epsilon_high=0.2, beta=0.0, loss_type="bnpo", max_new_tokens=1)
    loss, stats = online.grpo_loss(logps, b, [0], T([2.0]), cfg, 1.0)
    loss.backward()
    assert loss.item() == -2.0 and stats["clipfrac"] == 0.0 and logps.grad.item() == -2.0


def test_disable_dropout_makes_train_mode_deterministic():
    """A model with dropout (GPT-2 style, p = 0.5): two train-mode forwards differ until dropout is off."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                     resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    model = GPT2LMHeadModel(cfg).train()
    ids = torch.arange(8)[None]
    assert not torch.equal(model(ids).logits, model(ids).logits)
    models.disable_dropout(model)
    assert torch.equal(model(ids).logits, model(ids).logits)
