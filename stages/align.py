"""align@<method>: align the SFT policy with one method; one DVC stage per entry of align.methods.

    python -m stages.align dpo --pairs pairs --prompts data/prompts.jsonl --sft models/sft --reward models/reward \
        --out models/dpo --metrics metrics/train_dpo.json --plots plots/train_dpo.csv
    python -m stages.align distill --teacher models/grpo ... --out models/distill_grpo ...   # distill@grpo

Each method is a record in stages/methods/registry.py naming its training loop and pieces (checked
against the params schema's sections before any work: no if/elif over method names). The loop receives
the record, the validated params and the paths and returns (trained model, tokenizer, final metrics,
train.Run); this module writes the outputs atomically, logs them, then clears the method's checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

from stages.core import config, engine, models, stage, tracking
from stages.methods import registry


def main(argv=None) -> str:
    p = stage.parser(__doc__, "--pairs", "--prompts", "--sft", "--reward", "--out", "--metrics", "--plots")
    p.add_argument("method", choices=sorted(registry.REGISTRY))
    p.add_argument("--teacher", help="the teacher's model directory (methods that distill)")
    args = p.parse_args(argv)
    method = registry.get(args.method)
    if method.teacher != bool(args.teacher):
        p.error(f"{args.method}: --teacher " + ("is required" if method.teacher else "is for methods that distill"))
    cfg = config.load(args.params)
    mcfg = cfg.align.method(args.method)
    device = models.setup_torch(cfg.seed, args.sft)
    t0 = time.perf_counter()

    teacher = Path(args.teacher).name if method.teacher else None  # distill@grpo trains the policy distill_grpo
    label, name = ((f"{args.method}@{teacher}", f"{args.method}_{teacher}") if teacher
                   else (f"align@{args.method}", args.method))
    deps = [args.sft, args.pairs, args.reward, *([args.teacher] if teacher else [])]
    with tracking.stage_run("align", method=name, params={"seed": cfg.seed, **mcfg.model_dump()}, deps=deps) as tr, \
            engine.open_engine(cfg.generation, args.sft) as eng:
        model, tok, metrics, run = method.fit(method, cfg, args, device, tr, t0, eng)
        metrics = {**metrics, **(eng.stats if eng else {}), "cost/wall_s": time.perf_counter() - t0 + run.prior_s,
                   "cost/peak_mem_mb": models.peak_mem_mb(device)}
        stage.write_trained(model, tok, args.out, args.metrics, metrics, args.plots, run.rows, tr,
                            run.rows[-1]["step"] if run.rows else 0, mcfg)
    run.checkpoint.clear()
    shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("train/loss", "probe/accuracy") if k in metrics)
    return f"{label}: {shown}, {metrics['cost/wall_s']:.0f}s → {args.out}"


if __name__ == "__main__":
    stage.run(main, parallel=True)
