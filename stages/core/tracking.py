"""The one place stages talk to MLflow.

A stage's run is owned by a small worker process that the stage starts and feeds one JSON line per
call: importing mlflow (~2.5 s here) overlaps the stage's own start-up on the other core, and no log
call ever blocks a training step (against a remote tracking server each one is an HTTP request).

A pipeline run is one parent run; each stage is a nested run tagged with its stage, method (the stage's
name where it has no method: every run has one), git commit and the DVC hashes of its deps. compare adds
one summary run per policy (tag alignpipe.kind = summary): the method's params, its evaluation and its
cost in one row, and saves the experiment's view METHODS_VIEW: the runs table filtered to those rows
with their key metrics as columns, the methods side by side in one step (methods_view_url). evaluate
logs its greedy replies as an MLflow table (samples.json). The experiment is tagged as model training
(mlflow.experimentKind), so the UI opens on its runs, not on GenAI traces. The parent is:
  - ALIGNPIPE_PARENT_RUN_ID when set (the Prefect flow sets it), else
  - the run of the `dvc repro` process this stage runs under (created by its first stage), else
  - none: a stage run by hand is a top-level run.
Tracking URI: MLFLOW_TRACKING_URI, else a SQLite store `mlflow.db` in the project (git-ignored).
ALIGNPIPE_TRACKING=off gives the null tracker (nothing is written).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from .io import file_digest

EXPERIMENT = os.environ.get("MLFLOW_EXPERIMENT_NAME", "alignpipe")


def tracking_uri(root: str | Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root or Path.cwd()).resolve() / 'mlflow.db'}"


class NullTracker:
    run_id = None

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_table(self, rows: list[dict], name: str) -> None: ...
    def summary(self, name: str, params: dict, metrics: dict) -> None: ...
    def methods_view(self, metrics: list[str]) -> None: ...


class MlflowTracker:
    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_table(self, rows: list[dict], name: str) -> None:
        import pandas as pd

        self.client.log_table(self.run_id, pd.DataFrame(rows), name)

    def summary(self, name: str, params: dict, metrics: dict) -> None:
        """A top-level run holding one policy's params, evaluation and cost, tagged with its pipeline run
        (alignpipe.pipeline_run): nested under the parent, the UI would fold it away under that run."""
        run = self.client.get_run(self.run_id)
        parent = run.data.tags.get("mlflow.parentRunId")
        tags = {"alignpipe.kind": "summary", "method": name, "stage": "compare", "git_commit": git_commit(),
                **({"alignpipe.pipeline_run": parent} if parent else {})}
        if parent:  # a study's condition and seed, so its summaries can be told apart and filtered
            tags.update({k: v for k, v in self.client.get_run(parent).data.tags.items() if k.startswith("study.")})
        other = MlflowTracker(self.client, self.client.create_run(run.info.experiment_id, run_name=f"summary@{name}",
                                                                  tags=tags).info.run_id)
        other.log_params(params)
        other.log_metrics(metrics)
        self.client.set_terminated(other.run_id, "FINISHED")

    def methods_view(self, metrics: list[str]) -> None:
        """The experiment's saved runs-table view METHODS_VIEW (MLflow ≥ 3.15 keeps a saved view as the
        experiment tag mlflow.sharedViewState.<id>, listed under Views and opened by methods_view_url): the
        summary runs, one row per method, its method, seed and `metrics` as columns, best first."""
        exp_id = self.client.get_run(self.run_id).info.experiment_id
        columns = ["tags.`method`", "params.`seed`", "tags.`study.condition`", *(f"metrics.`{k}`" for k in metrics)]
        state = json.dumps({"searchFilter": SUMMARY_FILTER, "orderByKey": f"metrics.`{metrics[0]}`",
                            "orderByAsc": False, "selectedColumns": columns, "columnOrder": columns})
        key = VIEW_TAG_PREFIX + METHODS_VIEW
        now = int(time.time() * 1000)
        try:
            old = json.loads(self.client.get_experiment(exp_id).tags[key])
            if old["state"] == state:
                return  # unchanged
            created = int(old["createdAt"])
        except (KeyError, ValueError, TypeError):
            created = now
        self.client.set_experiment_tag(exp_id, key, json.dumps({"name": "alignpipe: the methods side by side",
                                                                "createdAt": created, "updatedAt": now,
                                                                "state": state}))


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def client_and_experiment(root: str | Path | None = None):
    import logging

    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    client = MlflowClient(tracking_uri(root))
    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT, tags=EXPERIMENT_TAGS)
    if exp and any(exp.tags.get(k) != v for k, v in EXPERIMENT_TAGS.items()):
        for k, v in EXPERIMENT_TAGS.items():
            client.set_experiment_tag(exp_id, k, v)
    return client, exp_id


SUMMARY_FILTER = "tags.`alignpipe.kind` = 'summary'"
METHODS_VIEW = "alignpipe-methods"
TRAINING_MODE = "workflowType=machine_learning"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."


def methods_view_url(ui: str, exp_id: str) -> str:
    """The runs table as METHODS_VIEW shows it, in the MLflow UI at `ui`, in its model-training mode (the
    UI's own GenAI / model-training switch, which a URL parameter sets, wins over mlflow.experimentKind)."""
    return f"{ui.rstrip('/')}/#/experiments/{exp_id}/runs?viewStateShareKey={METHODS_VIEW}&{TRAINING_MODE}"


EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",  # the UI's model-training view, not GenAI traces
    "mlflow.note.content": "alignpipe: one parent run per pipeline run, a nested run per stage. Views → "
                           "\"alignpipe: the methods side by side\" (or filter `tags.`alignpipe.kind` = 'summary'`) "
                           "gives one row per method: its params, evaluation and cost.",
}


