"""A real chat template appends tokens after the end of a turn (ChatML: "<|im_end|>\\n"). Training data
must end a completion where the sampler ends it, or the reward model is trained at one token and applied
at another, and SFT learns to emit the template's trailing newline."""

import copy

import pytest
import torch

from stages.core import data, losses, models, rewards, rollout
from stages.core.logprobs import token_logps

# ChatML's shape on the tiny tokenizer's special tokens: role header, content, end of turn, then "\n".
CHATML = ("{% for m in messages %}<|system|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|system|>assistant\n{% endif %}")
PROMPT = [{"role": "user", "content": "12+34="}]


@pytest.fixture(scope="module")
def chatml(tok):
    t = copy.deepcopy(tok)
    t.chat_template = CHATML
    return t


def test_a_completion_ends_at_its_end_of_turn_token_not_after_the_template_newline(chatml):
    rendered = chatml.apply_chat_template(PROMPT + [{"role": "assistant", "content": "64"}], tokenize=False)
    assert rendered.endswith("<|eos|>\n")  # the template does append a newline after the turn
    row = data.tokenize(chatml, [{"prompt": PROMPT, "completion": [{"role": "assistant", "content": "64"}]}], "sft")[0]
    assert row["completion_ids"][-1] == chatml.eos_token_id
    assert chatml.decode(row["completion_ids"]) == "64<|eos|>"  # SFT never trains on the "\n"
    # a second stop token (a generation config may list several) cuts there too
    newline = chatml.encode("\n", add_special_tokens=False)[0]
    assert data.cut_after_stop([5, newline, 6, chatml.eos_token_id], {chatml.eos_token_id, newline}) == [5, newline]


def test_reward_model_scores_a_training_pair_where_it_scores_the_sampled_completion(chatml, tiny_model, tmp_path):
    """Teach the tiny model to answer "64" then end, sample it with the real sampler, and score that
    completion both as the sampler produced it and as the training data (rendered by the template)."""
    policy = copy.deepcopy(tiny_model).train()
    prompt_ids = data.encode_prompts(chatml, [PROMPT])
    target = data.tokenize(chatml, [{"prompt": PROMPT, "completion": [{"role": "assistant", "content": "64"}]}],
                           "sft")[0]["completion_ids"]
    batch = data.collate(prompt_ids, [target], chatml.pad_token_id)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-2)
    for _ in range(60):
        loss = losses.sft_loss(token_logps(policy, batch), batch.completion_mask)
        loss.backward()
        opt.step()
        opt.zero_grad()
    # two prompts of different lengths, so the sampler pads (left and right) as it does in training runs
    other = data.encode_prompts(chatml, [[{"role": "user", "content": "1+2= and more words"}]])
    sampled = rollout.sample(policy, other + prompt_ids, 1, 6, 0.0, [chatml.eos_token_id], chatml.pad_token_id, 8)
    row_ids = sampled.seqs.completion_ids[1][sampled.seqs.completion_mask[1].bool()].tolist()
    assert row_ids == target and not sampled.truncated[1]  # the sampler stops at the end-of-turn token

    policy.save_pretrained(tmp_path)
    chatml.save_pretrained(tmp_path)
    rm = models.load_reward_model(str(tmp_path), torch.device("cpu"), pad_token_id=chatml.pad_token_id)
    text = chatml.decode(row_ids, skip_special_tokens=True)
    pair = data.tokenize(chatml, [{"prompt": PROMPT, "chosen": [{"role": "assistant", "content": text}],
                                   "rejected": [{"role": "assistant", "content": "65"}]}], "preference")
    trained_at = rewards.reward_model_scores(rm, data.collate_pairs(pair, chatml.pad_token_id), 8)[0]
    applied_at = rewards.reward_model_scores(rm, sampled.seqs, 8)[1]
    assert torch.allclose(trained_at, applied_at, atol=1e-5)
    # and the bug this guards against: scored one token later (after the template's "\n") it differs
    newline = chatml.encode("\n", add_special_tokens=False)
    late = data.collate(prompt_ids, [target + newline], chatml.pad_token_id)
    assert not torch.allclose(rewards.reward_model_scores(rm, late, 8)[0], applied_at, atol=1e-3)
