"""The study's report: the comparison table with 95% intervals over seeds, paired tests against SFT
and between methods, the noisy-preference and reward-hacking experiments, the seeds' method-selection
table with our measured values in its cells, plots, and a reading of what the numbers support.

    write(out, seeds, plan, seconds) reads <out>/runs/<condition>/seed_<n>/{metrics,plots} (flows.study)
    and writes <out>/report.md, study.json, study.csv, accuracy.png, compute.png, noise.png, hacking.png,
    and the headline numbers as DVC reads them: metrics.json and methods.csv, named with the plots by
    <out>/dvc.yaml, which DVC finds in the project (`dvc metrics show`, `dvc plots show`).

Statistics: stages/core/stats.py (Student-t intervals; paired t-tests over seeds; Holm's correction).
Plots: flows/study_plots.py.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import yaml

from flows import study_plots
from stages import compare
from stages.core import config, io, stats

ACC = study_plots.ACC  # the headline metric: the verifier's held-out accuracy


def load(out: Path, seeds: list[int], plan: list[tuple[str, list[str]]]) -> dict:
    """{condition: {seed: {policy: row}}}: compare's row (eval metrics, stability) plus the training
    run's metrics (`train`) and plot rows (`curve`), and the pairs stage's metrics under "pairs"."""
    runs: dict = {}
    for cond, methods in plan:
        for seed in seeds:
            d = out / "runs" / cond / f"seed_{seed}"
            rows = {r["policy"]: r for r in compare.collect(["sft", *methods], d / "metrics", d / "plots")}
            for name, row in rows.items():
                row["train"] = io.read_json(d / "metrics" / f"train_{name}.json")
                with open(d / "plots" / f"train_{name}.csv") as fh:
                    row["curve"] = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(fh)]
            rows["pairs"] = io.read_json(d / "metrics" / "pairs.json")
            runs.setdefault(cond, {})[seed] = rows
    return runs


def per_seed(runs: dict, cond: str, policy: str, key: str, seeds: list[int]) -> list[float] | None:
    """One value per seed, or None when a seed lacks it (the report then says n/a, and tests nothing)."""
    values = [runs[cond][s][policy].get(key) for s in seeds]
    return None if any(v is None for v in values) else [float(v) for v in values]


def estimate(values: list[float] | None) -> stats.Estimate | None:
    return stats.estimate(values) if values else None


def paired(a: list[float] | None, b: list[float] | None) -> stats.Difference | None:
    return stats.paired(a, b) if a and b else None


def cell(e: stats.Estimate | None, fmt: str) -> str:
    if e is None:
        return "n/a"
    return fmt.format(e.mean) if e.half is None else f"{fmt.format(e.mean)} ± {fmt.replace('+', '').format(e.half)}"


def pts(d: stats.Difference | None) -> str:
    if d is None:
        return "n/a"
    e = d.estimate
    ci = "" if e.half is None else f" (95% CI {100 * e.low:+.1f} to {100 * e.high:+.1f})"
    return f"{100 * e.mean:+.1f} pts{ci}"


def pvalue(d: stats.Difference | None) -> str:
    if d is None or d.p is None:
        return "not tested: it needs 2 seeds or more, and a difference that varies between them"
    return f"p = {d.p:.3g}, Holm {d.p_holm:.3g}"


def main_table(runs: dict, seeds: list[int], policies: list[str]) -> tuple[str, dict]:
    """The comparison table (mean ± 95% interval per cell; a pass@k column for each k the runs measured)
    → (markdown, {policy: {key: Estimate | None}})."""
    ks = sorted({int(k.rsplit("_", 1)[1]) for seed in runs["main"].values() for r in seed.values() for k in r
                 if k.startswith("eval/pass_at_")})
    cols = compare.columns(ks)
    est = {p: {k: estimate(per_seed(runs, "main", p, k, seeds)) for k, _, _ in cols} for p in policies}
    return compare.text_table([{"policy": p, **{h: cell(est[p][k], fmt) for k, h, fmt in cols}} for p in policies]), est


def tests(runs: dict, seeds: list[int], methods: list[str]) -> tuple[dict, dict]:
    """Paired t-tests of accuracy over seeds: each method against SFT (Holm over the methods) and every
    pair of methods (Holm over the pairs) → ({method: Difference | None}, {(a, b): Difference | None})."""
    acc = {p: per_seed(runs, "main", p, ACC, seeds) for p in ["sft", *methods]}
    vs_sft = {m: paired(acc[m], acc["sft"]) for m in methods}
    pairs = {(a, b): paired(acc[a], acc[b]) for i, a in enumerate(methods) for b in methods[i + 1:]}
    stats.holm([d for d in vs_sft.values() if d])
    stats.holm([d for d in pairs.values() if d])
    return vs_sft, pairs


def noise_table(runs: dict, seeds: list[int], levels: list[tuple[float, str]], methods: list[str]) -> tuple[str, dict]:
    """Accuracy of each offline method against the share of flipped pairs (levels: (share, condition),
    0 first), and its paired change from 0, Holm-corrected over every (method, share)."""
    out = {}
    for m in methods:
        acc = {f: per_seed(runs, c, m, ACC, seeds) for f, c in levels}
        out[m] = {"accuracy": {f: estimate(v) for f, v in acc.items()},
                  "change": {f: paired(acc[f], acc[0.0]) for f, _ in levels if f > 0}}
    stats.holm([d for e in out.values() for d in e["change"].values() if d])
    rows = [{"method": m, **{f"{f:.0%} flipped": cell(e["accuracy"][f], "{:.1%}") for f, _ in levels},
             **{f"change at {f:.0%}": f"{pts(d)}, {pvalue(d)}" for f, d in e["change"].items()}}
            for m, e in out.items()]
    return compare.text_table(rows), out


def hacking_table(runs: dict, seeds: list[int]) -> tuple[str, dict]:
    """GRPO rewarded by the verifier (main) and by the reward model (rm-reward): the rise over SFT of
    the reward-model score and of accuracy on held-out prompts, and the training probe's fall from its
    peak to its last reading (accuracy lost while the reward kept being optimised; n/a without probes)."""
    def rise(cond: str, key: str) -> list[float] | None:
        grpo, sft = per_seed(runs, cond, "grpo", key, seeds), per_seed(runs, cond, "sft", key, seeds)
        return [g - b for g, b in zip(grpo, sft)] if grpo and sft else None

    def fall(cond: str) -> list[float] | None:
        probes = [[r["probe/accuracy"] for r in runs[cond][s]["grpo"]["curve"] if "probe/accuracy" in r] for s in seeds]
        return None if not all(probes) else [max(p) - p[-1] for p in probes]

    conds = (("verifier", "main"), ("reward model", "rm-reward"))
    rises = {label: (rise(cond, "eval/reward_mean"), rise(cond, ACC)) for label, cond in conds}  # per seed
    out = {label: {"rm_rise": estimate(rises[label][0]), "accuracy_rise": estimate(rises[label][1]),
                   "probe_fall": estimate(fall(cond))} for label, cond in conds}
    summary = compare.text_table([{"GRPO rewarded by": label,
                                   "RM score rise over SFT (std units)": cell(e["rm_rise"], "{:+.3f}"),
                                   "accuracy rise over SFT": cell(e["accuracy_rise"], "{:+.1%}"),
                                   "probe accuracy, peak − last": cell(e["probe_fall"], "{:.1%}")}
                                  for label, e in out.items()])

    def seed_row(i: int, seed: int) -> dict:
        row = {"seed": str(seed)}
        for label, short in (("reward model", "by RM"), ("verifier", "by verifier")):
            rm, acc = rises[label]
            row[f"{short}: RM rise"] = "n/a" if rm is None else f"{rm[i]:+.3f}"
            row[f"{short}: accuracy rise"] = "n/a" if acc is None else f"{100 * acc[i]:+.1f} pts"
        return row

    per_seed_table = compare.text_table([seed_row(i, s) for i, s in enumerate(seeds)])
    said = "Per seed (held-out prompts; the hacking gap is the RM score rising while accuracy does not):"
    return f"{summary}\n{said}\n\n{per_seed_table}", out


def selection_table(runs: dict, seeds: list[int], methods: list[str], est: dict, noise: dict,
                    hacking: dict | None) -> str:
    """The seeds' method-selection rows, one column per method, our measured values in the cells."""
    from stages.methods import registry

    def mean(m: str, key: str, fmt: str) -> str:
        return "n/a" if est[m][key] is None else fmt.format(est[m][key].mean)

    def seed_sd(m: str) -> str:
        acc = per_seed(runs, "main", m, ACC, seeds)
        return "n/a" if not acc or len(acc) < 2 else f"{100 * statistics.stdev(acc):.1f}"

    def data(m: str) -> str:
        r = runs["main"][seeds[0]][m]["train"]
        if registry.for_policy(m).kind == "offline":
            return f"{r.get('train/examples', 0):.0f} stored {'KTO rows' if m == 'kto' else 'pairs'}"
        if registry.for_policy(m).teacher:
            return f"prompts + teacher ({config.split_policy(m)[1]})"
        return "prompts + reward (" + ("verifier" if m != "ppo" else "RM / verifier") + ")"

    def per_step(m: str, key: str, fmt: str) -> str:  # the run's total over its steps (the last row's step)
        runs_m = [runs["main"][s][m] for s in seeds]
        if not all(r["curve"] for r in runs_m):
            return "n/a"
        vals = [r["train"].get(key, 0.0) / r["curve"][-1]["step"] for r in runs_m]
        return fmt.format(sum(vals) / len(vals))

    rows = {
        "Training complexity (models held · peak MB)": lambda m: f"{mean(m, 'cost/models_in_memory', '{:.0f}')} · "
                                                                 f"{mean(m, 'cost/peak_mem_mb', '{:.0f}')}",
        "Data requirements (what it consumed)": data,
        "Training stability (seed-to-seed SD · within-run SD, pts)": lambda m: f"{seed_sd(m)} · "
                                                                               f"{cell(est[m]['stability'], '{:.1f}')}",
        "Performance (held-out accuracy)": lambda m: cell(est[m][ACC], "{:.1%}"),
        "Compute per step in training (tokens generated · wall s)": lambda m: (
            f"{per_step(m, 'cost/tokens_generated', '{:.0f}')} · {per_step(m, 'cost/wall_s', '{:.2f}')}"),
        "Sensitivity to noisy pairs (accuracy change at the most noise)": lambda m: (
            pts(noise[m]["change"][max(noise[m]["change"])]) if m in noise and noise[m]["change"]
            else "not measured (online)" if registry.for_policy(m).kind == "online"
            else "not measured (no noise condition)"),
        "Reward hacking (RM rise · accuracy rise, GRPO by RM)": lambda m: (
            f"{cell(hacking['reward model']['rm_rise'], '{:+.2f}')} · "
            f"{cell(hacking['reward model']['accuracy_rise'], '{:+.1%}')}" if hacking and m == "grpo" else "—"),
    }
    table = compare.text_table([{"criterion": name, **{m: fn(m) for m in methods}} for name, fn in rows.items()],
                               right=False)
    return table + ("\nOffline methods generate nothing while training: their pairs were sampled "
                                       "by the pairs stage (its tokens are on compute.png).\n")


