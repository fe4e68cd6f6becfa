"""Deployments of the pipeline flow: start it from the Prefect UI with parameters, or on a schedule.

    python -m flows.deploy                          # serve: register `alignpipe/alignpipe` and run its
                                                    #   flow runs in this process (Ctrl-C stops serving)
    python -m flows.deploy --cron "0 3 * * *"       # the same, on a schedule
    python -m flows.deploy --pool gpu               # the same, each stage of a run dispatched to the work
                                                    #   pool `gpu` (created if missing; flows/workers.py);
                                                    #   on each GPU machine, in the project's venv:
                                                    #   prefect worker start --pool gpu

Parameters (UI, `prefect deployment run alignpipe/alignpipe -p 'methods=["dpo"]'`, or the client):
repo_dir (the checkout to run in), methods, overrides ({"align.dpo.beta": 0.05}), pool.
The pipeline flow itself always runs here, in the checkout that is the run's record (dvc.lock,
reports, the MLflow parent run); with a pool, only the stages run on the workers.
Needs a Prefect server: `prefect server start`, and PREFECT_API_URL pointing at it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import flows  # noqa: F401  (Prefect defaults, before prefect is imported)
from flows import workers
from flows.pipeline import pipeline

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="alignpipe", help="deployment name (default: alignpipe)")
    p.add_argument("--repo", default=str(ROOT), help="default repo_dir of the runs (default: this checkout)")
    p.add_argument("--pool", help="dispatch each stage of a run to this work pool's workers")
    p.add_argument("--cron", help="run on this cron schedule (UTC)")
    p.add_argument("--interval", type=float, help="run every this many seconds")
    args = p.parse_args(argv)
    schedule = {"cron": args.cron} if args.cron else {"interval": args.interval} if args.interval else {}
    parameters = {"repo_dir": str(Path(args.repo).resolve())}
    if args.pool:
        workers.register(args.pool)
        parameters["pool"] = args.pool
        print(f"stages go to work pool {args.pool!r}; on each GPU machine, in the project's venv:\n"
              f"  prefect worker start --pool {args.pool}", flush=True)
    pipeline.serve(name=args.name, parameters=parameters, **schedule)


if __name__ == "__main__":
    main()
