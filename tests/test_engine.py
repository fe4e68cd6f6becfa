"""The vLLM engine (generation.engine: vllm), real, in its own environment (`make vllm`), on the CPU in fp32:
its greedy completions equal our sampler's, its samples follow the model's distribution with one random
stream per row, its log-probs are the trainer's, every weight push is checked (a stale layer is caught),
LoRA pushes merged weights, and the stages run with it: a GRPO stage killed and resumed equals an
uninterrupted one, and evaluate's greedy answers are the hf engine's."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from stages.core import config, data, engine, logprobs, models, rollout
from tests import helpers
from tests.test_stages import smoke_params, weights

pytestmark = pytest.mark.vllm
VLLM_FP32 = config.GenerationConfig(engine="vllm", kv_cache_gb=0.25)


@pytest.fixture(scope="module")
def wide(tok, tmp_path_factory):
    """A tiny Llama with 32-wide heads (vLLM's CPU kernels take no narrower ones), tied head, saved."""
    m = models.build_tiny_llama(tok, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128,
                                max_positions=32, seed=0)
    d = tmp_path_factory.mktemp("wide")
    m.save_pretrained(d)
    tok.save_pretrained(d)
    m.eval()
    return m, d


@pytest.fixture(scope="module")
def eng(wide):
    model, d = wide
    with engine.open_engine(VLLM_FP32, d) as e:
        e.sync(model)
        yield e


def prompts(tok, texts):
    return data.encode_prompts(tok, [[{"role": "user", "content": t}] for t in texts])


def test_greedy_completions_equal_our_samplers(tok, wide, eng):
    model, _ = wide
    ids = prompts(tok, ["1+2=", "12+13=", "9+19=", "33+4=", "0+0="])
    ours = rollout.sample(model, ids, 1, 8, 0.0, models.stop_ids(tok), tok.pad_token_id, 8)
    theirs = eng.sample(ids, 1, 8, 0.0, models.stop_ids(tok), tok.pad_token_id)
    assert torch.equal(ours.seqs.input_ids, theirs.seqs.input_ids)
    assert torch.equal(ours.seqs.attention_mask, theirs.seqs.attention_mask)
    assert torch.equal(ours.truncated, theirs.truncated)
    assert (ours.sample_logps - theirs.sample_logps).abs().max() < 1e-4


def test_sampled_log_probs_are_the_trainers_and_rows_have_their_own_streams(tok, wide, eng):
    model, _ = wide
    ids = prompts(tok, ["1+2=", "12+13=", "9+19="])
    args = (4, 6, 1.0, models.stop_ids(tok), tok.pad_token_id)
    s = eng.sample(ids, *args, seed=3)
    mask = s.seqs.completion_mask
    assert mask.sum() > 0
    assert ((logprobs.token_logps(model, s.seqs) - s.sample_logps).abs() * mask).max() < 1e-4
    tail = eng.sample(ids[1:], *args, seed=3, first_row=4)  # the rows of another process's share
    width = tail.seqs.completion_ids.shape[1]
    assert torch.equal(s.seqs.completion_ids[4:, :width], tail.seqs.completion_ids)
    assert torch.equal(eng.sample(ids, *args, seed=3).seqs.input_ids, s.seqs.input_ids)  # reproducible
    assert not torch.equal(eng.sample(ids, *args, seed=4).seqs.completion_ids, s.seqs.completion_ids)
    for row, n, cut in zip(s.seqs.completion_ids, mask.sum(-1), s.truncated):  # ends at the stop token, kept
        assert (int(row[n - 1]) in models.stop_ids(tok)) != bool(cut)


def test_samples_follow_the_models_distribution(tok, wide, eng):
    """4000 one-token completions of one prompt at temperature 0.7 from a model with peaked next-token
    distributions (the random model's final norm scaled up, pushed to the engine): a chi-square test accepts
    the model's distribution at that temperature and rejects it at temperature 1."""
    from scipy.stats import chisquare

    base, _ = wide
    model = models.build_tiny_llama(tok, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128,
                                    max_positions=32, seed=0)
    model.load_state_dict(base.state_dict())
    with torch.no_grad():
        model.model.norm.weight.mul_(12.0)
    model.eval()
    eng.sync(model)
    ids = prompts(tok, ["12+13="])
    n = 4000
    s = eng.sample(ids, n, 1, 0.7, models.stop_ids(tok), tok.pad_token_id, seed=11)
    eng.sync(base)
    counts = torch.bincount(s.seqs.completion_ids[:, 0], minlength=len(tok)).double()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids)).logits[0, -1].double()

    def p_value(temperature: float) -> float:
        expected = torch.softmax(logits / temperature, -1) * n
        big = expected >= 5  # bins with enough expected counts; the rest pooled into one
        obs = torch.cat([counts[big], counts[~big].sum()[None]])
        exp = torch.cat([expected[big], expected[~big].sum()[None]])
        return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)

    assert torch.softmax(logits / 0.7, -1).max() > 0.05  # peaked: the two temperatures are told apart
    assert p_value(0.7) > 1e-3
    assert p_value(1.0) < 1e-6


