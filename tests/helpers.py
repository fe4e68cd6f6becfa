"""Running the project's real entry points in a scratch directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from flows.repro import venv_path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "params.smoke.yaml"


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
