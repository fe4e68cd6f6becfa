"""Offline preference optimisation on the pairs stage's output: DPO and IPO on pairs, KTO on
unpaired desirable/undesirable examples.

One model in memory: the reference log-probs of every completion (and of KTO's mismatched
completions) were computed by the pairs stage, so no reference model is loaded. DPO/IPO run the B
chosen and B rejected sequences of a step as one batch of 2B through the policy.
"""

from __future__ import annotations

from pathlib import Path

import torch

from stages.core import data, evaluation, io, losses, models, train
from stages.core.logprobs import sequence_logps, token_logps

PAIR_LOSSES = {
    "dpo": lambda pi_c, pi_r, ref_c, ref_r, len_c, len_r, c: losses.dpo_loss(
        pi_c, pi_r, ref_c, ref_r, c.beta, c.label_smoothing),
    "ipo": lambda pi_c, pi_r, ref_c, ref_r, len_c, len_r, c: losses.ipo_loss(
        pi_c, pi_r, ref_c, ref_r, len_c, len_r, c.beta, c.length_normalize),
}
"""method → loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, len_chosen, len_rejected [B], cfg) →
(losses [B], chosen rewards [B], rejected rewards [B])."""


def pair_step(method, policy, batch: list[dict], c, pad_id: int, device):
    """DPO/IPO on B pairs → (loss, metrics, tokens)."""
    seqs = data.collate_pairs(batch, pad_id).to(device)  # [2B, P+C]
    with models.autocast(device):
        logps = sequence_logps(token_logps(policy, seqs), seqs.completion_mask)  # [2B]
    pi_c, pi_r = logps.float().chunk(2)  # [B], [B]
    len_c, len_r = seqs.completion_mask.sum(-1).float().chunk(2)  # [B], [B]
    ref_c = torch.tensor([r["chosen_ref_logp"] for r in batch], device=device)  # [B]
    ref_r = torch.tensor([r["rejected_ref_logp"] for r in batch], device=device)  # [B]
    per_pair, r_c, r_r = PAIR_LOSSES[method](pi_c, pi_r, ref_c, ref_r, len_c, len_r, c)
    metrics = {"rewards/chosen": r_c.mean().item(), "rewards/rejected": r_r.mean().item(),
               "rewards/margins": (r_c - r_r).mean().item(), "rewards/accuracies": (r_c > r_r).float().mean().item()}
    return per_pair.mean(), metrics, int(seqs.attention_mask.sum()), (pi_c, ref_c)


def kto_step(method, policy, batch: list[dict], c, pad_id: int, device):
    """KTO on B unpaired examples; z0 from each row's precomputed mismatched completion → (loss, metrics, tokens)."""
    prompts = [r["prompt_ids"] for r in batch]
    seqs = data.collate(prompts, [r["completion_ids"] for r in batch], pad_id).to(device)  # [B, P+C]
    kl_seqs = data.collate(prompts, [r["kl_completion_ids"] for r in batch], pad_id).to(device)  # [B, P+C']
    with models.autocast(device):
        pi = sequence_logps(token_logps(policy, seqs), seqs.completion_mask).float()  # [B]
        with torch.no_grad():  # z0 is detached: no graph for the mismatched pass (as TRL)
            pi_kl = sequence_logps(token_logps(policy, kl_seqs), kl_seqs.completion_mask).float()  # [B]
    ref = torch.tensor([r["ref_logp"] for r in batch], device=device)
    ref_kl = torch.tensor([r["kl_ref_logp"] for r in batch], device=device)
    desirable = torch.tensor([bool(r["label"]) for r in batch], device=device)
    per_row, rewards, z0 = losses.kto_loss(pi, ref, desirable, pi_kl, ref_kl, c.beta, c.desirable_weight,
                                           c.undesirable_weight)
    good, bad = rewards[desirable], rewards[~desirable]
    metrics = {"policy/kl": z0.item()}
    if len(good):
        metrics["rewards/chosen"] = good.mean().item()
    if len(bad):
        metrics["rewards/rejected"] = bad.mean().item()
    if len(good) and len(bad):
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return per_row.mean(), metrics, int(seqs.attention_mask.sum() + kl_seqs.attention_mask.sum()), (pi, ref)


