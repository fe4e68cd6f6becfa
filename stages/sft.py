"""sft: supervised fine-tuning, cross-entropy on the response tokens only.

    python -m stages.sft --train data/sft.jsonl --probe data/prompts.jsonl --base models/base \
        --out models/sft --metrics metrics/train_sft.json --plots plots/train_sft.csv

Checkpoints every `sft.checkpoint_every` steps and resumes from the last one on rerun (same params,
same inputs); the data order is a function of (seed, step), so a resumed run trains on exactly the
batches the interrupted one would have.
"""

from __future__ import annotations

import time

from stages.core import config, data, evaluation, io, losses, models, stage, tracking, train
from stages.core.logprobs import token_logps


def main(argv=None) -> str:
    p = stage.parser(__doc__, "--train", "--probe", "--base", "--out", "--metrics", "--plots")
    args = p.parse_args(argv)
    cfg = config.load(args.params)
    c = cfg.sft
    device = models.setup_torch(cfg.seed, args.base)
    t0 = time.perf_counter()

    sft_file = args.train
    tok = models.load_tokenizer(args.base)
    examples = [(r["prompt_ids"], r["completion_ids"]) for r in io.read_jsonl(sft_file)]
    probe = io.read_jsonl(args.probe)[:c.probe_size]
    probe_len = c.probe_max_new_tokens or max(len(e[1]) for e in examples) + 1
    model = models.load_causal_lm(args.base, device)
    opt = train.make_optimizer(model.parameters(), c, fused=not models.exact(device))
    guard = train.GuardedStep(model.parameters(), opt, c.max_grad_norm)
    ckpt = train.Checkpoint("sft", {"seed": cfg.seed, **c.model_dump()}, [sft_file, args.base])
    start, rows, _ = ckpt.resume(model, opt)
    probe_at = train.probe_steps(c.steps, c.probes)

    with tracking.stage_run("sft", params={"seed": cfg.seed, **c.model_dump()}, deps=[args.base, sft_file]) as tr:
        log = train.StepLog(tr, c.steps, c.log_every, "sft", start, rows)
        model.train()
        for step in range(start, c.steps):
            idx = train.batch_indices(len(examples), c.batch_size, step, cfg.seed)
            batch = data.collate([examples[i][0] for i in idx], [examples[i][1] for i in idx],
                                 tok.pad_token_id).to(device)
            with models.autocast(device):
                logps = token_logps(model, batch)  # [B, C]
            loss = losses.sft_loss(logps, batch.completion_mask)
            lr = train.lr_at(step, c, c.steps)
            grad_norm = guard(loss, lr)
            metrics = {"train/loss": loss.item(), "train/lr": lr, "train/grad_norm": grad_norm}
            if step + 1 in probe_at:
                metrics["probe/accuracy"] = evaluation.probe_accuracy(model, tok, probe, probe_len, c.batch_size,
                                                                          cfg.verifier)
            log.step(step + 1, metrics, tokens=int(batch.attention_mask.sum()))
            ckpt.maybe_save(step + 1, c.checkpoint_every, c.steps, model, opt, log.rows)
        log.close()

        metrics = {
            **log.last(), "train/skipped_steps": guard.skipped,
            "cost/wall_s": time.perf_counter() - t0, "cost/peak_mem_mb": models.peak_mem_mb(device),
            "cost/models_in_memory": 1, "cost/tokens_generated": 0,
        }
        stage.write_trained(model, tok, args.out, args.metrics, metrics, args.plots, log.rows, tr, c.steps)
    ckpt.clear()
    return (f"sft: {c.steps} steps on {len(examples)} examples, final loss {metrics['train/loss']:.4f}, "
            f"probe accuracy {metrics.get('probe/accuracy', float('nan')):.3f}, "
            f"{metrics.get('perf/tokens_per_sec', 0):.0f} tokens/s → {args.out}")


if __name__ == "__main__":
    stage.run(main)
