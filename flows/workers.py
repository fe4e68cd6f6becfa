"""Stages on workers: each DVC stage as its own Prefect flow run on a work pool, artifacts through a
DVC remote and its run-cache. The user's checkout stays the record (dvc.lock, reports, MLflow parent).

    python -m flows.pipeline --pool gpu        # on each GPU machine first: prefect worker start --pool gpu

The orchestrator (flows.pipeline with a pool) does, for each stage whose inputs are ready:
1. restore it from the remote's run-cache (`dvc repro --pull --single-item S`, with a shell that refuses
   to run the stage's command here): done if a worker, this run or an earlier one, already ran it;
2. otherwise dispatch `stage_job` to the pool (`run_deployment`, an idempotency key per stage, inputs and
   attempt) and wait for it; then restore again, and a miss is an error, never a local run.
A job that crashed (its worker or process died) is dispatched again, to whichever worker takes it, and
resumes from its last checkpoint (ALIGNPIPE_CHECKPOINTS, a store every worker reads); a stage that failed
for a real reason (a gate, bad params) fails once with its own line.

The worker (`stage_job`) clones the user's commit into a fresh workspace, writes the run's params.yaml and
the orchestrator's dvc.lock, shares its machine's DVC cache between workspaces, runs
`dvc repro --pull --single-item S` (the stage's inputs come from the remote) and `dvc push --run-cache S`.
`check` and `compare` do no model work and run where the flow runs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from prefect import flow, get_run_logger, task

LOCAL_STAGES = ("check", "compare")  # no model work: they run in the user's checkout
DEPLOYMENT = "alignpipe-stage/stage"
SECRET_OPTIONS = ("access_key_id", "secret_access_key", "session_token", "password", "token", "credentialpath")
MISS_EXIT = 97
_RESTORE = threading.Lock()  # one DVC command at a time in the user's checkout


class NotDispatchable(RuntimeError):
    """A mistake known before anything is dispatched (uncommitted code, no remote, no tracking server)."""


class WorkerLost(RuntimeError):
    """The job's worker or process died before it finished: the stage is dispatched again."""


# ---------------------------------------------------------------------------------------------- worker side

def worker_name() -> str:
    """Who runs this job: ALIGNPIPE_WORKER_NAME when the machine sets one, else the host name."""
    return os.environ.get("ALIGNPIPE_WORKER_NAME") or socket.gethostname()


@flow(name="alignpipe-stage", flow_run_name="{stage}")
def stage_job(repo_url: str, commit: str, stage: str, params_yaml: str, dvc_lock: str, remote: dict,
              env: dict, with_check: bool = False) -> dict:
    """Run one stage on this worker: a fresh workspace at `commit` with the run's params and dvc.lock,
    the stage's inputs pulled from the DVC remote (`remote`: its name, url and options), its outputs and
    run-cache entry pushed back. `env`: what the stage needs from the orchestrator (MLflow server and
    parent run, checkpoint store); this machine's own environment (credentials, devices) is kept.
    with_check: the stage reads the `check` stage's digest of the inputs, which is made here first."""
    from flows.pipeline import stream_dvc

    who = worker_name()
    _rename_flow_run(f"{stage} @ {who}")
    root = Path(os.environ.get("ALIGNPIPE_JOBS_DIR") or Path.home() / ".cache" / "alignpipe" / "jobs")
    root.mkdir(parents=True, exist_ok=True)
    ws = Path(tempfile.mkdtemp(prefix=stage.replace("@", "-") + "-", dir=root))  # fresh: never another run's outputs
    job_env = {**os.environ, **env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "DVC_NO_ANALYTICS": "1"}
    try:
        _git(["clone", "--quiet", "--no-checkout", repo_url, str(ws)], Path.cwd())
        _git(["checkout", "--quiet", commit], ws)
        (ws / "params.yaml").write_text(params_yaml)
        if dvc_lock:
            (ws / "dvc.lock").write_text(dvc_lock)
        cache = os.environ.get("ALIGNPIPE_WORKER_CACHE") or str(Path.home() / ".cache" / "alignpipe" / "dvc-cache")
        write_local_config(ws, remote, cache)
        if with_check:  # check's digest of the inputs is not cached: it is made afresh where it is read
            stream_dvc(ws, ["repro", "--single-item", "check"], job_env)
        status = stream_dvc(ws, ["repro", "--pull", "--single-item", stage], job_env)
        stream_dvc(ws, ["push", "--run-cache", stage], job_env)
    finally:
        shutil.rmtree(ws, ignore_errors=True)
    return {"stage": stage, "worker": who, "status": status}