def test_a_batch_over_the_engines_token_budget_samples_every_seeded_row(tok, wide, eng):
    """200 seeded rows of 26 prompt tokens (5,200 tokens, over vLLM's 4,096-token step on the CPU): with
    chunked prefill a prompt split across steps made vLLM rewind a CPU generator and fail; every row is
    sampled, and the same as when it is sampled alone."""
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(10, len(tok), (26,), generator=g).tolist() for _ in range(200)]
    s = eng.sample(ids, 1, 4, 1.0, models.stop_ids(tok), tok.pad_token_id, seed=5)
    assert len(s.seqs) == 200 and int(s.seqs.completion_mask.sum(-1).min()) >= 1
    alone = eng.sample(ids[150:151], 1, 4, 1.0, models.stop_ids(tok), tok.pad_token_id, seed=5, first_row=150)
    n = alone.seqs.completion_ids.shape[1]
    assert torch.equal(s.seqs.completion_ids[150, :n], alone.seqs.completion_ids[0])


def test_every_push_gives_the_engine_the_trainers_weights(tok, wide, eng):
    """AdamW steps on a model with a tied output head: after each push the engine's log-probs of a fixed
    sequence equal the trainer's (fp32, within 1e-4) and differ from the previous step's."""
    base, _ = wide
    model = models.build_tiny_llama(tok, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128,
                                    max_positions=32, seed=0)
    model.load_state_dict(base.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    seq = torch.tensor(prompts(tok, ["7+8="]))
    previous, pushes = None, eng.stats["engine/pushes"]
    for _ in range(3):
        model.train()
        torch.log_softmax(model(input_ids=seq).logits, -1)[0, :, 7].sum().neg().backward()
        opt.step()
        opt.zero_grad()
        model.eval()
        eng.sync(model)
        assert eng.stats["engine/push_logp_gap"] < 1e-4
        if previous is not None:
            assert max(abs(a - b) for a, b in zip(previous, eng.previous_check)) > 1e-3
        previous = list(eng.previous_check)
    eng.sync(model)  # no update since: nothing pushed
    assert eng.stats["engine/pushes"] == pushes + 3  # one per step
    eng.sync(base)  # back to the module's model for the other tests


def test_a_push_inside_bf16_autocast_is_checked_in_fp32(tok, wide, eng):
    """Stages sample inside bf16 autocast on GPUs and on CPUs with bf16 units (models.autocast): the push
    check still compares the fp32 engine with the trainer's exact fp32 log-probs. (Before, on such a CPU,
    `make real` with the engine stopped at evaluate@sft: a 0.238-nat gap taken for a stale layer.)"""
    base, _ = wide
    model = models.build_tiny_llama(tok, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128,
                                    max_positions=32, seed=1)  # other weights than the engine has: a push
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eng.sync(model)
        assert eng.stats["engine/push_logp_gap"] < 1e-4
        eng.sync(base)  # back to the module's model for the other tests


def test_a_fused_optimizer_step_changes_the_weights_version():
    """The fused AdamW (stages not in exact fp32: GPUs, CPUs with bf16 units) does not bump torch's version
    counters by itself: without the optimizer's hook the engine kept the first weights all run long (seen
    in `make real` with the engine: engine/pushes 1 after 48 GRPO steps)."""
    from types import SimpleNamespace

    from stages.core import train

    model = torch.nn.Linear(2, 2)
    for fused in (False, True):
        opt = train.make_optimizer(model.parameters(), SimpleNamespace(lr=0.1, weight_decay=0.0), fused=fused)
        before = engine.weights_version(model)
        model(torch.ones(1, 2)).sum().backward()
        opt.step()
        assert engine.weights_version(model) != before, fused


def test_a_stale_layer_is_caught(tok, wide, eng):
    """A push that leaves one layer on the old weights fails the check with one line."""
    from safetensors.torch import save_file

    base, _ = wide
    model = models.build_tiny_llama(tok, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128,
                                    max_positions=32, seed=1)  # other weights everywhere
    state = engine._state(model)
    state["model.layers.1.mlp.down_proj.weight"] = base.state_dict()["model.layers.1.mlp.down_proj.weight"].clone()
    save_file(state, str(eng.tmp / "partial.safetensors"))
    eng._call({"op": "push", "path": str(eng.tmp / "partial.safetensors")})
    with pytest.raises(engine.EngineError, match="stale"):
        eng.check(model)
    eng.pushed = None
    eng.sync(base)


def test_lora_pushes_merged_weights(tok, wide, eng):
    from stages.core import lora

    base, _ = wide
    model = models.build_tiny_llama(tok, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128,
                                    max_positions=32, seed=0)
    model.load_state_dict(base.state_dict())
    model = lora.wrap(model, config.LoraConfig(r=4), "CAUSAL_LM")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    seq = torch.tensor(prompts(tok, ["7+8="]))
    for _ in range(2):
        torch.log_softmax(model(input_ids=seq).logits, -1)[0, :, 7].sum().neg().backward()
        opt.step()
        opt.zero_grad()
    before = base.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert (lora.merged_state(model)["model.layers.0.self_attn.q_proj.weight"] - before).abs().max() > 1e-4
    model.eval()
    eng.sync(model)
    assert eng.stats["engine/push_logp_gap"] < 1e-4
    eng.sync(base)


def test_a_model_the_cpu_engine_cannot_run_is_one_line():
    from transformers import LlamaConfig

    with pytest.raises(config.ConfigError, match="head_dim 16"):
        engine.check_model(LlamaConfig(hidden_size=32, num_attention_heads=2))


# ---------------------------------------------------------------------------------------------- the stages

@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """The smoke chain at helpers.LEAN's sizes with 32-wide heads, the vLLM engine in fp32 from pairs on."""
    d = tmp_path_factory.mktemp("engine_chain")
    sections = {**helpers.LEAN, "model.embedded.hidden_size": 64, "model.embedded.num_heads": 2,
                "model.embedded.intermediate_size": 128}
    smoke_params(d / "params.yaml", **sections)
    helpers.stage("prepare", "--data-out", "data", "--model-out", "models/base", cwd=d)
    helpers.stage("sft", "--train", "data/sft.jsonl", "--probe", "data/prompts.jsonl", "--base", "models/base",
                  "--out", "models/sft", "--metrics", "metrics/train_sft.json", "--plots", "plots/train_sft.csv", cwd=d)
    helpers.stage("reward", "--pairs", "data/preference.jsonl", "--sft", "models/sft", "--base", "models/base",
                  "--out", "models/reward", "--metrics", "metrics/reward.json", "--plots", "plots/reward.csv", cwd=d)
    return d, sections


def vllm_params(d, sections, **more):
    return smoke_params(d / "params.yaml", **sections, **{"generation.engine": "vllm", "generation.kv_cache_gb": 0.25},
                        **more)


def evaluate_args(out):
    return ["sft", "--eval", "data/eval.jsonl", "--policy", "models/sft", "--ref", "models/sft", "--reward",
            "models/reward", "--train-metrics", "metrics/train_sft.json", "--out", f"{out}.json",
            "--answers", f"{out}.jsonl"]


def test_evaluate_with_the_engine_gives_the_hf_engines_greedy_answers(upstream):
    d, sections = upstream
    smoke_params(d / "params.yaml", **sections)
    helpers.stage("evaluate", *evaluate_args("e_hf"), cwd=d)
    vllm_params(d, sections)
    out = helpers.stage("evaluate", *evaluate_args("e_vllm"), cwd=d)
    assert "evaluate@sft" in out.stdout
    hf, vl = ((d / f"{x}.jsonl").read_text().splitlines() for x in ("e_hf", "e_vllm"))
    assert len(hf) > 0 and hf == vl
    metrics = json.loads((d / "e_vllm.json").read_text())
    assert metrics["engine/pushes"] == 1 and metrics["engine/push_logp_gap"] < 1e-4


def test_pairs_sample_with_the_engine(upstream):
    d, sections = upstream
    vllm_params(d, sections)
    helpers.stage("pairs", "--prompts", "data/prompts.jsonl", "--sft", "models/sft", "--reward", "models/reward",
                  "--out", "pairs", "--metrics", "metrics/pairs.json", cwd=d)
    metrics = json.loads((d / "metrics" / "pairs.json").read_text())
    n_prompts, num_samples = sections["data.embedded.n_prompts"], 4  # params.smoke.yaml's pairs.num_samples
    assert metrics["pairs/n_samples"] == n_prompts * num_samples and metrics["engine/pushes"] == 1


def align_args(out):
    return ["grpo", "--pairs", "pairs", "--prompts", "data/prompts.jsonl", "--sft", "models/sft",
            "--reward", "models/reward", "--out", out, "--metrics", f"{out}.json", "--plots", f"{out}.csv"]


GRPO = {"align.grpo.steps": 4, "align.grpo.checkpoint_every": 2, "align.grpo.probes": 2, "align.grpo.log_every": 1,
        "align.grpo.lr": 1e-3, "align.grpo.reward": {"reward_model": 1.0}}  # a checkpoint at step 2: 2 steps after it


@pytest.fixture(scope="module")
def grpo_straight(upstream):
    """One uninterrupted GRPO run on 1 process with the engine (GRPO's params): what a resumed run and a
    2-process run must equal."""
    d, sections = upstream
    vllm_params(d, sections, **GRPO)
    helpers.stage("align", *align_args("models/g_straight"), cwd=d, ALIGNPIPE_PROCESSES=1)
    return d, sections


def test_grpo_with_the_engine_resumes_exactly_after_a_kill(grpo_straight):
    """Weights pushed every step, the mismatch logged, and a killed run resumed equals an uninterrupted one."""
    d, sections = grpo_straight
    vllm_params(d, sections, **GRPO)
    proc = subprocess.Popen([sys.executable, "-m", "stages.align", *align_args("models/g_resumed")], cwd=d,
                            env=helpers.env(ALIGNPIPE_PROCESSES=1), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    meta = d / ".checkpoints" / "align-grpo" / "meta.json"
    deadline = time.time() + 240
    while not meta.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert meta.exists(), "no checkpoint before the stage ended"
    out = helpers.stage("align", *align_args("models/g_resumed"), cwd=d, ALIGNPIPE_PROCESSES=1)
    assert "resuming from step" in out.stdout
    a, b = weights(d / "models" / "g_straight"), weights(d / "models" / "g_resumed")
    assert all((a[k] - b[k]).abs().max() < 1e-6 for k in a)
    m = json.loads((d / "models" / "g_straight.json").read_text())
    steps = GRPO["align.grpo.steps"]
    assert m["engine/pushes"] >= steps  # one per step (the probes after a step find nothing new) and the first
    assert m["rollout/logp_gap"] < 1e-3 and m["rollout/sampler_logp_gap"] < 1e-4
    assert m["rollout/tis_capped"] == 0.0 and abs(m["rollout/tis_weight"] - 1) < 1e-3
    shutil.rmtree(d / ".checkpoints", ignore_errors=True)


def test_two_processes_with_the_engine_equal_one(grpo_straight):
    """Launched on 2 processes, each samples its share of the rows (and of the probes) with an engine of its
    own (every row its own seed), so the GRPO run makes the updates 1 process makes (the shared straight run)."""
    from tests.test_modes import TOL, max_gap

    d, sections = grpo_straight
    vllm_params(d, sections, **GRPO)
    shutil.rmtree(d / ".checkpoints", ignore_errors=True)  # nothing to resume from
    helpers.stage("align", *align_args("models/g_2p"), cwd=d, ALIGNPIPE_PROCESSES=2)
    one, two = weights(d / "models" / "g_straight"), weights(d / "models" / "g_2p")
    assert max_gap(one, two) < TOL
    start = weights(d / "models" / "sft")
    assert max(float((one[k] - start[k]).abs().max()) for k in one.keys() & start.keys()) > 100 * TOL  # it trained
