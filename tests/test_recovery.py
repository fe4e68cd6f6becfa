"""What the flow does before any stage, in a real DVC repo: recover from a killed run without a manual
step (a half-written DVC rwlock is removed, never one a live DVC command is writing), read params.yaml
itself, so a mistake DVC would trip over first is still one line naming the key, and stop, naming its pid,
when another DVC command is running in the workspace."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from flows import repro, workspace
from tests import helpers

pytestmark = pytest.mark.integration
HOLD = """
import sys, time
from dvc.lock import make_lock
lock = make_lock(sys.argv[1] + "/rwlock.lock", tmp_dir=sys.argv[1], friendly=False)
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
        assert not repro.recover_dvc_lock(d) and rwlock.exists()  # a live DVC command is writing it: left alone
    finally:
        holder.kill()
        holder.wait()
    assert repro.recover_dvc_lock(d) and not rwlock.exists()
    assert "Running stage 'check'" in helpers.dvc("repro", "check", cwd=d).stdout
    assert not repro.recover_dvc_lock(d)  # a readable rwlock is DVC's own business


@pytest.mark.parametrize("entry", [["flows.pipeline", "--repo", "."], ["flows.repro", "check"]],
                         ids=["flow", "make-repro"])
def test_every_entry_point_names_a_params_mistake_that_dvc_would_trip_over(tmp_path, entry):
    """align.methods as a string: DVC's matrix expansion fails first ("'Value' object is not iterable")
    under a bare dvc repro; the flow (make run) and make repro read params.yaml before DVC does."""
    d = workspace.create(tmp_path / "ws", helpers.SMOKE)
    params = d / "params.yaml"
    params.write_text(params.read_text().replace("methods: [dpo]", "methods: dpo"))
    bare = helpers.dvc("repro", "check", cwd=d, check=False)
    assert bare.returncode != 0 and "not iterable" in bare.stdout + bare.stderr  # what a bare dvc repro says
    out = helpers.run([sys.executable, "-m", *entry], d, check=False)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]  # beside Prefect's log lines
    assert len(errors) == 1 and errors[0].startswith("error: params.yaml: align.methods: Input should be a valid list")
    assert not (d / "dvc.lock").exists() and not (d / "data").exists() and not (d / "inputs.lock.json").exists()


def test_a_params_file_without_the_keys_dvc_expands_is_one_line_before_dvc():
    """An older params.yaml (no align.distill section): valid for the schema, which has defaults, but DVC reads
    the file and would stop on "Could not find 'align.distill.teachers'" while parsing dvc.yaml."""
    raw = yaml.safe_load(helpers.SMOKE.read_text())
    repro.check_matrix_keys(yaml.safe_dump(raw))
    del raw["align"]["distill"]
    with pytest.raises(ValueError, match=r"^params.yaml: align.distill.teachers: missing; dvc.yaml makes its stages"):
        repro.check_matrix_keys(yaml.safe_dump(raw))


def test_make_repro_recovers_a_stale_lock_then_runs_dvc_repro_with_its_arguments(tmp_path):
    d = workspace.create(tmp_path / "ws", helpers.SMOKE)
    rwlock = d / ".dvc" / "tmp" / "rwlock"
    rwlock.parent.mkdir(exist_ok=True)
    rwlock.write_text('{"read": {"da')
    out = helpers.run([sys.executable, "-m", "flows.repro", "check"], d)
    assert "removed .dvc/tmp/rwlock" in out.stdout and "Running stage 'check'" in out.stdout
    assert (d / "inputs.lock.json").is_file() and not (d / "data").exists()  # only the stage asked for


