"""The pipeline as a Prefect flow: every DVC stage is a task run, and every task runs its stage
through DVC (`dvc repro --single-item`), so a flow run and `dvc repro` share one cache and one
dvc.lock, and a stage that is up to date is skipped (or restored from DVC's run-cache) either way.
Each task waits for the tasks of the stages whose outputs it reads, so the flow run's graph in the
Prefect UI is DVC's pipeline graph.

    python -m flows.pipeline                        # the whole pipeline in this repo
    python -m flows.pipeline --methods dpo kto      # choose methods (written to params.yaml)
    python -m flows.pipeline --set align.dpo.beta=0.05

One MLflow parent run per flow run; the stages' runs nest under it. The comparison table ends up
as a Prefect artifact (key `comparison`) and on the parent run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from flows import params as params_edit
from flows import workers
from flows.repro import preflight, venv_path


def stage_order(repo: Path) -> list[tuple[str, list[str]]]:
    """The repo's DVC stages (matrix items expanded), every stage after the stages it needs → (stage,
    the stages whose outputs it reads)."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        graph = r.index.graph  # edges point from a stage to the stages it depends on
        names = {s: s.name for s in graph.nodes}
        order = nx.lexicographical_topological_sort(graph.reverse(copy=True), key=lambda s: names[s])
        return [(names[s], sorted(names[d] for d in graph.successors(s))) for s in order]


PROGRESS = re.compile(r"\|\s*\d+/\d+ \[")  # a tqdm bar
DVC_HINTS = ("To track the changes with git", "git add ", "To enable auto staging", "dvc config core.autostage",
             "Use `dvc push`")


def stream_dvc(repo: str | Path, args: list[str], env: dict) -> str:
    """`dvc <args>` in `repo`, its output streamed to the Prefect log (progress bars at most every 30 s)
    → what DVC did with the stage: "restored from run-cache", "up to date" or "ran". A failure raises
    RuntimeError with DVC's error line."""
    logger = get_run_logger()
    proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines, last_bar = [], 0.0
    for raw in proc.stdout:
        for line in raw.replace("\r", "\n").splitlines():
            line = line.strip()
            if not line or line.startswith(DVC_HINTS):
                continue
            if PROGRESS.search(line):
                if time.perf_counter() - last_bar < 30:
                    continue
                last_bar = time.perf_counter()
            lines.append(line)
            logger.info(line)
    proc.wait()
    out = "\n".join(lines)
    if proc.returncode:
        errors = [ln for ln in lines if ln.startswith(("error:", "ERROR"))]
        raise RuntimeError(f"{' '.join(args)} failed: "
                           f"{errors[0] if errors else lines[-1] if lines else proc.returncode}")
    return ("restored from run-cache" if "is cached" in out else
            "up to date" if "didn't change" in out else "ran")


@task(task_run_name="{stage}")
def run_stage(repo: str, stage: str, env: dict) -> dict:
    """`dvc repro --single-item <stage>` here: DVC decides whether it runs, is skipped or is restored."""
    t0 = time.perf_counter()
    try:
        status = stream_dvc(repo, ["repro", "--single-item", stage], env)
    except RuntimeError as e:
        raise RuntimeError(f"stage {stage} failed: {str(e).partition(' failed: ')[2]}") from None
    return {"stage": stage, "status": status, "seconds": round(time.perf_counter() - t0, 1)}


