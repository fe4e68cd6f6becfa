"""Offline preference optimisation on stored pairs: DPO (and its relatives that share the loop).

One model in memory: the reference log-probs of every chosen and rejected completion were computed
by the pairs stage, so no reference model is loaded. Each step runs the B chosen and B rejected
sequences as one batch of 2B through the policy.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from stages.core import data, evaluation, io, losses, models, train
from stages.core.logprobs import sequence_logps, token_logps


def _dpo(pi_c, pi_r, ref_c, ref_r, c):
    return losses.dpo_loss(pi_c, pi_r, ref_c, ref_r, c.beta, c.label_smoothing)


PAIR_LOSSES = {"dpo": _dpo}
"""method → loss(pi_chosen [B], pi_rejected [B], ref_chosen [B], ref_rejected [B], cfg) →
(losses [B], chosen rewards [B], rejected rewards [B])."""


def fit(method: str, cfg, args, device, tracker):
    """Train the SFT policy on pairs/pairs.jsonl → (model, tokenizer, final metrics, logged rows)."""
    c = cfg.align.method(method)
    pairs = io.read_jsonl(Path(args.pairs) / "pairs.jsonl")
    probe = io.read_jsonl(args.prompts)[:c.probe_size]
    probe_len = max(len(r["chosen_ids"]) for r in pairs) + 1
    steps = c.epochs * math.ceil(len(pairs) / c.batch_size) if c.epochs else c.steps

    tok = models.load_tokenizer(args.sft)
    policy = models.load_causal_lm(args.sft, device)
    opt = train.make_optimizer(policy.parameters(), c)
    guard = train.GuardedStep(policy.parameters(), opt, c.max_grad_norm)
    ckpt = train.Checkpoint(f"align-{method}", {"seed": cfg.seed, **c.model_dump()},
                            [Path(args.pairs) / "pairs.jsonl", args.sft])
    start, rows, _ = ckpt.resume(policy, opt)
    probe_at = train.probe_steps(steps, c.probes)
    loss_fn = PAIR_LOSSES[method]

    log = train.StepLog(tracker, steps, c.log_every, f"align@{method}", start, rows)
    policy.train()
    for step in range(start, steps):
        batch = [pairs[i] for i in train.batch_indices(len(pairs), c.batch_size, step, cfg.seed)]
        seqs = data.collate_pairs(batch, tok.pad_token_id).to(device)  # [2B, P+C]
        with models.autocast(device):
            logps = sequence_logps(token_logps(policy, seqs), seqs.completion_mask)  # [2B]
        pi_c, pi_r = logps.float().chunk(2)  # [B], [B]
        ref_c = torch.tensor([r["chosen_ref_logp"] for r in batch], device=device)  # [B]
        ref_r = torch.tensor([r["rejected_ref_logp"] for r in batch], device=device)  # [B]
        if step == 0:
            check_reference(pi_c, ref_c, strict=device.type == "cpu")
        per_pair, r_c, r_r = loss_fn(pi_c, pi_r, ref_c, ref_r, c)
        loss = per_pair.mean()
        lr = train.lr_at(step, c, steps)
        grad_norm = guard(loss, lr)
        metrics = {
            "train/loss": loss.item(), "train/lr": lr, "train/grad_norm": grad_norm,
            "rewards/chosen": r_c.mean().item(), "rewards/rejected": r_r.mean().item(),
            "rewards/margins": (r_c - r_r).mean().item(), "rewards/accuracies": (r_c > r_r).float().mean().item(),
        }
        if step + 1 in probe_at:
            metrics["probe/accuracy"] = evaluation.probe_accuracy(policy, tok, probe, probe_len, c.batch_size)
        log.step(step + 1, metrics, tokens=int(seqs.attention_mask.sum()))
        ckpt.maybe_save(step + 1, c.checkpoint_every, steps, policy, opt, log.rows)
    log.close()
    ckpt.clear()
    final = {**log.last(), "train/skipped_steps": guard.skipped, "train/pairs": len(pairs),
             "cost/models_in_memory": 1, "cost/tokens_generated": 0}
    return policy, tok, final, log.rows


def check_reference(pi_logps: torch.Tensor, ref_logps: torch.Tensor, strict: bool, tol: float = 1e-3) -> None:
    """Before any update the policy is the reference: stored log-probs that disagree mean the pairs
    were made with another model or tokenizer, and every implicit reward would be off. In fp32 the
    two agree to ~1e-6 and a gap is an error; under bf16 autocast batch composition alone moves them,
    so a gap is only reported."""
    gap = float((pi_logps.detach() - ref_logps).abs().max())
    if gap > tol:
        msg = (f"stored reference log-probs differ from the SFT policy's by up to {gap:.3g} nats; "
               "were the pairs made from another SFT model?")
        if strict:
            raise RuntimeError(msg)
        print(f"warning: {msg}")