def test_a_run_that_changes_no_param_leaves_params_yaml_as_it_was(tmp_path):
    """The command line passes the methods that run to the flow (the UI shows them): when they are the
    file's own, params.yaml keeps its bytes (its flow-style lists, its comments); a real change is written."""
    from flows import params as params_edit
    from flows import pipeline

    d = workspace.create(tmp_path / "ws", helpers.SMOKE)
    params = d / "params.yaml"
    before = params.read_text()
    cfg = pipeline.set_params(d, ["dpo"], {"align.dpo.beta": 0.1, "seed": 0})  # the smoke file's own values
    assert cfg.align.methods == ["dpo"] and params.read_text() == before
    pipeline.set_params(d, ["dpo", "kto"], {})
    doc = yaml.safe_load(params.read_text())
    assert params_edit.get(doc, "align.methods") == ["dpo", "kto"] and params.read_text() != before
    assert params_edit.get(doc, "align.nope") is params_edit.MISSING


REPO_LOCK = """
import sys, time
from dvc.lock import make_lock
lock = make_lock(sys.argv[1] + "/lock", tmp_dir=sys.argv[1], friendly=False)  # what every DVC command takes
lock.lock()
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_dvc_command_on_a_workspace_names_the_running_one_and_leaves_its_lock(tmp_path):
    """make repro (and the flow, through the same preflight) while another DVC command runs here: one line with
    that command's pid, exit 1, DVC's lock left where it is; once that command has ended, a run goes ahead."""
    d = tmp_path / "ws"
    (d / ".dvc" / "tmp").mkdir(parents=True)
    (d / "params.yaml").write_text(helpers.SMOKE.read_text())
    lock = d / ".dvc" / "tmp" / "lock"
    holder = subprocess.Popen([sys.executable, "-c", REPO_LOCK, str(lock.parent)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = f"another DVC command is running in this workspace (pid {holder.pid}): wait for it or stop it"
        with pytest.raises(repro.WorkspaceBusy, match=rf"^{re.escape(busy)}$"):
            repro.preflight(d)
        out = helpers.run([sys.executable, "-m", "flows.repro", "check"], d, check=False)
        assert (out.returncode, out.stderr) == (1, f"error: {busy}\n")
        assert lock.is_file() and holder.poll() is None and repro.dvc_lock_holder(d) == str(holder.pid)
    finally:
        holder.kill()
        holder.wait()
    assert lock.is_file() and repro.dvc_lock_holder(d) is None  # a lock its holder left: DVC takes it over
    assert repro.preflight(d).align.methods == ["dpo"]


def test_a_dvc_repro_running_a_stage_is_seen_though_it_let_go_of_the_repo_lock(tmp_path):
    """DVC unlocks .dvc/tmp/lock while a stage's command runs; its pid is then in .dvc/tmp/rwlock."""
    import psutil

    d = tmp_path / "ws"
    d.mkdir()
    helpers.dvc("init", "--no-scm", "-q", cwd=d)
    (d / "params.yaml").write_text(helpers.SMOKE.read_text())
    (d / "dvc.yaml").write_text("stages:\n  slow:\n    cmd: python -c \"import time; time.sleep(60)\" && touch out\n"
                                "    outs: [out]\n")
    running = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=d, env=helpers.env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while not any("time.sleep" in cmd for cmd in commands(psutil.Process(running.pid).children(recursive=True))):
            assert running.poll() is None, "dvc repro ended before its stage ran"
            time.sleep(0.05)  # until the stage's command runs (DVC has let go of the repo lock)
        assert repro.rwlock_pids(d / ".dvc" / "tmp" / "rwlock") == [str(running.pid)]
        with pytest.raises(repro.WorkspaceBusy, match=rf"\(pid {running.pid}\): wait for it or stop it$"):
            repro.preflight(d)
    finally:
        os.killpg(running.pid, signal.SIGKILL)
        running.wait()
    assert repro.dvc_lock_holder(d) is None and (d / ".dvc" / "tmp" / "rwlock").is_file()


def commands(processes) -> list[str]:
    """The command lines of processes, leaving out any that ended meanwhile."""
    import psutil

    out = []
    for p in processes:
        try:
            out.append(" ".join(p.cmdline()))
        except psutil.Error:
            pass
    return out
