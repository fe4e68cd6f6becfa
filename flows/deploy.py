"""Deployments of the pipeline flow: start it from the Prefect UI with parameters, or on a schedule.

    python -m flows.deploy                          # serve: register `alignpipe/alignpipe` and run its
                                                    #   flow runs in this process (Ctrl-C stops serving)
    python -m flows.deploy --cron "0 3 * * *"       # the same, on a schedule
    python -m flows.deploy --pool gpu               # register on a process work pool (created if
                                                    #   missing); on each GPU machine, in the project's
                                                    #   venv: prefect worker start --pool gpu

Parameters (UI, `prefect deployment run alignpipe/alignpipe -p 'methods=["dpo"]'`, or the client):
repo_dir (the checkout to run in), methods, overrides ({"align.dpo.beta": 0.05}).
Needs a Prefect server: `prefect server start`, and PREFECT_API_URL pointing at it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import flows  # noqa: F401  (Prefect defaults, before prefect is imported)
from flows.pipeline import pipeline

ROOT = Path(__file__).resolve().parents[1]


def ensure_pool(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="alignpipe", help="deployment name (default: alignpipe)")
    p.add_argument("--repo", default=str(ROOT), help="default repo_dir of the runs (default: this checkout)")
    p.add_argument("--pool", help="register on this process work pool instead of serving here")
    p.add_argument("--cron", help="run on this cron schedule (UTC)")
    p.add_argument("--interval", type=float, help="run every this many seconds")
    args = p.parse_args(argv)
    schedule = {"cron": args.cron} if args.cron else {"interval": args.interval} if args.interval else {}
    parameters = {"repo_dir": str(Path(args.repo).resolve())}
    if args.pool:
        ensure_pool(args.pool)
        deployment_id = pipeline.from_source(source=str(ROOT), entrypoint="flows/pipeline.py:pipeline").deploy(
            name=args.name, work_pool_name=args.pool, parameters=parameters, build=False, push=False,
            print_next_steps=False, ignore_warnings=True, **schedule)
        print(f"deployment alignpipe/{args.name} ({deployment_id}) on work pool {args.pool!r}; start a worker with:\n"
              f"  prefect worker start --pool {args.pool}")
    else:
        pipeline.serve(name=args.name, parameters=parameters, **schedule)


if __name__ == "__main__":
    main()
