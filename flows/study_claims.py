"""The study over difficulty levels: what each level is (the SFT policy's accuracy and pass@k, the reward
model's held-out accuracy), and the two source articles' method-selection claims tested as hypotheses on
every level.

    overview(out, levels, plan, seconds) reads each level's runs (<out>/<level>/runs, flows.study) and its
    report (<out>/<level>/report.md, flows.study_report) and writes <out>/report.md and <out>/claims.json.

A claim is a paired difference over seeds (every condition of a seed shares its upstream), oriented so that
the articles predict it is positive. Its verdict: supported when the paired t-test, Holm-corrected over the
level's claims, rejects zero and the difference is positive; contradicted when it rejects zero and the
difference is negative; otherwise not separated. One seed, or a difference that is the same on every seed,
tests nothing: the claim is then "not tested".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from flows import study_report
from stages import compare
from stages.core import io, stats

ACC = study_report.ACC
VERIFIER_RL = ("grpo", "rloo")
PREFERENCE = ("dpo", "ipo", "kto")


@dataclass(frozen=True)
class Claim:
    name: str
    said: str
    """What the articles' tables say, in their words."""
    test: str
    """The paired difference tested, positive where the claim holds."""
    values: Callable[[dict, list[int]], tuple[list[float], list[float]] | None]
    """(a, b) per seed from one level's runs, or None when the level did not run what the claim needs."""
    unit: str = "pts"


def _acc(runs: dict, seeds: list[int], cond: str, policies: tuple[str, ...]) -> list[float] | None:
    """Per seed, the mean accuracy of `policies` under condition `cond` (None if any is missing)."""
    if cond not in runs or any(p not in runs[cond][seeds[0]] for p in policies):
        return None
    per = [study_report.per_seed(runs, cond, p, ACC, seeds) for p in policies]
    return None if any(v is None for v in per) else [sum(v) / len(v) for v in zip(*per)]


def _pair(cond_a: str, a: tuple[str, ...], cond_b: str, b: tuple[str, ...]):
    def values(runs: dict, seeds: list[int]):
        va, vb = _acc(runs, seeds, cond_a, a), _acc(runs, seeds, cond_b, b)
        return None if va is None or vb is None else (va, vb)
    return values


def _metric(key: str, a: str, b: str, scale: float = 1.0):
    """A main-condition metric of policies a and b per seed (× scale)."""
    def values(runs: dict, seeds: list[int]):
        if any(p not in runs["main"][seeds[0]] for p in (a, b)):
            return None
        va, vb = (study_report.per_seed(runs, "main", p, key, seeds) for p in (a, b))
        return None if va is None or vb is None else ([v * scale for v in va], [v * scale for v in vb])
    return values


def _noise_drop(method: str):
    """`method`'s accuracy on clean pairs and on the most flipped ones, per seed."""
    def values(runs: dict, seeds: list[int]):
        noisy = sorted((c for c in runs if c.startswith("noise-")), key=lambda c: float(c.split("-", 1)[1]))
        if not noisy:
            return None
        clean, flipped = _acc(runs, seeds, "main", (method,)), _acc(runs, seeds, noisy[-1], (method,))
        return None if clean is None or flipped is None else (clean, flipped)
    return values


def _robustness(runs: dict, seeds: list[int]):
    """IPO's drop under the most noise against DPO's: (DPO's drop, IPO's drop) per seed."""
    dpo, ipo = _noise_drop("dpo")(runs, seeds), _noise_drop("ipo")(runs, seeds)
    if dpo is None or ipo is None:
        return None
    return [c - f for c, f in zip(*dpo)], [c - f for c, f in zip(*ipo)]


