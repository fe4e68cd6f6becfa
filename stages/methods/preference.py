"""Offline preference optimisation on the pairs stage's output: DPO, IPO, and the reference-free SimPO
and ORPO on pairs, KTO on unpaired desirable/undesirable examples.

One model in memory: the reference log-probs of every completion (and of KTO's mismatched
completions) were computed by the pairs stage, so no reference model is loaded (SimPO and ORPO use
none; the first step still checks them against the policy, which catches pairs of another model). DPO/IPO run the B
chosen and B rejected sequences of a step as one batch of 2B through the policy.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from stages.core import data, evaluation, io, losses, models, train
from stages.core.logprobs import sequence_logps, token_logps
from stages.core.stage import StageFailed


def dpo_pair_loss(pi_c, pi_r, ref_c, ref_r, len_c, len_r, c):
    """A pair method's loss: (pi_chosen, pi_rejected, ref_chosen, ref_rejected, len_chosen, len_rejected [B],
    cfg) → (losses [B], chosen rewards [B], rejected rewards [B])."""
    return losses.dpo_loss(pi_c, pi_r, ref_c, ref_r, c.beta, c.label_smoothing)


def ipo_pair_loss(pi_c, pi_r, ref_c, ref_r, len_c, len_r, c):
    return losses.ipo_loss(pi_c, pi_r, ref_c, ref_r, len_c, len_r, c.beta, c.length_normalize)


def simpo_pair_loss(pi_c, pi_r, ref_c, ref_r, len_c, len_r, c):
    return losses.simpo_loss(pi_c, pi_r, len_c, len_r, c.beta, c.gamma, c.label_smoothing)


def orpo_pair_loss(pi_c, pi_r, ref_c, ref_r, len_c, len_r, c):
    return losses.orpo_loss(pi_c, pi_r, len_c, len_r, c.beta)


def pair_step(method, policy, batch: list[dict], c, pad_id: int, device) -> list[train.Micro]:
    """A pair method on B pairs, the B chosen and B rejected sequences of a micro-batch in one forward."""

    def micro(rows: list[dict]):
        seqs = data.collate_pairs(rows, pad_id).to(device)  # [2b, P+C]
        with models.autocast(device):
            logps = sequence_logps(token_logps(policy, seqs, chunk=c.logprob_chunk), seqs.completion_mask)  # [2b]
        pi_c, pi_r = logps.float().chunk(2)  # [b], [b]
        len_c, len_r = seqs.completion_mask.sum(-1).float().chunk(2)  # [b], [b]
        ref_c = torch.tensor([r["chosen_ref_logp"] for r in rows], device=device)  # [b]
        ref_r = torch.tensor([r["rejected_ref_logp"] for r in rows], device=device)  # [b]
        per_pair, r_c, r_r = method.loss(pi_c, pi_r, ref_c, ref_r, len_c, len_r, c)
        stats = {"rewards/chosen": r_c.mean().item(), "rewards/rejected": r_r.mean().item(),
                 "rewards/margins": (r_c - r_r).mean().item(),
                 "rewards/accuracies": (r_c > r_r).float().mean().item(), "_ref_gap": _gap(pi_c, ref_c)}
        return per_pair.mean(), stats, int(seqs.attention_mask.sum())

    return [train.Micro(partial(micro, part), share) for part, share in train.micro_batches(batch, c.micro_batch_size)]


def kto_step(method, policy, batch: list[dict], c, pad_id: int, device) -> list[train.Micro]:
    """KTO on B unpaired examples. z0 comes from the mismatched completions of the whole batch (a
    no-grad pass first, as it is detached), so a split into micro-batches changes nothing."""
    prompts = [r["prompt_ids"] for r in batch]
    pi_kl = []
    with torch.no_grad():  # no graph for the mismatched pass (as TRL)
        for part, _ in train.micro_batches(batch, c.micro_batch_size):
            kl_seqs = data.collate([r["prompt_ids"] for r in part], [r["kl_completion_ids"] for r in part],
                                   pad_id).to(device)  # [b, P+C']
            with models.autocast(device):
                pi_kl.append(sequence_logps(token_logps(policy, kl_seqs, chunk=c.logprob_chunk),
                                            kl_seqs.completion_mask).float())  # [b]
    pi_kl = torch.cat(pi_kl)  # [B]
    ref_kl = torch.tensor([r["kl_ref_logp"] for r in batch], device=device)
    kl_tokens = sum(len(p) + len(r["kl_completion_ids"]) for p, r in zip(prompts, batch))

    def micro(rows: list[dict], first: bool):
        seqs = data.collate([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows], pad_id).to(device)
        with models.autocast(device):
            pi = sequence_logps(token_logps(policy, seqs, chunk=c.logprob_chunk), seqs.completion_mask).float()  # [b]
        ref = torch.tensor([r["ref_logp"] for r in rows], device=device)
        desirable = torch.tensor([bool(r["label"]) for r in rows], device=device)
        per_row, rewards, z0 = losses.kto_loss(pi, ref, desirable, pi_kl, ref_kl, c.beta, c.desirable_weight,
                                               c.undesirable_weight)
        good, bad = rewards[desirable], rewards[~desirable]
        stats = {"policy/kl": z0.item(), "_ref_gap": _gap(pi, ref),
                 "rewards/chosen": good.mean().item() if len(good) else None,
                 "rewards/rejected": bad.mean().item() if len(bad) else None,
                 "rewards/margins": good.mean().item() - bad.mean().item() if len(good) and len(bad) else None}
        return per_row.mean(), stats, int(seqs.attention_mask.sum()) + (kl_tokens if first else 0)

    return [train.Micro(partial(micro, part, i == 0), share)
            for i, (part, share) in enumerate(train.micro_batches(batch, c.micro_batch_size))]


def _gap(pi_logps: torch.Tensor, ref_logps: torch.Tensor) -> float:
    """Largest |policy − stored reference| log-prob: before the first update they are the same model."""
    return float((pi_logps.detach() - ref_logps).abs().max())


def check_kto_weights(rows: list[dict], c) -> dict:
    """Warn when λ_D·n_D / (λ_U·n_U) is outside the KTO paper's [1, 4/3] (eq. 8), as TRL does."""
    n_good = sum(bool(r["label"]) for r in rows)
    ok, ratio = losses.kto_weight_ratio_ok(n_good, len(rows) - n_good, c.desirable_weight, c.undesirable_weight)
    if not ok:
        print(f"warning: align.kto: desirable_weight·n_D / (undesirable_weight·n_U) = {ratio:.2f} is outside "
              f"[1, 4/3] (KTO paper eq. 8); n_D = {n_good}, n_U = {len(rows) - n_good}")
    return {"kto/weight_ratio": ratio}


