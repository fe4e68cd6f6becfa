"""Screenshots of the MLflow and Prefect UIs in headless Chromium: what a user sees when comparing methods.

    python -m bench.ui_screenshots [--repo .study] [--out ui-screenshots] [--chromium chromium]

Needs a Chromium binary (Debian: `apt-get install chromium`). Starts `mlflow server` on the repo's store
(`<repo>/mlflow.db`) and `prefect server start` (on its default database, which holds the flow runs this
machine ran, temporary servers included), each on a free loopback port, and saves into --out:
  mlflow-experiment.png   the experiment as it opens
  mlflow-methods.png      the saved view compare writes: one row per method, its key metrics as columns
  mlflow-run.png          the latest summary run (params, evaluation and cost of one method)
  prefect-flow-run.png    the latest alignpipe flow run (its task graph)
then stops both servers. Nothing is asserted: look at the pictures.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, seconds: float = 90) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"{url} did not answer within {seconds:.0f} s")


def shot(chromium: str, url: str, path: Path, wait_ms: int = 15000) -> None:
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1600,1000", f"--virtual-time-budget={wait_ms}", f"--screenshot={path}", url],
                   capture_output=True, timeout=120, check=True)
    print(f"{path}  ←  {url}")


def mlflow_pages(repo: Path, port: int) -> list[tuple[str, str]]:
    from mlflow.tracking import MlflowClient

    from stages.core import tracking

    client = MlflowClient(tracking.tracking_uri(repo))
    exp = client.get_experiment_by_name(tracking.EXPERIMENT)
    base = f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}"
    pages = [("mlflow-experiment.png", base),
             ("mlflow-methods.png", tracking.methods_view_url(f"http://127.0.0.1:{port}", exp.experiment_id))]
    latest = client.search_runs([exp.experiment_id], tracking.SUMMARY_FILTER, order_by=["start_time DESC"],
                                max_results=1)
    if latest:
        pages.append(("mlflow-run.png", f"{base}/runs/{latest[0].info.run_id}"))
    return pages


def prefect_pages(port: int) -> list[tuple[str, str]]:
    import json

    body = json.dumps({"flows": {"name": {"any_": ["alignpipe"]}}, "sort": "START_TIME_DESC", "limit": 1}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/flow_runs/filter", data=body,
                                 headers={"Content-Type": "application/json"})
    runs = json.loads(urllib.request.urlopen(req, timeout=30).read())
    return [("prefect-flow-run.png", f"http://127.0.0.1:{port}/runs/flow-run/{runs[0]['id']}")] if runs else []


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=".", help="the repo whose mlflow.db to show (e.g. .study)")
    p.add_argument("--out", default="ui-screenshots")
    p.add_argument("--chromium", default="chromium")
    args = p.parse_args(argv)
    repo, out = Path(args.repo).resolve(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    ml_port, pf_port = free_port(), free_port()
    env = {**os.environ, "PREFECT_UI_API_URL": f"http://127.0.0.1:{pf_port}/api"}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    store = f"sqlite:///{repo / 'mlflow.db'}"
    procs = [subprocess.Popen([str(bin_dir / "mlflow"), "server", "--backend-store-uri", store, "--host", "127.0.0.1",
                               "--port", str(ml_port)], **quiet),
             subprocess.Popen([str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(pf_port)], env=env, **quiet)]
    try:
        wait_http(f"http://127.0.0.1:{ml_port}/health")
        wait_http(f"http://127.0.0.1:{pf_port}/api/health")
        for name, url in mlflow_pages(repo, ml_port) + prefect_pages(pf_port):
            shot(args.chromium, url, out / name)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