def write_local_config(ws: Path, remote: dict, cache: str) -> None:
    """The workspace's .dvc/config.local: the orchestrator's remote as default (credentials stay in this
    machine's environment) and this machine's DVC cache, shared by all its jobs (content-addressed)."""
    name = remote["name"]
    lines = ["[core]", f"    remote = {name}", f"['remote \"{name}\"']", f"    url = {remote['url']}"]
    lines += [f"    {key} = {value}" for key, value in remote.get("options", {}).items()]
    lines += ["[cache]", f"    dir = {cache}"]
    (ws / ".dvc" / "config.local").write_text("\n".join(lines) + "\n")


def _rename_flow_run(name: str) -> None:
    """The Prefect UI lists the job as `<stage> @ <worker>`."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if flow_run.id:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, name=name)


def _git(args: list[str], cwd: Path) -> None:
    _run(["git", *args], cwd, None)


def _run(cmd: list[str], cwd: Path, env: dict | None) -> None:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed: {(out.stderr or out.stdout).strip().splitlines()[-1]}")


# ---------------------------------------------------------------------------------------------- orchestrator side

def prepare_dispatch(repo: Path) -> dict:
    """What every job of this pipeline run shares, checked before anything is dispatched (each mistake
    one line, as NotDispatchable): the commit (no uncommitted code), where workers clone it from, the
    DVC remote, the MLflow tracking server and the checkpoint store."""
    from dvc.repo import Repo

    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, check=True)
    dirty = [line[3:] for line in status.stdout.splitlines() if line[3:] not in ("params.yaml", "dvc.lock")]
    if dirty:
        more = " …" if len(dirty) > 5 else ""
        raise NotDispatchable(f"uncommitted changes to {', '.join(dirty[:5])}{more}: workers run "
                           "the commit, not this working tree (commit them; params.yaml travels with the run)")
    commit = _git_out(["rev-parse", "HEAD"], repo)
    origin = subprocess.run(["git", "remote", "get-url", "origin"], cwd=repo, capture_output=True, text=True)
    repo_url = os.environ.get("ALIGNPIPE_REPO_URL") or (origin.stdout.strip() if origin.returncode == 0 else str(repo))
    with Repo(str(repo)) as r:
        name = r.config["core"].get("remote")
        if not name:
            raise NotDispatchable("no default DVC remote: workers hand their outputs over through one "
                               "(dvc remote add -d store s3://bucket/alignpipe, or a shared directory)")
        options = {k: v for k, v in r.config["remote"][name].items() if k != "url" and k not in SECRET_OPTIONS}
        url = r.config["remote"][name]["url"]
        for st in r.index.stages:
            uncached = [str(o) for o in st.outs if not o.use_cache]
            if uncached and st.name not in LOCAL_STAGES:
                raise NotDispatchable(f"stage {st.name}: {uncached[0]} is `cache: false` in dvc.yaml: a worker cannot "
                                      "hand it over through the remote (make it a cached output)")
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        raise NotDispatchable("workers log to one MLflow tracking server: set MLFLOW_TRACKING_URI to its address "
                           "(mlflow server --host 0.0.0.0 --port 5000 on a machine they reach)")
    env = {"MLFLOW_TRACKING_URI": uri,
           "ALIGNPIPE_CHECKPOINTS": os.environ.get("ALIGNPIPE_CHECKPOINTS") or url.rstrip("/") + "-checkpoints"}
    if options.get("endpointurl"):  # the checkpoint store reaches the same S3 server as the remote
        env["AWS_ENDPOINT_URL"] = options["endpointurl"]
    return {"repo_url": repo_url, "commit": commit, "remote": {"name": name, "url": url, "options": options},
            "env": env}


def _git_out(args: list[str], cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def restore(repo: Path, stage: str, env: dict) -> str | None:
    """Restore `stage` in the user's checkout from the remote's run-cache → "up to date", "restored from
    the remote's run-cache", or None when it is not there (a miss runs nothing: the stage's command is
    refused by the shell DVC runs it with)."""
    from flows.pipeline import stream_dvc

    guard = repo / ".dvc" / "tmp" / "alignpipe-no-local-run"
    with _RESTORE:
        guard.parent.mkdir(parents=True, exist_ok=True)
        guard.write_text(f"#!/bin/sh\necho \"alignpipe: $DVC_STAGE is not in the remote's run-cache\" >&2\n"
                         f"exit {MISS_EXIT}\n")
        guard.chmod(0o755)
        try:
            status = stream_dvc(repo, ["repro", "--pull", "--single-item", stage], {**env, "SHELL": str(guard)})
        except RuntimeError as e:
            if f"exited with {MISS_EXIT}" in str(e):
                return None
            raise
        return "up to date" if status == "up to date" else "restored from the remote's run-cache"


def _retry_if_lost(task, task_run, state) -> bool:
    """Prefect retries a stage only when its job was lost (a worker or its process died), not when the
    stage itself failed."""
    try:
        state.result()
    except WorkerLost:
        return True
    except Exception:
        return False
    return False


@task(task_run_name="{stage}", retries=2, retry_condition_fn=_retry_if_lost)
def dispatch_stage(repo: str, stage: str, env: dict, job: dict, upstream: list[dict]) -> dict:
    """Run `stage` on the pool (unless the remote's run-cache already has it), then restore it here.
    upstream: the results of the stages whose outputs it reads. When one of them was just made by a job,
    the remote cannot have this stage for those inputs yet, so the first restore is skipped (were it
    there all the same, the job would restore it rather than run it)."""
    from prefect.deployments import run_deployment
    from prefect.runtime import task_run

    logger = get_run_logger()
    root = Path(repo)
    t0 = time.perf_counter()
    fresh = any(r.get("worker", "-") != "-" for r in upstream)
    status = None if fresh else restore(root, stage, env)
    if status:
        return {"stage": stage, "status": status, "worker": "-", "seconds": round(time.perf_counter() - t0, 1)}
    with _RESTORE:
        params_yaml = (root / "params.yaml").read_text()
        lock = (root / "dvc.lock").read_text() if (root / "dvc.lock").exists() else ""
    key = hashlib.sha256("\0".join([job["commit"], stage, params_yaml, lock, str(task_run.run_count)]).encode())
    run = run_deployment(DEPLOYMENT, timeout=None, idempotency_key=key.hexdigest()[:32],
                         parameters={"repo_url": job["repo_url"], "commit": job["commit"], "stage": stage,
                                     "params_yaml": params_yaml, "dvc_lock": lock, "remote": job["remote"],
                                     "env": {**job["env"], "ALIGNPIPE_PARENT_RUN_ID": env["ALIGNPIPE_PARENT_RUN_ID"]},
                                     "with_check": any(r["stage"] == "check" for r in upstream)},
                         poll_interval=1)
    worker = run.name.partition(" @ ")[2] or "?"
    if run.state.is_crashed() or run.state.is_cancelled():
        raise WorkerLost(f"stage {stage}: its job on {worker} was lost ({run.state.message}); dispatching it again")
    if not run.state.is_completed():
        message = (run.state.message or "").split("RuntimeError: ")[-1] or run.state.name
        raise RuntimeError(f"stage {stage} failed on {worker}: {message.partition(' failed: ')[2] or message}")
    if restore(root, stage, env) is None:
        raise RuntimeError(f"stage {stage}: the job on {worker} completed but its result is not in the DVC remote's "
                           "run-cache; nothing was run here")
    logger.info(f"{stage}: ran on {worker}")
    return {"stage": stage, "status": f"ran on {worker}", "worker": worker, "flow_run": str(run.id),
            "seconds": round(time.perf_counter() - t0, 1)}


def register(pool: str) -> None:
    """The pool (a process pool when missing), the stage job's deployment on it (workers load the job from
    the project installed in their own environment: a module path, no code storage), and the automation
    that marks a silent job Crashed, so that its stage is dispatched again."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.types.entrypoint import EntrypointType

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        zombie = zombie_automation()
        for old in client.read_automations_by_name(ZOMBIE_AUTOMATION):
            if old.trigger.within == zombie.trigger.within:
                break
            client.delete_automation(old.id)  # made for another heartbeat frequency
        else:
            client.create_automation(zombie)
    stage_job.to_deployment(name="stage", entrypoint_type=EntrypointType.MODULE_PATH).apply(work_pool_name=pool)


ZOMBIE_AUTOMATION = "alignpipe: crash silent stage jobs"


def zombie_automation():
    """Prefect's zombie-flow automation (docs: "detect zombie flows"), for the stage jobs only: a job whose
    flow run sends no event for three heartbeat periods (PREFECT_FLOWS_HEARTBEAT_FREQUENCY on the
    workers: 180 s by default, so 9 minutes) is marked Crashed: its machine died with it."""
    from datetime import timedelta

    from prefect.automations import AutomationCore
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification
    from prefect.settings import get_current_settings

    heartbeat = get_current_settings().flows.heartbeat_frequency or 180
    return AutomationCore(
        name=ZOMBIE_AUTOMATION,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"}, expect={"prefect.flow-run.*"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.role": "flow",
                                                 "prefect.resource.name": "alignpipe-stage"}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=3 * heartbeat)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message="no heartbeat: its worker is gone")])


@task(task_run_name="{stage}")
def run_local(repo: str, stage: str, env: dict) -> dict:
    """A stage without model work (check, compare), run in the user's checkout between the restores."""
    from flows.pipeline import run_stage

    with _RESTORE:
        return run_stage.fn(repo, stage, env)