def check_kto_weights(rows: list[dict], c) -> dict:
    """Warn when λ_D·n_D / (λ_U·n_U) is outside the KTO paper's [1, 4/3] (eq. 8), as TRL does."""
    n_good = sum(bool(r["label"]) for r in rows)
    ok, ratio = losses.kto_weight_ratio_ok(n_good, len(rows) - n_good, c.desirable_weight, c.undesirable_weight)
    if not ok:
        print(f"warning: align.kto: desirable_weight·n_D / (undesirable_weight·n_U) = {ratio:.2f} is outside "
              f"[1, 4/3] (KTO paper eq. 8); n_D = {n_good}, n_U = {len(rows) - n_good}")
    return {"kto/weight_ratio": ratio}


STEPS = {
    "dpo": (pair_step, "pairs.jsonl", None),
    "ipo": (pair_step, "pairs.jsonl", None),
    "kto": (kto_step, "kto.jsonl", check_kto_weights),
}
"""method → (step function, the pairs stage's file it trains on, a check of that data or None)."""


def fit(method: str, cfg, args, device, tracker):
    """Train the SFT policy on the stored pairs → (model, tokenizer, final metrics, logged rows)."""
    c = cfg.align.method(method)
    step_fn, data_file, check_data = STEPS[method]
    rows = io.read_jsonl(Path(args.pairs) / data_file)
    probe = io.read_jsonl(args.prompts)[:c.probe_size]
    probe_len = c.probe_max_new_tokens or max(len(r.get("chosen_ids") or r["completion_ids"]) for r in rows) + 1
    steps = c.epochs * max(1, len(rows) // c.batch_size) if c.epochs else c.steps  # whole batches, as batch_indices
    final = {"train/examples": len(rows), "cost/models_in_memory": 1, "cost/tokens_generated": 0,
             **(check_data(rows, c) if check_data else {})}

    tok = models.load_tokenizer(args.sft)
    policy = models.disable_dropout(models.load_causal_lm(args.sft, device))
    opt = train.make_optimizer(policy.parameters(), c, fused=not models.exact(device))
    guard = train.GuardedStep(policy.parameters(), opt, c.max_grad_norm)
    ckpt = train.Checkpoint(f"align-{method}", {"seed": cfg.seed, **c.model_dump()},
                            [Path(args.pairs) / data_file, args.sft])
    start, logged, _ = ckpt.resume(policy, opt)
    probe_at = train.probe_steps(steps, c.probes)

    log = train.StepLog(tracker, steps, c.log_every, f"align@{method}", start, logged)
    policy.train()
    for step in range(start, steps):
        batch = [rows[i] for i in train.batch_indices(len(rows), c.batch_size, step, cfg.seed)]
        loss, metrics, tokens, (pi, ref) = step_fn(method, policy, batch, c, tok.pad_token_id, device)
        if step == 0:
            check_reference(pi, ref, strict=models.exact(device))
        lr = train.lr_at(step, c, steps)
        grad_norm = guard(loss, lr)
        metrics.update({"train/loss": loss.item(), "train/lr": lr, "train/grad_norm": grad_norm})
        if step + 1 in probe_at:
            metrics["probe/accuracy"] = evaluation.probe_accuracy(policy, tok, probe, probe_len, c.batch_size,
                                                                  cfg.verifier)
        log.step(step + 1, metrics, tokens=tokens)
        ckpt.maybe_save(step + 1, c.checkpoint_every, steps, policy, opt, log.rows)
    log.close()
    ckpt.clear()
    return policy, tok, {**log.last(), **final, "train/skipped_steps": guard.skipped}, log.rows


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