def start_parent(name: str, tags: dict | None = None, root: str | Path | None = None) -> str:
    """Create a pipeline (parent) run and return its id."""
    client, exp_id = client_and_experiment(root)
    run = client.create_run(exp_id, run_name=name, tags={"alignpipe.kind": "pipeline", **(tags or {})})
    return run.info.run_id


def end_run(run_id: str, status: str = "FINISHED", root: str | Path | None = None) -> None:
    client, _ = client_and_experiment(root)
    client.set_terminated(run_id, status)


class BackgroundTracker:
    """The stage's side of a tracking worker (see the module docstring): each call is one JSON line."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.broken = False

    def _send(self, op: str, **fields) -> None:
        if self.broken:
            return
        try:
            self.proc.stdin.write(json.dumps({"op": op, **fields}, default=str) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.broken = True
            print("warning: the MLflow tracking worker stopped; this stage's run is incomplete", file=sys.stderr)

    def log_params(self, params: dict) -> None:
        self._send("params", params=flatten(params))

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self._send("metrics", metrics={k: float(v) for k, v in metrics.items() if v is not None}, step=step or 0)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._send("artifact", path=str(Path(path).resolve()), artifact_path=artifact_path)

    def set_tags(self, tags: dict) -> None:
        self._send("tags", tags=tags)

    def log_table(self, rows: list[dict], name: str) -> None:
        """rows as an MLflow table artifact `name` (.json), shown in the UI's evaluation view."""
        self._send("table", rows=rows, name=name)

    def summary(self, name: str, params: dict, metrics: dict) -> None:
        """A summary run for policy `name` beside this stage's run: its params, evaluation and cost."""
        self._send("summary", name=name, params=flatten(params),
                   metrics={k: float(v) for k, v in metrics.items() if v is not None})

    def methods_view(self, metrics: list[str]) -> None:
        self._send("view", metrics=list(metrics))

    def close(self, status: str) -> None:
        self._send("end", status=status)
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            code = self.proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = "killed after 300 s"
        if code:
            print(f"warning: the MLflow tracking worker exited with {code}; this stage's run may be incomplete",
                  file=sys.stderr)


_worker: subprocess.Popen | None = None


def enabled() -> bool:
    """Tracking on, in this process: of a stage launched on several processes only the main one (RANK 0) logs."""
    return os.environ.get("ALIGNPIPE_TRACKING", "mlflow") != "off" and os.environ.get("RANK", "0") == "0"


def prestart() -> None:
    """Start this process's tracking worker now, so that it imports mlflow while the stage imports
    torch and transformers. A stage that ends before stage_run leaves it nothing to record."""
    global _worker
    if enabled() and _worker is None:
        _worker = subprocess.Popen([sys.executable, "-m", "stages.core.tracking"], stdin=subprocess.PIPE, text=True)


