"""The real pipeline under a real `dvc repro`, in a fresh git + DVC repo, tracked in a real MLflow
store: staleness is exactly what it should be, a no-op is fast, reverting a param restores outputs
from the run-cache, and MLflow holds one parent run per repro with the stages nested under it."""

import json
import resource
import shutil
import time
from pathlib import Path

import pytest

from flows import params as params_edit
from flows import workspace
from stages.core import tracking
from tests import helpers

pytestmark = pytest.mark.integration
AFTER_SFT = {"sft", "reward", "pairs", "align@dpo", "evaluate_sft", "evaluate@dpo", "compare"}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("dvc")
    d = workspace.create(root / "ws", helpers.lean_params(root / "params.yaml"))
    uri = f"sqlite:///{d.parent / 'mlflow.db'}"
    return d, {"ALIGNPIPE_TRACKING": "mlflow", "MLFLOW_TRACKING_URI": uri}


def repro(ws):
    d, extra = ws
    return helpers.dvc("repro", cwd=d, **extra).stdout


def digest(path):
    return tracking.dvc_hash(path)


def test_first_repro_runs_every_stage_and_writes_the_report(ws):
    d, _ = ws
    t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = repro(ws)
    took, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    assert helpers.ran_stages(out) == {"prepare"} | AFTER_SFT
    report = (d / "reports" / "comparison.md").read_text()
    assert "| sft " in report and "| dpo " in report
    assert (d / "reports" / "comparison.png").stat().st_size > 1000
    for name in ("sft", "dpo"):
        m = (d / "metrics" / f"eval_{name}.json").read_text()
        for key in ("eval/accuracy", "eval/reward_mean", "eval/win_rate_vs_sft", "eval/kl_to_ref", "eval/length",
                    "cost/wall_s", "cost/peak_mem_mb", "cost/models_in_memory", "cost/tokens_generated"):
            assert f'"{key}"' in m, (name, key)
    assert '"reward/heldout_accuracy"' in (d / "metrics" / "reward.json").read_text()
    # DVC reads every metric and plot dvc.yaml names (the study's are in study/dvc.yaml, never copied here).
    for cmd in (("metrics", "show"), ("plots", "show", "--json")):
        shown = helpers.dvc(*cmd, cwd=d)
        assert "failed to load" not in shown.stderr, shown.stderr
    print(f"lean smoke chain under dvc repro: {took:.1f} s wall, {cpu:.1f} s CPU")
    # CPU time (DVC and every stage it ran), which a test on the other xdist worker cannot inflate as it
    # does wall time; 95 s was measured here (104 s wall), 2x that for a slower CPU
    assert cpu < 200, f"the lean smoke chain took {cpu:.0f} s of CPU ({took:.0f} s wall)"


def test_second_repro_is_a_fast_noop(ws):
    """Fast as the work it does (CPU of dvc and its check stage), which another test file running on the
    other xdist worker cannot inflate; the wall bound is loose for that reason."""
    t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = repro(ws)
    took, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    assert helpers.ran_stages(out) == set()
    assert "Running stage 'check'" in out  # params validated even when nothing is stale
    assert "Stage 'prepare' didn't change, skipping" in out
    assert cpu < 3.0 and took < 10.0, f"no-op dvc repro took {cpu:.2f} s of CPU, {took:.2f} s wall"


def test_dpo_beta_reruns_exactly_its_stages_and_reverting_restores(ws):
    d, _ = ws
    before = digest(d / "models" / "dpo"), (d / "reports" / "comparison.md").read_text()
    params_edit.apply(d / "params.yaml", {"align.dpo.beta": 0.3})
    out = repro(ws)
    assert helpers.ran_stages(out) == {"align@dpo", "evaluate@dpo", "compare"}
    assert digest(d / "models" / "dpo") != before[0]

    params_edit.apply(d / "params.yaml", {"align.dpo.beta": 0.1})
    out = repro(ws)
    assert helpers.ran_stages(out) == set()  # nothing trains again
    assert helpers.restored_stages(out) == {"align@dpo", "evaluate@dpo", "compare"}
    assert digest(d / "models" / "dpo") == before[0]
    assert (d / "reports" / "comparison.md").read_text() == before[1]


def test_sft_change_reruns_everything_from_sft_and_reverting_restores(ws):
    d, _ = ws
    sft_before = digest(d / "models" / "sft")
    params_edit.apply(d / "params.yaml", {"sft.lr": 0.002})
    out = repro(ws)
    assert helpers.ran_stages(out) == AFTER_SFT
    params_edit.apply(d / "params.yaml", {"sft.lr": 0.003})
    out = repro(ws)
    assert helpers.ran_stages(out) == set()
    assert helpers.restored_stages(out) == AFTER_SFT
    assert digest(d / "models" / "sft") == sft_before


