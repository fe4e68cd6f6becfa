"""evaluate@<name>: measure a policy (the SFT baseline or an aligned method) on held-out prompts.

    python -m stages.evaluate dpo --eval data/eval.jsonl --policy models/dpo --ref models/sft --reward models/reward \
        --train-metrics metrics/train_dpo.json --baseline evals/sft.jsonl \
        --out metrics/eval_dpo.json --answers evals/dpo.jsonl

eval/accuracy       greedy answers the verifier accepts (pass@1 of the greedy answer)
eval/pass_at_<k>    pass@k from `evaluate.pass_n` samples per prompt at `pass_temperature` (unbiased estimator)
eval/reward_mean    mean reward-model score of the greedy answers (standardized scale)
eval/win_rate_vs_sft  share of prompts where the answer outscores SFT's under the reward model (tie = ½)
eval/kl_to_ref      KL(π‖π_sft) per completion, on `evaluate.kl_samples` samples per prompt
eval/length         completion tokens of the greedy answers (EOS included)
cost/*              what training the policy cost, copied from its training stage's metrics
"""

from __future__ import annotations

import time

from stages.core import config, dist, engine, evaluation, io, models, rewards, stage, tracking


def win_rate(scores: list[float], baseline: list[float]) -> float:
    """Share of prompts where score beats the baseline's, ties counting one half."""
    wins = [1.0 if s > b + 1e-6 else 0.5 if abs(s - b) <= 1e-6 else 0.0 for s, b in zip(scores, baseline)]
    return sum(wins) / len(wins)


SAMPLES_LOGGED = 100
"""Greedy replies shown as the evaluate run's MLflow table (all of them are in --answers)."""


def main(argv=None) -> str:
    p = stage.parser(__doc__, "--eval", "--policy", "--ref", "--reward", "--train-metrics", "--out", "--answers")
    p.add_argument("name", help="sft, or an alignment method")
    p.add_argument("--baseline", help="the SFT answers (evals/sft.jsonl); omitted when evaluating sft itself")
    args = p.parse_args(argv)
    cfg = config.load(args.params)
    c = cfg.evaluate
    device = models.setup_torch(cfg.seed, args.policy)
    t0 = time.perf_counter()

    rows = io.read_jsonl(args.eval)
    if c.max_prompts:
        rows = rows[:c.max_prompts]
    rewards.check_references(rows, cfg.verifier, args.eval)
    prompt_ids = [r["prompt_ids"] for r in rows]
    tok = models.load_tokenizer(args.policy)
    policy = models.load_causal_lm(args.policy, device, trainable=False)
    rm = models.load_reward_model(args.reward, device)

    with tracking.stage_run("evaluate", method=args.name, deps=[args.policy, args.reward]) as tr, \
            engine.open_engine(cfg.generation, args.policy) as eng:
        with models.autocast(device):
            greedy = evaluation.generate(policy, tok, prompt_ids, c.max_new_tokens, c.batch_size, engine=eng)
            scores = rewards.reward_model_scores(rm, greedy.seqs, c.batch_size)  # [N]
        correct = evaluation.verifier_scores(greedy.texts, [r.get("answer") for r in rows], cfg.verifier)
        lengths = greedy.seqs.completion_mask.sum(-1).float()  # [N]

        if args.baseline:
            sft_scores = [a["reward_model"] for a in io.read_jsonl(args.baseline)][:len(rows)]
            win = win_rate(scores.tolist(), sft_scores)
            ref = models.load_causal_lm(args.ref, device, trainable=False)
            with models.autocast(device):
                sampled = evaluation.generate(policy, tok, prompt_ids, c.max_new_tokens, c.batch_size, 1.0,
                                              c.kl_samples, cfg.seed, eng)
                kl = float(evaluation.kl_to_reference(policy, ref, sampled.seqs, c.batch_size).mean())
        else:  # the SFT policy is the reference: KL 0, and it ties with itself
            win, kl = 0.5, 0.0

        pass_at = {}
        if c.pass_n:
            with models.autocast(device):
                samples = evaluation.generate(policy, tok, prompt_ids, c.max_new_tokens, c.batch_size,
                                              c.pass_temperature, c.pass_n, cfg.seed + 1, eng)
            checked = evaluation.verifier_scores(samples.texts, [r.get("answer") for r in rows], cfg.verifier,
                                                 c.pass_n)
            pass_at = {f"eval/pass_at_{k}": evaluation.mean_pass_at_k(checked, c.pass_n, k) for k in c.pass_k}

        train_metrics = io.read_json(args.train_metrics)
        metrics = {
            "eval/accuracy": evaluation.accuracy(correct), "eval/reward_mean": float(scores.mean()),
            **pass_at, "eval/win_rate_vs_sft": win, "eval/kl_to_ref": kl, "eval/length": float(lengths.mean()),
            "eval/n_prompts": len(rows), "eval/wall_s": time.perf_counter() - t0,
            **{k: v for k, v in train_metrics.items() if k.startswith("cost/")}, **(eng.stats if eng else {}),
        }
        answers = [{"prompt": r["prompt"], "answer": r.get("answer"), "completion": t, "correct": ok,
                    "reward_model": float(s)} for r, t, ok, s in zip(rows, greedy.texts, correct, scores)]
        if dist.is_main():
            io.write_jsonl(args.answers, answers)
            io.write_json(args.out, {k: v for k, v in metrics.items() if v is not None})
        tr.log_metrics({k: v for k, v in metrics.items() if v is not None})
        tr.log_table(answers[:SAMPLES_LOGGED], "samples.json")
    return (f"evaluate@{args.name}: accuracy {metrics['eval/accuracy']:.3f}, reward {metrics['eval/reward_mean']:.3f}, "
            f"win rate vs sft {win:.3f}, KL {kl:.3f} on {len(rows)} held-out prompts")


if __name__ == "__main__":
    stage.run(main, parallel=True)
