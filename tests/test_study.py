"""`make study`: the report's statistics on runs whose numbers are known, and a real study (Prefect flow →
DVC stages per condition and seed → DVC experiments → report) on the smoke profile."""

import csv
import json
import re
import shutil
import subprocess
import sys

import pytest

from flows import study_report
from tests import helpers

SEEDS = [0, 1, 2]
ACCURACY = {  # per seed: grpo far and steadily above SFT, dpo up, down, up (not separated)
    "sft": [0.50, 0.60, 0.55], "dpo": [0.58, 0.55, 0.62], "grpo": [0.80, 0.92, 0.86]}


def squeezed(md: str) -> str:
    """The report with runs of spaces as one: pandas pads each table cell to its column's width."""
    return re.sub(r" {2,}", " ", md)


def fake_run(d, seed: int, accuracy: dict, reward: dict | None = None) -> None:
    (d / "metrics").mkdir(parents=True)
    (d / "plots").mkdir()
    for policy, acc in accuracy.items():
        ev = {"eval/accuracy": acc[seed], "eval/reward_mean": (reward or {}).get(policy, [0.0] * 3)[seed],
              "eval/win_rate_vs_sft": 0.5, "eval/kl_to_ref": 0.1, "eval/length": 3.0, "cost/models_in_memory": 1,
              "cost/peak_mem_mb": 500, "cost/wall_s": 60, "cost/tokens_generated": 0}
        (d / "metrics" / f"eval_{policy}.json").write_text(json.dumps(ev))
        (d / "metrics" / f"train_{policy}.json").write_text(json.dumps({"train/examples": 100, "cost/wall_s": 60}))
        with open(d / "plots" / f"train_{policy}.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, ["step", "probe/accuracy", "rollout/reward_mean", "rollout/accuracy", "cost/wall_s"])
            w.writeheader()
            for step, a in ((5, acc[seed] - 0.1), (10, acc[seed])):
                w.writerow({"step": step, "probe/accuracy": a, "rollout/reward_mean": a, "rollout/accuracy": a,
                            "cost/wall_s": 6 * step})
    (d / "metrics" / "pairs.json").write_text(json.dumps({"cost/tokens_generated": 1000}))
    (d / "metrics" / "reward.json").write_text(json.dumps({"reward/heldout_accuracy": 0.9 + seed / 100}))


def test_the_report_states_what_the_seeds_support(tmp_path, tmp_path_factory):
    """grpo − sft = [+0.30, +0.32, +0.31]: mean +31.0 pts, s = 1.0 pt, t = 31.0 / (1.0/√3) = 53.7 on 2 dof,
    p = 1 − 53.7/√(53.7² + 2) = 3.5e-4 → Holm (×2) 6.9e-4: better than SFT. dpo − sft = [+8, −5, +7] pts:
    mean +3.33, s = 7.23, t = 0.80, p = 0.51: not separated. The accuracy cell of grpo is its mean 86.0%
    ± 4.303 · 6.0 / √3 = 14.9 pts."""
    for seed in SEEDS:
        fake_run(tmp_path / "runs" / "main" / f"seed_{seed}", seed, ACCURACY,
                 reward={"sft": [0.0] * 3, "grpo": [0.5, 0.6, 0.4], "dpo": [0.1] * 3})
        noisy = {**ACCURACY, "dpo": [a - 0.10 for a in ACCURACY["dpo"]]}
        fake_run(tmp_path / "runs" / "noise-0.4" / f"seed_{seed}", seed, {k: noisy[k] for k in ("sft", "dpo")})
        hacked = {"sft": ACCURACY["sft"], "grpo": [0.52, 0.61, 0.55]}
        fake_run(tmp_path / "runs" / "rm-reward" / f"seed_{seed}", seed, hacked,
                 reward={"sft": [0.0] * 3, "grpo": [1.5, 1.7, 1.6]})
    plan = [("main", ["dpo", "grpo"]), ("noise-0.4", ["dpo"]), ("rm-reward", ["grpo"])]
    failed = {3: "main: stage reward failed: below the gate"}
    md = squeezed(study_report.write(tmp_path, SEEDS, plan, 60.0, failed=failed))

    assert "| grpo | 86.0% ± 14.9% |" in md
    assert "**Seeds left out** (1 of 4): seed 3, main: stage reward failed: below the gate." in md
    assert "**grpo**: +31.0 pts" in md and "better than SFT" in md.split("**grpo**")[1].splitlines()[0]
    assert "**dpo**: +3.3 pts" in md and "not separated from SFT" in md.split("**dpo**")[1].splitlines()[0]
    assert "grpo > dpo" in md  # [+22, +37, +24]: t = 7.8, p = 0.016 (one pair: no Holm factor)
    out = json.loads((tmp_path / "study.json").read_text())
    assert out["vs_sft"]["grpo"]["p"] == pytest.approx(1 - 53.69358 / (53.69358 ** 2 + 2) ** 0.5, rel=1e-3)
    assert out["vs_sft"]["grpo"]["p_holm"] == pytest.approx(2 * out["vs_sft"]["grpo"]["p"])
    assert out["vs_sft"]["dpo"]["p"] == pytest.approx(0.5086, abs=1e-3) and not out["vs_sft"]["dpo"]["significant"]
    assert out["per_seed"]["main"]["1"]["grpo"]["eval/accuracy"] == 0.92
    noise = md.split("## Noisy preferences")[1]
    assert "| dpo | 58.3% ±" in noise and "-10.0 pts" in noise  # the same 10 points lost on every seed
    hacking = md.split("## Reward hacking")[1]
    assert "| reward model | +1.600 ± 0.248 | +1.0% ±" in hacking  # the RM score soared, accuracy did not
    assert "| 0 | +1.500 | +2.0 pts | +0.500 | +30.0 pts |" in hacking  # per seed: by the RM, then by the verifier
    for name in ("accuracy.png", "compute.png", "noise.png", "hacking.png", "study.csv"):
        assert (tmp_path / name).stat().st_size > 0

    # DVC finds the report's own dvc.yaml in the project (with its .dvcignore) and reads the headline numbers.
    repo = tmp_path_factory.mktemp("repo")
    shutil.copytree(tmp_path, repo / "study")
    for name in (".dvcignore", ".gitignore"):
        shutil.copy2(helpers.ROOT / name, repo / name)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    helpers.dvc("init", "-q", cwd=repo)
    shown = json.loads(helpers.dvc("metrics", "show", "--json", cwd=repo).stdout)[""]["data"]["study/metrics.json"]
    assert shown["data"]["vs_sft"]["grpo"] == pytest.approx({"mean": 0.31, "p_holm": out["vs_sft"]["grpo"]["p_holm"]})
    assert shown["data"]["accuracy"]["grpo"]["mean"] == pytest.approx(0.86) and shown["data"]["seeds"] == 3
    assert shown["data"]["noise"]["dpo"]["flip_40"]["mean"] == pytest.approx(0.4833, abs=1e-4)
    plots = json.loads(helpers.dvc("plots", "show", "--json", cwd=repo).stdout)["data"]
    bars = plots["study: mean accuracy over seeds"][0]["content"]["data"]["values"]
    bars = {b["policy"]: float(b["mean"]) for b in bars}
    assert bars == pytest.approx({"sft": 0.55, "dpo": 0.5833, "grpo": 0.86}, abs=1e-4)
    assert plots["study/hacking.png"][0]["type"] == "image"

    # A seed without a verifier accuracy (no reference answers) or probes: n/a and no test, never a guess.
    ev = tmp_path / "runs" / "main" / "seed_1" / "metrics" / "eval_dpo.json"
    ev.write_text(json.dumps({k: v for k, v in json.loads(ev.read_text()).items() if k != "eval/accuracy"}))
    (tmp_path / "runs" / "rm-reward" / "seed_0" / "plots" / "train_grpo.csv").write_text("step,cost/wall_s\n10,60\n")
    md = squeezed(study_report.write(tmp_path, SEEDS, plan, 60.0))
    assert "| dpo | n/a |" in md and "**dpo**: n/a over SFT (not tested" in md
    assert "| reward model | +1.600 ± 0.248 | +1.0% ± 2.5% | n/a |" in md.split("## Reward hacking")[1]


def test_the_articles_claims_are_tested_per_level(tmp_path):
    """Two levels of made-up runs. On "hard", verifier RL (GRPO, RLOO) − preference optimisation (DPO, IPO,
    KTO) = [+30, +35, +32] pts: mean +32.3, s = 2.52, t = 22.3 on 2 dof, p = 1 − t/√(t² + 2) = 0.0020:
    supported after Holm over the claims tested; PPO − DPO = [−5, −15, −2]: not separated; GRPO by the
    verifier − by the RM = [+40, +50, +44]: supported. On "easy" the two families tie: not separated."""
    from flows import study_claims

    hard = {"sft": [0.20, 0.30, 0.25], "dpo": [0.30, 0.35, 0.32], "grpo": [0.60, 0.70, 0.64],
            "ppo": [0.25, 0.20, 0.30]}
    hard |= {"ipo": hard["dpo"], "kto": hard["dpo"], "rloo": hard["grpo"]}
    easy = {**hard, "grpo": [0.35, 0.30, 0.36], "rloo": [0.35, 0.30, 0.36]}
    plan = [("main", ["ppo", "dpo", "ipo", "kto", "grpo", "rloo"]), ("noise-0.4", ["dpo", "ipo", "kto"]),
            ("rm-reward", ["grpo"])]
    for level, acc in (("easy", easy), ("hard", hard)):
        for seed in SEEDS:
            runs = tmp_path / level / "runs"
            fake_run(runs / "main" / f"seed_{seed}", seed, acc)
            drop = {"dpo": [0.10, 0.12, 0.08], "ipo": [0.02, 0.05, 0.01], "kto": [0.1] * 3}
            fake_run(runs / "noise-0.4" / f"seed_{seed}", seed,
                     {"sft": acc["sft"], **{m: [a - d for a, d in zip(acc[m], drop[m])] for m in drop}})
            fake_run(runs / "rm-reward" / f"seed_{seed}", seed, {"sft": acc["sft"], "grpo": [0.20, 0.20, 0.20]})
        study_report.write(tmp_path / level, SEEDS, plan, 60.0)
    levels = {"easy": {}, "hard": {"data.embedded.terms": 3}}
    md = squeezed(study_claims.overview(tmp_path, levels, {"easy": SEEDS, "hard": SEEDS}, plan, 120.0))

    claims = json.loads((tmp_path / "claims.json").read_text())["claims"]
    rl = claims["hard"]["Verifier RL beats preference optimisation on reasoning"]
    assert rl["mean"] == pytest.approx(0.3233, abs=1e-4) and rl["p"] == pytest.approx(0.00202, abs=2e-5)
    assert rl["verdict"] == "supported"
    assert claims["easy"]["Verifier RL beats preference optimisation on reasoning"]["verdict"] == "not separated"
    assert claims["hard"]["Online RLHF (PPO) has a higher ceiling than DPO"]["verdict"] == "not separated"
    hacking = claims["hard"]["A verifier resists reward hacking better than a learned reward model"]
    assert hacking["verdict"] == "supported"
    assert claims["hard"]["Preference optimisation depends on the pairs' quality"]["verdict"] == "supported"
    assert claims["hard"]["IPO's regularisation makes it more robust to noisy pairs than DPO"]["mean"] == \
        pytest.approx(0.0733, abs=1e-4)
    # the same cost on every seed: no spread to test against, so nothing is claimed
    assert claims["hard"]["DPO trains with less compute than GRPO"]["verdict"] == "not tested"
    assert "| hard | 25.0% ± 12.4% |" in md  # SFT's accuracy, the level's difficulty
    assert "91.0% ± 2.5%" in md  # the reward model's held-out accuracy over the seeds (0.90, 0.91, 0.92)
    assert "supported: +32.3 pts (95% CI +26.1 to +38.6)" in md
    assert "# Level hard" in md and "## Method comparison over 3 seeds" in md  # each level's own report, below

    # A level whose runs were not kept (study/runs is git-ignored): the claims come from its study.json.
    shutil.rmtree(tmp_path / "easy" / "runs")
    md = squeezed(study_claims.overview(tmp_path, levels, {"easy": SEEDS, "hard": SEEDS}, plan, None))
    assert json.loads((tmp_path / "claims.json").read_text())["claims"] == claims
    assert "(report only)" in md and "| easy |" in md


@pytest.mark.integration
def test_a_study_runs_every_level_and_reruns_nothing(tmp_path):
    """The real thing on the lean smoke profile: 2 levels (two terms, three), DPO, each a pipeline flow run
    through DVC and a saved DVC experiment; the report's per-seed values are the runs' own metrics, the hard
    level's problems have three terms, and the overview has both levels and the claims. A second study of the
    easy level, with the noise condition added, gives the seed's values back (from DVC's run-cache) and flips
    pairs only where asked. (Several seeds and the reward-hacking condition: the tests above and below.)"""
    lean = helpers.lean_params(tmp_path / "params.yaml")
    from flows import params

    params.apply(lean, {"study.levels": {"easy": {}, "hard": {"data.embedded.terms": 3}}})
    args = [sys.executable, "-m", "flows.study", "--params", str(lean), "--methods", "dpo", "--no-hacking",
            "--workspace", str(tmp_path / "ws"), "--out", str(tmp_path / "study"), "--seeds", "0"]
    helpers.run([*args, "--noise"], cwd=tmp_path, timeout=1200)
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname:lstrip=-1)", "refs/exps"], cwd=tmp_path / "ws",
                          capture_output=True, text=True).stdout.split()
    assert {"study-easy-main-s0", "study-hard-main-s0"} <= set(refs)
    for level in ("easy", "hard"):
        out = json.loads((tmp_path / "study" / level / "study.json").read_text())
        for policy in ("sft", "dpo"):
            ev = json.loads((tmp_path / "study" / level / "runs" / "main" / "seed_0" / "metrics" /
                             f"eval_{policy}.json").read_text())
            assert out["per_seed"]["main"]["0"][policy]["eval/reward_mean"] == ev["eval/reward_mean"]
    last = json.loads((tmp_path / "ws" / "data" / "eval.jsonl").read_text().splitlines()[0])  # the hard level's
    assert re.fullmatch(r"\d+\+\d+\+\d+=", last["prompt"][-1]["content"]), last["prompt"]
    report = (tmp_path / "study" / "report.md").read_text()
    assert report.startswith("# Method comparison over 2 task difficulty levels")
    assert "# Level easy" in report and "# Level hard" in report and "GRPO beats DPO on reasoning" in report
    claims = json.loads((tmp_path / "study" / "claims.json").read_text())
    assert claims["levels"]["hard"] == {"overrides": {"data.embedded.terms": 3}, "seeds": [0]}
    before = json.loads((tmp_path / "study" / "easy" / "study.json").read_text())["per_seed"]["main"]["0"]

    again = helpers.run([*args, "--noise", "0.4", "--levels", "easy"], cwd=tmp_path, timeout=600)
    assert again.returncode == 0
    rerun = json.loads((tmp_path / "study" / "easy" / "study.json").read_text())
    assert rerun["per_seed"]["main"]["0"] == before  # the seed's outputs, as they were
    runs = tmp_path / "study" / "easy" / "runs"
    assert json.loads((runs / "noise-0.4" / "seed_0" / "metrics" / "pairs.json").read_text())["pairs/flipped"] > 0
    assert json.loads((runs / "main" / "seed_0" / "metrics" / "pairs.json").read_text())["pairs/flipped"] == 0