def fit(method, cfg, args, device, tracker, t0: float, engine=None):
    """Train the SFT policy on the stored pairs with `method` (a registry record) → (model, tokenizer,
    final metrics, train.Run)."""
    c = cfg.align.method(method.name)
    data_file, check_data = method.reads, method.check_data
    rows = io.read_jsonl(Path(args.pairs) / data_file)
    probe = io.read_jsonl(args.prompts)[:c.probe_size]
    probe_len = c.probe_max_new_tokens or max(len(r.get("chosen_ids") or r["completion_ids"]) for r in rows) + 1
    steps = c.epochs * max(1, len(rows) // c.batch_size) if c.epochs else c.steps  # whole batches, as batch_indices
    final = {"train/examples": len(rows), "cost/models_in_memory": 1, "cost/tokens_generated": 0,
             **(check_data(rows, c) if check_data else {})}
    tok = models.load_tokenizer(args.sft)
    policy = models.disable_dropout(models.for_training(models.load_causal_lm(args.sft, device), c))

    def plan(step: int) -> train.Plan:
        batch = [rows[i] for i in train.batch_indices(len(rows), c.batch_size, step, cfg.seed)]
        micros = method.step(method, policy, batch, c, tok.pad_token_id, device)
        if step == 0:  # before any update the policy is the reference: check the stored log-probs
            micros[0] = train.Micro(partial(check_reference, micros[0].loss, strict=models.exact(device)),
                                    micros[0].share)
        return train.Plan([micros])

    def probe_fn() -> dict:
        return {"probe/accuracy": evaluation.probe_accuracy(policy, tok, probe, probe_len, c.batch_size, cfg.verifier,
                                                            engine)}

    run = train.fit(f"align-{method.name}", policy, c, cfg.seed, tracker, [Path(args.pairs) / data_file, args.sft],
                    plan, steps=steps, device=device, t0=t0, probe=probe_fn)
    return policy, tok, {**run.metrics, **final}, run


def check_reference(loss_fn, strict: bool, tol: float = 1e-3):
    """Run the first micro-batch's loss and check its `_ref_gap`: stored reference log-probs that
    disagree with the SFT policy's mean the pairs were made with another model or tokenizer, and
    every implicit reward would be off. In fp32 the two agree to ~1e-6 and a gap is an error; under
    bf16 autocast batch composition alone moves them, so a gap is only reported."""
    loss, stats, tokens = loss_fn()
    gap = stats["_ref_gap"]
    if gap > tol:
        msg = (f"stored reference log-probs differ from the SFT policy's by up to {gap:.3g} nats; "
               "were the pairs made from another SFT model?")
        if strict:
            raise StageFailed(msg)
        print(f"warning: {msg}")
    return loss, stats, tokens
