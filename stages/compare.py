"""compare: one table and one plot over SFT, every method in align.methods and every distilled policy.

    python -m stages.compare --metrics metrics --plots plots --out reports

The measured version of the seeds' method-selection tables: quality (verifier accuracy, reward-model
score, win rate against SFT), drift (KL to the reference, length), cost (models held in memory,
peak memory, wall time, tokens generated) and stability (standard deviation, in accuracy points, of
the training probe over its last `STABILITY_PROBES` readings). Writes comparison.md, .csv, .json
and .png to --out; logs them to MLflow.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

from stages.core import config, io, stage, tracking

STABILITY_PROBES = 5

COLUMNS = [  # (key, header, format)
    ("eval/accuracy", "accuracy", "{:.1%}"),
    ("eval/reward_mean", "reward (RM)", "{:+.3f}"),
    ("eval/win_rate_vs_sft", "win vs SFT", "{:.1%}"),
    ("eval/kl_to_ref", "KL to ref", "{:.3f}"),
    ("eval/length", "length", "{:.2f}"),
    ("cost/models_in_memory", "models in memory", "{:.0f}"),
    ("cost/peak_mem_mb", "peak mem (MB)", "{:.0f}"),
    ("cost/wall_s", "train wall (s)", "{:.0f}"),
    ("cost/tokens_generated", "tokens generated", "{:.0f}"),
    ("stability", "stability (± pts)", "{:.1f}"),
]


def columns(ks: list[int]) -> list[tuple[str, str, str]]:
    """COLUMNS with a pass@k column after accuracy for each k in `ks`."""
    return COLUMNS[:1] + [(f"eval/pass_at_{k}", f"pass@{k}", "{:.1%}") for k in ks] + COLUMNS[1:]


def stability(plot_csv: Path) -> float | None:
    """Std, in accuracy points, of the last probe readings of a training run (None without probes)."""
    if not plot_csv.exists():
        return None
    with open(plot_csv) as fh:
        probes = [float(r["probe/accuracy"]) for r in csv.DictReader(fh) if r.get("probe/accuracy")]
    tail = probes[-STABILITY_PROBES:]
    return 100 * statistics.pstdev(tail) if len(tail) >= 2 else None


def collect(names: list[str], metrics_dir: Path, plots_dir: Path) -> list[dict]:
    table = []
    for name in names:
        f = metrics_dir / f"eval_{name}.json"
        if not f.exists():
            raise config.ConfigError(f"compare: {f} is missing (was evaluate@{name} run?)")
        row = {"policy": name, **io.read_json(f)}
        row["stability"] = stability(plots_dir / f"train_{name}.csv")
        table.append(row)
    return table


def frame(table: list[dict], cols: list[tuple[str, str, str]] = COLUMNS):
    """The comparison as a DataFrame: a row per policy, a column per metric key (NaN: not measured)."""
    import pandas as pd

    return pd.DataFrame([{"policy": r["policy"], **{k: r.get(k) for k, _, _ in cols}} for r in table])


def markdown(df, cols: list[tuple[str, str, str]] = COLUMNS) -> str:
    """The DataFrame as a Markdown table, each column in its format (n/a: not measured)."""
    import pandas as pd

    def shown(v, fmt: str) -> str:
        return fmt.format(v) if pd.notna(v) else "n/a"

    return text_table([{"policy": r["policy"], **{h: shown(r[k], fmt) for k, h, fmt in cols}}
                       for r in df.to_dict("records")])


def text_table(rows: list[dict[str, str]], right: bool = True) -> str:
    """Rows of formatted cells (header → text) as a Markdown table, written by pandas: the first column
    left-aligned, the others right-aligned (or left, right=False); the cells as given, never re-parsed."""
    import pandas as pd

    df = pd.DataFrame(rows, dtype=str)
    align = ["left"] + ["right" if right else "left"] * (len(df.columns) - 1)
    return df.to_markdown(index=False, colalign=align, disable_numparse=True) + "\n"


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("eval/accuracy", "verifier accuracy"), ("eval/reward_mean", "reward-model score"),
              ("eval/kl_to_ref", "KL to SFT"), ("cost/wall_s", "training wall time (s)")]
    names = [r["policy"] for r in table]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, title) in zip(axes, panels):
        ax.bar(names, [r.get(key) or 0.0 for r in table], color=["#888"] + ["#3a7"] * (len(names) - 1))
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    with io.atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)


def main(argv=None) -> str:
    p = stage.parser(__doc__, "--metrics", "--plots", "--out")
    args = p.parse_args(argv)
    cfg = config.load(args.params)
    names = ["sft", *cfg.align.policies()]
    table = collect(names, Path(args.metrics), Path(args.plots))
    cols = columns(cfg.evaluate.pass_k if cfg.evaluate.pass_n else [])

    out = Path(args.out)
    df = frame(table, cols)
    md = markdown(df, cols)
    with tracking.stage_run("compare", params={"align.methods": cfg.align.methods,
                                                         "align.distill.teachers": cfg.align.distill.teachers}) as tr:
        with io.atomic_dir(out) as tmp:
            (tmp / "comparison.md").write_text("# Method comparison (held-out prompts)\n\n" + md)
            io.write_json(tmp / "comparison.json", table)
            df.to_csv(tmp / "comparison.csv", index=False)
            plot(table, tmp / "comparison.png")
        for name in ("comparison.md", "comparison.png", "comparison.csv", "comparison.json"):
            tr.log_artifact(out / name)
        tr.log_table(df.to_dict("records"), "comparison_table.json")  # an MLflow table (the run's artifacts)
        tr.log_metrics({f"{r['policy']}/{k}": r[k] for r in table for k, _, _ in cols if r.get(k) is not None})
        for r in table:  # one row per method in MLflow: its params, evaluation and cost
            section = cfg.sft if r["policy"] == "sft" else cfg.align.section(r["policy"])
            tr.summary(r["policy"], {"seed": cfg.seed, **section.model_dump()},
                       {k: r[k] for k, _, _ in cols if r.get(k) is not None})
        tr.methods_view([k for k, _, _ in cols])
    print(md, end="")
    return f"compare: {len(table)} policies ({', '.join(names)}) → {out}/comparison.md, comparison.png"


if __name__ == "__main__":
    stage.run(main)
