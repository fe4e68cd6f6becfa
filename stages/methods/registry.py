"""The alignment methods: one record each. The params schema (config.AlignConfig: a section per method,
and `align.methods` checked against them), dvc.yaml's choice (the align matrix runs `align.methods`) and
the dispatch (stages/align.py) all come from these records and the sections.

Adding a method: its params section (a class in stages/core/config.py and its field in AlignConfig),
its loss (stages/core/losses.py), and one record below naming its training loop and pieces. A method
missing a piece is a one-line error at load (`check`), before any work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from stages.core import config
from stages.methods import online, ppo, preference


def _never(c) -> bool:
    return False


@dataclass(frozen=True)
class Method:
    name: str
    kind: Literal["offline", "online"]
    """offline: trains on the pairs stage's stored data (reference log-probs precomputed, one model);
    online: generates from the policy during training."""
    fit: Callable
    """Its training loop: (method, params, paths, device, tracker, t0, generation engine or None) → (model,
    tokenizer, metrics, train.Run)."""
    reads: str
    """What it trains on: a file of the pairs stage's output (offline), or `prompts`."""
    step: Callable | None = None
    """offline: a batch → its micro-batches (preference.pair_step, kto_step)."""
    loss: Callable | None = None
    """Its loss: offline pair methods (chosen/rejected log-probs → per-pair loss), online critic-free
    methods (per micro-batch); PPO's lives in its own loop."""
    advantages: Callable | None = None
    """online critic-free: (batch, cfg) → (advantages, stats)."""
    units: Callable | None = None
    """online critic-free: what each row counts for in the loss's mean (gradient accumulation's shares)."""
    check_data: Callable | None = None
    """offline: a check of the training rows → extra metrics (KTO's weight ratio)."""
    needs_reference: Callable = _never
    """cfg → whether a reference model is held (online; offline methods read stored log-probs)."""
    needs_old_logps: Callable = _never
    """cfg → whether the old log-probs are computed before training on a batch (online)."""
    full_vocab: Callable = _never
    """online: cfg → whether its loss takes the policy's and the held model's whole next-token log-distributions
    at each completion position, as `vocab=(policy's, held model's)` (distillation's generalized JSD)."""
    teacher: bool = False
    """online: the model held beside the policy is a teacher (the stage's --teacher), not the SFT reference:
    its log-probs of the sampled tokens are the batch's ref_logps."""


NEEDS = {  # the pieces each training loop calls
    preference.fit: ("step",),
    online.fit: ("advantages", "loss", "units"),
    ppo.fit: (),
}

REGISTRY: dict[str, Method] = {m.name: m for m in [
    Method("dpo", "offline", preference.fit, "pairs.jsonl", step=preference.pair_step, loss=preference.dpo_pair_loss),
    Method("ipo", "offline", preference.fit, "pairs.jsonl", step=preference.pair_step, loss=preference.ipo_pair_loss),
    Method("kto", "offline", preference.fit, "kto.jsonl", step=preference.kto_step,
           check_data=preference.check_kto_weights),
    Method("grpo", "online", online.fit, "prompts", advantages=online.grpo_advantages, loss=online.grpo_loss,
           units=online.grpo_units, needs_reference=lambda c: c.beta > 0),
    Method("rloo", "online", online.fit, "prompts", advantages=online.rloo_advantages, loss=online.rloo_loss,
           units=online.rloo_units, needs_reference=lambda c: c.beta > 0, needs_old_logps=lambda c: c.beta > 0),
    Method("ppo", "online", ppo.fit, "prompts", needs_reference=lambda c: True, needs_old_logps=lambda c: True),
    Method("simpo", "offline", preference.fit, "pairs.jsonl", step=preference.pair_step,
           loss=preference.simpo_pair_loss),
    Method("orpo", "offline", preference.fit, "pairs.jsonl", step=preference.pair_step, loss=preference.orpo_pair_loss),
    Method("gspo", "online", online.fit, "prompts", advantages=online.grpo_advantages, loss=online.gspo_loss,
           units=online.grpo_units, needs_reference=lambda c: c.beta > 0),
    Method("cispo", "online", online.fit, "prompts", advantages=online.grpo_advantages, loss=online.cispo_loss,
           units=online.grpo_units, needs_reference=lambda c: c.beta > 0),
    Method("reinforce_pp", "online", online.fit, "prompts", advantages=online.reinforce_pp_advantages,
           loss=online.reinforce_pp_loss, units=online.grpo_units, needs_reference=lambda c: c.beta > 0,
           needs_old_logps=lambda c: c.beta > 0),
    Method("distill", "online", online.fit, "prompts", advantages=online.distill_advantages,
           loss=online.distill_loss, units=online.grpo_units, needs_reference=lambda c: True,
           needs_old_logps=lambda c: True, full_vocab=lambda c: c.divergence == "jsd", teacher=True),
]}


def check(registry: dict[str, Method] | None = None, sections: dict[str, type] | None = None) -> None:
    """Every method has a record and a params section, and its record every piece its loop calls;
    else a ConfigError naming the method and the missing piece."""
    registry = REGISTRY if registry is None else registry
    sections = config.METHOD_CONFIGS if sections is None else sections
    for name in sections:
        if name not in registry:
            raise config.ConfigError(f"method {name!r} has a params section (align.{name}) but no record in "
                                     "stages/methods/registry.py")
    for name, m in registry.items():
        if name not in sections:
            raise config.ConfigError(f"method {name!r} has no params section: add its class to "
                                     "stages/core/config.py and its field to AlignConfig")
        if m.fit not in NEEDS:
            raise config.ConfigError(f"method {name!r}: fit is not a known training loop")
        missing = [piece for piece in NEEDS[m.fit] if not callable(getattr(m, piece))]
        if m.step is preference.pair_step and not callable(m.loss):
            missing.append("loss")
        if missing:
            raise config.ConfigError(f"method {name!r}: its record lacks {', '.join(missing)} "
                                     f"(stages/methods/registry.py)")


def get(name: str) -> Method:
    check()
    return REGISTRY[name]


def for_policy(policy: str) -> Method:
    """The record of the method that trains an aligned policy: `dpo` → dpo, `distill_grpo` → distill."""
    return get(config.split_policy(policy)[0])
