"""Measuring a policy: greedy answers checked by the verifier, reward-model scores, KL to a reference.

The probe (greedy verifier accuracy on a fixed slice of training prompts) is logged during every
training stage as `probe/accuracy`; its spread over the last probes is the comparison's stability.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from . import data, dist, models, rewards, rollout
from .logprobs import Sequences, completion_logits


@dataclass
class Answers:
    """Completions of a list of prompts (one each, or `n` each, grouped by prompt)."""

    rollout: rollout.Rollout
    texts: list[str]

    @property
    def seqs(self) -> Sequences:
        return self.rollout.seqs


def generate(model, tok, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int,
             temperature: float = 0.0, n: int = 1, seed: int | None = None, engine=None) -> Answers:
    """Sample (or, at temperature 0, greedily decode) n completions of each prompt (rollout.sample, or
    the vLLM `engine` after it is given the model's current weights: engine.open_engine) and decode them
    to text. In a launched stage every process calls it and samples its share of the prompts; each gets
    all the completions back (the same ones a single process would sample)."""
    device = next(model.parameters()).device
    mine = dist.share(len(prompt_ids))
    if engine is None:
        sample = partial(rollout.sample, model)
    else:
        engine.sync(model)
        sample = engine.sample
    r = sample(prompt_ids[mine], n, max_new_tokens, temperature, models.stop_ids(tok), tok.pad_token_id,
               batch_size, seed, mine.start * n, device)  # None for no prompts
    if dist.world() > 1:  # each process sampled its share
        parts = [p for p in dist.gather(r.to("cpu") if r is not None else None) if p is not None]
        r = rollout.concat(parts, tok.pad_token_id).to(device)
    return Answers(r, decode(tok, r.seqs))


def decode(tok, seqs: Sequences) -> list[str]:
    ids, mask = seqs.completion_ids.cpu(), seqs.completion_mask.cpu()
    return [data.decode_completion(tok, row[m.bool()].tolist()) for row, m in zip(ids, mask)]


def verifier_scores(texts: list[str], answers: list[str | None], verifier=None, n: int = 1) -> list[float | None]:
    """Verifier result of each completion (verifier: config.VerifierConfig, None = exact whole reply);
    completion i belongs to prompt i // n."""
    extract, compare = getattr(verifier, "extract", "whole"), getattr(verifier, "compare", "exact")
    return [rewards.verify(t, answers[i // n], extract, compare) for i, t in enumerate(texts)]


def accuracy(scores: list[float | None]) -> float | None:
    """Mean over the completions the verifier could check; None if it could check none."""
    checked = [s for s in scores if s is not None]
    return sum(checked) / len(checked) if checked else None


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator (Chen et al. 2021, arXiv 2107.03374, eq. 1) for one prompt with c correct
    of n samples: 1 − C(n − c, k)/C(n, k), the chance that k of the n drawn without replacement hold a correct
    one; computed as 1 − Π_{i=n−c+1..n} (1 − k/i), the paper's numerically stable form."""
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(scores: list[float | None], n: int, k: int) -> float | None:
    """pass@k averaged over prompts, from the verifier scores of n samples per prompt (grouped); a prompt whose
    samples the verifier could not check is left out; None if none could be checked."""
    per_prompt = []
    for i in range(0, len(scores), n):
        group = [s for s in scores[i:i + n] if s is not None]
        if len(group) == n:
            per_prompt.append(pass_at_k(n, sum(s >= 1.0 for s in group), k))
    return sum(per_prompt) / len(per_prompt) if per_prompt else None


@torch.no_grad()
def probe_accuracy(model, tok, probe_rows: list[dict], max_new_tokens: int, batch_size: int,
                   verifier=None, engine=None) -> float | None:
    """Greedy verifier accuracy on a fixed probe set (rows with prompt_ids and answer)."""
    if not probe_rows:
        return None
    ans = generate(model, tok, [r["prompt_ids"] for r in probe_rows], max_new_tokens, batch_size, engine=engine)
    return accuracy(verifier_scores(ans.texts, [r.get("answer") for r in probe_rows], verifier))


@torch.no_grad()
def kl_to_reference(policy, ref, seqs: Sequences, batch_size: int) -> torch.Tensor:
    """KL(π‖π_ref) of each sequence, summed over its completion tokens with the full next-token
    distributions (exact at each step along the sampled path; unbiased for the sequence KL when the
    paths are sampled from π, and never negative). Sharded across processes (dist.map_rows).  → [N]
    """
    device = next(policy.parameters()).device

    def kl(rows: slice) -> torch.Tensor:
        part = seqs.select(rows).to(device)
        logp = torch.log_softmax(completion_logits(policy, part).float(), -1)  # [b, C, V]
        logq = torch.log_softmax(completion_logits(ref, part).float(), -1)  # [b, C, V]
        per_token = (logp.exp() * (logp - logq)).sum(-1)  # [b, C]
        return (per_token * part.completion_mask).sum(-1).cpu()

    return dist.map_rows(kl, len(seqs), batch_size)
