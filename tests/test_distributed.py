"""Two processes (gloo on the CPU) against one, through the stages' real entry points on the tiny model:
with the same global batch they make the same updates, so the final weights agree; a 2-process run
killed and resumed equals an uninterrupted one; only the main process writes.

Tolerance 2e-5 (fp32), as for accumulation (test_modes): each process runs half of every update's
rows and their gradients are summed, which changes only the order of float additions.
"""

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


@pytest.mark.parametrize("stage, section, settings", [
    ("sft", "sft", {"steps": 6}),
    ("reward", "reward", {"steps": 6}),
    ("dpo", "align.dpo", {"steps": 4, "lr": 1e-3}),
    ("grpo", "align.grpo", {"steps": 3, "lr": 1e-3, "reward": {"reward_model": 1.0}}),
])
def test_two_processes_equal_one(upstream, stage, section, settings):  # noqa: F811
    d = upstream
    smoke_params(d / "params.yaml", **{f"{section}.{k}": v for k, v in settings.items()})
    try:
        run(d, stage, f"models/{stage}_1p", 1)
        two = run(d, stage, f"models/{stage}_2p", 2)
    finally:
        shutil.copy(helpers.SMOKE, d / "params.yaml")
    assert len([x for x in two.stdout.splitlines() if x.startswith(("sft:", "reward:", "align@"))]) == 1  # main only
    assert max_gap(weights(d / f"models/{stage}_1p"), weights(d / f"models/{stage}_2p")) < TOL
    m1, m2 = (json.loads((d / f"models/{stage}_{n}p.json").read_text()) for n in (1, 2))
    assert m2["train/loss"] == pytest.approx(m1["train/loss"], rel=1e-4)
    assert m2["train/grad_norm"] == pytest.approx(m1["train/grad_norm"], rel=1e-4)


def test_a_two_process_run_killed_and_resumed_equals_an_uninterrupted_one(upstream):  # noqa: F811
    d = upstream
    smoke_params(d / "params.yaml", **{"sft.steps": 40, "sft.checkpoint_every": 5, "sft.probes": 0})
    try:
        run(d, "sft", "models/s_straight", 2)
        env = helpers.env(ALIGNPIPE_PROCESSES=2)
        proc = subprocess.Popen([sys.executable, "-m", "stages.sft", *args("sft", "models/s_resumed")[1:]], cwd=d,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        meta = d / ".checkpoints" / "sft" / "meta.json"
        deadline = time.time() + 120
        while not meta.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # the launcher: its processes die with it
        proc.wait()
        assert meta.exists(), "no checkpoint before the stage ended"
        time.sleep(0.5)
        assert not (d / "models" / "s_resumed").exists()  # no orphan process finished the stage
        import torch

        before = torch.load(d / ".checkpoints" / "sft" / "state.pt", weights_only=False)["extra"]["elapsed_s"]
        out = run(d, "sft", "models/s_resumed", 2)
    finally:
        shutil.copy(helpers.SMOKE, d / "params.yaml")
    assert "resuming from step" in out.stdout
    assert max_gap(weights(d / "models" / "s_straight"), weights(d / "models" / "s_resumed")) < 1e-6
    assert not (d / ".checkpoints" / "sft").exists()  # cleared once the outputs were written
    resumed = json.loads((d / "models" / "s_resumed.json").read_text())
    assert resumed["cost/wall_s"] > before > 0  # the cost counts the segment before the kill too


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
    assert os.environ.get("WORLD_SIZE") is None  # the tests themselves run in one process
