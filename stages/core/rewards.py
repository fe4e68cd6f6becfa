"""Rewards: reward functions in TRL's interface, the reward model's score, and their weighted mix.

A reward function takes the completions' texts and keyword arguments (`prompts`, `completion_ids`,
`truncated`, and the prompt set's columns such as `answer`) and returns one float, or None, per
completion. The built-in ones are such functions (verifier, format, think_format, reward_model) and a
user's own are named `module:function` in a reward section's `functions`.

A reward that cannot be computed for a row (no reference answer, a verifier that failed) is None →
NaN in tensors: the row is excluded and counted, never silently scored 0.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
import traceback
from dataclasses import dataclass, field

import torch

from . import answers, dist, models
from .config import ConfigError, SandboxConfig
from .logprobs import Sequences, position_ids
from .stage import StageFailed


def verify(completion: str, answer: str | None, extract: str = "whole", compare: str = "exact") -> float | None:
    """1.0 if the reply states the reference answer, else 0.0; None when there is no reference.
    extract/compare: verifier.extract and verifier.compare (stages/core/answers.py)."""
    return answers.check(completion, answer, extract, compare)


def check_references(rows: list[dict], verifier, source: str) -> None:
    """Every reference answer the verifier will compare against must be readable by it: a one-line error
    naming the file and row otherwise (a reference it cannot read would score every reply 0, silently)."""
    compare = getattr(verifier, "compare", "exact")
    for i, row in enumerate(rows, start=1):
        ref = row.get("answer")
        if ref is not None and not answers.parses(str(ref), compare):
            raise ConfigError(f"{source}: row {i}: the verifier cannot read the reference answer {str(ref)[:40]!r} "
                              f"(verifier.compare: {compare}; check data.answer_column)")


def verifier_reward(completions: list[str], answer: list[str | None], extract: str = "whole",
                    compare: str = "exact", **_) -> list[float | None]:
    """The verifier as a reward function: 1 right, 0 wrong or no answer stated, None no reference."""
    return [verify(c, a, extract, compare) for c, a in zip(completions, answer)]


def format_ok(completion: str, truncated: bool, pattern: str) -> float:
    """1.0 if the completion ended on its own (EOS) and, trimmed, fully matches `pattern`."""
    if truncated:
        return 0.0
    return 1.0 if re.fullmatch(pattern, completion.strip()) else 0.0


def format_reward(completions: list[str], truncated: list[bool], pattern: str = r"\d{1,3}", **_) -> list[float]:
    """The format reward as a reward function (format_ok of each completion)."""
    return [format_ok(c, t, pattern) for c, t in zip(completions, truncated)]


THINK = re.compile(r"<think>(?:(?!</?think>).)+</think>\s*(?:(?!</?think>).)*\S(?:(?!</?think>).)*", re.DOTALL)


def think_format_reward(completions: list[str], truncated: list[bool], **_) -> list[float]:
    """1.0 for a reply that ended and is one non-empty `<think>…</think>` block followed by a non-empty
    answer (DeepSeek-R1's format; open-r1's format reward), else 0.0."""
    return [0.0 if t else 1.0 if THINK.fullmatch(c.strip()) else 0.0 for c, t in zip(completions, truncated)]


def reward_model_reward(completions: list[str], reward_model=None, sequences: Sequences | None = None,
                        batch_size: int = 64, **_) -> list[float]:
    """The reward model's standardized score of each completion (scored as token sequences, not text)."""
    return reward_model_scores(reward_model, sequences, batch_size).tolist()


def code_reward(completions: list[str], tests: list[str | None] | None = None, sandbox_limits=None,
                **_) -> list[float | None]:
    """Each reply's program (sandbox.extract_code) run against its row's `tests` in a sandbox of its own:
    1.0 passes, 0.0 fails, None no tests or no sandbox. In a launched stage each process runs its share
    (dist.map_rows); `sandbox_limits`: a config.SandboxConfig (verifier.sandbox)."""
    from concurrent.futures import ThreadPoolExecutor

    from . import sandbox

    limits = sandbox_limits or SandboxConfig()
    tests = tests or [None] * len(completions)

    def one(i: int) -> float | None:
        return None if not tests[i] else sandbox.run_tests(sandbox.extract_code(completions[i]), tests[i], limits)

    def share(rows: slice) -> list[float | None]:
        with ThreadPoolExecutor(limits.workers) as pool:  # each run is a process of its own
            return list(pool.map(one, range(rows.start, rows.stop)))

    return dist.map_rows(share, len(completions))


