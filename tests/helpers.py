"""Running the project's real entry points in a scratch directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from flows.repro import venv_path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "params.smoke.yaml"
LEAN = {  # the smoke profile with fewer rows and steps: for tests of how stages connect (DVC staleness,
    # run-cache restores, flows, studies), where every stage runs. SFT keeps its 30 steps: fewer leave
    # replies that never end within pairs.max_new_tokens, so no pair forms.
    "data.embedded.n_sft": 64, "data.embedded.n_preference": 48, "data.embedded.n_prompts": 16,
    "data.embedded.n_eval": 12,
    "sft.probes": 1,
    "reward.steps": 6, "reward.log_every": 2, "reward.checkpoint_every": 3,
    "align.dpo.steps": 4, "align.dpo.log_every": 1, "align.dpo.checkpoint_every": 2, "align.dpo.probes": 1,
    "evaluate.kl_samples": 1,
}


def lean_params(dest: Path) -> Path:
    """params.smoke.yaml at LEAN's sizes (its comments kept), written to `dest`."""
    from flows import params

    dest.write_text(SMOKE.read_text())
    params.apply(dest, LEAN)
    return dest


def env(**extra) -> dict:
    """The environment a stage sees: this venv first on PATH (DVC runs `python -m stages.…`)."""
    e = {**os.environ, "PATH": venv_path(), "PYTHONPATH": str(ROOT), "ALIGNPIPE_TRACKING": "off"}
    e.update({k: str(v) for k, v in extra.items()})
    return e


def run(args: list[str], cwd: Path, check: bool = True, timeout: int = 600, **extra) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env(**extra), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def stage(name: str, *args: str, cwd: Path, check: bool = True, **extra) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", f"stages.{name}", *args], cwd, check=check, **extra)


def dvc(*args: str, cwd: Path, check: bool = True, **extra) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], cwd, check=check, **extra)


def ran_stages(output: str) -> set[str]:
    """Stages `dvc repro` actually ran (not skipped, not restored from the run-cache), leaving out `check`,
    which runs on every repro by design (stages/check.py)."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")} - {"check"}


def restored_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if "is cached - skipping run" in line}
