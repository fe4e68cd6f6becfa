"""Calling TRL 1.16's own loss code on hand-made tensors, as an oracle for our pure functions.

TRL's trainers compute losses inside methods that read a few attributes of `self` and get per-token
log-probs from `model(..., labels=..., fused_lm_head=True).log_probs`. We call those methods unbound
with a namespace as `self` and a stand-in model whose fused head returns the log-probs we choose, so
TRL's arithmetic runs on exactly our inputs. Pinned to trl==1.16.0 (pyproject's dev extra): these are
private methods and may move.
"""

from __future__ import annotations

import contextlib
import inspect
import textwrap
from collections import defaultdict
from types import MethodType, SimpleNamespace

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


def rl_self(trainer_cls, **attrs) -> SimpleNamespace:
    """`self` for GRPOTrainer/RLOOTrainer._compute_loss, with the trainer's real `_get_per_token_logps_and_entropies`
    bound to it, so per-token log-probs come from the FusedLM given as `model` through TRL's own slicing."""
    ns = trainer_self(top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False,
                      vllm_importance_sampling_correction=False, _entropy_bonus_enabled=False, **attrs)
    ns._get_per_token_logps_and_entropies = MethodType(trainer_cls._get_per_token_logps_and_entropies, ns)
    return ns


def rl_inputs(completion_mask: torch.Tensor, **extra):
    """GRPO/RLOO `inputs` for completions with the given mask [B, C] after a one-token prompt, and the input_ids
    [B, 1+C] that TRL will feed the model (the FusedLM route)."""
    ids, am, _ = layout(completion_mask)
    return ids, dict(prompt_ids=ids[:, :1], prompt_mask=am[:, :1], completion_ids=ids[:, 1:],
                     completion_mask=completion_mask.long(), **extra)


# --------------------------------------------------------------------- inline blocks of TRL's installed source
# Some of TRL's arithmetic is inline in long methods. We cut the block out of the installed source between two short
# marker strings (not line numbers), dedent it and exec it with only the names it reads. A marker that moved raises.

def source_block(func, start: str, end: str, include_end: bool = True) -> str:
    """The dedented lines of `func`'s installed source from the line holding `start` to the line holding `end`
    (or to the line before it)."""
    src = inspect.getsource(func)
    i = src.rindex("\n", 0, src.index(start)) + 1
    j = src.index(end, i)
    j = src.index("\n", j) if include_end else src.rindex("\n", i, j)
    return textwrap.dedent(src[i:j])


_ADV_START = "unscorable_mask = torch.isnan(rewards_per_func)"
_ADV_END = "advantages = torch.nan_to_num(advantages, nan=0.0)"


def grpo_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> torch.Tensor:
    """GRPOTrainer._generate_and_score_completions' advantage block ("sum_then_normalize") on one reward
    function's rewards [N] (NaN: no reward)."""
    from trl import GRPOTrainer
    from trl.trainer.utils import nanstd

    code = source_block(GRPOTrainer._generate_and_score_completions, _ADV_START, _ADV_END)
    me = SimpleNamespace(scale_rewards=scale_rewards, multi_objective_aggregation="sum_then_normalize",
                         reward_weights=torch.ones(1), reward_funcs=[None])
    ns = dict(torch=torch, nanstd=nanstd, self=me, rewards_per_func=rewards[:, None], num_generations=num_generations,
              device=rewards.device)
    exec(code, ns)
    return ns["advantages"]


def rloo_advantages(rewards: torch.Tensor, num_generations: int, beta: float, old_per_token_logps: torch.Tensor,
                    ref_per_token_logps: torch.Tensor, completion_mask: torch.Tensor,
                    normalize_advantages: bool) -> torch.Tensor:
    """RLOOTrainer._generate_and_score_completions' reward → KL penalty → leave-one-out → normalisation block on one
    reward function's rewards [N] (NaN: no reward)."""
    from trl import RLOOTrainer
    from trl.trainer.utils import nanstd

    code = source_block(RLOOTrainer._generate_and_score_completions, _ADV_START, _ADV_END)
    me = SimpleNamespace(beta=beta, normalize_advantages=normalize_advantages, reward_clip_range=None,
                         reward_weights=torch.ones(1))
    ns = dict(torch=torch, nanstd=nanstd, self=me, rewards_per_func=rewards[:, None], num_generations=num_generations,
              device=rewards.device, gather=lambda x: x, old_per_token_logps=old_per_token_logps,
              ref_per_token_logps=ref_per_token_logps, completion_mask=completion_mask)
    exec(code, ns)
    return ns["advantages"]


def kto_weight_warning(labels: list[bool], desirable_weight: float, undesirable_weight: float) -> bool:
    """Whether KTOTrainer._prepare_dataset's desirable/undesirable weight check warns for these train labels."""
    from trl import KTOTrainer

    code = source_block(KTOTrainer._prepare_dataset, 'num_desirable = max(sum(dataset["label"])', "return dataset",
                        include_end=False)
    warned = []
    me = SimpleNamespace(desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    exec(code, dict(dataset={"label": labels}, self=me, logger=SimpleNamespace(warning=warned.append)))
    return bool(warned)
