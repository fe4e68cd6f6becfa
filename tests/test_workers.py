"""Stages on workers, with the real parts on one machine (flows/cluster.py): an S3 server (`rclone serve
s3`) as the DVC remote and checkpoint store, a Prefect server, a process work pool with two workers in
directories of their own, an MLflow tracking server. The smoke pipeline through the pool must end with
the outputs of a local `dvc repro` of the same commit and params, even with a machine lost mid-stage."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from flows import cluster
from tests import helpers

pytestmark = pytest.mark.workers

METHODS = ["dpo", "grpo"]
# the lean profile, with an SFT long enough to be killed between two checkpoints (30 steps take a second)
SETS = {**helpers.LEAN, "sft.steps": 150, "sft.checkpoint_every": 30}


@pytest.fixture(scope="module")
def cl(tmp_path_factory):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with cluster.cluster(tmp_path_factory.mktemp("workers")) as c:
        with temporary_settings(updates={PREFECT_API_URL: c.env["PREFECT_API_URL"]}):
            yield c


@pytest.fixture(scope="module")
def project(cl):
    return cluster.project(cl.scratch / "project", helpers.SMOKE, cl.s3, METHODS, SETS)


def pipeline(cl, repo: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.pipeline", "--repo", str(repo), "--pool", cl.pool, *extra],
                          cwd=repo, env=cl.env, capture_output=True, text=True, timeout=1200)


def lock_outs(repo: Path) -> dict[str, dict[str, str]]:
    """dvc.lock's output hashes: {stage: {path: md5}}."""
    stages = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {name: {o["path"]: o["md5"] for o in s.get("outs", [])} for name, s in stages.items()}


MEASURED = ("cost/wall_s", "cost/peak_mem_mb", "eval/wall_s", "perf/")  # what a stage measures of itself


def results(repo: Path) -> dict[str, object]:
    """Every output of the pipeline: its dvc.lock hash, except for the metrics and plots files, which
    hold what the stage measured of its own run (wall time, memory, throughput): their other values."""
    out: dict[str, object] = {}
    for stage, paths in lock_outs(repo).items():
        for path, md5 in paths.items():
            f = repo / path
            if path.startswith("metrics/"):
                out[path] = {k: v for k, v in json.loads(f.read_text()).items() if not k.startswith(MEASURED)}
            elif path.startswith("plots/"):
                out[path] = [{k: v for k, v in row.items() if not k.startswith(MEASURED)}
                             for row in csv.DictReader(f.open())]
            elif path != "reports":  # the comparison table: its rows are the metrics above, with costs
                out[path] = md5
    return out


def kill_the_machine_after_a_checkpoint(cl, stage: str, found: dict) -> None:
    """When `stage`'s first checkpoint is in the store, kill what a dead machine loses: the worker running
    the stage's job and the job itself (its flow run, DVC, the stage; SIGKILL, nothing reports). Then a
    new worker of that name starts, as the machine coming back would."""
    meta = cl.scratch / "s3" / "alignpipe" / "store-checkpoints" / stage / "meta.json"
    deadline = time.time() + 900
    while not meta.exists():
        if time.time() > deadline:
            return
        time.sleep(0.05)
    for name, home in cl.dirs.items():
        jobs = sorted((home / "jobs").glob(f"{stage}-*"))
        if jobs:
            job = [p for p in psutil.process_iter() if _cwd(p).startswith(str(jobs[0]))]  # DVC and the stage
            groups = {os.getpgid(cl.workers[name].pid)} | {os.getpgid(q.pid) for p in job for q in (p, p.parent()) if q}
            for group in groups:
                os.killpg(group, signal.SIGKILL)
            found.update(worker=name, workspace=str(jobs[0]), at=time.time())
            cl.workers[name].wait()
            cl.start_worker(name)
            return