BUILT_IN = {"reward_model": reward_model_reward, "verifier": verifier_reward, "format": format_reward,
            "think_format": think_format_reward, "code": code_reward}
"""A reward section's built-in weights → their reward functions."""


def load_function(name: str, field: str = "functions"):
    """The callable a `module:function` name points to; a one-line error when it cannot be imported."""
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{field}: cannot import {name!r} ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise ConfigError(f"{field}: {name!r} is not callable")
    return fn


def score_sequences(rm, seqs: Sequences) -> torch.Tensor:
    """Scalar score of each sequence: the head applied to the last real token, standardized with
    the config's reward_mean / reward_std when the reward stage saved them.  → [N] float32

    Pooling by attention mask (not by searching for pad ids) stays right when pad == EOS. Works for
    the HF *ForSequenceClassification models that expose `base_model` and a `score` head.
    """
    hidden = models.backbone(rm)(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask,
                           position_ids=position_ids(seqs.attention_mask)).last_hidden_state  # [N, T, H]
    last = last_token_index(seqs.attention_mask)  # [N]
    pooled = hidden[torch.arange(len(seqs), device=hidden.device), last]  # [N, H]
    raw = rm.score(pooled).squeeze(-1).float()
    return (raw - getattr(rm.config, "reward_mean", 0.0)) / getattr(rm.config, "reward_std", 1.0)