def reading(vs_sft: dict, pairs: dict, n: int) -> str:
    """Sentences that say only what the tests support."""
    out = []
    for m, d in vs_sft.items():
        verdict = ("not tested" if d is None or d.p is None else
                   "better than SFT" if d.significant() and d.estimate.mean > 0 else
                   "worse than SFT" if d.significant() else "not separated from SFT")
        out.append(f"- **{m}**: {pts(d)} over SFT ({pvalue(d)}): {verdict}.")
    tested = {k: d for k, d in pairs.items() if d is not None and d.p is not None}
    ordered = [f"{a} > {b}" if d.estimate.mean > 0 else f"{b} > {a}" for (a, b), d in tested.items() if d.significant()]
    family = f"paired t over {n} seeds, Holm over {len(tested)} tested pairs of {len(pairs)}"
    out.append(f"- Order of the methods ({family}): " + (", ".join(ordered) + "; no other tested pair is separated."
                                                          if ordered else "no tested pair of methods is separated."))
    return "\n".join(out) + "\n"


def write(out: Path, seeds: list[int], plan: list[tuple[str, list[str]]], seconds: float | None,
          failed: dict[int, str] | None = None) -> str:
    """Read every run of the study's complete `seeds`, write the report and its files → the markdown.
    failed: seeds left out → why (the report says so: what survives a gate is not a random sample)."""
    runs = load(out, seeds, plan)
    methods = dict(plan)["main"]
    table, est = main_table(runs, seeds, ["sft", *methods])
    vs_sft, pairwise = tests(runs, seeds, methods)
    levels = [(0.0, "main")] + sorted((float(c.split("-", 1)[1]), c) for c, _ in plan if c.startswith("noise-"))
    offline = next((m for c, m in plan if c.startswith("noise-")), [])
    noise_md, noise = noise_table(runs, seeds, levels, offline) if len(levels) > 1 else ("", {})
    hacking_md, hacking = hacking_table(runs, seeds) if "rm-reward" in runs else ("", None)
    parts = [
        f"# Method comparison over {len(seeds)} seeds ({', '.join(map(str, seeds))})\n",
        "Each seed is a replicate of the whole chain (data draw, base model, SFT, reward model, pairs, "
        "alignment). A cell is the mean over seeds ± the half-width of its 95% Student-t interval "
        "(t(0.975, n−1)·s/√n). Differences are paired by seed (the methods of a seed share everything "
        "upstream) and tested with a two-sided paired t-test, Holm-corrected over each family of tests. "
        + ("Written from runs made before (report only). " if seconds is None else
         f"This run of the study took {seconds / 60:.0f} min (a stage already run for its params and inputs is "
         "restored from DVC's cache, not retrained).") + "\n",
        *([f"**Seeds left out** ({len(failed)} of {len(failed) + len(seeds)}): " + "; ".join(
            f"seed {s}, {why}" for s, why in sorted(failed.items())) + ". Every figure below is over the other "
            "seeds only, so it describes the runs that passed every gate, not every run.\n"] if failed else []),
        table, "## What the numbers support\n", reading(vs_sft, pairwise, len(seeds)),
        "## The method-selection table, measured\n", selection_table(runs, seeds, methods, est, noise, hacking),
    ]
    if noise_md:
        parts += ["## Noisy preferences: accuracy against the share of flipped pairs\n", noise_md]
    if hacking_md:
        parts += ["## Reward hacking: GRPO rewarded by the reward model or by the verifier\n", hacking_md]
    md = "\n".join(parts)
    study_plots.plots(out, runs, seeds, methods, est, noise, hacking is not None)
    with io.atomic_file(out / "report.md") as fh:
        fh.write(md)
    io.write_json(out / "study.json", {
        "seeds": seeds, "failed": {str(s): why for s, why in (failed or {}).items()},
        "conditions": {c: m for c, m in plan},
        "per_seed": {c: {str(s): {p: {k: v for k, v in r.items() if k not in ("curve", "train")}
                                  for p, r in runs[c][s].items() if p != "pairs"} for s in seeds} for c in runs},
        "vs_sft": {m: _diff(d) for m, d in vs_sft.items()},
        "pairwise": {f"{a} - {b}": _diff(d) for (a, b), d in pairwise.items()},
    })
    dvc_sources(out, len(seeds), est, vs_sft, noise, hacking)
    io.write_csv(out / "study.csv", [{"condition": c, "seed": s, "policy": p, "metric": k, "value": v}
                                     for c in runs for s in seeds for p, r in runs[c][s].items() if p != "pairs"
                                     for k, v in r.items() if isinstance(v, (int, float)) and k != "curve"])
    return md


