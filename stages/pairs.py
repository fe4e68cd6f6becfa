"""pairs: sample K completions per prompt from the SFT policy, score them, write preference pairs,
unpaired labels and the reference log-probs of every completion.

    python -m stages.pairs --prompts data/prompts.jsonl --sft models/sft --reward models/reward --out pairs \
        --metrics metrics/pairs.json

Scores are a weighted mix of the reward model, the verifier and the format reward (pairs.score).
Per prompt: chosen = best, rejected = worst; a prompt whose best and worst score the same is a tie
(dropped, counted), one with fewer than two scorable completions is dropped too. The reference
(SFT) log-prob of each completion is stored, so DPO/IPO/KTO never load a reference model.

Outputs in --out: samples.jsonl (every completion: ids, text, scores, ref logp), pairs.jsonl
(prompt/chosen/rejected with ids and ref logps), kto.jsonl (unpaired: completion, label, ref logp).
"""

from __future__ import annotations

import math
import random
import time

from stages.core import config, data, dist, engine, evaluation, io, models, rewards, stage, tracking
from stages.core.logprobs import batched_token_logps, sequence_logps


def build_pairs(samples: list[dict], k: int, truncated: str = "drop", penalty: float = 1.0) -> tuple[list[dict], dict]:
    """Best vs worst of each group of k samples → (pair rows, counts of what was dropped and why).

    A truncated sample (no end-of-turn token) is never chosen: with truncated = "drop" it leaves its
    group; with "penalize" it stays a candidate for rejected with its score lowered by `penalty`.
    """
    pairs = []
    counts = {"ties": 0, "unscorable": 0, "unfinished": 0, "truncated_dropped": 0, "truncated_penalized": 0}
    for g in range(0, len(samples), k):
        group = [s for s in samples[g:g + k] if not math.isnan(s["score"])]
        n_cut = sum(s["truncated"] for s in group)
        if truncated == "drop":
            group = [s for s in group if not s["truncated"]]
            counts["truncated_dropped"] += n_cut
        else:
            counts["truncated_penalized"] += n_cut
        finished = [s for s in group if not s["truncated"]]
        if len(group) < 2:
            counts["unscorable"] += 1
            continue
        if not finished:
            counts["unfinished"] += 1
            continue

        def ranked(s: dict) -> float:
            return s["score"] - (penalty if s["truncated"] else 0.0)

        best, worst = max(finished, key=ranked), min(group, key=ranked)
        if ranked(best) - ranked(worst) <= 1e-6 or best["completion_ids"] == worst["completion_ids"]:
            counts["ties"] += 1
            continue
        pairs.append({
            "prompt": best["prompt"], "prompt_ids": best["prompt_ids"],
            "chosen": best["completion"], "chosen_ids": best["completion_ids"], "chosen_ref_logp": best["ref_logp"],
            "chosen_score": best["score"], "chosen_verifier": best["verifier"],
            "rejected": worst["completion"], "rejected_ids": worst["completion_ids"],
            "rejected_ref_logp": worst["ref_logp"], "rejected_score": worst["score"],
            "rejected_verifier": worst["verifier"], "rejected_truncated": worst["truncated"],
        })
    return pairs, counts


SIDES = ("", "_ids", "_ref_logp", "_score", "_verifier")
"""The fields a pair holds for each side: chosen<field> and rejected<field>."""


def flip(pairs: list[dict], fraction: float, seed: int) -> list[dict]:
    """round(fraction · n) pairs, drawn from the seed, with chosen and rejected swapped (a swapped pair's
    rejected side was finished, as every chosen one is): label noise on purpose."""
    picked = set(random.Random(seed).sample(range(len(pairs)), round(fraction * len(pairs))))
    out = []
    for i, p in enumerate(pairs):
        if i in picked:
            swapped = {f"{side}{f}": p[f"{other}{f}"] for f in SIDES
                       for side, other in (("chosen", "rejected"), ("rejected", "chosen"))}
            p = {**p, **swapped, "rejected_truncated": False}
        out.append(p)
    return out


def unpaired(pairs: list[dict]) -> list[dict]:
    """KTO rows: each pair's chosen as desirable, its rejected as undesirable (TRL's unpairing),
    plus the mismatched completion for KTO's reference point z0: row i is paired with the completion
    of row i+2 (the next pair's same side, so another prompt), whose reference log-prob under row i's
    prompt the caller fills in (kl_ref_logp)."""
    rows = []
    for p in pairs:
        for side, label in (("chosen", True), ("rejected", False)):
            rows.append({"prompt": p["prompt"], "prompt_ids": p["prompt_ids"], "completion": p[side],
                         "completion_ids": p[f"{side}_ids"], "ref_logp": p[f"{side}_ref_logp"], "label": label})
    shift = 2 if len(rows) > 2 else 1
    for i, row in enumerate(rows):
        row["kl_completion_ids"] = rows[(i + shift) % len(rows)]["completion_ids"]
    return rows


def ref_logps(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int, batch_size: int,
              device) -> list[float]:
    """Reference log-prob (summed) of each completion after its prompt."""
    seqs = data.collate(prompts, completions, pad_id)
    with models.autocast(device):
        token = batched_token_logps(model, seqs.to(device), batch_size).cpu()
    return sequence_logps(token, seqs.completion_mask).tolist()


