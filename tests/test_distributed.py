"""Two processes (gloo on the CPU) against one, through the stages' real entry points on the tiny model:
with the same global batch they make the same updates, so the final weights agree; a 2-process run
killed and resumed equals an uninterrupted one; only the main process writes.

Tolerance 2e-5 (fp32), as for accumulation (test_modes): each process runs half of every update's
rows and their gradients are summed, which changes only the order of float additions.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests import helpers
from tests.test_methods import align_args, upstream  # noqa: F401  (the fixture)
from tests.test_modes import TOL, max_gap
from tests.test_stages import smoke_params, weights

pytestmark = [pytest.mark.smoke, pytest.mark.distributed]
STAGES = {
    "sft": ["--train", "data/sft.jsonl", "--probe", "data/prompts.jsonl", "--base", "models/base"],
    "reward": ["--pairs", "data/preference.jsonl", "--sft", "models/sft", "--base", "models/base"],
}


def args(stage: str, out: str) -> list[str]:
    if stage in STAGES:
        return [stage, *STAGES[stage], "--out", out, "--metrics", f"{out}.json", "--plots", f"{out}.csv"]
    return ["align", *align_args(stage, out)]


def run(d, stage: str, out: str, processes: int, **extra):
    name, *rest = args(stage, out)
    return helpers.stage(name, *rest, cwd=d, ALIGNPIPE_PROCESSES=processes, **extra)


CASES = [  # (stage, params section, its settings, sharded: FSDP, else DDP)
    ("sft", "sft", {"steps": 6}, False),
    ("reward", "reward", {"steps": 6}, False),
    ("dpo", "align.dpo", {"steps": 4, "lr": 1e-3}, False),
    ("grpo", "align.grpo", {"steps": 3, "lr": 1e-3, "reward": {"reward_model": 1.0}}, False),
    ("sft", "sft", {"steps": 6}, True),
    ("reward", "reward", {"steps": 6}, True),
    ("ppo", "align.ppo", {"steps": 3, "lr": 1e-3}, True),
    ("grpo", "align.grpo", {"steps": 3, "lr": 1e-3, "reward": {"reward_model": 1.0}}, True),
    ("reward", "reward", {"steps": 6, "lora": {"r": 4}}, True),
    ("grpo", "align.grpo", {"steps": 3, "lr": 1e-2, "reward": {"reward_model": 1.0}, "lora": {"r": 4},
                            "logprob_chunk": 3, "beta": 0.1}, True),
    ("simpo", "align.simpo", {"steps": 4, "lr": 1e-3}, False),
    ("orpo", "align.orpo", {"steps": 4, "lr": 1e-3}, True),
    ("gspo", "align.gspo", {"steps": 2, "lr": 1e-3, "reward": {"reward_model": 1.0}, "epsilon": 0.05}, False),
    ("cispo", "align.cispo", {"steps": 2, "lr": 1e-3, "reward": {"reward_model": 1.0}, "epsilon_max": 1.05}, True),
    ("reinforce_pp", "align.reinforce_pp", {"steps": 3, "lr": 1e-3, "reward": {"reward_model": 1.0}}, True),
    ("distill", "align.distill", {"steps": 3, "lr": 1e-3}, True),
    ("distill", "align.distill", {"steps": 3, "lr": 1e-3, "divergence": "jsd"}, True),
]


def outputs(stage: str, settings: dict, sharded: bool) -> tuple[str, str]:
    """(the 1-process reference's output, the 2-process run's): the DDP and FSDP cases of the same settings
    share one reference."""
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return f"models/{stage}_1p_{key}", f"models/{stage}_2p_{'fsdp' if sharded else 'ddp'}_{key}"


def batch(d, jobs: list[dict], processes: int, **env):
    path = d / f"jobs_{processes}p_{len(jobs)}_{env.get('ALIGNPIPE_FSDP', 0)}.json"
    path.write_text(json.dumps(jobs))
    out = helpers.run([sys.executable, "-m", "tests.dist_batch", str(path), str(processes)], cwd=d, timeout=1200,
                      ALIGNPIPE_PROCESSES=processes, **env)
    assert len(out.stdout.strip().splitlines()) == len(jobs), out.stdout  # one summary each, from main only
    return out


@pytest.fixture(scope="module")
def trained(upstream):  # noqa: F811
    """Every case run once alone and once on 2 processes: the references in one process, the DDP cases in one
    launch of 2, the FSDP cases in another (tests/dist_batch.py), each case with its own params file."""
    d = upstream
    jobs: dict = {"1p": {}, False: [], True: []}
    for i, (stage, section, settings, sharded) in enumerate(CASES):
        params = d / f"params_case{i}.yaml"
        smoke_params(params, **{f"{section}.{k}": v for k, v in settings.items()})
        one_out, two_out = outputs(stage, settings, sharded)
        name, *rest = args(stage, one_out)
        jobs["1p"].setdefault(one_out, {"module": f"stages.{name}", "argv": [*rest, "--params", params.name]})
        name, *rest = args(stage, two_out)
        jobs[sharded].append({"module": f"stages.{name}", "argv": [*rest, "--params", params.name]})
    batch(d, list(jobs["1p"].values()), 1)
    batch(d, jobs[False], 2, ALIGNPIPE_FSDP=0)
    batch(d, jobs[True], 2, ALIGNPIPE_FSDP=1)
    return d


@pytest.mark.parametrize("stage, section, settings, sharded", CASES,
                         ids=lambda v: "fsdp" if v is True else "ddp" if v is False else "lora" if isinstance(v, dict)
                         and "lora" in v else "jsd" if isinstance(v, dict) and v.get("divergence") == "jsd" else None)
def test_two_processes_equal_one(trained, stage, section, settings, sharded):
    """sharded: FSDP (each process holds half of every weight, gradient and optimizer state, of the
    reference and reward model too; generation and scoring split in lockstep; the written model is
    gathered, a LoRA one merged from the gathered adapter), else each process a full copy with summed
    gradients. The LoRA GRPO case also runs chunked log-probs (the output head as an FSDP forward
    method) and a reference that is the policy with its adapter off."""
    d = trained
    one_out, two_out = outputs(stage, settings, sharded)
    one_w, two_w = weights(d / one_out), weights(d / two_out)
    assert one_w.keys() == two_w.keys()  # a tied weight written once, as save_pretrained does
    assert max_gap(one_w, two_w) < TOL
    start = weights(d / ("models/base" if stage == "sft" else "models/sft"))
    assert max(float((one_w[k] - start[k]).abs().max()) for k in one_w.keys() & start.keys()) > 100 * TOL  # it trained
    m1, m2 = (json.loads((d / f"{out}.json").read_text()) for out in (one_out, two_out))
    # abs: REINFORCE++'s whitened advantages make its loss ~1e-8 at ratio 1: only absolute agreement means anything
    assert m2["train/loss"] == pytest.approx(m1["train/loss"], rel=1e-4, abs=1e-6)
    assert m2["train/grad_norm"] == pytest.approx(m1["train/grad_norm"], rel=1e-4, abs=1e-6)


def test_a_lora_adapter_saved_alone_under_fsdp_equals_one_process(upstream):  # noqa: F811
    """lora.output: adapter under FSDP: the adapter is cut from the gathered state on the main process
    (lora.unsharded) and is the one a single process saves."""
    from safetensors.torch import load_file

    d = upstream
    smoke_params(d / "params.yaml", **{"sft.steps": 4, "sft.lora": {"r": 4, "output": "adapter"}})
    try:
        run(d, "sft", "models/sft_adapter_1p", 1)
        run(d, "sft", "models/sft_adapter_2p", 2, ALIGNPIPE_FSDP=1)
    finally:
        shutil.copy(helpers.SMOKE, d / "params.yaml")
    one, two = (load_file(str(d / f"models/sft_adapter_{n}p" / "adapter_model.safetensors")) for n in (1, 2))
    assert one and all("lora_" in k for k in one)  # the adapter alone
    # 2.5 TOL: on an AVX2-only CPU (AMD EPYC, no AVX-512) the gap was 2.7e-5, at the commit before the
    # generation engines too (the kernels' summation order differs by CPU); a wrong adapter is off by far more
    assert max_gap(one, two) < 2.5 * TOL
    assert json.loads((d / "models/sft_adapter_2p/adapter_config.json").read_text())["r"] == 4


def counted_reward(completions, prompts, **_) -> list[float]:
    """A user's reward function (pairs.score.functions) that logs how many completions each call got."""
    if os.environ.get("COUNTED_REWARD_LOG"):
        with open(os.environ["COUNTED_REWARD_LOG"], "a") as f:
            f.write(f"{os.getpid()} {len(completions)}\n")
    assert len(prompts) == len(completions)
    return [len(c) / 10 for c in completions]