def dvc_sources(out: Path, n: int, est: dict, vs_sft: dict, noise: dict, hacking: dict | None) -> None:
    """metrics.json: accuracy per policy (mean and 95% interval), each method's paired difference from
    SFT with its Holm p, accuracy per share of flipped pairs (flip_20: 20%), the hacking rises;
    methods.csv: a row per policy (the bar plot). `dvc metrics show/diff` makes a column of each number;
    a value that could not be estimated is null, and DVC leaves it out."""
    def ci(e: stats.Estimate | None) -> dict | None:
        return None if e is None else {"mean": e.mean, "low": e.low, "high": e.high}

    metrics = {"seeds": n, "accuracy": {p: ci(e[ACC]) for p, e in est.items()},
               "vs_sft": {m: None if d is None else {"mean": d.estimate.mean, "p_holm": d.p_holm}
                          for m, d in vs_sft.items()},
               "noise": {m: {f"flip_{round(100 * f)}": ci(a) for f, a in e["accuracy"].items()}
                         for m, e in noise.items()},
               "hacking": {k.replace(" ", "_"): {name: ci(v) for name, v in e.items()}
                           for k, e in (hacking or {}).items()}}
    io.write_json(out / "metrics.json", metrics)
    plots = [{"study: mean accuracy over seeds": {"template": "bar_horizontal", "x": "mean",
                                                  "y": {"methods.csv": "policy"}}}]
    plots += [name for name in ("accuracy.png", "compute.png", "noise.png", "hacking.png") if (out / name).exists()]
    with io.atomic_file(out / "dvc.yaml") as fh:
        fh.write("# Written by `make study` (flows/study_report.py) with the report: DVC finds this file in the\n"
                 "# project, so `dvc metrics show` and `dvc plots show` read the study beside the pipeline.\n")
        yaml.safe_dump({"metrics": ["metrics.json"], "plots": plots}, fh, sort_keys=False)
    io.write_csv(out / "methods.csv", [{"policy": p, **ci(e[ACC])} for p, e in est.items() if e[ACC] is not None])


def _diff(d: stats.Difference | None) -> dict | None:
    if d is None:
        return None
    e = d.estimate
    return {"mean": e.mean, "low": e.low, "high": e.high, "n": e.n, "p": d.p, "p_holm": d.p_holm,
            "significant": d.significant()}