def test_mlflow_has_a_parent_per_repro_with_nested_stage_runs(ws, tmp_path):
    d, extra = ws
    from mlflow.tracking import MlflowClient

    client = MlflowClient(extra["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("alignpipe")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    parents = [r for r in runs if r.data.tags.get("alignpipe.kind") == "pipeline"]
    stages = [r for r in runs if r.data.tags.get("alignpipe.kind") == "stage"]
    assert len(parents) == 3  # the repros that ran stages: first, beta, sft (restores run nothing)
    first = min(parents, key=lambda r: r.info.start_time)
    children = [r for r in stages if r.data.tags.get("mlflow.parentRunId") == first.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(
        ["prepare", "sft", "reward", "pairs", "align@dpo", "evaluate@sft", "evaluate@dpo", "compare"])
    by_name = {r.info.run_name: r for r in children}
    sft = by_name["sft"]
    assert sft.data.tags["stage"] == "sft" and len(sft.data.tags["git_commit"]) == 40
    lock = (d / "dvc.lock").read_text()
    dep_tags = {k: v for k, v in sft.data.tags.items() if k.startswith("dvc.dep.")}
    assert dep_tags and all(v in lock for v in dep_tags.values())  # the same hashes DVC recorded
    assert by_name["align@dpo"].data.tags["method"] == "dpo"
    assert sft.data.params["lr"] == "0.003"
    history = client.get_metric_history(sft.info.run_id, "train/loss")
    assert len({m.step for m in history}) > 3  # per-step, not just a final value
    align = by_name["align@dpo"]
    for key in ("rewards/chosen", "rewards/margins", "rewards/accuracies", "train/grad_norm", "perf/tokens_per_sec"):
        assert key in align.data.metrics, key
    artifacts = [a.path for a in client.list_artifacts(by_name["compare"].info.run_id)]
    assert {"comparison.md", "comparison.png"} <= set(artifacts)

    # One comparison in one view: the experiment opens as model training; every run names its method; a
    # summary run per policy holds the method's params with its evaluation and cost; replies as a table.
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert all(r.data.tags.get("method") for r in children)
    assert sft.data.tags["method"] == "sft"
    summaries = {r.data.tags["method"]: r for r in runs if r.data.tags.get("alignpipe.kind") == "summary"
                 and r.data.tags.get("alignpipe.pipeline_run") == first.info.run_id}
    assert set(summaries) == {"sft", "dpo"}
    dpo = summaries["dpo"]
    assert dpo.data.params["beta"] == "0.1" and {"eval/accuracy", "cost/wall_s"} <= set(dpo.data.metrics)
    evals = json.loads((d / "metrics" / "eval_dpo.json").read_text())
    assert dpo.data.metrics["eval/reward_mean"] == pytest.approx(evals["eval/reward_mean"])
    samples = client.download_artifacts(by_name["evaluate@dpo"].info.run_id, "samples.json", str(tmp_path))
    table = json.loads(Path(samples).read_text())
    assert {"prompt", "completion", "correct", "reward_model"} <= set(table["columns"]) and table["data"]

    # The saved view that opens the methods side by side (?viewStateShareKey=alignpipe-methods), in the
    # envelope the MLflow UI reads (name, createdAt, state), its filter run through MLflow's own parser.
    view = json.loads(exp.tags["mlflow.sharedViewState.alignpipe-methods"])
    assert isinstance(view["name"], str) and isinstance(view["createdAt"], int)
    state = json.loads(view["state"])
    shown = client.search_runs([exp.experiment_id], state["searchFilter"], max_results=500)
    summary_ids = {r.info.run_id for r in runs if r.data.tags.get("alignpipe.kind") == "summary"}
    assert summary_ids and {r.info.run_id for r in shown} == summary_ids
    assert state["selectedColumns"][:2] == ["tags.`method`", "params.`seed`"]
    assert "metrics.`eval/accuracy`" in state["selectedColumns"] and state["orderByKey"] == "metrics.`eval/accuracy`"
    assert all(f"metrics.`{k}`" in state["selectedColumns"] for k in dpo.data.metrics)  # every summary metric shown


def test_a_code_change_reruns_only_the_stages_that_run_that_code(ws):
    """dvc.yaml lists each stage's own code (test_code_deps): a fix in the MLflow logging makes nothing
    stale, one in the advantages (online methods only) makes align stale (and, once it reran, what reads
    its outputs: test_dpo_beta_… shows that chain), not SFT and the stages before align. `dvc status`
    says so without training anything."""
    d, _ = ws

    def stale() -> set[str]:
        return set(json.loads(helpers.dvc("status", "--json", cwd=d).stdout)) - {"check"}  # check: always runs

    tracking_py, advantages_py = d / "stages" / "core" / "tracking.py", d / "stages" / "core" / "advantages.py"
    originals = tracking_py.read_text(), advantages_py.read_text()
    try:
        assert stale() == set()
        tracking_py.write_text(originals[0] + "\n# a comment\n")
        assert stale() == set()
        advantages_py.write_text(originals[1] + "\n# a comment\n")
        assert stale() == {"align@dpo"}  # not prepare, sft, reward, pairs or evaluate_sft
    finally:
        tracking_py.write_text(originals[0])
        advantages_py.write_text(originals[1])


@pytest.mark.parametrize("folder", ["inputs", "elsewhere"])
def test_an_edited_local_input_reruns_prepare(ws, folder):
    """A data file that params.yaml names: under inputs/ (a dep of prepare) a bare `dvc status` shows
    prepare stale as soon as the file changes; elsewhere, the check stage (run by every repro) records
    its digest in inputs.lock.json, which prepare depends on, so `dvc status` sees the edit once check
    has run. Either way the repro reads the new rows; a typo in params fails at once with nothing stale."""
    d, _ = ws
    rows = [{"prompt": r["prompt"], "answer": r["answer"]}
            for r in map(json.loads, (d / "data" / "eval.jsonl").read_text().splitlines())]
    (d / folder).mkdir(exist_ok=True)
    user_file = d / folder / "eval.jsonl"
    user_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = (d / "params.yaml").read_text()
    try:
        params_edit.apply(d / "params.yaml", {"data.eval": f"{folder}/eval.jsonl"})
        assert "prepare" in helpers.ran_stages(helpers.dvc("repro", "prepare", cwd=d).stdout)
        assert "prepare" not in helpers.dvc("status", "prepare", cwd=d).stdout
        user_file.write_text("".join(json.dumps({**r, "answer": "7"}) + "\n" for r in rows[:5]))
        if folder != "inputs":
            helpers.dvc("repro", "check", cwd=d)
        assert "prepare" in helpers.dvc("status", "prepare", cwd=d).stdout  # stale: its inputs changed
        assert helpers.ran_stages(helpers.dvc("repro", "prepare", cwd=d).stdout) == {"prepare"}
        eval_rows = [json.loads(x) for x in (d / "data" / "eval.jsonl").read_text().splitlines()]
        assert len(eval_rows) == 5 and {r["answer"] for r in eval_rows} == {"7"}
        assert helpers.ran_stages(helpers.dvc("repro", "prepare", cwd=d).stdout) == set()  # unchanged: cached

        (d / "params.yaml").write_text(params.replace("seed: 0", "seed: zero"))
        out = helpers.dvc("repro", cwd=d, check=False)
        assert out.returncode != 0 and helpers.ran_stages(out.stdout) == set()
        assert "error: params.yaml: seed:" in out.stdout + out.stderr
    finally:
        (d / "params.yaml").write_text(params)
        user_file.unlink()
        helpers.dvc("repro", "prepare", cwd=d)


def test_a_distilled_policy_waits_for_its_teacher_and_reaches_the_comparison(tmp_path):
    """distill@grpo reads models/grpo: DVC orders it after align@grpo (and reruns it when that model
    changes); its evaluation feeds compare. The align matrix could not give one member that edge."""
    from flows.pipeline import stage_order

    d = workspace.create(tmp_path / "ws", helpers.SMOKE)
    params_edit.apply(d / "params.yaml", {"align.methods": ["dpo", "grpo"], "align.distill.teachers": ["grpo", "sft"]})
    needs = dict(stage_order(d))
    assert needs["distill@grpo"] == ["align@grpo", "pairs", "prepare", "reward", "sft"]
    assert "align@" not in " ".join(needs["distill@sft"])
    assert {"evaluate_distill@grpo", "evaluate_distill@sft"} <= set(needs["compare"])
    assert needs["evaluate_distill@grpo"] == ["distill@grpo", "evaluate_sft", "prepare", "reward", "sft"]


def test_an_external_teacher_is_copied_in_then_distilled(tmp_path, saved_model):
    """A teacher from outside (align.distill.external; here the tiny model, the smoke tokenizer's vocabulary) is
    the stage teacher@<name>, after check (whose inputs.lock.json records the source's digest) and prepare (its
    vocabulary is checked against the pipeline's); distill@<name> reads what it wrote. An unchanged source leaves
    it up to date; a file changed in it makes it stale (DVC's status once check has hashed the inputs again)."""
    from flows.pipeline import stage_order

    d = workspace.create(tmp_path / "ws", helpers.SMOKE)
    outside = tmp_path / "outside"
    shutil.copytree(saved_model, outside)
    params_edit.apply(d / "params.yaml", {"align.distill.teachers": ["big"],
                                          "align.distill.external": {"big": str(outside)}})
    needs = dict(stage_order(d))
    assert needs["teacher@big"] == ["check", "prepare"]
    assert "teacher@big" in needs["distill@big"]
    assert "teacher@big" in helpers.ran_stages(helpers.dvc("repro", "teacher@big", cwd=d).stdout)
    assert (d / "models" / "big" / "config.json").is_file()

    def stale() -> set[str]:
        helpers.dvc("repro", "check", cwd=d)
        return set(json.loads(helpers.dvc("status", "--json", "teacher@big", cwd=d).stdout)) - {"check"}

    assert stale() == set()
    (outside / "note.txt").write_text("a changed source")
    assert stale() == {"teacher@big"}