def test_pool_run_equals_a_local_run_with_a_machine_lost_mid_stage(cl, project, tmp_path):
    # a local `dvc repro` of the same commit and params, uninterrupted, at the same time
    ref = tmp_path / "local"
    subprocess.run(["git", "clone", "-q", str(project), str(ref)], check=True)
    shutil.copy(project / "params.yaml", ref / "params.yaml")
    local = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=ref, env=helpers.env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed: dict = {}
    killer = threading.Thread(target=kill_the_machine_after_a_checkpoint, args=(cl, "sft", killed), daemon=True)
    killer.start()
    t0 = time.time()
    out = pipeline(cl, project)
    pool_s = time.time() - t0
    assert out.returncode == 0, out.stderr[-3000:]
    assert killed.get("worker"), "the machine running sft was never killed"
    assert local.wait(timeout=900) == 0, local.stdout.read()[-3000:]
    runs = cluster.stage_runs(cl.env["PREFECT_API_URL"])
    print(f"\nsmoke pipeline ({', '.join(METHODS)}) through the pool: {pool_s:.0f} s, beside a local dvc repro "
          f"of it\n{cluster.format_runs(runs, t0)}")
    assert set(lock_outs(project)) == set(lock_outs(ref)) and len(lock_outs(ref)) == 11
    pool, local = results(project), results(ref)
    assert len(pool) == 23 and "models/sft" in pool
    assert pool == local

    sft = [r for r in runs if r["stage"] == "sft"]
    assert [r["state"] for r in sft] == ["Crashed", "Completed"], sft
    assert sft[0]["worker"] == killed["worker"]
    assert "no heartbeat" in sft[0]["message"]  # Prefect's zombie automation marked it (flows/workers.py)
    assert "resuming from step 30" in job_log(sft[1]["id"])  # from the checkpoint in the store, not step 0
    left = [p for p in psutil.process_iter() if _cwd(p).startswith(killed["workspace"])]
    assert not left, [p.cmdline() for p in left]  # nothing of the lost job still runs
    # methods side by side: on different workers, at overlapping times
    dpo, grpo = (next(r for r in runs if r["stage"] == f"align@{m}") for m in METHODS)
    assert dpo["worker"] != grpo["worker"]
    assert max(dpo["start"], grpo["start"]) < min(dpo["end"], grpo["end"]), (dpo, grpo)

    # one MLflow server: every stage's run under the flow's parent run
    import mlflow

    client = mlflow.MlflowClient(cl.env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("alignpipe")
    stages = client.search_runs([exp.experiment_id], "tags.stage = 'sft'")
    parent = stages[0].data.tags["mlflow.parentRunId"]
    nested = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert {"sft", "reward", "pairs", "align", "evaluate"} <= {r.data.tags.get("stage") for r in nested}


def _cwd(proc) -> str:
    try:
        return proc.cwd()
    except psutil.Error:
        return ""


def job_log(flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def test_second_run_dispatches_nothing(cl, project):
    before = len(cluster.stage_runs(cl.env["PREFECT_API_URL"]))
    out = pipeline(cl, project)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(cluster.stage_runs(cl.env["PREFECT_API_URL"])) == before
    log = out.stderr + out.stdout  # the flow's summary of its stages is in its log
    summary = dict(line[2:].split(": ", 1) for line in log.splitlines() if line.startswith("- "))
    assert len(summary) == 11 and summary.pop("check").startswith("ran "), log[-3000:]  # check always runs
    assert all(status.startswith("up to date ") for status in summary.values()), summary


def test_a_miss_fails_in_one_line_and_runs_nothing_here(cl, project):
    """The worker's run-cache entry vanishes between its push and the restore (as `dvc gc` on the remote
    would do): the pipeline stops with one line, and the stage never runs in the user's checkout."""
    import s3fs

    # through the S3 API, as `dvc gc` would: files removed behind the server's back would leave it listing them
    s3 = s3fs.S3FileSystem(key=cluster.S3_KEYS["AWS_ACCESS_KEY_ID"], secret=cluster.S3_KEYS["AWS_SECRET_ACCESS_KEY"],
                           endpoint_url=cl.s3)
    runs = "alignpipe/store/runs"
    seen = set(s3.find(runs))
    done = threading.Event()

    def drop_new_entries():
        while not done.is_set():
            s3.invalidate_cache()
            for key in set(s3.find(runs)) - seen:
                s3.rm(key)
            time.sleep(0.05)

    lock = lock_outs(project)
    threading.Thread(target=drop_new_entries, daemon=True).start()
    try:
        out = pipeline(cl, project, "--set", "reward.min_accuracy=0.01")
    finally:
        done.set()
        subprocess.run(["git", "checkout", "params.yaml"], cwd=project, check=True)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stage reward: the job on w") and "not in the DVC remote's run-cache" in last, last
    assert lock_outs(project)["reward"] == lock["reward"]  # nothing restored, nothing run here


def test_a_stage_that_fails_for_a_real_reason_fails_once_with_its_own_line(cl, project):
    before = cluster.stage_runs(cl.env["PREFECT_API_URL"])
    try:
        out = pipeline(cl, project, "--set", "reward.min_accuracy=1.0")  # the reward gate stops the stage
    finally:
        subprocess.run(["git", "checkout", "params.yaml"], cwd=project, check=True)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stage reward failed on w") and "error: reward: held-out pairwise accuracy" in last
    new = cluster.stage_runs(cl.env["PREFECT_API_URL"])[len(before):]
    assert [(r["stage"], r["state"]) for r in new] == [("reward", "Failed")]  # once: no retry of a real failure


def test_code_changes_and_uncached_outputs_are_refused_before_dispatch(cl, project):
    before = len(cluster.stage_runs(cl.env["PREFECT_API_URL"]))
    with (project / "stages" / "compare.py").open("a") as fh:
        fh.write("# an edit\n")
    try:
        out = pipeline(cl, project)
    finally:
        subprocess.run(["git", "checkout", "stages/compare.py"], cwd=project, check=True)
    assert out.returncode == 2
    assert out.stderr.strip() == ("error: uncommitted changes to stages/compare.py: workers run the commit, not this "
                                  "working tree (commit them; params.yaml travels with the run)")

    dvc_yaml = (project / "dvc.yaml").read_text()
    (project / "dvc.yaml").write_text(dvc_yaml.replace("      - metrics/reward.json\n",
                                                       "      - metrics/reward.json:\n          cache: false\n"))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["commit", "-qam", "an uncached metric"], cwd=project, check=True)
    try:
        out = pipeline(cl, project)
    finally:
        subprocess.run(["git", "reset", "-q", "--hard", "HEAD~1"], cwd=project, check=True)
    assert out.returncode == 2
    assert out.stderr.strip() == ("error: stage reward: metrics/reward.json is `cache: false` in dvc.yaml: a worker "
                                  "cannot hand it over through the remote (make it a cached output)")
    assert len(cluster.stage_runs(cl.env["PREFECT_API_URL"])) == before


def test_checkpoint_store_round_trip(tmp_path, monkeypatch):
    """A checkpoint saved to a store URL is found by a fresh workspace (another machine), and cleared there."""
    import torch

    from stages.core.train import Checkpoint

    monkeypatch.chdir(tmp_path)
    store = f"file://{tmp_path / 'store'}"
    (tmp_path / "in.txt").write_text("data")
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    Checkpoint("sft", {"lr": 1}, ["in.txt"], root=store).maybe_save(5, 5, 10, model, opt, [{"step": 5}])
    shutil.rmtree(tmp_path / ".checkpoints")  # the other machine has no local copy
    other = torch.nn.Linear(2, 2)
    ck = Checkpoint("sft", {"lr": 1}, ["in.txt"], root=store)
    step, rows, _ = ck.resume(other, torch.optim.SGD(other.parameters(), lr=0.1))
    assert step == 5 and rows == [{"step": 5}]
    assert torch.equal(other.weight, model.weight)
    assert Checkpoint("sft", {"lr": 2}, ["in.txt"], root=store).load() is None  # other params: never resumed
    ck.clear()
    assert not os.path.exists(tmp_path / "store" / "sft")