def read_rows(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def same_rows(a: list[dict], b: list[dict]) -> None:
    """The same rows: token ids, texts and labels equal; floats to 1e-4 (a shard's forward passes see
    other batch shapes than one process's, which moves the last bits of a sum)."""
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], float):
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-4), key
            else:
                assert x[key] == y[key], key


@pytest.mark.parametrize("sharded", [False, True], ids=["ddp", "fsdp"])
def test_generation_and_scoring_are_sharded_and_equal_one_process(upstream, sharded):  # noqa: F811
    """pairs (sampling, reward-model scores, reference log-probs) and evaluate (greedy answers, sampled
    KL, win rate) on 2 processes, each generating half the prompts, give what 1 process gives: every
    completion draws from its own random stream (rollout.sample). Under FSDP every model is sharded and
    the processes generate and score in lockstep. An odd number of prompts and batch sizes that leave
    one process a batch more than the other (31 prompts of 4 samples, batches of 60; 23 held-out
    prompts, batches of 11) make that happen."""
    d = upstream
    for name, rows in (("prompts", 31), ("eval", 23)):
        lines = (d / f"data/{name}.jsonl").read_text().splitlines(True)
        (d / f"data/{name}_odd.jsonl").write_text("".join(lines[:rows]))
    smoke_params(d / "params.yaml", **{"pairs.batch_size": 60, "evaluate.batch_size": 11,
                                       "pairs.score.functions": {"tests.test_distributed:counted_reward": 0.5}})
    counts = d / f"counts_{sharded}"
    runs = {"1p": {"ALIGNPIPE_PROCESSES": 1},
            "2p": {"ALIGNPIPE_PROCESSES": 2, "ALIGNPIPE_FSDP": int(sharded), "COUNTED_REWARD_LOG": counts}}
    try:
        for name, env in runs.items():
            if name == "1p" and (d / "eval_1p.json").exists():
                continue  # the other variant made it
            helpers.stage("pairs", "--prompts", "data/prompts_odd.jsonl", "--sft", "models/sft", "--reward",
                          "models/reward", "--out", f"pairs_{name}", "--metrics", f"pairs_{name}.json", cwd=d, **env)
            helpers.stage("evaluate", "dpo", "--eval", "data/eval_odd.jsonl", "--policy", "models/sft", "--ref",
                          "models/base", "--reward", "models/reward", "--train-metrics", "metrics/train_sft.json",
                          "--baseline", "evals/sft.jsonl", "--out", f"eval_{name}.json", "--answers",
                          f"answers_{name}.jsonl", cwd=d, **env)
    finally:
        shutil.copy(helpers.SMOKE, d / "params.yaml")
    for name in ("samples", "pairs", "kto"):
        same_rows(read_rows(d / "pairs_1p" / f"{name}.jsonl"), read_rows(d / "pairs_2p" / f"{name}.jsonl"))
    calls = [line.split() for line in counts.read_text().splitlines()]  # a user's reward: each completion once
    assert len({pid for pid, _ in calls}) == 2 and sum(int(n) for _, n in calls) == 31 * 4
    same_rows(read_rows(d / "answers_1p.jsonl"), read_rows(d / "answers_2p.jsonl"))
    e1, e2 = (json.loads((d / f"eval_{n}.json").read_text()) for n in ("1p", "2p"))
    for key in ("eval/accuracy", "eval/reward_mean", "eval/win_rate_vs_sft", "eval/kl_to_ref", "eval/length"):
        assert e2[key] == pytest.approx(e1[key], rel=1e-4, abs=1e-5), key
    assert e1["eval/kl_to_ref"] > 0