CLAIMS = [
    Claim("Verifier RL beats preference optimisation on reasoning",
          "RL + verifier: best domain math, code; GRPO: performance ceiling high (online + emergence), DPO: "
          "medium (offline limitations)",
          "accuracy, mean of GRPO and RLOO − mean of DPO, IPO and KTO",
          _pair("main", VERIFIER_RL, "main", PREFERENCE)),
    Claim("GRPO beats DPO on reasoning", "as above, GRPO against DPO alone", "accuracy, GRPO − DPO",
          _pair("main", ("grpo",), "main", ("dpo",))),
    Claim("Online RLHF (PPO) has a higher ceiling than DPO",
          "RLHF: performance ceiling high (online optimization); DPO: medium (offline limitations)",
          "accuracy, PPO − DPO", _pair("main", ("ppo",), "main", ("dpo",))),
    Claim("DPO trains with less compute than GRPO", "compute per step: DPO low, GRPO medium (K samples)",
          "training wall time, GRPO − DPO", _metric("cost/wall_s", "grpo", "dpo"), unit="s"),
    Claim("DPO holds less in memory than GRPO",
          "training complexity: DPO low (2 models), GRPO medium (2 models + online generation)",
          "peak training memory, GRPO − DPO", _metric("cost/peak_mem_mb", "grpo", "dpo"), unit="MB"),
    Claim("PPO is less stable than DPO", "training stability: PPO is unstable, DPO stable like SFT",
          "within-run SD of the training probe's accuracy over its last readings, PPO − DPO",
          _metric("stability", "ppo", "dpo", scale=0.01)),
    Claim("Preference optimisation depends on the pairs' quality",
          "choosing a method trades off data quality; DPO learns from offline preference pairs",
          "DPO's accuracy on clean pairs − on the most flipped pairs", _noise_drop("dpo")),
    Claim("IPO's regularisation makes it more robust to noisy pairs than DPO",
          "IPO adds regularization to prevent overfitting",
          "DPO's accuracy lost to the most flipped pairs − IPO's", _robustness),
    Claim("A verifier resists reward hacking better than a learned reward model",
          "reward hacking risk: RL + verifier low (ground-truth verifier), GRPO medium (RM-dependent)",
          "accuracy, GRPO rewarded by the verifier − GRPO rewarded by the reward model",
          _pair("main", ("grpo",), "rm-reward", ("grpo",))),
]


def test_claims(runs: dict, seeds: list[int]) -> dict[str, stats.Difference | None]:
    """Every claim's paired difference on one level's runs, Holm-corrected over the claims tested."""
    out = {}
    for c in CLAIMS:
        v = c.values(runs, seeds)
        out[c.name] = None if v is None else stats.paired(*v)
    stats.holm([d for d in out.values() if d])
    return out


def verdict(d: stats.Difference | None) -> str:
    if d is None:
        return "not run"
    if d.p is None:
        return "not tested"
    if not d.significant():
        return "not separated"
    return "supported" if d.estimate.mean > 0 else "contradicted"


def amount(d: stats.Difference | None, unit: str) -> str:
    if d is None:
        return "—"
    if unit == "pts":
        return study_report.pts(d)
    e = d.estimate
    ci = "" if e.half is None else f" (95% CI {e.low:+.0f} to {e.high:+.0f})"
    return f"{e.mean:+.0f} {unit}{ci}"


def load(out: Path, seeds: list[int], plan) -> dict:
    """One level's runs (study_report.load), or, where its runs were not kept (<out>/runs is git-ignored),
    the per-seed values its study.json holds (everything the claims read; no training curves)."""
    if (out / "runs").is_dir():
        return study_report.load(out, seeds, plan)
    per_seed = io.read_json(out / "study.json")["per_seed"]
    return {c: {int(s): rows for s, rows in by_seed.items() if int(s) in seeds} for c, by_seed in per_seed.items()}


def difficulty(runs: dict, seeds: list[int], out: Path) -> dict:
    """What one level is: SFT's accuracy and pass@k at the eval temperature, the reward model's held-out
    accuracy (each mean ± 95% interval over seeds), the held-out set's size and one seed's standard error."""
    sft = {k: study_report.estimate(study_report.per_seed(runs, "main", "sft", k, seeds))
           for k in runs["main"][seeds[0]]["sft"] if k == ACC or k.startswith("eval/pass_at_")}
    files = [out / "runs" / "main" / f"seed_{s}" / "metrics" / "reward.json" for s in seeds]
    rm = [io.read_json(f).get("reward/heldout_accuracy") if f.exists() else None for f in files]
    n = [runs["main"][s]["sft"].get("eval/n_prompts") for s in seeds]
    return {"sft": sft, "rm": study_report.estimate(None if None in rm else rm), "n_eval": n[0]}


