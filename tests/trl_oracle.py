"""Calling TRL 1.16's own loss code on hand-made tensors, as an oracle for our pure functions.

TRL's trainers compute losses inside methods that read a few attributes of `self` and get per-token
log-probs from `model(..., labels=..., fused_lm_head=True).log_probs`. We call those methods unbound
with a namespace as `self` and a stand-in model whose fused head returns the log-probs we choose, so
TRL's arithmetic runs on exactly our inputs. Pinned to trl==1.16.0 (pyproject's dev extra): these are
private methods and may move.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from types import SimpleNamespace

import torch


def accelerator():
    """A single-process accelerate.Accelerator stand-in: gathers and reductions are identities."""
    return SimpleNamespace(
        device=torch.device("cpu"), num_processes=1, process_index=0, is_main_process=True, sync_gradients=True,
        gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=lambda x, reduction="sum": x,
        autocast=contextlib.nullcontext, unwrap_model=lambda m: m,
    )


def trainer_self(**attrs) -> SimpleNamespace:
    """What every TRL 1.16 loss method reads from `self`, plus the method-specific `attrs`."""
    placeholder = torch.nn.Module()  # accelerate.is_peft_model inspects ._modules
    placeholder.is_gradient_checkpointing = False
    ns = SimpleNamespace(
        accelerator=accelerator(), _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        aux_loss_enabled=False, _total_train_tokens=0, _tp_size=1, model=placeholder, ref_model=None,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
    )
    for k, v in attrs.items():
        setattr(ns, k, v)
    return ns


class FusedLM(torch.nn.Module):
    """A causal LM stand-in whose fused head returns given per-token log-probs.

    routes: [(input_ids, token_logps [B, C])]; the call whose input_ids match a route gets its
    log-probs, placed on the last C positions (the completion) and zeroed where labels are -100.
    """

    def __init__(self, routes):
        super().__init__()
        self.routes = routes
        self.is_gradient_checkpointing = False

    def forward(self, input_ids=None, labels=None, fused_lm_head=False, **_):
        from trl.trainer.utils import FusedCausalLMOutput

        assert fused_lm_head, "TRL 1.16 asks for the fused head"
        (lp,) = [lp for ids, lp in self.routes if ids.shape == input_ids.shape and torch.equal(ids, input_ids)]
        width = input_ids.shape[1] - 1
        lp = torch.nn.functional.pad(lp, (width - lp.shape[1], 0))  # [B, L-1] aligned with labels[:, 1:]
        valid = labels[:, 1:] != -100
        zeros = torch.zeros_like(lp)
        return FusedCausalLMOutput(loss=None, log_probs=torch.where(valid, lp, zeros), entropy=zeros,
                                   log_sum_sq_probs=None, mean_logits=zeros.detach(), is_top1=torch.zeros_like(valid),
                                   label_mask=valid, aux_loss=None)


def layout(completion_mask: torch.Tensor, offset: int = 0):
    """TRL inputs for completions with the given mask [B, C] after a one-token prompt:
    (input_ids, attention_mask, completion_mask), each [B, 1+C]; `offset` makes ids distinct."""
    b, c = completion_mask.shape
    cm = torch.cat([torch.zeros(b, 1, dtype=torch.long), completion_mask.long()], 1)
    am = torch.cat([torch.ones(b, 1, dtype=torch.long), completion_mask.long()], 1)
    ids = torch.arange(b * (1 + c)).view(b, 1 + c) + 1 + offset
    return ids, am, cm
