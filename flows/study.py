"""`make study`: the method comparison over several seeds, with intervals and paired tests, and the
experiments that measure the other rows of the seeds' method-selection tables, in the scratch
workspace `.study/`; the report lands in `study/`.

    python -m flows.study [--seeds 0 1 2 3] [--methods ...] [--noise 0.4] [--no-hacking] [--levels NAME ...]
                          [--params params.yaml] [--workspace .study] [--out study]

Seeds, methods, noise, hacking and levels default to params.yaml's `study` section (seeds 0 1 2 3, the
seeds' six methods, 40% flipped pairs, the reward-model GRPO, two task difficulty levels); the options
override it (`--methods all`: every method the registry knows; `--levels` picks some of study.levels).

A level is a task difficulty (study.levels: name → param overrides, e.g. `data.embedded.terms: 3`): the
whole study (every condition on every seed) runs on each level, each level gets its own report
(<out>/<level>/report.md), and <out>/report.md puts the levels side by side: how hard each is (SFT's
accuracy and pass@k, the reward model's held-out accuracy) and the source articles' claims tested as
hypotheses per level (flows/study_claims.py).

A seed is a replicate of the whole chain (its own data draw, base model, SFT, reward model, pairs
and alignment runs). Each (condition, seed) is one run of the pipeline flow with param overrides, so
every stage goes through DVC in one workspace: a stage already run with those params and inputs is
restored from DVC's run-cache, never retrained, so a study that is run again (or grown by a seed)
runs only what is missing. Each run is then saved as a DVC experiment, `study-<condition>-s<seed>`
(`dvc exp show` in the workspace lists them side by side; `dvc exp apply` brings one's artifacts back).

Conditions (every one on every seed):
- main: the methods (default: all of them), on the params as they are;
- noise-<f>: the offline methods (DPO, IPO, KTO, SimPO, ORPO) on pairs with a share f of chosen/rejected swapped
  (pairs.flip_fraction): accuracy against label noise; upstream of pairs is the main run's, cached;
- rm-reward: GRPO rewarded by the reward model alone (verifier weight 0), next to the main GRPO
  rewarded by the verifier: how far the reward-model score rises against how far accuracy does.

Seeds run one after another: on a machine whose stages already use every core (as on a 2-core CPU),
running seeds side by side (`dvc queue start -j N`) gains nothing and splits the cores; on a GPU
machine, start one study per GPU with disjoint --seeds and workspaces and report them together.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows import params as params_edit
from flows import pipeline, study_claims, study_report, workspace
from stages.core import config, io

SNAPSHOT = ["metrics", "plots"]
"""What a run leaves that the report reads, copied per (condition, seed) into <out>/runs/."""


@dataclass
class Condition:
    name: str
    methods: list[str]
    overrides: dict = field(default_factory=dict)


def conditions(methods: list[str], noise: list[float], hacking: bool) -> list[Condition]:
    """The study's conditions for these methods (see the module docstring)."""
    from stages.methods import registry

    out = [Condition("main", list(methods))]
    offline = [m for m in methods if registry.for_policy(m).kind == "offline"]
    out += [Condition(f"noise-{f:g}", offline, {"pairs.flip_fraction": f}) for f in noise if offline and f > 0]
    if hacking and "grpo" in methods:
        out.append(Condition("rm-reward", ["grpo"], {"align.grpo.reward.reward_model": 1.0,
                                                      "align.grpo.reward.verifier": 0.0}))
    return out


def save_experiment(ws: Path, name: str) -> None:
    """The workspace as it stands (params, dvc.lock, metrics; outputs are in DVC's cache) as a DVC experiment."""
    out = subprocess.run([sys.executable, "-m", "dvc", "exp", "save", "--force", "-n", name], cwd=ws,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"dvc exp save {name}: {(out.stderr or out.stdout).strip().splitlines()[-1:]}")


def run_level(ws: Path, out: Path, level: str, overrides: dict, seeds: list[int], plan: list[Condition],
              base: str) -> dict[int, str]:
    """Every condition on every seed of one level, each a pipeline flow run saved as a DVC experiment and
    snapshotted into <out>/runs → {seed: why} for the seeds that failed (a failed run ends its seed)."""
    logger = get_run_logger()
    failed: dict[int, str] = {}
    for seed in seeds:
        for cond in plan:
            (ws / "params.yaml").write_text(base)  # each run from the study's own params
            t_run = time.perf_counter()
            align = config.policy_params(cond.methods)  # distill_grpo: a teacher, not a method
            try:
                pipeline.pipeline(repo_dir=str(ws), methods=align["methods"],
                                  overrides={**overrides, "seed": seed,
                                             "align.distill.teachers": align["distill"]["teachers"], **cond.overrides},
                                  tags={"study.level": level, "study.condition": cond.name, "study.seed": str(seed)})
            except Exception as e:  # the other conditions of this seed would be incomplete: the seed is out
                failed[seed] = f"{cond.name}: {str(e).splitlines()[0]}"
                logger.error(f"{level}: seed {seed} left out of the report: {failed[seed]}")
                break
            try:
                save_experiment(ws, f"study-{level}-{cond.name}-s{seed}")
            except RuntimeError as e:  # the run's outputs are in DVC's cache and its snapshot below: go on
                logger.warning(str(e))
            dest = out / "runs" / cond.name / f"seed_{seed}"
            shutil.rmtree(dest, ignore_errors=True)
            for name in SNAPSHOT:
                shutil.copytree(ws / name, dest / name)
            logger.info(f"{level}, {cond.name}, seed {seed}: {time.perf_counter() - t_run:.0f} s")
    (ws / "params.yaml").write_text(base)
    return failed