def test_every_condition_runs_on_every_seed_of_a_level_with_its_overrides(tmp_path, monkeypatch):
    """run_level's plan, with the pipeline flow replaced by a recorder: each seed is its own replicate
    (seed set), the level's and the condition's overrides reach the run, each run is saved as an
    experiment and snapshotted, and a failed run ends its seed only."""
    from prefect.logging import disable_run_logger

    from flows import study

    calls, saved = [], []

    def pipeline(repo_dir, methods, overrides, tags):
        calls.append((methods, overrides, tags))
        if overrides["seed"] == 2 and tags["study.condition"] == "noise-0.4":
            raise RuntimeError("stage reward failed: below the gate\nmore")
        for name in study.SNAPSHOT:
            (tmp_path / "ws" / name).mkdir(parents=True, exist_ok=True)
            (tmp_path / "ws" / name / "seed.txt").write_text(str(overrides["seed"]))

    monkeypatch.setattr(study.pipeline, "pipeline", pipeline)
    monkeypatch.setattr(study, "save_experiment", lambda ws, name: saved.append(name))
    (tmp_path / "ws").mkdir()
    plan = study.conditions(["dpo", "grpo"], [0.4], hacking=False)
    with disable_run_logger():
        failed = study.run_level(tmp_path / "ws", tmp_path / "out", "hard", {"data.embedded.terms": 3}, [1, 2], plan,
                                 "seed: 0\n")
    assert failed == {2: "noise-0.4: stage reward failed: below the gate"}
    assert [(c[2]["study.condition"], c[1]["seed"]) for c in calls] == [
        ("main", 1), ("noise-0.4", 1), ("main", 2), ("noise-0.4", 2)]
    assert all(c[1]["data.embedded.terms"] == 3 and c[2]["study.level"] == "hard" for c in calls)
    assert calls[1][0] == ["dpo"] and calls[1][1]["pairs.flip_fraction"] == 0.4
    assert "pairs.flip_fraction" not in calls[0][1] and calls[0][0] == ["dpo", "grpo"]
    assert saved == ["study-hard-main-s1", "study-hard-noise-0.4-s1", "study-hard-main-s2"]
    assert (tmp_path / "out" / "runs" / "noise-0.4" / "seed_1" / "metrics" / "seed.txt").read_text() == "1"
    assert (tmp_path / "ws" / "params.yaml").read_text() == "seed: 0\n"  # the study's own params, back


def test_a_distilled_policy_is_a_study_method_with_its_teacher():
    """study.methods may name distill_<teacher>: the run sets align.distill.teachers (not align.methods), the noise
    condition leaves it out (it is online), and [all] is every method plus GRPO distilled."""
    from flows.study import conditions
    from stages.core import config

    s = config.StudyConfig(methods=["dpo", "grpo", "distill_grpo"])
    assert config.policy_params(s.methods) == {"methods": ["dpo", "grpo"], "distill": {"teachers": ["grpo"]}}
    assert [(c.name, c.methods) for c in conditions(s.methods, [0.4], False)] == [
        ("main", ["dpo", "grpo", "distill_grpo"]), ("noise-0.4", ["dpo"])]
    assert config.StudyConfig(methods=["all"]).methods[-1] == "distill_grpo"
    with pytest.raises(ValueError, match="'grpo' is not a policy of this pipeline"):
        config.StudyConfig(methods=["dpo", "distill_grpo"])
