"""Sampling with the KV cache and log-probs of the sampled tokens: the sampler and the trainer must
agree on every token (stale or mismatched weights show up here), padding must not change anything."""

import pytest
import torch

from stages.core import data, evaluation, logprobs, rollout


def prompts(tok, texts):
    return data.encode_prompts(tok, [[{"role": "user", "content": t}] for t in texts])


@pytest.fixture(scope="module")
def sampled(tok, tiny_model):
    ids = prompts(tok, ["1+2=", "12+13=", "9+19="])
    return rollout.sample(tiny_model, ids, 4, 6, 1.0, tok.eos_token_id, tok.pad_token_id, batch_size=5, seed=0)


def test_sampler_and_trainer_logps_agree(tiny_model, sampled):
    teacher_forced = logprobs.token_logps(tiny_model, sampled.seqs)
    assert sampled.sample_logps.abs().sum() > 0
    assert torch.allclose(teacher_forced, sampled.sample_logps, atol=1e-5)


def test_completion_masks_end_at_eos_or_truncation(tok, sampled):
    seqs = sampled.seqs
    assert len(seqs) == 12  # 3 prompts × 4, grouped by prompt
    for ids, mask, truncated in zip(seqs.completion_ids, seqs.completion_mask, sampled.truncated):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # a prefix of real tokens
        assert (ids[n:] == tok.pad_token_id).all()
        ended = n > 0 and ids[n - 1].item() == tok.eos_token_id
        assert ended != bool(truncated)
        assert tok.eos_token_id not in ids[:max(n - 1, 0)].tolist()  # nothing after the first EOS


def test_left_padding_does_not_change_logps(tok, tiny_model):
    """A sequence alone and the same sequence padded inside a batch get the same log-probs."""
    p = prompts(tok, ["1+2=", "12+13="])
    c = [[5, 6, tok.eos_token_id], [7, tok.eos_token_id]]
    alone = logprobs.token_logps(tiny_model, data.collate(p[:1], c[:1], tok.pad_token_id))
    batch = logprobs.token_logps(tiny_model, data.collate(p[::-1], c[::-1], tok.pad_token_id))
    assert torch.allclose(alone[0, :3], batch[1, :3], atol=1e-5)


def test_greedy_is_deterministic_and_seeded_sampling_reproducible(tok, tiny_model):
    ids = prompts(tok, ["3+4=", "10+11="])
    a = rollout.sample(tiny_model, ids, 1, 5, 0.0, tok.eos_token_id, tok.pad_token_id, 8)
    b = rollout.sample(tiny_model, ids, 1, 5, 0.0, tok.eos_token_id, tok.pad_token_id, 1)  # other batching
    assert torch.equal(a.seqs.completion_ids, b.seqs.completion_ids)
    s1, s2 = (rollout.sample(tiny_model, ids, 3, 5, 1.0, tok.eos_token_id, tok.pad_token_id, 8, seed=7)
              for _ in range(2))
    assert torch.equal(s1.seqs.input_ids, s2.seqs.input_ids)


def test_kl_to_reference(tiny_model, sampled):
    same = evaluation.kl_to_reference(tiny_model, tiny_model, sampled.seqs, 8)
    assert same.abs().max() < 1e-5
    other = type(tiny_model)(tiny_model.config)
    other.eval()
    kl = evaluation.kl_to_reference(tiny_model, other, sampled.seqs, 8)
    assert (kl > 0).all()


def test_every_stop_token_ends_a_completion(tok, tiny_model):
    """A chat model's generation config may list several end-of-turn tokens: any of them ends a completion."""
    ids = prompts(tok, ["1+2=", "12+13="])
    free = rollout.sample(tiny_model, ids, 4, 6, 1.0, tok.eos_token_id, tok.pad_token_id, 8,
                          seed=0)
    first = int(free.seqs.completion_ids[0, 0])
    assert first != tok.eos_token_id
    stopped = rollout.sample(tiny_model, ids, 4, 6, 1.0, [tok.eos_token_id, first], tok.pad_token_id, 8,
                             seed=0)
    assert int(stopped.seqs.completion_mask[0].sum()) == 1 and not stopped.truncated[0]
    assert int(stopped.seqs.completion_ids[0, 0]) == first  # the stop token is kept, as EOS is


def test_each_completion_has_its_own_random_stream(tok, tiny_model, sampled):
    """Rows sampled in other batches, or as the tail of a batch split across processes (first_row),
    draw the same tokens: what generation sharding relies on."""
    ids = prompts(tok, ["1+2=", "12+13=", "9+19="])
    args = (4, 6, 1.0, tok.eos_token_id, tok.pad_token_id)
    rebatched = rollout.sample(tiny_model, ids, *args, batch_size=3, seed=0)
    head = rollout.sample(tiny_model, ids[:1], *args, batch_size=8, seed=0)
    tail = rollout.sample(tiny_model, ids[1:], *args, batch_size=8, seed=0, first_row=4)
    split = rollout.concat([head, tail], tok.pad_token_id)
    for other in (rebatched, split):
        assert torch.equal(other.seqs.completion_ids, sampled.seqs.completion_ids)
        assert torch.equal(other.seqs.input_ids, sampled.seqs.input_ids)
        assert torch.allclose(other.sample_logps, sampled.sample_logps, atol=1e-5)
    other_seed = rollout.sample(tiny_model, ids, *args, batch_size=5, seed=1)
    assert not torch.equal(other_seed.seqs.completion_ids, sampled.seqs.completion_ids)
    assert len(set(map(tuple, sampled.seqs.completion_ids[:4].tolist()))) > 1  # a prompt's rows differ


def test_inverse_cdf_draws_follow_the_distribution_and_skip_impossible_tokens():
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3]]).repeat(20_000, 1)
    streams = [torch.Generator().manual_seed(rollout.stream_seed(0, i)) for i in range(len(probs))]
    drawn = rollout._draw(probs, streams)
    freq = torch.bincount(drawn, minlength=5).float() / len(drawn)
    assert freq[0] == 0 and freq[2] == 0
    assert torch.allclose(freq, probs[0], atol=0.015)  # 3.5 standard errors at 20k draws
