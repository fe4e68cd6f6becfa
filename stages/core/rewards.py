"""Rewards: the verifier, a format reward, the reward model's score, and their weighted mix.

A reward that cannot be computed for a row (no reference answer, a verifier that failed) is None →
NaN in tensors: the row is excluded and counted, never silently scored 0.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .logprobs import Sequences, position_ids


def verify(completion: str, answer: str | None) -> float | None:
    """1.0 if the completion is exactly the reference answer (whitespace-trimmed), else 0.0; None
    when there is no reference answer to check against."""
    if answer is None:
        return None
    if not completion.strip():  # an empty answer never checks, whatever the reference says
        return 0.0
    return 1.0 if completion.strip() == str(answer).strip() else 0.0


def format_ok(completion: str, truncated: bool, pattern: str) -> float:
    """1.0 if the completion ended on its own (EOS) and, trimmed, fully matches `pattern`."""
    if truncated:
        return 0.0
    return 1.0 if re.fullmatch(pattern, completion.strip()) else 0.0


def score_sequences(rm, seqs: Sequences) -> torch.Tensor:
    """Scalar score of each sequence: the head applied to the last real token, standardized with
    the config's reward_mean / reward_std when the reward stage saved them.  → [N] float32

    Pooling by attention mask (not by searching for pad ids) stays right when pad == EOS. Works for
    the HF *ForSequenceClassification models that expose `base_model` and a `score` head.
    """
    hidden = rm.base_model(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask,
                           position_ids=position_ids(seqs.attention_mask)).last_hidden_state  # [N, T, H]
    last = last_token_index(seqs.attention_mask)  # [N]
    pooled = hidden[torch.arange(len(seqs), device=hidden.device), last]  # [N, H]
    raw = rm.score(pooled).squeeze(-1).float()
    return (raw - getattr(rm.config, "reward_mean", 0.0)) / getattr(rm.config, "reward_std", 1.0)


@torch.no_grad()
def reward_model_scores(rm, seqs: Sequences, batch_size: int) -> torch.Tensor:
    """score_sequences in chunks, without grad.  → [N] on the CPU"""
    return torch.cat([score_sequences(rm, seqs.select(slice(i, i + batch_size)).to(rm.device)).cpu()
                      for i in range(0, len(seqs), batch_size)])


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row.  [B, T] → [B]"""
    idx = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask * idx).argmax(-1)


def mix(weights, rm: torch.Tensor | None, verifier: list[float | None] | None,
        fmt: list[float] | None) -> torch.Tensor:
    """Weighted sum of the rewards whose weight is > 0.  → [N], NaN where a needed part is missing.

    weights: config.RewardWeights; rm [N] or None; verifier, fmt: per-row lists or None.
    """
    parts = []
    if weights.reward_model > 0:
        parts.append(weights.reward_model * rm.float().cpu())
    if weights.verifier > 0:
        parts.append(weights.verifier * torch.tensor([math.nan if v is None else v for v in verifier]))
    if weights.format > 0:
        parts.append(weights.format * torch.tensor(fmt, dtype=torch.float32))
    return torch.stack(parts).sum(0)


@dataclass
class Scores:
    """Rewards of N completions: the weighted mix and its parts.

    total:         [N] float, NaN = no reward (a needed part could not be computed)
    verifier:      per completion 1.0 / 0.0 / None (no reference answer)
    format:        per completion 1.0 / 0.0
    reward_model:  [N] standardized scores, or None when the mix does not use the reward model
    """

    total: torch.Tensor
    verifier: list[float | None]
    format: list[float]
    reward_model: torch.Tensor | None

    @property
    def n_unscored(self) -> int:
        return int(torch.isnan(self.total).sum())


def score_completions(weights, texts: list[str], truncated: list[bool], answers: list[str | None], rm,
                      seqs: Sequences, batch_size: int) -> Scores:
    """Every built-in reward of each completion and their mix. answers[i] is completion i's reference
    (None: the verifier cannot check it). The reward model runs only if its weight is > 0."""
    verifier = [verify(t, a) for t, a in zip(texts, answers)]
    fmt = [format_ok(t, tr, weights.format_pattern) for t, tr in zip(texts, truncated)]
    rm_scores = reward_model_scores(rm, seqs, batch_size) if weights.reward_model > 0 else None
    return Scores(mix(weights, rm_scores, verifier, fmt), verifier, fmt, rm_scores)
