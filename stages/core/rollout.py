"""Sampling completions with the KV cache: batched, EOS-aware, reproducible from a seed.

The output is a `Sequences` batch in the shared layout (left-padded prompt, right-padded completion)
plus the log-probs the sampler drew each token with, so a trainer can check that its own log-probs
of the same tokens agree (stale generation weights show up as a mismatch).

Every completion draws its tokens from a random stream of its own, named by (seed, row): what a row
samples does not depend on which other rows share its batch or its process, so generation can be
split across processes (or batched differently) and give the same completions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from . import dist
from .logprobs import Sequences, position_ids, selective_log_softmax


@dataclass
class Rollout:
    """Sampled completions.

    seqs:          Sequences [N, P+C]
    sample_logps:  [N, C] log-probs of the drawn tokens under the sampling distribution (0 on padding)
    truncated:     [N] bool, no stop token within max_new_tokens
    """

    seqs: Sequences
    sample_logps: torch.Tensor
    truncated: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        return self.seqs.completion_mask.sum(-1)  # [N]

    def to(self, device) -> "Rollout":
        return Rollout(self.seqs.to(device), self.sample_logps.to(device), self.truncated.to(device))


def stream_seed(*keys: int) -> int:
    """The seed of the random stream named by `keys` (say the run's seed, a step and a row): a hash, so
    nearby keys give unrelated streams."""
    return int.from_bytes(hashlib.blake2b(repr(keys).encode(), digest_size=8).digest(), "little") >> 1


def _draw(probs: torch.Tensor, streams: list[torch.Generator]) -> torch.Tensor:
    """One token per row from its own stream, by inverting the CDF with one uniform draw per row (a
    zero-probability token is never drawn).  probs [N, V] → [N]"""
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in streams]).to(probs.device)  # [N]
    cdf = probs.double().cumsum(-1)  # [N, V]
    target = (1.0 - u) * cdf[:, -1]  # in (0, total]
    return torch.searchsorted(cdf, target[:, None]).squeeze(-1).clamp(max=probs.shape[-1] - 1)

def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists → (input_ids [N, P], attention_mask [N, P]), padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return ids, mask


@torch.no_grad()
def _sample_batch(model, prompt_ids, prompt_mask, max_new_tokens, temperature, stop_ids, pad_id, streams,
                  counts: bool = True):
    """counts: False for a batch run only to keep in step (FSDP), which never keeps the others decoding."""
    from transformers import DynamicCache

    n, p = prompt_ids.shape
    device = prompt_ids.device
    stop = torch.tensor(stop_ids, device=device)
    cache = DynamicCache(config=model.config)
    mask = prompt_mask
    out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=position_ids(mask),
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    next_pos = mask.sum(-1, keepdim=True)  # [N, 1] position of the first completion token
    tokens, logps = [], []
    done = torch.zeros(n, dtype=torch.bool, device=device)
    alive = torch.ones(n, dtype=torch.long, device=device)  # 1 while the row has not ended before this step
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].float()  # [N, V]
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            tok = _draw(probs, streams)  # [N]
            lp = selective_log_softmax(logits / temperature, tok)
        else:
            tok = logits.argmax(-1)
            lp = selective_log_softmax(logits, tok)
        alive = (~done).long()
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        tokens.append(tok)
        logps.append(lp * alive)
        mask = torch.cat([mask, alive[:, None]], dim=1)
        done = done | torch.isin(tok, stop)
        if step == max_new_tokens - 1 or not dist.any_process(counts and not bool(done.all()), device):  # FSDP
            break
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos + step,
                    past_key_values=cache, use_cache=True)
    completion = torch.stack(tokens, dim=1)  # [N, C]
    return Rollout(Sequences(torch.cat([prompt_ids, completion], 1), mask, p), torch.stack(logps, dim=1), ~done)


def sample(model, prompts: list[list[int]], n_per_prompt: int, max_new_tokens: int, temperature: float,
           stop_ids: int | list[int], pad_id: int, batch_size: int, seed: int | None = None, first_row: int = 0,
           device: torch.device | str = "cpu") -> Rollout:
    """`n_per_prompt` completions of each prompt, grouped: rows i*n … i*n+n-1 belong to prompt i.

    temperature 0 is greedy; above 0 row i draws from the stream stream_seed(seed, first_row + i)
    (first_row: where these rows start in a larger batch split across processes). A completion ends
    at the first of `stop_ids` (every EOS the model's generation config lists), which it keeps. Rows
    are generated `batch_size` at a time; all come back padded to one width (the longest completion)
    so the result is one batch in the shared layout (None for no prompts).

    Under FSDP every forward pass is a collective: each process runs as many batches as the busiest
    one (dist.lockstep), and decodes while any process has a row still generating (a finished row gets
    padding, as it does while others in its own batch go on).
    """
    if temperature > 0 and seed is None:
        raise ValueError("sampling at a temperature above 0 needs a seed")
    rows = [r for r in prompts for _ in range(n_per_prompt)]
    stop_ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
    was_training = model.training
    model.eval()
    parts, starts = [], range(0, len(rows), batch_size)
    extra = dist.lockstep(len(starts)) - len(starts)  # FSDP: batches in step with the others (known first)
    for i in starts:
        ids, mask = left_pad(rows[i:i + batch_size], pad_id)
        streams = [torch.Generator().manual_seed(stream_seed(seed, first_row + j))
                   for j in range(i, i + len(ids))] if temperature > 0 else None
        parts.append(_sample_batch(model, ids.to(device), mask.to(device), max_new_tokens, temperature,
                                   stop_ids, pad_id, streams))
    for _ in range(extra):  # one row, its result dropped: the cost of a collective pass is per pass, not per row
        ids, mask = left_pad(rows[:1] or [[pad_id]], pad_id)
        streams = [torch.Generator().manual_seed(0)] if temperature > 0 else None
        _sample_batch(model, ids.to(device), mask.to(device), max_new_tokens, temperature, stop_ids, pad_id, streams,
                      counts=False)
    model.train(was_training)
    return concat(parts, pad_id) if parts else None


def concat(parts: list[Rollout], pad_id: int) -> Rollout:
    """Rollouts of different prompt and completion widths as one batch in the shared layout."""
    p = max(r.seqs.prompt_len for r in parts)
    c = max(r.seqs.input_ids.shape[1] - r.seqs.prompt_len for r in parts)
    ids, masks, logps, trunc = [], [], [], []
    for r in parts:
        s, lp, tr = r.seqs, r.sample_logps, r.truncated
        lpad, rpad = p - s.prompt_len, c - (s.input_ids.shape[1] - s.prompt_len)
        ids.append(torch.nn.functional.pad(s.input_ids, (lpad, rpad), value=pad_id))
        masks.append(torch.nn.functional.pad(s.attention_mask, (lpad, rpad), value=0))
        logps.append(torch.nn.functional.pad(lp, (0, rpad), value=0.0))
        trunc.append(tr)
    return Rollout(Sequences(torch.cat(ids), torch.cat(masks), p), torch.cat(logps), torch.cat(trunc))