def main(argv=None) -> str:
    p = stage.parser(__doc__, "--prompts", "--sft", "--reward", "--out", "--metrics")
    args = p.parse_args(argv)
    cfg = config.load(args.params)
    c = cfg.pairs
    device = models.setup_torch(cfg.seed, args.sft)
    t0 = time.perf_counter()

    prompts = io.read_jsonl(args.prompts)
    if c.max_prompts:
        prompts = prompts[:c.max_prompts]
    if c.score.verifier > 0:
        rewards.check_references(prompts, cfg.verifier, args.prompts)
    k = c.num_samples
    answers = [prompts[i // k].get("answer") for i in range(len(prompts) * k)]
    tok = models.load_tokenizer(args.sft)
    policy = models.load_causal_lm(args.sft, device, trainable=False)
    rm = models.load_reward_model(args.reward, device) if c.score.reward_model > 0 else None

    with tracking.stage_run("pairs", params={"seed": cfg.seed, **c.model_dump()},
                            deps=[args.sft, args.reward, args.prompts]) as tr, \
            engine.open_engine(cfg.generation, args.sft) as eng:
        t_gen = time.perf_counter()
        with models.autocast(device):
            ans = evaluation.generate(policy, tok, [r["prompt_ids"] for r in prompts], c.max_new_tokens,
                                      c.batch_size, c.temperature, k, cfg.seed, eng)
        t_gen = time.perf_counter() - t_gen
        seqs, truncated = ans.seqs, ans.rollout.truncated.tolist()
        with models.autocast(device):
            scores = rewards.score_completions(c.score, ans.texts, truncated, rewards.group_columns(prompts, k), rm,
                                               seqs, c.batch_size, cfg.verifier, group=k)
        completion_ids = [ids[m.bool()].tolist() for ids, m in zip(seqs.completion_ids, seqs.completion_mask)]
        prompt_ids = [prompts[i // k]["prompt_ids"] for i in range(len(ans.texts))]
        ref = ref_logps(policy, prompt_ids, completion_ids, tok.pad_token_id, c.batch_size, device)  # temperature 1
        samples = [{
            "prompt": prompts[i // k]["prompt"], "prompt_ids": prompt_ids[i], "completion": text,
            "completion_ids": completion_ids[i], "truncated": truncated[i], "ref_logp": ref[i],
            "score": float(scores.total[i]), "verifier": scores.verifier[i], "format": scores.format[i],
            "reward_model": None if scores.reward_model is None else float(scores.reward_model[i]),
        } for i, text in enumerate(ans.texts)]
        pairs, dropped = build_pairs(samples, k, c.truncated, c.truncated_penalty)
        if not pairs:
            cause = rewards.no_signal_cause(scores, answers, c.score)
            if 2 * sum(truncated) > len(truncated):
                cause = f"most completions never ended within pairs.max_new_tokens {c.max_new_tokens} (raise it)"
            why = (f"{dropped['ties']} ties, {dropped['unscorable']} unscorable, "
                   f"{dropped['unfinished']} with no finished completion")
            raise stage.StageFailed(f"pairs: no pair could be formed from {len(prompts)} prompts ({why}): {cause}; "
                                    f"e.g. reply {ans.texts[0][:80]!r}, reference answer {answers[0]!r}")
        pairs = flip(pairs, c.flip_fraction, cfg.seed) if c.flip_fraction else pairs
        kto_rows = unpaired(pairs)
        kl_ref = ref_logps(policy, [r["prompt_ids"] for r in kto_rows], [r["kl_completion_ids"] for r in kto_rows],
                           tok.pad_token_id, c.batch_size, device)
        for row, lp in zip(kto_rows, kl_ref):
            row["kl_ref_logp"] = lp

        n_tokens = int(seqs.completion_mask.sum())
        metrics = {
            "pairs/n_prompts": len(prompts), "pairs/n_samples": len(samples), "pairs/n_pairs": len(pairs),
            "pairs/flipped": round(c.flip_fraction * len(pairs)),
            "pairs/ties_dropped": dropped["ties"], "pairs/unscorable_dropped": dropped["unscorable"],
            "pairs/unfinished_dropped": dropped["unfinished"], "pairs/truncated_dropped": dropped["truncated_dropped"],
            "pairs/truncated_penalized": dropped["truncated_penalized"],
            "pairs/no_reward": scores.n_unscored, "pairs/sample_accuracy": evaluation.accuracy(scores.verifier),
            "pairs/chosen_accuracy": evaluation.accuracy([p["chosen_verifier"] for p in pairs]),
            "pairs/rejected_accuracy": evaluation.accuracy([p["rejected_verifier"] for p in pairs]),
            "pairs/score_mean": float(scores.total.nanmean()), "pairs/truncated": sum(truncated),
            "rollout/length": n_tokens / len(samples), "perf/gen_tokens_per_sec": n_tokens / t_gen,
            "cost/wall_s": time.perf_counter() - t0, "cost/peak_mem_mb": models.peak_mem_mb(device),
            "cost/models_in_memory": 2 if rm is not None else 1, "cost/tokens_generated": n_tokens,
            **(eng.stats if eng else {}),
        }
        metrics = {key: v for key, v in metrics.items() if v is not None}
        if dist.is_main():
            with io.atomic_dir(args.out) as tmp:
                io.write_jsonl(tmp / "samples.jsonl", samples)
                io.write_jsonl(tmp / "pairs.jsonl", pairs)
                io.write_jsonl(tmp / "kto.jsonl", kto_rows)
            io.write_json(args.metrics, metrics)
        tr.log_metrics(metrics)
    return (f"pairs: {len(samples)} samples from {len(prompts)} prompts → {len(pairs)} pairs "
            f"(ties {dropped['ties']}, unscorable {dropped['unscorable']}), {metrics['perf/gen_tokens_per_sec']:.0f} "
            f"generated tokens/s → {args.out}")


if __name__ == "__main__":
    stage.run(main, parallel=True)