@contextlib.contextmanager
def stage_run(stage: str, method: str | None = None, params: dict | None = None,
              deps: list[str] | tuple = ()) -> Iterator[NullTracker | BackgroundTracker]:
    """A nested MLflow run for one stage; FINISHED on success, FAILED (and re-raised) on error."""
    global _worker
    if not enabled():
        yield NullTracker()
        return
    prestart()
    tracker, _worker = BackgroundTracker(_worker), None
    tracker._send("start", stage=stage, method=method or "", deps=[str(d) for d in deps],
                  parent=os.environ.get("ALIGNPIPE_PARENT_RUN_ID"))
    if params:
        tracker.log_params(params)
    try:
        yield tracker
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.close("FINISHED")


def _start(client, exp_id: str, stage: str, method: str, deps: list[str], parent: str | None) -> MlflowTracker:
    tags = {"stage": stage, "method": method or stage, "git_commit": git_commit(), "alignpipe.kind": "stage"}
    tags.update({f"dvc.dep.{d}": dvc_hash(d) for d in deps})
    parent = parent or _dvc_session_parent(client, exp_id)
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(exp_id, run_name=f"{stage}@{method}" if method else stage, tags=tags)
    return MlflowTracker(client, run.info.run_id)


OPS = {
    "params": lambda tr, m: tr.log_params(m["params"]),
    "metrics": lambda tr, m: tr.log_metrics(m["metrics"], m["step"]),
    "artifact": lambda tr, m: tr.log_artifact(m["path"], m["artifact_path"]),
    "tags": lambda tr, m: tr.set_tags(m["tags"]),
    "table": lambda tr, m: tr.log_table(m["rows"], m["name"]),
    "summary": lambda tr, m: tr.summary(m["name"], m["params"], m["metrics"]),
    "view": lambda tr, m: tr.methods_view(m["metrics"]),
}


def worker() -> None:
    """The worker: apply the JSON lines on stdin to one MLflow run. A stage that dies without saying
    "end" leaves its run FAILED; one that ends before its first call (bad params) leaves the store untouched."""
    from mlflow.tracking import MlflowClient  # noqa: F401  (the slow import, while the stage starts)

    first = sys.stdin.readline()
    if not first:
        return
    client, exp_id = client_and_experiment()
    tracker, status = None, "FAILED"
    for line in itertools.chain([first], sys.stdin):  # lazily: each call lands as it comes
        msg = json.loads(line)
        op = msg.pop("op")
        if op == "start":
            tracker = _start(client, exp_id, **msg)
        elif op == "end":
            status = msg["status"]
            break
        else:
            OPS[op](tracker, msg)
    if tracker is not None:
        client.set_terminated(tracker.run_id, status)


# ---------------------------------------------------------------------------------------------- helpers

def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "none"
    except (OSError, subprocess.SubprocessError):
        return "none"


def dvc_hash(path: str | Path) -> str:
    """The md5 DVC records for a dep: a file's md5, or for a directory the md5 of its sorted
    {md5, relpath} listing with a `.dir` suffix (dvc_data.hashfile.tree.Tree.digest)."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    if not path.is_dir():
        return "missing"
    entries = [{"md5": file_digest(f), "relpath": f.relative_to(path).as_posix()}
               for f in sorted(path.rglob("*")) if f.is_file()]
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a process, from /proc (Linux); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[19]


def _dvc_ancestor() -> str | None:
    """`<pid>:<start time>` of the `dvc` process this one runs under, if any."""
    pid = os.getppid()
    for _ in range(8):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        names = [Path(a.decode(errors="replace")).name for a in argv[:3]]
        if "dvc" in names:
            stat = _proc_stat(pid)
            return f"{pid}:{stat[1]}" if stat else None
        stat = _proc_stat(pid)
        if not stat or stat[0] <= 1:
            return None
        pid = stat[0]
    return None


def _dvc_session_parent(client, exp_id: str) -> str | None:
    """The parent run of the current `dvc repro`, created by the first stage that asks."""
    session = _dvc_ancestor()
    if session is None:
        return None
    found = client.search_runs([exp_id], filter_string=f"tags.`alignpipe.session` = '{session}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=f"dvc repro {time.strftime('%Y-%m-%d %H:%M:%S')}",
                            tags={"alignpipe.kind": "pipeline", "alignpipe.session": session, "entry": "dvc repro"})
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


if __name__ == "__main__":
    worker()
