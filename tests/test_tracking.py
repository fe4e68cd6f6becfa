"""The MLflow side of compare, on a real SQLite MLflow store: a summary run per policy, top-level, that
carries its pipeline run and a study's condition and seed; and the saved view that shows them."""

import json

from stages.core import tracking


def test_summaries_carry_the_study_tags_and_the_view_keeps_its_creation_time(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    parent = tracking.start_parent("pipeline", {"study.condition": "noise-0.4", "study.seed": "3"}, root=tmp_path)
    client, exp_id = tracking.client_and_experiment(tmp_path)
    stage = client.create_run(exp_id, run_name="compare", tags={"mlflow.parentRunId": parent}).info.run_id
    tr = tracking.MlflowTracker(client, stage)
    tr.summary("dpo", {"seed": 3, "beta": 0.1}, {"eval/accuracy": 0.9, "cost/wall_s": 17.0})
    tr.methods_view(["eval/accuracy", "cost/wall_s"])

    runs = client.search_runs([exp_id], tracking.SUMMARY_FILTER)
    assert len(runs) == 1
    tags = runs[0].data.tags
    assert "mlflow.parentRunId" not in tags and tags["alignpipe.pipeline_run"] == parent  # top-level, linked
    assert (tags["method"], tags["study.condition"], tags["study.seed"]) == ("dpo", "noise-0.4", "3")
    assert runs[0].data.metrics == {"eval/accuracy": 0.9, "cost/wall_s": 17.0} and runs[0].data.params["beta"] == "0.1"

    key = tracking.VIEW_TAG_PREFIX + tracking.METHODS_VIEW
    view = json.loads(client.get_experiment(exp_id).tags[key])
    state = json.loads(view["state"])
    assert state["selectedColumns"] == ["tags.`method`", "params.`seed`", "tags.`study.condition`",
                                        "metrics.`eval/accuracy`", "metrics.`cost/wall_s`"]
    assert state["orderByKey"] == "metrics.`eval/accuracy`" and state["orderByAsc"] is False
    tr.methods_view(["eval/accuracy", "cost/wall_s"])  # unchanged: the tag is left as it was
    assert json.loads(client.get_experiment(exp_id).tags[key]) == view
    tr.methods_view(["eval/accuracy"])  # changed: rewritten, made when it was first made
    again = json.loads(client.get_experiment(exp_id).tags[key])
    assert again["createdAt"] == view["createdAt"] and again["updatedAt"] >= view["updatedAt"]
    assert json.loads(again["state"])["selectedColumns"][-1] == "metrics.`eval/accuracy`"
    assert tracking.methods_view_url("http://h:5000/", exp_id) == (
        f"http://h:5000/#/experiments/{exp_id}/runs?viewStateShareKey=alignpipe-methods&workflowType=machine_learning")
