"""The study's plots (flows/study_report.py writes them beside the report):

    accuracy.png  held-out accuracy per policy, mean over seeds with its 95% interval
    compute.png   probe accuracy against tokens generated and against training wall time, a curve per method
    noise.png     accuracy of DPO, IPO and KTO against the share of flipped pairs
    hacking.png   over GRPO training, per seed: the RM score rise and the verifier accuracy rise
"""

from __future__ import annotations

from pathlib import Path

from stages.core import io

ACC = "eval/accuracy"  # the headline metric: the verifier's held-out accuracy


def plots(out: Path, runs: dict, seeds: list[int], methods: list[str], est: dict, noise: dict,
          hacking_conds: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stages.methods import registry

    def save(fig, name):
        fig.tight_layout()
        with io.atomic_file(out / name, "wb") as fh:
            fig.savefig(fh, format="png", dpi=110)
        plt.close(fig)

    names = [p for p in ["sft", *methods] if est[p][ACC] is not None]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(names, [est[p][ACC].mean for p in names], yerr=[est[p][ACC].half or 0 for p in names], capsize=4,
           color=["#888" if p == "sft" else "#3a7" for p in names])
    ax.set_ylabel(f"held-out accuracy (mean, 95% CI, {len(seeds)} seeds)")
    save(fig, "accuracy.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for m in methods:
        curves = [[r for r in runs["main"][s][m]["curve"] if "probe/accuracy" in r] for s in seeds]
        k = min(len(c) for c in curves)
        if not k:
            continue
        offset = sum(runs["main"][s]["pairs"].get("cost/tokens_generated", 0) for s in seeds) / len(seeds) \
            if registry.for_policy(m).kind == "offline" else 0.0  # offline: the pairs stage generated their data
        for ax, key in zip(axes, ("cost/tokens_generated", "cost/wall_s")):
            x = [sum(c[i].get(key, 0.0) for c in curves) / len(curves) + (offset if key.startswith("cost/tok") else 0)
                 for i in range(k)]
            ax.plot(x, [sum(c[i]["probe/accuracy"] for c in curves) / len(curves) for i in range(k)], marker="o",
                    label=m)
    axes[0].set_xlabel("tokens generated (offline methods: the pairs stage's)")
    axes[1].set_xlabel("training wall time (s)")
    for ax in axes:
        ax.set_ylabel("probe accuracy (mean over seeds)")
    axes[1].legend(fontsize=8)
    save(fig, "compute.png")

    if noise:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for m, e in noise.items():
            fs = sorted(f for f, a in e["accuracy"].items() if a is not None)
            ax.errorbar(fs, [e["accuracy"][f].mean for f in fs], yerr=[e["accuracy"][f].half or 0 for f in fs],
                        marker="o", capsize=3, label=m)
        ax.set_xlabel("share of pairs flipped")
        ax.set_ylabel("held-out accuracy")
        ax.legend()
        save(fig, "noise.png")
    if hacking_conds:
        hacking_plot(runs, seeds, plt, save)


def hacking_plot(runs: dict, seeds: list[int], plt, save) -> None:
    """hacking.png: over GRPO training, per seed, the rollouts' reward-model score (GRPO rewarded by the
    reward model) and their verifier accuracy (rewarded by either), each a moving average over 5 logged
    steps, as a rise over the mean of the first 5: a hacking gap is the first rising while the second does not."""
    def rise(xs: list[float], k: int = 5) -> list[float]:
        base = sum(xs[:k]) / len(xs[:k])
        return [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1]) - base for i in range(len(xs))]

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for i, seed in enumerate(seeds):
        color = f"C{i % 10}"
        for label, cond, style in (("reward model", "rm-reward", "-"), ("verifier", "main", "--")):
            curve = [r for r in runs[cond][seed]["grpo"]["curve"] if "rollout/accuracy" in r]
            if not curve:
                continue
            steps = [r["step"] for r in curve]
            if cond == "rm-reward":
                axes[0].plot(steps, rise([r["rollout/reward_mean"] for r in curve]), style, color=color,
                             label=f"seed {seed}")
            axes[1].plot(steps, [100 * v for v in rise([r["rollout/accuracy"] for r in curve])], style, color=color,
                         label=f"seed {seed}, by {label}")
    axes[0].set_ylabel("RM score rise (std units)")
    axes[0].set_title("GRPO rewarded by the reward model", fontsize=9)
    axes[1].set_ylabel("verifier accuracy rise (pts)")
    axes[1].set_title("solid: rewarded by the RM; dashed: by the verifier", fontsize=9)
    for ax in axes:
        ax.set_xlabel("GRPO step (rollouts)")
        ax.legend(fontsize=7)
    save(fig, "hacking.png")
