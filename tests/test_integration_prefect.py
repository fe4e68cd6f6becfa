"""A real Prefect server on loopback runs the pipeline deployment to Completed through `serve`; with a
pool, the stage job is registered on it (the pipeline through a pool: tests/test_workers.py). Each DVC
stage is a task run, the comparison table is an artifact, and MLflow gets one parent run per flow run."""

import subprocess
import sys
import time
import urllib.request

import pytest

from flows import workspace
from flows.cluster import free_port, stop
from tests import helpers

pytestmark = pytest.mark.integration

STAGES = {"check", "prepare", "sft", "reward", "pairs", "align@dpo", "evaluate_sft", "evaluate@dpo", "compare"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path_factory.mktemp("prefect")
    api = f"http://127.0.0.1:{free_port()}/api"
    env = helpers.env(
        PREFECT_HOME=home, PREFECT_API_URL=api, PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",  # the UI would copy its build into site-packages
        PREFECT_LOGGING_LEVEL="WARNING", PREFECT_RUNNER_POLL_FREQUENCY=1, PREFECT_WORKER_QUERY_SECONDS=1,
        ALIGNPIPE_TRACKING="mlflow", MLFLOW_TRACKING_URI=f"sqlite:///{home / 'mlflow.db'}",
    )
    log = home / "server.log"
    procs = [subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", api.split(":")[-1].split("/")[0]], env=env, stdout=log.open("w"),
                              stderr=subprocess.STDOUT, start_new_session=True)]
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2):
                break
        except OSError:
            assert procs[0].poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)

    def spawn(args, name):
        p = subprocess.Popen(args, cwd=helpers.ROOT, env=env, stdout=(home / f"{name}.log").open("w"),
                             stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    with temporary_settings(updates={PREFECT_API_URL: api}):
        yield {"env": env, "home": home, "spawn": spawn}
    stop(*procs[1:])  # workers and servers of deployments before the API server
    stop(procs[0])


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefect-ws")
    return workspace.create(root / "ws", helpers.lean_params(root / "params.yaml"))


def wait_for_deployment(name: str, timeout: float = 120):
    from prefect.client.orchestration import get_client

    deadline = time.time() + timeout
    with get_client(sync_client=True) as client:
        while True:
            try:
                return client.read_deployment_by_name(name)
            except Exception:
                assert time.time() < deadline, f"deployment {name} never registered"
                time.sleep(1)


def run_and_read(name: str, parameters: dict):
    """Run a deployment to a final state → (flow run, task run names, artifacts)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment

    fr = run_deployment(name, parameters=parameters, timeout=600, poll_interval=2)
    with get_client(sync_client=True) as client:
        fr = client.read_flow_run(fr.id)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id])))
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[fr.id])))
    return fr, {t.name: t for t in tasks}, {a.key: a for a in arts}


def test_deploy_with_a_pool_serves_the_pipeline_here_and_registers_the_stage_job_on_the_pool(server, ws):
    """The pipeline flow stays in the user's checkout; its stages go to the pool (run in tests/test_workers.py)."""
    from prefect.client.orchestration import get_client

    from flows import workers

    server["spawn"]([sys.executable, "-m", "flows.deploy", "--name", "ci-pool", "--pool", "ci", "--repo", str(ws),
                     "--cron", "0 3 * * *"], "deploy-pool")
    dep = wait_for_deployment("alignpipe/ci-pool")
    assert dep.schedules and dep.schedules[0].schedule.cron == "0 3 * * *"
    assert dep.parameters == {"repo_dir": str(ws), "pool": "ci"} and dep.work_pool_name is None  # served here
    job = wait_for_deployment(workers.DEPLOYMENT)
    assert job.work_pool_name == "ci" and job.entrypoint == "flows.workers.stage_job"
    with get_client(sync_client=True) as client:
        assert client.read_work_pool("ci").type == "process"
        [auto] = client.read_automations_by_name(workers.ZOMBIE_AUTOMATION)
    assert auto.trigger.match_related.root["prefect.resource.name"] == "alignpipe-stage"


def test_served_deployment_takes_parameters(server, ws):
    server["spawn"]([sys.executable, "-m", "flows.deploy", "--name", "ci-serve", "--repo", str(ws)], "serve")
    wait_for_deployment("alignpipe/ci-serve")
    fr, tasks, arts = run_and_read("alignpipe/ci-serve", {"repo_dir": str(ws)})
    assert fr.state.is_completed(), fr.state
    assert set(tasks) == STAGES and all(t.state.is_completed() for t in tasks.values())
    assert "| sft " in arts["comparison"].data and "| dpo " in arts["comparison"].data
    assert "prepare: ran" in arts["comparison"].data
    # The UI's graph is DVC's: a task waits for the tasks of the stages whose outputs it reads.
    waits = {name: {i.id for i in t.task_inputs.get("wait_for", [])} for name, t in tasks.items()}
    assert waits["align@dpo"] == {tasks[s].id for s in ("prepare", "pairs", "sft", "reward")}  # prompts: prepare's
    assert waits["prepare"] == {tasks["check"].id} and waits["check"] == set()
    assert "/#/experiments/" in arts["mlflow-run"].data  # the link to the MLflow parent run
    assert "/runs?viewStateShareKey=alignpipe-methods&" in arts["mlflow-methods"].data  # the saved view

    fr, tasks, arts = run_and_read("alignpipe/ci-serve", {"overrides": {"align.dpo.beta": 0.25}, "repo_dir": str(ws)})
    assert fr.state.is_completed(), fr.state
    assert set(tasks) == STAGES
    summary = arts["comparison"].data
    for stage in ("prepare", "sft", "reward", "pairs", "evaluate_sft"):
        assert f"{stage}: up to date" in summary
    for stage in ("align@dpo", "evaluate@dpo", "compare"):
        assert f"{stage}: ran" in summary
    assert "beta: 0.25" in (ws / "params.yaml").read_text()


def test_bad_parameters_fail_the_flow_run_before_any_stage(server, ws):
    lock = (ws / "dvc.lock").read_text()
    fr, tasks, _ = run_and_read("alignpipe/ci-serve", {"overrides": {"align.dpo.beta": -1}, "repo_dir": str(ws)})
    assert fr.state.is_failed()
    assert tasks == {}
    assert "beta: 0.25" in (ws / "params.yaml").read_text()  # the params file was not touched
    assert (ws / "dvc.lock").read_text() == lock


def test_mlflow_parent_run_per_flow_run(server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server["env"]["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("alignpipe")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    parents = [r for r in runs if r.data.tags.get("entry") == "prefect"]
    assert len(parents) == 2  # the failed run stopped before MLflow
    assert all(r.data.tags.get("prefect.flow_run_id") for r in parents)
    stages = [r for r in runs if r.data.tags.get("alignpipe.kind") == "stage"]
    nested = [{r.info.run_name for r in stages if r.data.tags.get("mlflow.parentRunId") == p.info.run_id}
              for p in sorted(parents, key=lambda r: r.info.start_time)]
    assert nested[0] == {"prepare", "sft", "reward", "pairs", "align@dpo", "evaluate@sft", "evaluate@dpo", "compare"}
    assert nested[1] == {"align@dpo", "evaluate@dpo", "compare"}  # what the override made stale
    assert {p.data.tags["alignpipe.kind"] for p in parents} == {"pipeline"}