@pytest.mark.parametrize("sharded", [False, True], ids=["ddp", "fsdp"])
def test_a_two_process_run_killed_and_resumed_equals_an_uninterrupted_one(upstream, sharded):  # noqa: F811
    """Under FSDP the checkpoint holds the gathered full weights and optimizer state, and each process
    takes its shard back on resume."""
    d = upstream
    straight, resumed = (f"models/s_{name}_{'fsdp' if sharded else 'ddp'}" for name in ("straight", "resumed"))
    smoke_params(d / "params.yaml", **{"sft.steps": 12, "sft.checkpoint_every": 4, "sft.probes": 0})
    try:
        run(d, "sft", straight, 2, ALIGNPIPE_FSDP=int(sharded))
        env = helpers.env(ALIGNPIPE_PROCESSES=2, ALIGNPIPE_FSDP=int(sharded))
        proc = subprocess.Popen([sys.executable, "-m", "stages.sft", *args("sft", resumed)[1:]], cwd=d,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        meta = d / ".checkpoints" / "sft" / "meta.json"
        deadline = time.time() + 120
        while not meta.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # the launcher: its processes die with it
        proc.wait()
        assert meta.exists(), "no checkpoint before the stage ended"
        time.sleep(0.5)
        assert not (d / resumed).exists()  # no orphan process finished the stage
        import torch

        before = torch.load(d / ".checkpoints" / "sft" / "state.pt", weights_only=False)["extra"]["elapsed_s"]
        out = run(d, "sft", resumed, 2, ALIGNPIPE_FSDP=int(sharded))
    finally:
        shutil.copy(helpers.SMOKE, d / "params.yaml")
    assert "resuming from step" in out.stdout
    assert max_gap(weights(d / straight), weights(d / resumed)) < 1e-6
    assert not (d / ".checkpoints" / "sft").exists()  # cleared once the outputs were written
    metrics = json.loads((d / f"{resumed}.json").read_text())
    assert metrics["cost/wall_s"] > before > 0  # the cost counts the segment before the kill too


def test_a_failing_process_is_one_line_and_a_nonzero_exit(upstream):  # noqa: F811
    d = upstream
    smoke_params(d / "params.yaml", **{"reward.min_accuracy": 1.0, "reward.steps": 2})
    try:
        out = helpers.stage(*args("reward", "models/r_fail"), cwd=d, check=False, ALIGNPIPE_PROCESSES=2)
    finally:
        shutil.copy(helpers.SMOKE, d / "params.yaml")
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if "error" in line]  # beside the main process's bars
    assert len(errors) == 1 and errors[0].startswith("error: reward: held-out pairwise accuracy")
    assert not (d / "models" / "r_fail").exists()


def test_processes_come_from_the_machines_accelerate_config(tmp_path, monkeypatch):
    from stages.core import dist

    monkeypatch.delenv("ALIGNPIPE_PROCESSES", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert dist.wanted_processes() == 1
    (tmp_path / "accelerate").mkdir()
    (tmp_path / "accelerate" / "default_config.yaml").write_text("distributed_type: MULTI_GPU\nnum_processes: 8\n")
    assert dist.wanted_processes() == 8
    monkeypatch.setenv("ALIGNPIPE_PROCESSES", "2")
    assert dist.wanted_processes() == 2
    dist._fsdp_wanted.cache_clear()
    assert not dist._fsdp_wanted()
    (tmp_path / "accelerate" / "default_config.yaml").write_text("distributed_type: FSDP\nnum_processes: 8\n")
    dist._fsdp_wanted.cache_clear()
    assert dist._fsdp_wanted() and not dist.fsdp()  # chosen, but a single process has nothing to shard
    dist._fsdp_wanted.cache_clear()
    assert os.environ.get("WORLD_SIZE") is None  # the tests themselves run in one process
