"""Log-probabilities of completions under a causal LM.

One sequence layout serves every stage: `[left-padded prompt | right-padded completion]`, so that all
prompts end at the same column `prompt_len` and all completions start there. Rollouts come out of the
sampler in this layout and offline data is collated into it (data.collate_sequences).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import dist


@dataclass
class Sequences:
    """A batch of prompt+completion token sequences.

    input_ids:        [B, P+C] left-padded prompts then right-padded completions
    attention_mask:   [B, P+C] 1 on real tokens
    prompt_len:       P, the column where every completion starts
    completion_mask:  [B, C] 1 on completion tokens (EOS included), 0 on padding
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int

    @property
    def completion_mask(self) -> torch.Tensor:
        return self.attention_mask[:, self.prompt_len:]

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len:]

    def to(self, device) -> "Sequences":
        return Sequences(self.input_ids.to(device), self.attention_mask.to(device), self.prompt_len)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx) -> "Sequences":
        return Sequences(self.input_ids[idx], self.attention_mask[idx], self.prompt_len)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so left padding does not shift a prompt."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., index] without materialising the full log-softmax.  [B, C, V] → [B, C]"""
    picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1).float()
    return picked - torch.logsumexp(logits.float(), dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at each position.  [B, C, V] → [B, C]"""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def completion_logits(model, seqs: Sequences) -> torch.Tensor:
    """Logits that predict each completion token: positions P-1 … P+C-2.  → [B, C, V]"""
    n_completion = seqs.input_ids.shape[1] - seqs.prompt_len
    out = model(
        input_ids=seqs.input_ids, attention_mask=seqs.attention_mask,
        position_ids=position_ids(seqs.attention_mask), logits_to_keep=n_completion + 1, use_cache=False,
    )
    return out.logits[:, :-1]  # [B, C, V]


def token_logps(model, seqs: Sequences, temperature: float = 1.0, with_entropy: bool = False, chunk: int = 0):
    """Per-token log-probs of the completion tokens, 0 on padding.  → [B, C] (and entropy [B, C]).

    chunk > 0: the output head and log-softmax run over `chunk` completion positions at a time and are
    recomputed in the backward pass, so at most [B, chunk, V] logits exist at once (a long completion
    with a 150k vocabulary would otherwise hold B·C·V floats, twice). Same values as chunk = 0."""
    if chunk and chunk < seqs.input_ids.shape[1] - seqs.prompt_len:
        run = getattr(model, CHUNKED, None)  # a sharded model's own (fsdp.shard)
        return run(seqs, temperature, with_entropy, chunk) if run else chunked_token_logps(model, seqs, temperature,
                                                                                          with_entropy, chunk)
    logits = completion_logits(model, seqs)  # [B, C, V]
    if temperature != 1.0:
        logits = logits / temperature
    mask = seqs.completion_mask
    logps = selective_log_softmax(logits, seqs.completion_ids) * mask  # [B, C]
    if not with_entropy:
        return logps
    return logps, entropy_from_logits(logits.detach()) * mask


def vocab_logps(model, seqs: Sequences, temperature: float = 1.0) -> torch.Tensor:
    """The whole next-token log-distribution at each completion position (a divergence over the vocabulary:
    distillation's generalized JSD), fp32, 0 on padding.  → [B, C, V]"""
    logits = completion_logits(model, seqs).float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1) * seqs.completion_mask[..., None]


def picked(vocab: torch.Tensor, seqs: Sequences) -> tuple[torch.Tensor, torch.Tensor]:
    """The completion tokens' log-probs and the entropy at each position, from vocab_logps.  → [B, C], [B, C]"""
    mask = seqs.completion_mask
    logps = vocab.gather(-1, seqs.completion_ids.unsqueeze(-1)).squeeze(-1) * mask
    return logps, -(vocab.detach().exp() * vocab.detach()).sum(-1) * mask


CHUNKED = "chunked_token_logps"
"""The name a sharded model holds chunked_token_logps under, as one of its forward methods (fsdp.shard):
it runs the output head outside the model's forward, where FSDP would not gather the head's weights."""


def chunked_token_logps(model, seqs: Sequences, temperature: float, with_entropy: bool, chunk: int):
    from torch.utils.checkpoint import checkpoint

    n_completion = seqs.input_ids.shape[1] - seqs.prompt_len
    hidden = model.get_decoder()(
        input_ids=seqs.input_ids, attention_mask=seqs.attention_mask,
        position_ids=position_ids(seqs.attention_mask), use_cache=False,
    ).last_hidden_state[:, seqs.prompt_len - 1:seqs.prompt_len - 1 + n_completion]  # [B, C, H]
    head = model.get_output_embeddings()

    def logits_of(h: torch.Tensor) -> torch.Tensor:
        logits = head(h)
        return logits / temperature if temperature != 1.0 else logits

    def piece(h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return selective_log_softmax(logits_of(h), ids)

    logps, entropy = [], []
    ids = seqs.completion_ids
    for i in range(0, n_completion, chunk):
        h = hidden[:, i:i + chunk]
        logps.append(checkpoint(piece, h, ids[:, i:i + chunk], use_reentrant=False) if torch.is_grad_enabled()
                     else piece(h, ids[:, i:i + chunk]))
        if with_entropy:
            with torch.no_grad():
                entropy.append(entropy_from_logits(logits_of(h.detach())))
    mask = seqs.completion_mask
    if not with_entropy:
        return torch.cat(logps, 1) * mask
    return torch.cat(logps, 1) * mask, torch.cat(entropy, 1) * mask


@torch.no_grad()
def batched_token_logps(model, seqs: Sequences, batch_size: int, temperature: float = 1.0) -> torch.Tensor:
    """token_logps in chunks, without grad (reference and old-policy log-probs), sharded across the
    processes of a launched stage (every process calls it and gets every row).  → [B, C] on seqs' device"""
    return dist.map_rows(lambda rows: token_logps(model, seqs.select(rows), temperature), len(seqs), batch_size,
                         device=seqs.input_ids.device)


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logp(y|x): the SUM of per-token log-probs over completion tokens.  [B, C] → [B]"""
    return (token_logps * mask).sum(-1)
