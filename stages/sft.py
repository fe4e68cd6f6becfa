"""sft: supervised fine-tuning, cross-entropy on the response tokens only.

    python -m stages.sft --train data/sft.jsonl --probe data/prompts.jsonl --base models/base \
        --out models/sft --metrics metrics/train_sft.json --plots plots/train_sft.csv

Checkpoints every `sft.checkpoint_every` steps and resumes from the last one on rerun (same params,
same inputs); the data order is a function of (seed, step), so a resumed run trains on exactly the
batches the interrupted one would have.
"""

from __future__ import annotations

import time
from functools import partial

from stages.core import config, data, engine, evaluation, io, losses, models, stage, tracking, train
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
    model = models.for_training(models.load_causal_lm(args.base, device), c)

    def micro(idx: list[int]):
        batch = data.collate([examples[i][0] for i in idx], [examples[i][1] for i in idx], tok.pad_token_id).to(device)
        with models.autocast(device):
            logps = token_logps(model, batch)  # [b, C]
        return losses.sft_loss(logps, batch.completion_mask), {}, int(batch.attention_mask.sum())

    def plan(step: int) -> train.Plan:
        idx = train.batch_indices(len(examples), c.batch_size, step, cfg.seed)
        units = [len(examples[i][1]) for i in idx]  # the loss is a mean over completion tokens
        return train.Plan([[train.Micro(partial(micro, part), share)
                            for part, share in train.micro_batches(idx, c.micro_batch_size, units)]])

    def probe_fn() -> dict:
        return {"probe/accuracy": evaluation.probe_accuracy(model, tok, probe, probe_len, c.batch_size, cfg.verifier,
                                                            eng)}

    with (tracking.stage_run("sft", params={"seed": cfg.seed, **c.model_dump()}, deps=[args.base, sft_file]) as tr,
          engine.open_engine(cfg.generation, args.base) as eng):
        run = train.fit("sft", model, c, cfg.seed, tr, [sft_file, args.base], plan, steps=c.steps, device=device,
                        t0=t0, probe=probe_fn)
        metrics = {
            **run.metrics, **(eng.stats if eng else {}), "cost/wall_s": time.perf_counter() - t0 + run.prior_s,
            "cost/peak_mem_mb": models.peak_mem_mb(device), "cost/models_in_memory": 1, "cost/tokens_generated": 0,
        }
        stage.write_trained(model, tok, args.out, args.metrics, metrics, args.plots, run.rows, tr, c.steps, c)
    run.checkpoint.clear()
    return (f"sft: {c.steps} steps on {len(examples)} examples, final loss {metrics['train/loss']:.4f}, "
            f"probe accuracy {metrics.get('probe/accuracy', float('nan')):.3f}, "
            f"{metrics.get('perf/tokens_per_sec', 0):.0f} tokens/s → {args.out}")


if __name__ == "__main__":
    stage.run(main, parallel=True)
