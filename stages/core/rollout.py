"""Sampling completions with the KV cache: batched, EOS-aware, reproducible from a torch.Generator.

The output is a `Sequences` batch in the shared layout (left-padded prompt, right-padded completion)
plus the log-probs the sampler drew each token with, so a trainer can check that its own log-probs
of the same tokens agree (stale generation weights show up as a mismatch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
def _sample_batch(model, prompt_ids, prompt_mask, max_new_tokens, temperature, stop_ids, pad_id, generator):
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
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [N]
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
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos + step,
                    past_key_values=cache, use_cache=True)
    completion = torch.stack(tokens, dim=1)  # [N, C]
    seqs = Sequences(torch.cat([prompt_ids, completion], 1), mask, p)
    return seqs, torch.stack(logps, dim=1), ~done


def sample(model, prompts: list[list[int]], n_per_prompt: int, max_new_tokens: int, temperature: float,
           stop_ids: int | list[int], pad_id: int, batch_size: int, generator: torch.Generator | None = None,
           device: torch.device | str = "cpu") -> Rollout:
    """`n_per_prompt` completions of each prompt, grouped: rows i*n … i*n+n-1 belong to prompt i.

    temperature 0 is greedy; a completion ends at the first of `stop_ids` (every EOS the model's
    generation config lists), which it keeps. Rows are generated `batch_size` at a time; all come back padded to one
    width (the longest completion) so the result is one batch in the shared layout.
    """
    rows = [r for r in prompts for _ in range(n_per_prompt)]
    stop_ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
    was_training = model.training
    model.eval()
    parts = []
    for i in range(0, len(rows), batch_size):
        ids, mask = left_pad(rows[i:i + batch_size], pad_id)
        parts.append(_sample_batch(model, ids.to(device), mask.to(device), max_new_tokens, temperature,
                                   stop_ids, pad_id, generator))
    model.train(was_training)
    return _concat(parts, pad_id)


def _concat(parts, pad_id) -> Rollout:
    p = max(s.prompt_len for s, _, _ in parts)
    c = max(s.input_ids.shape[1] - s.prompt_len for s, _, _ in parts)
    ids, masks, logps, trunc = [], [], [], []
    for s, lp, tr in parts:
        lpad, rpad = p - s.prompt_len, c - (s.input_ids.shape[1] - s.prompt_len)
        ids.append(torch.nn.functional.pad(s.input_ids, (lpad, rpad), value=pad_id))
        masks.append(torch.nn.functional.pad(s.attention_mask, (lpad, rpad), value=0))
        logps.append(torch.nn.functional.pad(lp, (0, rpad), value=0.0))
        trunc.append(tr)
    return Rollout(Sequences(torch.cat(ids), torch.cat(masks), p), torch.cat(logps), torch.cat(trunc))
