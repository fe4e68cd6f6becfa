"""Every alignment method's real entry point on the tiny model, after prepare → sft → reward → pairs:
it trains, writes its model and the shared metric names, evaluates, and counts its cost. GRPO resumes
exactly after a kill (generator state included)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests import helpers
from tests.test_docs import documented_metrics, is_documented
from tests.test_stages import smoke_params, weights

pytestmark = pytest.mark.smoke
MODELS_IN_MEMORY = {"ppo": 4, "dpo": 1, "ipo": 1, "kto": 1, "grpo": 2, "rloo": 2, "simpo": 1, "orpo": 1,
                    "gspo": 1, "cispo": 1, "reinforce_pp": 2, "distill": 2}  # gspo, cispo: β = 0 holds no reference
ONLINE_METHODS = {"ppo", "grpo", "rloo", "gspo", "cispo", "reinforce_pp", "distill"}
SHARED = {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_sec", "cost/models_in_memory",
          "cost/tokens_generated", "cost/wall_s", "cost/peak_mem_mb", "probe/accuracy"}
OFFLINE = {"rewards/chosen", "rewards/rejected", "rewards/margins"}
ONLINE = {"rollout/reward_mean", "rollout/reward_std", "rollout/length", "rollout/accuracy", "policy/clipfrac",
          "policy/entropy", "perf/gen_share", "perf/rollout_tokens_per_sec", "rollout/logp_gap"}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """prepare → sft → reward → pairs → evaluate sft on the smoke profile, in this module's own directory: a copy of
    one built once per test session (test_methods, test_modes, test_lora and test_distributed all start from it,
    on whichever xdist worker runs them; the first to ask builds it under a file lock)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the session's, under xdist
    built = shared / "upstream-smoke"
    with FileLock(str(shared / "upstream-smoke.lock")):
        if not (built / ".built").exists():
            shutil.rmtree(built, ignore_errors=True)
            build_upstream(built)
            (built / ".built").touch()
    d = tmp_path_factory.mktemp("methods")
    shutil.copytree(built, d, dirs_exist_ok=True)
    return d


def build_upstream(d):
    d.mkdir(parents=True)
    shutil.copy(helpers.SMOKE, d / "params.yaml")
    helpers.stage("prepare", "--data-out", "data", "--model-out", "models/base", cwd=d)
    helpers.stage("sft", "--train", "data/sft.jsonl", "--probe", "data/prompts.jsonl", "--base", "models/base",
                  "--out", "models/sft", "--metrics", "metrics/train_sft.json", "--plots", "plots/train_sft.csv", cwd=d)
    helpers.stage("reward", "--pairs", "data/preference.jsonl", "--sft", "models/sft", "--base", "models/base",
                  "--out", "models/reward", "--metrics", "metrics/reward.json", "--plots", "plots/reward.csv", cwd=d)
    helpers.stage("pairs", "--prompts", "data/prompts.jsonl", "--sft", "models/sft", "--reward", "models/reward",
                  "--out", "pairs", "--metrics", "metrics/pairs.json", cwd=d)
    helpers.stage("evaluate", "sft", "--eval", "data/eval.jsonl", "--policy", "models/sft", "--ref", "models/sft",
                  "--reward", "models/reward", "--train-metrics", "metrics/train_sft.json",
                  "--out", "metrics/eval_sft.json", "--answers", "evals/sft.jsonl", cwd=d)
    return d


def align_args(method, out=None):
    """The stage's command line; distill's teacher is the base model here (its vocabulary, other weights)."""
    out = out or f"models/{method}"
    return [method, "--pairs", "pairs", "--prompts", "data/prompts.jsonl", "--sft", "models/sft",
            "--reward", "models/reward", "--out", out, "--metrics", f"{out}.json", "--plots", f"{out}.csv",
            *(["--teacher", "models/base"] if method == "distill" else [])]


def test_pairs_store_kto_rows_with_mismatched_reference(upstream):
    rows = [json.loads(x) for x in (upstream / "pairs" / "kto.jsonl").read_text().splitlines()]
    pairs = (upstream / "pairs" / "pairs.jsonl").read_text().splitlines()
    assert len(rows) == 2 * len(pairs) > 0
    assert [r["label"] for r in rows[:2]] == [True, False]
    for i, r in enumerate(rows):
        assert r["kl_completion_ids"] == rows[(i + 2) % len(rows)]["completion_ids"]  # another prompt's completion
        assert isinstance(r["kl_ref_logp"], float) and r["kl_ref_logp"] < 0


@pytest.fixture(scope="module")
def every_method(upstream):
    """Every method trained by the align stage's main, one after another in one process (tests/dist_batch.py:
    one start and one import of torch for all; the stage's own `python -m` entry runs in the tests below)
    → its summary line per method."""
    jobs = [{"module": "stages.align", "argv": align_args(m)} for m in MODELS_IN_MEMORY]
    (upstream / "jobs_methods.json").write_text(json.dumps(jobs))
    out = helpers.run([sys.executable, "-m", "tests.dist_batch", "jobs_methods.json", "1"], cwd=upstream)
    return dict(zip(MODELS_IN_MEMORY, out.stdout.strip().splitlines()))