def difficulty_table(levels: dict[str, dict]) -> str:
    ks = sorted({int(k.rsplit("_", 1)[1]) for d in levels.values() for k in d["sft"] if k.startswith("eval/pass_at_")})

    def se(d: dict) -> str:
        acc, n = d["sft"].get(ACC), d["n_eval"]
        return "n/a" if acc is None or not n else f"{100 * (acc.mean * (1 - acc.mean) / n) ** 0.5:.1f} pts"

    rows = [{"level": name, "SFT accuracy": study_report.cell(d["sft"].get(ACC), "{:.1%}"),
             **{f"SFT pass@{k}": study_report.cell(d["sft"].get(f"eval/pass_at_{k}"), "{:.1%}") for k in ks},
             "RM held-out accuracy": study_report.cell(d["rm"], "{:.1%}"),
             "held-out problems": str(d["n_eval"] or "n/a"), "one seed's SE": se(d)} for name, d in levels.items()]
    return compare.text_table(rows)


def claims_table(tested: dict[str, dict[str, stats.Difference | None]]) -> str:
    rows = []
    for c in CLAIMS:
        row = {"claim (the articles)": f"**{c.name}**: {c.said}", "test (paired over seeds, > 0 if it holds)": c.test}
        for level, diffs in tested.items():
            d = diffs[c.name]
            p = "" if d is None or d.p is None else f"; Holm p {d.p_holm:.2g}"
            row[level] = f"{verdict(d)}: {amount(d, c.unit)}{p}"
        rows.append(row)
    return compare.text_table(rows, right=False)


def demoted(md: str) -> str:
    """A level's report inside the overview: every heading one level down."""
    return re.sub(r"^(#+) ", r"#\1 ", md, flags=re.M)


def overview(out: Path, levels: dict[str, dict], done: dict[str, list[int]], plan, seconds: float | None) -> str:
    """The top report over the levels that have complete seeds (`done`: level → seeds); seconds: the run's
    wall time (None: a report of runs made before)."""
    runs = {lv: load(out / lv, seeds, plan) for lv, seeds in done.items()}
    diff = {lv: difficulty(runs[lv], seeds, out / lv) for lv, seeds in done.items()}
    tested = {lv: test_claims(runs[lv], seeds) for lv, seeds in done.items()}
    knobs = "; ".join(f"**{lv}**: " + (", ".join(f"`{k}: {v}`" for k, v in levels[lv].items()) or "params as they are")
                      for lv in done)
    parts = [
        f"# Method comparison over {len(done)} task difficulty level{'s' if len(done) > 1 else ''}\n",
        f"Levels ({knobs}). Each level is the whole study (every condition on every seed); its own report follows "
        "below. " + ("Written from the levels' runs already made (report only): each level's report gives its run "
                     "time.\n" if seconds is None else f"This run took {seconds / 60:.0f} min.\n"),
        "## How hard each level is (the SFT policy and the reward model, before any alignment)\n",
        difficulty_table(diff),
        "pass@k: the SFT policy's chance that one of k samples at the eval temperature is right (Chen et al.'s "
        "unbiased estimator): headroom that sampling can find, which online RL exploits and offline pairs may not.\n",
        "## The articles' claims, tested\n",
        "Each claim is a paired difference over the seeds of a level, positive where the claim holds; the cell "
        "gives the verdict, the mean difference with its 95% interval, and the p-value Holm-corrected over the "
        "level's claims. Supported or contradicted only where the corrected test rejects zero.\n",
        claims_table(tested),
    ]
    for lv in done:
        parts += [f"# Level {lv}\n", demoted((out / lv / "report.md").read_text())]
    md = "\n".join(parts)
    with io.atomic_file(out / "report.md") as fh:
        fh.write(md)
    io.write_json(out / "claims.json", {
        "levels": {lv: {"overrides": levels[lv], "seeds": done[lv]} for lv in done},
        "claims": {lv: {name: study_report._diff(d) | {"verdict": verdict(d)} if d else None
                        for name, d in diffs.items()} for lv, diffs in tested.items()}})
    return md