@flow(name="alignpipe-study", log_prints=True)
def study(workspace_dir: str, seeds: list[int], methods: list[str], noise: list[float], hacking: bool,
          levels: dict[str, dict], out_dir: str, report_only: bool = False) -> str:
    """Every condition on every seed of every level through the pipeline flow (each a subflow run), then a
    report per level over the seeds whose runs all completed, and the overview over the levels. A run that
    fails (a stage's gate, say a reward model below reward.min_accuracy) does not stop the others: the
    report names it, and the flow then fails. report_only: run nothing, report the seeds whose runs are all
    in <out> (studies of disjoint seeds run side by side, one per GPU or workspace, reported together)."""
    ws, out = Path(workspace_dir).resolve(), Path(out_dir).resolve()
    base = (ws / "params.yaml").read_text()
    plan = conditions(methods, noise, hacking)
    pairs = [(c.name, c.methods) for c in plan]
    t0 = time.perf_counter()
    failed: dict[str, dict[int, str]] = {}
    done: dict[str, list[int]] = {}
    for level, overrides in levels.items():
        t_level = time.perf_counter()
        if report_only and not (out / level / "runs").is_dir() and (out / level / "study.json").exists():
            failed[level], done[level] = {}, io.read_json(out / level / "study.json")["seeds"]  # its report stands
            continue
        failed[level] = (missing(out / level, seeds, plan) if report_only else
                         run_level(ws, out / level, level, overrides, seeds, plan, base))
        done[level] = [s for s in seeds if s not in failed[level]]
        if done[level]:
            study_report.write(out / level, done[level], pairs, None if report_only else time.perf_counter() - t_level,
                               failed[level])
    done = {lv: s for lv, s in done.items() if s}
    if not done:
        level = next(iter(levels))
        raise RuntimeError(f"every seed failed, e.g. {level} seed {seeds[0]}: {failed[level][seeds[0]]}")
    report = study_claims.overview(out, levels, done, pairs, None if report_only else time.perf_counter() - t0)
    create_markdown_artifact(key="study", markdown=report, description=f"Method comparison over levels {list(done)}")
    log_study(ws, out, seeds)
    lost = [(lv, s, why) for lv, f in failed.items() for s, why in sorted(f.items())]
    if lost:
        lv, s, why = lost[0]
        raise StudyIncomplete(f"{len(lost)} (level, seed) runs failed ({lv} seed {s}: {why}); the report covers the "
                              f"others: {out / 'report.md'}")
    return report


def missing(out: Path, seeds: list[int], plan: list[Condition]) -> dict[int, str]:
    """{seed: why} for the seeds with a condition whose run is not in <out>/runs."""
    return {s: f"{c.name}: no run in {out / 'runs' / c.name}" for s in seeds for c in reversed(plan)
            if not (out / "runs" / c.name / f"seed_{s}" / "metrics").is_dir()}


class StudyIncomplete(RuntimeError):
    """Some seeds failed; the report over the others is written."""


def log_study(ws: Path, out: Path, seeds: list[int]) -> None:
    """The study as an MLflow run beside its pipeline runs (tagged study.condition / study.seed): the
    report, plots and per-seed values as its artifacts."""
    from stages.core import tracking

    client, _ = tracking.client_and_experiment(ws)
    run = tracking.start_parent(f"study, seeds {' '.join(map(str, seeds))}",
                                {"alignpipe.kind": "study", "prefect.flow_run_id": pipeline._flow_run_id()}, root=ws)
    for path in [out / "report.md", out / "claims.json"]:
        client.log_artifact(run, str(path))
    for level in sorted(p.parent for p in out.glob("*/study.json")):
        for path in [level / "report.md", level / "study.json", level / "study.csv", *sorted(level.glob("*.png"))]:
            client.log_artifact(run, str(path), artifact_path=level.name)
    tracking.end_run(run, root=ws)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, help="default: study.seeds")
    p.add_argument("--methods", nargs="+", help="default: study.methods")
    p.add_argument("--noise", nargs="*", type=float,
                   help="shares of flipped pairs (none: leave the noise condition out; default: study.noise)")
    p.add_argument("--no-hacking", dest="hacking", action="store_false", default=None,
                   help="leave out GRPO rewarded by the reward model (default: study.hacking)")
    p.add_argument("--levels", nargs="+", help="names of study.levels to run (default: all of them)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: report the runs already in --out (studies of disjoint seeds, reported together)")
    p.add_argument("--params", default=str(workspace.ROOT / "params.yaml"))
    p.add_argument("--workspace", default=".study")
    p.add_argument("--out", default="study")
    args = p.parse_args(argv)
    def work() -> str:
        cfg = params_edit.loads(Path(args.params).read_text(), args.params)  # a bad key: one line, before any work
        chosen = {k: getattr(args, k) for k in ("seeds", "methods", "noise", "hacking") if getattr(args, k) is not None}
        s = params_edit.loads(f"study: {json.dumps({**cfg.study.model_dump(), **chosen})}", "the options").study
        unknown = sorted(set(args.levels or []) - set(s.levels))
        if unknown:
            raise config.ConfigError(f"--levels: {', '.join(unknown)} not in study.levels ({', '.join(s.levels)})")
        levels = {k: v for k, v in s.levels.items() if not args.levels or k in args.levels}
        for name, overrides in levels.items():  # a bad override: one line, before any work
            params_edit.check(args.params, overrides, f"study.levels.{name}")
        ws = Path(args.workspace)
        if ws.exists():
            workspace.copy_code(ws, args.params)
        else:
            workspace.create(ws, args.params)
        return study(str(ws), s.seeds, s.methods, s.noise, s.hacking, levels, args.out, args.report_only)

    pipeline.run_cli(work)

if __name__ == "__main__":
    main()
