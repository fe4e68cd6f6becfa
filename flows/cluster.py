"""A pipeline across workers on this one machine, with the real parts a team would run on several:
an S3 server (`rclone serve s3` over a scratch directory) as the DVC remote and checkpoint store, a
Prefect server with a process work pool and two workers (each in its own directory, job workspaces and
DVC cache: as two machines would have), and an MLflow tracking server.

    python -m flows.cluster [--scratch DIR] [--methods dpo grpo]     # make workers

It runs the smoke pipeline in a fresh project checkout through the pool, prints which worker ran which
stage and when (from Prefect's records), and stops everything it started. The tests use the same parts
(`Cluster`).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from flows import workspace

ROOT = Path(__file__).resolve().parents[1]
HEARTBEAT_S = 30  # the jobs' heartbeats (Prefect's minimum): a job silent for 3 of them is marked Crashed
S3_KEYS = {"AWS_ACCESS_KEY_ID": "alignpipe-local", "AWS_SECRET_ACCESS_KEY": "alignpipe-local-secret"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(*procs: subprocess.Popen) -> None:
    """Stop processes started in their own sessions, and everything they started: all asked at once (SIGINT,
    then SIGTERM, then SIGKILL to those still running), so their shutdowns overlap."""
    for sig, wait in ((signal.SIGINT, 5), (signal.SIGTERM, 3), (signal.SIGKILL, 5)):
        alive = [p for p in procs if p.poll() is None]
        for p in alive:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        for p in alive:
            try:
                p.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:  # it answers (S3 wants a signed request)
            return
        except OSError as e:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{url} never answered ({e}); its log: {log}\n{log.read_text()[-2000:]}") from None
            time.sleep(0.5)


class Cluster:
    """The running parts: `env` is what the orchestrator needs (Prefect API, MLflow server, S3 keys),
    `s3` the S3 server's address, `workers` the worker processes by name, `dirs` their directories."""

    def __init__(self, scratch: Path, pool: str):
        self.scratch, self.pool = scratch, pool
        self.procs: list[subprocess.Popen] = []
        self.workers: dict[str, subprocess.Popen] = {}
        self.dirs: dict[str, Path] = {}
        prefect, mlflow, s3 = free_port(), free_port(), free_port()
        self.s3 = f"http://127.0.0.1:{s3}"
        self.env = {**os.environ, **S3_KEYS, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                    "PREFECT_API_URL": f"http://127.0.0.1:{prefect}/api", "PREFECT_HOME": str(scratch / "prefect"),
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false",
                    "PREFECT_LOGGING_LEVEL": "INFO", "PREFECT_WORKER_QUERY_SECONDS": "1",
                    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
                    "PREFECT_WORKER_PREFETCH_SECONDS": "1", "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow}",
                    "ALIGNPIPE_TRACKING": "mlflow", "DVC_NO_ANALYTICS": "1"}

    def start(self, workers: int = 2) -> None:
        (self.scratch / "s3" / "alignpipe").mkdir(parents=True, exist_ok=True)  # a bucket is a directory
        rclone = str(Path(sys.executable).parent / "rclone")
        s3 = self._spawn("s3", [rclone, "serve", "s3", "--addr", self.s3.removeprefix("http://"), "--auth-key",
                                ",".join(S3_KEYS.values()), str(self.scratch / "s3")])
        prefect = self._spawn("prefect-server", [sys.executable, "-m", "prefect", "server", "start", "--host",
                                                 "127.0.0.1", "--port", self.env["PREFECT_API_URL"].split(":")[2][:-4]],
                              PREFECT_LOGGING_LEVEL="WARNING")
        mlflow_port = self.env["MLFLOW_TRACKING_URI"].rsplit(":", 1)[1]
        mlflow = self._spawn("mlflow-server", [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", mlflow_port, "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.scratch / 'mlflow.db'}",
            "--artifacts-destination", str(self.scratch / "mlartifacts")])
        wait_http(self.s3, s3, self.scratch / "s3.log")
        wait_http(self.env["PREFECT_API_URL"] + "/health", prefect, self.scratch / "prefect-server.log")
        wait_http(self.env["MLFLOW_TRACKING_URI"] + "/health", mlflow, self.scratch / "mlflow-server.log")
        from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

        from flows import workers as jobs

        with temporary_settings(updates={PREFECT_API_URL: self.env["PREFECT_API_URL"],
                                         PREFECT_FLOWS_HEARTBEAT_FREQUENCY: HEARTBEAT_S}):
            jobs.register(self.pool)  # the pool exists before its workers poll it
        # the machines this simulates share this one's cores: each gets its share, or torch's threads on one
        # would spin waiting for threads the other descheduled (a stage ran 3x slower beside another)
        self.threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // workers))
        for i in range(1, workers + 1):
            self.start_worker(f"w{i}")

    def start_worker(self, name: str) -> subprocess.Popen:
        """A process worker of the pool in a directory of its own (its job workspaces and DVC cache)."""
        home = self.dirs.setdefault(name, self.scratch / name)
        home.mkdir(parents=True, exist_ok=True)
        env = {"ALIGNPIPE_WORKER_NAME": name, "ALIGNPIPE_JOBS_DIR": str(home / "jobs"),
               "ALIGNPIPE_WORKER_CACHE": str(home / "dvc-cache"), "OMP_NUM_THREADS": self.threads}
        self.workers[name] = self._spawn(name, [sys.executable, "-m", "prefect", "worker", "start", "--pool", self.pool,
                                                "--name", name, "--limit", "1"], cwd=home, **env)
        return self.workers[name]

    def _spawn(self, name: str, cmd: list[str], cwd: Path | None = None, **env) -> subprocess.Popen:
        log = (self.scratch / f"{name}.log").open("a")
        proc = subprocess.Popen(cmd, cwd=cwd or self.scratch, env={**self.env, **env}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        workers = [p for p in self.procs if p in self.workers.values()]
        stop(*workers)  # the workers before the servers they talk to
        stop(*(p for p in self.procs if p not in workers))


@contextmanager
def cluster(scratch: Path, pool: str = "alignpipe-local", workers: int = 2):
    scratch.mkdir(parents=True, exist_ok=True)
    c = Cluster(scratch.resolve(), pool)
    try:
        c.start(workers)
        yield c
    finally:
        c.close()


def project(dest: Path, params: Path, s3: str, methods: list[str] | None = None, sets: dict | None = None) -> Path:
    """A fresh checkout of the project (git + DVC) whose default DVC remote is the S3 server, with
    `methods` and the params `sets` ({"dotted.key": value}), committed."""
    ws = workspace.create(dest, params)
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (["remote", "add", "-d", "store", "s3://alignpipe/store"],
                ["remote", "modify", "store", "endpointurl", s3]):
        subprocess.run(dvc + cmd, cwd=ws, check=True, capture_output=True)
    if methods or sets:
        from flows import params as params_edit

        params_edit.apply(ws / "params.yaml", {**({"align.methods": methods} if methods else {}), **(sets or {})})
    git = ["git", "-c", "user.name=alignpipe", "-c", "user.email=alignpipe@localhost"]
    subprocess.run(git + ["commit", "-qam", "the DVC remote and the methods"], cwd=ws, check=True)
    return ws


def stage_runs(api: str) -> list[dict]:
    """Every stage job Prefect ran: stage, worker, start, end (epoch seconds) and state, by start time."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["alignpipe-stage"])))
    out = [{"id": str(r.id), "stage": r.parameters["stage"], "worker": r.name.partition(" @ ")[2] or "-",
            "state": r.state.name, "message": r.state.message,
            "start": r.start_time.timestamp() if r.start_time else None,
            "end": r.end_time.timestamp() if r.end_time else None} for r in runs]
    return sorted(out, key=lambda r: r["start"] or 0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scratch", default=".workers", help="where everything lives (made fresh; default .workers/)")
    p.add_argument("--params", default=str(ROOT / "params.smoke.yaml"))
    p.add_argument("--methods", nargs="+", default=["dpo", "grpo"])
    args = p.parse_args(argv)
    scratch = Path(args.scratch).resolve()
    if scratch.exists():
        import shutil

        shutil.rmtree(scratch)
    t0 = time.time()
    with cluster(scratch) as c:
        print(f"started in {time.time() - t0:.0f} s: S3 {c.s3}, Prefect {c.env['PREFECT_API_URL']}, "
              f"MLflow {c.env['MLFLOW_TRACKING_URI']}, workers {', '.join(c.workers)} (logs in {scratch})", flush=True)
        ws = project(scratch / "project", Path(args.params), c.s3, args.methods)
        t1 = time.time()
        out = subprocess.run([sys.executable, "-m", "flows.pipeline", "--repo", str(ws), "--pool", c.pool],
                             cwd=ws, env=c.env, capture_output=True, text=True)
        wall = time.time() - t1
        runs = stage_runs(c.env["PREFECT_API_URL"])
    print(format_runs(runs, t1))
    if out.returncode:
        print(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.stdout[-2000:], file=sys.stderr)
        sys.exit(out.returncode)
    print(f"\npipeline through the pool: {wall:.0f} s wall; dvc.lock, reports/comparison.md in {ws}")


def format_runs(runs: list[dict], t0: float) -> str:
    """The stage jobs as a table: worker, stage, seconds from the pipeline's start."""
    rows = ["| stage | worker | start s | end s | state |", "|---|---|---:|---:|---|"]
    for r in runs:
        start = f"{r['start'] - t0:.0f}" if r["start"] else "-"
        end = f"{r['end'] - t0:.0f}" if r["end"] else "-"
        rows.append(f"| {r['stage']} | {r['worker']} | {start} | {end} | {r['state']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