@pytest.mark.parametrize("method", list(MODELS_IN_MEMORY))
def test_method_trains_and_counts_its_cost(upstream, every_method, method):
    d = upstream
    label = "distill@base" if method == "distill" else f"align@{method}"
    assert every_method[method].startswith(f"{label}:")
    m = json.loads((d / f"models/{method}.json").read_text())
    expected = SHARED | (ONLINE if method in ONLINE_METHODS else OFFLINE)
    assert expected - set(m) == set(), method
    assert m["cost/models_in_memory"] == MODELS_IN_MEMORY[method]
    assert (m["cost/tokens_generated"] > 0) == (method in ONLINE_METHODS)
    if "rollout/logp_gap" in m:
        assert m["rollout/logp_gap"] < 1e-3  # the sampler and the trainer see the same weights
    assert (d / "models" / method / "model.safetensors").exists()
    names = documented_metrics()
    assert not [k for k in m if "/" in k and not is_documented(k, names)], "not on docs/reference/metrics.md"


def test_evaluate_copies_the_training_cost(upstream):
    """evaluate@ppo: the held-out figures, and the cost of the four-model training it evaluates."""
    d, method = upstream, "ppo"
    if not (d / "models" / method).exists():
        helpers.stage("align", *align_args(method), cwd=d)
    helpers.stage("evaluate", method, "--eval", "data/eval.jsonl", "--policy", f"models/{method}", "--ref",
                  "models/sft", "--reward", "models/reward", "--train-metrics", f"models/{method}.json",
                  "--baseline", "evals/sft.jsonl", "--out", f"eval_{method}.json", "--answers", f"evals/{method}.jsonl",
                  cwd=d)
    e = json.loads((d / f"eval_{method}.json").read_text())
    assert e["cost/models_in_memory"] == MODELS_IN_MEMORY[method]
    assert e["eval/kl_to_ref"] >= 0 and 0 <= e["eval/win_rate_vs_sft"] <= 1


def test_kto_warns_when_the_weights_are_out_of_range(upstream):
    smoke_params(upstream / "params.yaml", **{"align.kto.desirable_weight": 3.0, "align.kto.steps": 2})
    try:
        out = helpers.stage("align", *align_args("kto", "models/kto_w"), cwd=upstream)
    finally:
        shutil.copy(helpers.SMOKE, upstream / "params.yaml")
    assert "warning: align.kto: desirable_weight·n_D / (undesirable_weight·n_U) = 3.00 is outside [1, 4/3]" \
        in out.stdout


def test_grpo_resumes_exactly_after_a_kill(upstream):
    d = upstream
    smoke_params(d / "params.yaml", **{"align.grpo.steps": 8, "align.grpo.checkpoint_every": 2,
                                        "align.grpo.probes": 0})
    try:
        helpers.stage("align", *align_args("grpo", "models/g_straight"), cwd=d)
        proc = subprocess.Popen([sys.executable, "-m", "stages.align", *align_args("grpo", "models/g_resumed")], cwd=d,
                                env=helpers.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        meta = d / ".checkpoints" / "align-grpo" / "meta.json"
        deadline = time.time() + 120
        while not meta.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert meta.exists(), "no checkpoint before the stage ended"
        out = helpers.stage("align", *align_args("grpo", "models/g_resumed"), cwd=d)
    finally:
        shutil.copy(helpers.SMOKE, d / "params.yaml")
    assert "resuming from step" in out.stdout
    a, b = weights(d / "models" / "g_straight"), weights(d / "models" / "g_resumed")
    assert all((a[k] - b[k]).abs().max() < 1e-6 for k in a)


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_an_online_run_with_no_reward_signal_stops_with_the_likely_cause(upstream, method):
    """References the verifier can never match: every reward is 0, so nothing could be learned; the stage
    says so (exit 1, one line naming the verifier and showing a reply) instead of training 0-gradient steps."""
    d = upstream
    rows = [json.loads(x) for x in (d / "data" / "prompts.jsonl").read_text().splitlines()]
    (d / "no_signal.jsonl").write_text("".join(json.dumps({**r, "answer": "never"}) + "\n" for r in rows))
    smoke_params(d / "params.yaml", **{f"align.{method}.reward": {"reward_model": 0.0, "verifier": 1.0},
                                        f"align.{method}.no_signal_steps": 3})
    try:
        args = align_args(method, f"models/{method}_nosignal")
        args[args.index("data/prompts.jsonl")] = "no_signal.jsonl"
        out = helpers.stage("align", *args, cwd=d, check=False)
    finally:
        shutil.copy(helpers.SMOKE, d / "params.yaml")
    assert out.returncode == 1
    err = [line for line in out.stderr.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith(f"error: align@{method}: every reward of the first 3 steps was 0 ")
    assert "the verifier accepted no reply" in err[0] and "reference answer 'never'" in err[0]
    assert not (d / "models" / f"{method}_nosignal").exists()


def test_distilling_from_the_student_itself_stops_with_one_line(upstream):
    """A teacher that is the SFT policy scores every sampled token as the student does: nothing to learn."""
    d = upstream
    args = align_args("distill", "models/distill_self")
    args[args.index("--teacher") + 1] = "models/sft"
    out = helpers.stage("align", *args, cwd=d, check=False)
    assert out.returncode == 1
    err = [line for line in out.stderr.splitlines() if "error" in line]
    assert len(err) == 1 and "the teacher scores every sampled token exactly as the student does" in err[0]
    assert not (d / "models" / "distill_self").exists()


def test_zero_std_fraction_counts_groups_that_teach_nothing():
    import torch

    from stages.methods.online import zero_std_fraction

    nan = float("nan")
    total = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, nan, 0.0, nan, nan])
    assert zero_std_fraction(total, 2) == 4 / 5  # only [1, 0] varies; [nan, 0] has one scored reward