@torch.no_grad()
def reward_model_scores(rm, seqs: Sequences, batch_size: int) -> torch.Tensor:
    """score_sequences in chunks, without grad, sharded across the processes of a launched stage
    (every process calls it and gets every score).  → [N] on the CPU"""
    return dist.map_rows(lambda rows: score_sequences(rm, seqs.select(rows).to(rm.device)).cpu(), len(seqs),
                         batch_size)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row.  [B, T] → [B]"""
    idx = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask * idx).argmax(-1)


def mix(parts: list[tuple[float, list[float | None] | torch.Tensor]]) -> torch.Tensor:
    """Weighted sum of (weight, per-completion values) parts.  → [N], NaN where any part is None/NaN."""
    total = None
    for weight, values in parts:
        v = values.float().cpu() if isinstance(values, torch.Tensor) else torch.tensor(
            [math.nan if x is None else float(x) for x in values], dtype=torch.float32)
        total = weight * v if total is None else total + weight * v
    return total


@dataclass
class Scores:
    """Rewards of N completions: the weighted mix and its parts.

    total:         [N] float, NaN = no reward (a needed part could not be computed)
    verifier:      per completion 1.0 / 0.0 / None (no reference answer)
    format:        per completion 1.0 / 0.0
    reward_model:  [N] standardized scores, or None when the mix does not use the reward model
    parts:         every reward function's values that entered the mix, by name
    """

    total: torch.Tensor
    verifier: list[float | None]
    format: list[float]
    reward_model: torch.Tensor | None
    parts: dict[str, list] = field(default_factory=dict)

    @property
    def n_unscored(self) -> int:
        return int(torch.isnan(self.total).sum())


def reward_functions(weights) -> list[tuple[str, float, object]]:
    """(name, weight, function) of every reward with a weight > 0 in a config.RewardWeights."""
    out = [(name, getattr(weights, name), fn) for name, fn in BUILT_IN.items() if getattr(weights, name) > 0]
    out += [(name, w, load_function(name, "reward.functions")) for name, w in weights.functions.items() if w > 0]
    return out


def group_columns(rows: list[dict], k: int) -> dict[str, list]:
    """The prompt rows' columns, repeated for each of their k completions (completion i is row i // k):
    `prompts`, `answer` (None where a row has none) and every other column but the token ids."""
    n = len(rows) * k
    keys = [key for key in rows[0] if key not in ("prompt", "prompt_ids", "answer")] if rows else []
    out = {"prompts": [rows[i // k]["prompt"] for i in range(n)],
           "answer": [rows[i // k].get("answer") for i in range(n)]}
    return {**out, **{key: [rows[i // k].get(key) for i in range(n)] for key in keys}}


def score_completions(weights, texts: list[str], truncated: list[bool], columns: dict[str, list], rm,
                      seqs: Sequences, batch_size: int, verifier=None, group: int = 1) -> Scores:
    """Every reward of each completion and their mix. columns: per completion, `answer` (the reference;
    None: the verifier cannot check it) and the prompt set's other columns (group_columns), passed to
    reward functions. The verifier and format are always computed (they are logged); the reward model
    only when its weight is > 0. In a launched stage a user's reward function is called on each
    process's share of the completions, whole groups of `group` (a prompt's completions together)."""
    trl_kw = {"answer": [None] * len(texts), "truncated": truncated, **columns,
              "completion_ids": [ids[m.bool()].tolist() for ids, m in zip(seqs.completion_ids, seqs.completion_mask)]}
    kw = {**trl_kw, "extract": getattr(verifier, "extract", "whole"), "compare": getattr(verifier, "compare", "exact"),
          "pattern": weights.format_pattern, "reward_model": rm, "sequences": seqs, "batch_size": batch_size,
          "sandbox_limits": getattr(verifier, "sandbox", None)}
    values = {"verifier": verifier_reward(texts, **kw), "format": format_reward(texts, **kw)}
    parts = []
    for name, weight, fn in reward_functions(weights):
        if name not in values:
            values[name] = fn(texts, **kw) if name in BUILT_IN else user_reward(name, fn, texts, trl_kw, group)
            check_values(values[name], len(texts), name)
        parts.append((weight, values[name]))
    rm_scores = torch.tensor(values["reward_model"]) if "reward_model" in values else None
    return Scores(mix(parts), values["verifier"], values["format"], rm_scores, values)


def user_reward(name: str, fn, texts: list[str], kw: dict, group: int) -> list:
    """A user's reward function called once per completion across the processes of a launched stage
    (each process on its share, as TRL calls it; a function that calls an API is not called N times
    over), the values gathered in order."""
    n = len(texts)

    def call(rows: slice) -> list:
        try:
            out = fn(texts[rows], **{k: v[rows] if isinstance(v, list) and len(v) == n else v for k, v in kw.items()})
        except Exception as e:
            raise reward_raised(name, fn, e) from e
        check_values(out, rows.stop - rows.start, name)
        return list(out)

    return dist.map_rows(call, n, group=group)


def reward_raised(name: str, fn, e: Exception) -> StageFailed:
    """A user's reward function raised while scoring: its full traceback to the log (stderr), and the one
    line that ends the stage (nothing written): the function, the exception and where it was raised, the
    deepest line in the function's own file (else the deepest line of all)."""
    traceback.print_exception(e, file=sys.stderr)
    frames = traceback.extract_tb(e.__traceback__)
    own = [f for f in frames if f.filename == getattr(getattr(fn, "__code__", None), "co_filename", None)]
    where = (own or frames)[-1]
    file = os.path.relpath(where.filename) if where.filename.startswith(os.getcwd() + os.sep) else where.filename
    reason = (str(e).strip().splitlines() or [""])[0][:200]
    return StageFailed(f"reward function {name} raised {type(e).__name__}{': ' + reason if reason else ''} "
                       f"at {file}:{where.lineno} (its traceback is above)")


def check_values(values, n: int, name: str) -> None:
    """A reward function must return one float or None per completion."""
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
        raise ConfigError(f"reward function {name}: returned {got} for {n} completions (want a list of {n})")
    bad = next((v for v in values if v is not None and not isinstance(v, (int, float))), None)
    if bad is not None:
        raise ConfigError(f"reward function {name}: returned {bad!r}; each value must be a float or None")


def no_signal_cause(scores: Scores, answers: list[str | None], weights) -> str:
    """The likely reason a batch of rewards carries no signal (all equal, or none computable)."""
    if scores.n_unscored == len(scores.total):
        return "no reward could be computed for any completion (no reference answers? check data.answer_column)"
    if weights.verifier > 0 and all(a is None for a in answers):
        return "the prompts have no reference answers (check data.answer_column)"
    if weights.verifier > 0 and not any(scores.verifier):
        return ("the verifier accepted no reply (check the answer format of data.answer_column and "
                "verifier.extract / verifier.compare)")
    return "the reward does not vary between completions (check the reward weights and functions)"
