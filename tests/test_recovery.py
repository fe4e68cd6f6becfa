"""Recovering from a killed run without a manual step: a half-written DVC rwlock left by a killed
`dvc repro` is removed by the flow (never while a DVC command holds the repo), in a real DVC repo."""

import subprocess
import sys

import pytest

from flows import pipeline, workspace
from tests import helpers

pytestmark = pytest.mark.integration
HOLD = """
import sys, time
from dvc.lock import make_lock
lock = make_lock(sys.argv[1] + "/lock", tmp_dir=sys.argv[1], friendly=False)
lock.lock()
print("held", flush=True)
time.sleep(120)
"""


def test_a_corrupt_rwlock_of_a_killed_run_is_recovered_and_one_in_use_is_not(tmp_path):
    d = workspace.create(tmp_path / "ws", helpers.SMOKE)
    rwlock = d / ".dvc" / "tmp" / "rwlock"
    rwlock.parent.mkdir(exist_ok=True)
    rwlock.write_text('{"read": {"da')  # what a kill in the middle of DVC's rewrite leaves
    failed = helpers.dvc("repro", "check", cwd=d, check=False)
    assert failed.returncode != 0 and "corrupted" in failed.stdout + failed.stderr  # what users hit

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(rwlock.parent)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not pipeline.recover_dvc_lock(d) and rwlock.exists()  # a live DVC command: left alone
    finally:
        holder.kill()
        holder.wait()
    assert pipeline.recover_dvc_lock(d) and not rwlock.exists()
    assert "Running stage 'check'" in helpers.dvc("repro", "check", cwd=d).stdout
    assert not pipeline.recover_dvc_lock(d)  # a readable rwlock is DVC's own business