@flow(name="alignpipe", log_prints=True)
def pipeline(repo_dir: str = ".", methods: list[str] | None = None, overrides: dict | None = None,
             tags: dict | None = None, pool: str | None = None) -> str:
    """Run the pipeline in `repo_dir` (a DVC repo of this project) and return the comparison table.

    methods: replaces align.methods; overrides: {"dotted.key": value}, e.g. {"align.dpo.beta": 0.05};
    tags: set on the MLflow parent run (a study's condition and seed).
    Both are validated against the params schema and written to params.yaml before anything runs,
    as `dvc exp run -S` would: the params file is the record of what the run used.
    pool: run each stage as its own flow run on this work pool (flows/workers.py), stages whose inputs
    are ready at the same time side by side; without it every stage runs here, one after another.
    """
    from stages.core import tracking

    repo = Path(repo_dir).resolve()
    set_params(repo, methods, overrides)
    job = None
    if pool:  # every mistake that can be known here stops the run before anything is dispatched
        job = workers.prepare_dispatch(repo)
        workers.register(pool)

    flow_run = _flow_run_id()
    parent = tracking.start_parent(f"pipeline {time.strftime('%Y-%m-%d %H:%M:%S')}",
                                   {"entry": "prefect", "prefect.flow_run_id": flow_run, **_prefect_link(flow_run),
                                    **(tags or {})}, root=repo)
    # DVC runs stages as `python -m stages.<name>`: this interpreter's environment must come first.
    env = {**os.environ, "PATH": venv_path(), "ALIGNPIPE_PARENT_RUN_ID": parent}
    env.setdefault("MLFLOW_TRACKING_URI", tracking.tracking_uri(repo))
    results, states = [], {}
    try:
        client, exp_id = tracking.client_and_experiment(repo)
        mlflow_ui = os.environ.get("MLFLOW_UI_URL", "http://127.0.0.1:5000").rstrip("/")
        create_link_artifact(f"{mlflow_ui}/#/experiments/{exp_id}/runs/{parent}?{tracking.TRAINING_MODE}",
                             link_text="this run in MLflow",
                             key="mlflow-run", description="The MLflow parent run of this flow run (its stages nested)")
        create_link_artifact(tracking.methods_view_url(mlflow_ui, exp_id), link_text="the methods side by side",
                             key="mlflow-methods",
                             description="MLflow's runs table, one row per method and run (params, evaluation, "
                                         "cost): the saved view compare writes")
        for stage, needs in stage_order(repo):  # wait_for: the UI draws DVC's graph
            if job is None:  # one DVC repro at a time in this checkout
                states[stage] = run_stage(str(repo), stage, env, wait_for=[states[n] for n in needs],
                                          return_state=True)
                results.append(states[stage].result())  # raises if the stage failed
            elif stage in workers.LOCAL_STAGES:
                states[stage] = workers.run_local.submit(str(repo), stage, env, wait_for=[states[n] for n in needs])
            else:  # submitted: stages whose inputs are ready run side by side on the pool
                states[stage] = workers.dispatch_stage.submit(str(repo), stage, env, job, [states[n] for n in needs])
        if job is not None:
            results = [f.result() for f in states.values()]  # raises if a stage failed
    except BaseException:
        tracking.end_run(parent, "FAILED", root=repo)
        raise

    table = (repo / "reports" / "comparison.md").read_text()
    summary = "\n".join(f"- {r['stage']}: {r['status']} ({r['seconds']} s)" for r in results)
    create_markdown_artifact(key="comparison", markdown=f"{table}\n\n## Stages\n{summary}\n",
                             description="Method comparison on held-out prompts (reports/comparison.md)")
    for name in ("comparison.md", "comparison.png", "comparison.json"):
        client.log_artifact(parent, str(repo / "reports" / name))
    tracking.end_run(parent, root=repo)
    print(f"stages:\n{summary}")
    return table


def set_params(repo: Path, methods: list[str] | None, overrides: dict | None):
    """Write the run's choices to params.yaml and check it before DVC reads it → the params (raises
    ConfigError)."""
    changes = dict(overrides or {})
    if methods:
        changes["align.methods"] = list(methods)
    current = yaml.safe_load((repo / "params.yaml").read_text()) or {}
    changes = {k: v for k, v in changes.items() if params_edit.get(current, k) != v}
    if changes:  # only what differs: a run that changes nothing leaves the file (its layout, comments) as it is
        params_edit.apply(repo / "params.yaml", changes)
    return preflight(repo)


def _prefect_link(flow_run: str) -> dict:
    """The flow run's page in the Prefect UI, as a tag for the MLflow parent run (when the UI's address is known)."""
    from prefect.settings import PREFECT_UI_URL

    ui = PREFECT_UI_URL.value()
    return {"prefect.flow_run_url": f"{ui.rstrip('/')}/runs/flow-run/{flow_run}"} if ui and flow_run else {}


def _flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id or "")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=".", help="the DVC repo to run in (default: here)")
    p.add_argument("--methods", nargs="+", help="alignment methods, replacing align.methods")
    p.add_argument("--pool", help="run each stage on this Prefect work pool's workers (flows/workers.py)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a param, e.g. --set align.dpo.beta=0.05 (YAML value; repeatable)")
    args = p.parse_args(argv)

    def work() -> str:
        overrides = params_edit.parse_assignments(args.overrides)
        cfg = set_params(Path(args.repo).resolve(), args.methods, overrides)  # a mistake: one line, no flow run
        if args.pool:
            workers.prepare_dispatch(Path(args.repo).resolve())
        # the methods that run, as a parameter of the flow run (the Prefect UI shows them)
        return pipeline(repo_dir=args.repo, methods=cfg.align.methods, overrides=overrides, pool=args.pool)

    run_cli(work)


def run_cli(work) -> None:
    """A flow run from the command line: print what work() returns, or one line and exit 2 (bad params,
    before any work) or 1 (a failed stage: Prefect has the full log)."""
    try:
        out = work()
    except (params_edit.ConfigError, workers.NotDispatchable) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        sys.exit(1)
    print(out)


if __name__ == "__main__":
    main()
