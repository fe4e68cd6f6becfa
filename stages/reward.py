"""reward: a Bradley-Terry reward model on preference pairs.

    python -m stages.reward --pairs data/preference.jsonl --sft models/sft --base models/base --out models/reward \
        --metrics metrics/reward.json --plots plots/reward.csv

The model is AutoModelForSequenceClassification with one label (the HF convention), its backbone
the SFT model (or the base model with reward.init_from: base). A share of the pairs is
held out; pairwise accuracy on it is reported and gates the stage (reward.min_accuracy). The mean and
std of the scores on the training pairs are saved in the model's config (reward_mean, reward_std)
and every consumer standardizes with them, so downstream rewards mix the score with 0/1 verifier
rewards on a known scale.
"""

from __future__ import annotations

import time
from functools import partial

import torch

from stages.core import config, data, io, losses, models, stage, tracking, train
from stages.core.rewards import reward_model_scores, score_sequences


@torch.no_grad()
def evaluate_pairs(rm, rows: list[dict], pad_id: int, batch_size: int) -> tuple[float, float, torch.Tensor]:
    """(pairwise accuracy, mean margin, all scores [2N]) of the reward model on pairs."""
    rm.eval()
    scores = reward_model_scores(rm, data.collate_pairs(rows, pad_id), batch_size)
    chosen, rejected = scores.chunk(2)
    return float((chosen > rejected).float().mean()), float((chosen - rejected).mean()), scores


def main(argv=None) -> str:
    p = stage.parser(__doc__, "--pairs", "--sft", "--base", "--out", "--metrics", "--plots")
    args = p.parse_args(argv)
    cfg = config.load(args.params)
    c = cfg.reward
    init = {"sft": args.sft, "base": args.base}[c.init_from]
    device = models.setup_torch(cfg.seed, init)
    t0 = time.perf_counter()

    pref_file = args.pairs
    pairs = io.read_jsonl(pref_file)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    n_heldout = max(1, round(len(pairs) * c.heldout_fraction))
    heldout, train_pairs = [pairs[i] for i in order[:n_heldout]], [pairs[i] for i in order[n_heldout:]]
    if not train_pairs:
        raise config.ConfigError(f"reward.heldout_fraction: leaves no training pairs of {len(pairs)}")
    tok = models.load_tokenizer(init)
    rm = models.for_training(models.load_reward_model(init, device, trainable=True, pad_token_id=tok.pad_token_id), c,
                             task="SEQ_CLS")

    def micro(rows: list[dict]):
        batch = data.collate_pairs(rows, tok.pad_token_id).to(device)
        with models.autocast(device):
            scores = score_sequences(rm, batch)  # [2b]
        chosen, rejected = scores.chunk(2)  # [b], [b]
        per_pair, correct = losses.bradley_terry_loss(chosen, rejected, center_coef=c.center_coef)
        return per_pair.mean(), {
            "rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
            "rewards/margins": (chosen - rejected).mean().item(), "rewards/accuracies": correct.mean().item(),
        }, int(batch.attention_mask.sum())

    def plan(step: int) -> train.Plan:
        rows = [train_pairs[i] for i in train.batch_indices(len(train_pairs), c.batch_size, step, cfg.seed)]
        return train.Plan([[train.Micro(partial(micro, part), share)
                            for part, share in train.micro_batches(rows, c.micro_batch_size)]])

    with tracking.stage_run("reward", params={"seed": cfg.seed, **c.model_dump()}, deps=[init, pref_file]) as tr:
        run = train.fit("reward", rm, c, cfg.seed, tr, [pref_file, init], plan, steps=c.steps, device=device, t0=t0)
        accuracy, margin, _ = evaluate_pairs(rm, heldout, tok.pad_token_id, c.batch_size)
        if accuracy < c.min_accuracy:
            raise stage.StageFailed(f"reward: held-out pairwise accuracy {accuracy:.3f} is below reward.min_accuracy "
                                    f"{c.min_accuracy} ({len(heldout)} pairs); no reward model was written")
        train_acc, _, train_scores = evaluate_pairs(rm, train_pairs[:c.stats_pairs or None], tok.pad_token_id,
                                                   c.batch_size)
        raw_mean, raw_std = float(train_scores.mean()), float(train_scores.std().clamp(min=1e-6))
        rm.config.reward_mean, rm.config.reward_std = raw_mean, raw_std  # read back by score_sequences
        metrics = {
            **run.metrics, "reward/heldout_accuracy": accuracy, "reward/heldout_margin": margin / raw_std,
            "reward/train_accuracy": train_acc, "reward/raw_mean": raw_mean, "reward/raw_std": raw_std,
            "reward/n_heldout": len(heldout),
            "cost/wall_s": time.perf_counter() - t0 + run.prior_s, "cost/peak_mem_mb": models.peak_mem_mb(device),
        }
        stage.write_trained(rm, tok, args.out, args.metrics, metrics, args.plots, run.rows, tr, c.steps, c)
    run.checkpoint.clear()
    return (f"reward: {c.steps} steps on {len(train_pairs)} pairs, held-out accuracy {accuracy:.3f} "
            f"({len(heldout)} pairs) → {args.out}")


if __name__ == "__main__":
    stage.run(main, parallel=True)
