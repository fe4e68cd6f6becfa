"""Online RL without a critic: GRPO, RLOO, GSPO, CISPO, REINFORCE++, and on-policy distillation (its teacher
scores the sampled tokens where the others' reference does). Each step samples `num_generations` completions of
`prompts_per_step` prompts from the current policy (KV cache), scores them (verifier, reward model,
format or a mix), turns rewards into advantages and takes clipped policy-gradient steps.

`collect` (sample + score + old/ref log-probs) is shared with PPO (stages/methods/ppo.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from stages.core import advantages, evaluation, io, lora, losses, models, rewards, rollout, stage, train
from stages.core.logprobs import Sequences, batched_token_logps, picked, sequence_logps, token_logps, vocab_logps


@dataclass
class Batch:
    """One generation batch of N = prompts × num_generations completions, grouped by prompt.

    seqs:        Sequences [N, P+C] on the training device
    mask:        [N, C] completion mask, zeroed for completions with no reward (excluded from the loss)
    sample_logps: [N, C] the sampler's log-probs of the drawn tokens (checked against the trainer's)
    old_logps:   [N, C] the trainer's log-probs before this step's first update (temperature-scaled), or
                 None when the batch feeds a single update and nothing else needs them: the loss then
                 uses the detached current log-probs, so the ratio is exactly 1 (as TRL)
    ref_logps:   [N, C] under the reference (SFT) model, or None when no reference is held
    scores:      rewards.Scores of the N completions (total [N], NaN = no reward)
    truncated:   [N] bool, no EOS
    gen_seconds: wall time spent generating
    texts:       the N completions as text
    answers:     the N reference answers (None: none to check against)
    engine:      the generation params when the rollout came from another engine than the trainer (vLLM):
                 the mismatch is then measured and, unless generation.tis is off, corrected (importance)
    metrics:     the engine's own figures (start, weight pushes)
    """

    seqs: Sequences
    mask: torch.Tensor
    sample_logps: torch.Tensor
    old_logps: torch.Tensor | None
    ref_logps: torch.Tensor | None
    scores: rewards.Scores
    truncated: torch.Tensor
    gen_seconds: float
    texts: list[str]
    answers: list[str | None]
    engine: object = None
    metrics: dict | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.seqs.completion_mask.sum())


def read_prompts(path: str, c, verifier) -> list[dict]:
    """The training prompts; their reference answers checked readable when the reward uses the verifier."""
    prompts = io.read_jsonl(path)
    if c.reward.verifier > 0:
        rewards.check_references(prompts, verifier, path)
    return prompts


def load_models(cfg, c, args, device, needs_ref: bool, teacher: str | None = None):
    """(tokenizer, policy, reference or None, reward model or None) for an online method. With LoRA the
    reference is the policy with its adapter disabled, not a second model. teacher: a model directory held
    in the reference's place (on-policy distillation); it must share the student's vocabulary."""
    tok = models.load_tokenizer(args.sft)
    policy = models.disable_dropout(models.for_training(models.load_causal_lm(args.sft, device), c))
    ref = None
    if teacher:
        if models.load_tokenizer(teacher).get_vocab() != tok.get_vocab():
            raise stage.StageFailed(f"teacher {teacher}: its tokenizer differs from the student's ({args.sft}); "
                                    "the teacher scores the student's tokens, so both need one vocabulary")
        ref = models.load_causal_lm(teacher, device, trainable=False)
    elif needs_ref:
        ref = lora.AdapterOff(policy) if c.lora.r else models.load_causal_lm(args.sft, device, trainable=False)
    rm = models.load_reward_model(args.reward, device) if c.reward.reward_model > 0 else None
    return tok, policy, ref, rm


@torch.no_grad()
def collect(policy, ref, rm, tok, rows: list[dict], c, seed: int, device, need_old: bool, verifier=None,
            engine=None, gen=None) -> Batch:
    """Sample, score and measure a generation batch from the current policy (seed: names the random
    streams of its completions, rollout.sample; in a launched stage every process samples and scores its
    share and gets the whole batch back, dist.map_rows). need_old: compute the
    old log-probs with the trainer's forward pass (not the sampler's: under bf16 the KV-cache decode
    and the full forward differ, and the ratio must be exactly 1 before the first update).
    engine: the vLLM engine (None: our sampler) with `gen` its params (the loss then measures and corrects
    the sampler/trainer mismatch: importance)."""
    k = c.num_generations
    t0 = time.perf_counter()
    with models.autocast(device):
        ans = evaluation.generate(policy, tok, [r["prompt_ids"] for r in rows], c.max_new_tokens,
                                  c.gen_batch_size, c.temperature, k, seed, engine)
    gen_seconds = time.perf_counter() - t0
    seqs = ans.seqs.to(device)
    columns = rewards.group_columns(rows, k)
    truncated = ans.rollout.truncated
    with models.autocast(device):
        scores = rewards.score_completions(c.reward, ans.texts, truncated.tolist(), columns, rm, seqs,
                                           c.gen_batch_size, verifier, group=k)
        ref_logps = batched_token_logps(ref, seqs, c.gen_batch_size, c.temperature) if ref is not None else None
        old_logps = batched_token_logps(policy, seqs, c.gen_batch_size, c.temperature) if need_old else None
    scored = ~torch.isnan(scores.total)
    mask = seqs.completion_mask.float() * scored.to(device)[:, None]
    return Batch(seqs, mask, ans.rollout.sample_logps.to(device), old_logps, ref_logps, scores, truncated,
                 gen_seconds, ans.texts, columns["answer"], gen if engine is not None else None,
                 dict(engine.stats) if engine is not None else None)


def importance(logps, b: Batch, idx, level: str | None = None) -> tuple[torch.Tensor | None, dict]:
    """The truncated importance weight of rows `idx` of a rollout from vLLM ([b, C], or [b, 1] at sequence
    level; None with our sampler or generation.tis off) and the mismatch (rollout/sampler_logp_gap, the
    share of capped weights, the mean weight). The trainer's side is its log-probs at sampling time: the
    stored old ones, or, when the batch feeds one update, the current ones detached (the same weights, so
    no extra forward pass is spent on them). level: the method's own (RLOO: sequence), else generation.tis."""
    if b.engine is None:
        return None, {}
    gen = b.engine
    level = level or (gen.tis if gen.tis != "off" else "token")
    weight, stats = losses.truncated_is_weight(old_logps(logps, b, idx), b.sample_logps[idx], b.mask[idx],
                                               gen.tis_cap, level)
    return (weight if gen.tis != "off" else None), stats


def zero_std_fraction(total: torch.Tensor, k: int) -> float:
    """Share of the groups of k completions whose scored rewards are all equal (or fewer than two
    scored): their group-relative advantage is 0, so they teach nothing.  total: [N], NaN = no reward"""
    groups = total.view(-1, k)
    flat = [g[~torch.isnan(g)] for g in groups]
    return sum(len(g) < 2 or float(g.max() - g.min()) <= 1e-6 for g in flat) / len(flat)


def rollout_metrics(b: Batch, k: int) -> dict:
    total = b.scores.total
    m = {"rollout/reward_mean": float(total.nanmean()), "rollout/length": b.n_tokens / len(total),
         "rollout/no_reward": b.scores.n_unscored, "rollout/truncated": int(b.truncated.sum()),
         "rollout/zero_std_frac": zero_std_fraction(total, k)}
    if int((~torch.isnan(total)).sum()) > 1:
        m["rollout/reward_std"] = float(total[~torch.isnan(total)].std())
    acc = evaluation.accuracy(b.scores.verifier)
    if acc is not None:
        m["rollout/accuracy"] = acc
    return {**m, **(b.metrics or {})}


def check_signal(seen: list[torch.Tensor], b: Batch, step: int, c, method: str) -> None:
    """Stop when every reward of the first `c.no_signal_steps` steps was the same value: no advantage,
    no gradient, nothing learned; say the likely cause and show a reply next to its reference answer.
    `seen` collects the rewards of those steps (a resumed run past them does not check again)."""
    if step >= c.no_signal_steps:
        return
    seen.append(b.scores.total)
    if step + 1 < c.no_signal_steps:
        return
    total = torch.cat(seen)
    scored = total[~torch.isnan(total)]
    if len(scored) and float(scored.max() - scored.min()) > 1e-6:
        return
    i = next((j for j, t in enumerate(b.texts) if t.strip()), 0)
    example = f"reply {b.texts[i][:80]!r}, reference answer {b.answers[i]!r}"
    cause = rewards.no_signal_cause(b.scores, b.answers, c.reward)
    raise stage.StageFailed(f"align@{method}: every reward of the first {c.no_signal_steps} steps was "
                            f"{float(scored[0]) if len(scored) else float('nan'):g} ({len(total)} completions), "
                            f"nothing to learn from: {cause}; e.g. {example}")


def exact_sampler(device, engine) -> bool:
    """Whether the sampler's log-probs must equal the trainer's (a gap is then an error): fp32 training with
    our sampler or a float32 vLLM engine."""
    return models.exact(device) and (engine is None or engine.dtype == "float32")


def sampler_gap(logps: torch.Tensor, b: Batch, idx, strict: bool, tol: float = 1e-3) -> float:
    """Largest difference between the trainer's log-probs of the sampled tokens and the sampler's,
    before any update of this step: they are the same weights, so a gap means the sampler used
    stale weights or another temperature (TRL #5312). An error in fp32; reported under autocast."""
    gap = float(((logps.detach().float() - b.sample_logps[idx]).abs() * b.mask[idx]).max())
    if gap > tol and strict:
        raise stage.StageFailed(f"the trainer's log-probs of the sampled tokens differ from the sampler's by {gap:.3g}")
    return gap


# ---------------------------------------------------------------------------------------------- methods

def grpo_advantages(b: Batch, c) -> tuple[torch.Tensor, dict]:
    return advantages.group_advantages(b.scores.total, c.num_generations, c.scale_rewards).to(b.mask.device), {}


def rloo_advantages(b: Batch, c) -> tuple[torch.Tensor, dict]:
    """Leave-one-out on rewards with the k1 sequence KL folded in (r − β·Σ_t (logp_old − logp_ref))."""
    r = b.scores.total.to(b.mask.device)
    stats = {}
    if b.ref_logps is not None:
        old_seq, ref_seq = sequence_logps(b.old_logps, b.mask), sequence_logps(b.ref_logps, b.mask)  # [N]
        r = advantages.rewards_with_kl(r, old_seq, ref_seq, c.beta)
        stats["policy/kl"] = float((old_seq - ref_seq)[b.mask.sum(-1) > 0].mean())
    return advantages.leave_one_out_advantages(r, c.num_generations, c.normalize_advantages), stats


def old_logps(logps, b: Batch, idx) -> torch.Tensor:
    """The ratio's denominator: the stored old log-probs, or the detached current ones (one update)."""
    return b.old_logps[idx] if b.old_logps is not None else logps.detach()


def grpo_loss(logps, b: Batch, idx, adv, c, batch_tokens):
    ref = b.ref_logps[idx] if b.ref_logps is not None else None
    weight, mismatch = importance(logps, b, idx)
    loss, stats = losses.grpo_loss(logps, old_logps(logps, b, idx), ref, adv[idx], b.mask[idx], c.epsilon,
                                   c.epsilon_high, c.beta, c.loss_type, c.max_new_tokens, batch_tokens, weight)
    return loss, {**stats, **mismatch}


def grpo_units(b: Batch, idx, c) -> list[float] | None:
    return losses.token_units(b.mask[idx], c.loss_type)


def gspo_loss(logps, b: Batch, idx, adv, c, batch_tokens):
    """GRPO's loss with the sequence-level ratio (GSPO); a vLLM rollout's importance weight is per sequence too."""
    ref = b.ref_logps[idx] if b.ref_logps is not None else None
    weight, mismatch = importance(logps, b, idx, "sequence")
    loss, stats = losses.grpo_loss(logps, old_logps(logps, b, idx), ref, adv[idx], b.mask[idx], c.epsilon,
                                   c.epsilon_high, c.beta, c.loss_type, c.max_new_tokens, batch_tokens, weight,
                                   level="sequence")
    return loss, {**stats, **mismatch}


def cispo_loss(logps, b: Batch, idx, adv, c, batch_tokens):
    ref = b.ref_logps[idx] if b.ref_logps is not None else None
    weight, mismatch = importance(logps, b, idx)
    loss, stats = losses.cispo_loss(logps, old_logps(logps, b, idx), ref, adv[idx], b.mask[idx], c.epsilon_max,
                                    c.beta, c.loss_type, c.max_new_tokens, batch_tokens, weight)
    return loss, {**stats, **mismatch}


def reinforce_pp_advantages(b: Batch, c) -> tuple[torch.Tensor, dict]:
    """Token-level returns with the k1 KL (logp_old − logp_ref) folded into the reward, normalised over the
    batch; baseline "group" subtracts each prompt's mean reward first."""
    kl, stats = None, {}
    if b.ref_logps is not None:
        kl = (b.old_logps - b.ref_logps) * b.mask  # [N, C]
        stats["policy/kl"] = float(kl.sum(-1)[b.mask.sum(-1) > 0].mean())
    group = c.num_generations if c.baseline == "group" else None
    return advantages.reinforce_pp_advantages(b.scores.total.to(b.mask.device), b.mask, kl, c.beta, group), stats


def distill_advantages(b: Batch, c) -> tuple[torch.Tensor, dict]:
    """−coef·(logp_student − logp_teacher − batch mean) per sampled token (the batch's ref_logps are the
    teacher's). A teacher that scores every token as the student does has nothing to teach: an error."""
    diff = (b.old_logps - b.ref_logps) * b.mask
    if float(diff.abs().max()) <= 1e-6:
        raise stage.StageFailed("the teacher scores every sampled token exactly as the student does (is the teacher "
                                "the SFT policy itself?): nothing to distill")
    kl = diff.sum(-1)[b.mask.sum(-1) > 0]
    return advantages.distill_advantages(b.old_logps, b.ref_logps, b.mask, c.coef), {
        "distill/reverse_kl": float(kl.mean())}


def distill_loss(logps, b: Batch, idx, adv, c, batch_tokens, vocab=None):
    """divergence reverse_kl: REINFORCE++'s clipped token loss on distill_advantages. jsd: GKD's generalized JSD
    at each sampled position over the whole vocabulary (vocab: the student's and the teacher's log-distributions),
    aggregated as loss_type says; no ratio and no importance weight (a vLLM rollout's mismatch changes which
    positions are visited, not the divergence at them: it is measured, not weighted)."""
    if c.divergence == "reverse_kl":
        return reinforce_pp_loss(logps, b, idx, adv, c, batch_tokens)
    _, mismatch = importance(logps, b, idx)
    mask = b.mask[idx]
    per_token = losses.generalized_jsd(*vocab, c.jsd_beta)
    loss = losses.aggregate_tokens(per_token, mask, c.loss_type, c.max_new_tokens, batch_tokens)
    return loss, {"distill/jsd": losses.masked_mean(per_token.detach(), mask).item(), **mismatch}


def reinforce_pp_loss(logps, b: Batch, idx, adv, c, batch_tokens):
    """PPO's clipped surrogate per token on the token advantages; the KL is in the reward, not the loss
    (REINFORCE++'s to the reference, distillation's to the teacher)."""
    weight, mismatch = importance(logps, b, idx)
    loss, stats = losses.grpo_loss(logps, old_logps(logps, b, idx), None, adv[idx], b.mask[idx], c.epsilon,
                                   c.epsilon_high, 0.0, c.loss_type, c.max_new_tokens, batch_tokens, weight)
    return loss, {"clipfrac": stats["clipfrac"], **mismatch}


def rloo_loss(logps, b: Batch, idx, adv, c, batch_tokens):
    mask = b.mask[idx]
    weight, mismatch = importance(logps, b, idx, "sequence")  # its ratio and loss are per sequence
    per_seq, clipped = losses.rloo_loss(sequence_logps(logps, mask), sequence_logps(old_logps(logps, b, idx), mask),
                                        adv[idx], c.epsilon, c.epsilon_high,
                                        weight.squeeze(-1) if weight is not None else None)
    keep = (mask.sum(-1) > 0).float()  # sequences with a reward; none at all gives 0, not NaN
    return losses.masked_mean(per_seq, keep), {"clipfrac": losses.masked_mean(clipped.float(), keep).item(), **mismatch}


def rloo_units(b: Batch, idx, c) -> list[float]:
    return (b.mask[idx].sum(-1) > 0).float().tolist()


def micro_split(idx: torch.Tensor, units: list[float] | None, micro_batch_size: int) -> list[tuple]:
    """A minibatch's rows (indices into the generation batch) as micro-batches with their shares
    (train.micro_batches); units None: each micro-batch's loss is already normalized by the whole
    batch (dapo), so they add up with share 1."""
    parts = train.micro_batches(idx.tolist(), micro_batch_size, units)
    return [(torch.tensor(part, device=idx.device), 1.0 if units is None else share) for part, share in parts]


def fit(method, cfg, args, device, tracker, t0: float, engine=None):
    """Online RL from the SFT policy with `method` (a registry record: its advantages(batch, cfg), loss(logps,
    batch, rows, advantages, cfg, batch_tokens), units(batch, rows, cfg) and whether it needs a reference and
    the old log-probs before training; a batch used for more than one update always needs them)
    → (model, tokenizer, final metrics, train.Run)."""
    c = cfg.align.method(method.name)
    advantage_fn, loss_fn, units_fn = method.advantages, method.loss, method.units
    full_vocab = method.full_vocab(c)
    need_old = method.needs_old_logps(c) or c.num_iterations > 1 or c.minibatches > 1
    prompts = read_prompts(args.prompts, c, cfg.verifier)
    probe = prompts[:c.probe_size]
    tok, policy, ref, rm = load_models(cfg, c, args, device, method.needs_reference(c),
                                       args.teacher if method.teacher else None)
    seen: list[torch.Tensor] = []  # rewards of the first steps, for check_signal

    def micro(b: Batch, idx, adv, batch_tokens: float, first: bool):
        seqs, extra = b.seqs.select(idx), {}
        with models.autocast(device):
            if full_vocab:  # the loss compares whole next-token distributions (the policy's and the held model's)
                vocab = vocab_logps(policy, seqs, c.temperature)
                with torch.no_grad():
                    extra["vocab"] = (vocab, vocab_logps(ref, seqs, c.temperature))
                logps, entropy = picked(vocab, seqs)
            else:
                logps, entropy = token_logps(policy, seqs, c.temperature, with_entropy=True, chunk=c.logprob_chunk)
        stats = {"rollout/logp_gap": sampler_gap(logps, b, idx, strict=exact_sampler(device, engine))} if first else {}
        loss, st = loss_fn(logps.float(), b, idx, adv, c, batch_tokens, **extra)
        stats.update({"policy/clipfrac": st.get("clipfrac"), "policy/kl": st.get("kl"),
                      "policy/entropy": float(losses.masked_mean(entropy, b.mask[idx])),
                      **{k: v for k, v in st.items() if "/" in k}})  # the sampler mismatch, the method's own
        return loss, stats, int(b.seqs.attention_mask[idx].sum())

    def plan(step: int) -> train.Plan:
        rows = [prompts[i] for i in train.batch_indices(len(prompts), c.prompts_per_step, step, cfg.seed)]
        b = collect(policy, ref, rm, tok, rows, c, rollout.stream_seed(cfg.seed, step), device, need_old, cfg.verifier,
                    engine, cfg.generation)
        check_signal(seen, b, step, c, method.name)
        adv, adv_stats = advantage_fn(b, c)
        parts = torch.arange(len(b.seqs), device=device).chunk(c.minibatches)
        batch_tokens = float(b.mask.sum()) / len(parts)  # dapo: tokens per optimizer step of this generation batch
        updates = [[train.Micro(partial(micro, b, sub, adv, batch_tokens, it == 0 and j == 0 and k == 0), share)
                    for k, (sub, share) in enumerate(micro_split(idx, units_fn(b, idx, c), c.micro_batch_size))]
                   for it in range(c.num_iterations) for j, idx in enumerate(parts)]
        return train.Plan(updates, {**rollout_metrics(b, c.num_generations), **adv_stats}, b.gen_seconds, b.n_tokens)

    def probe_fn() -> dict:
        probe_len = c.probe_max_new_tokens or c.max_new_tokens
        return {"probe/accuracy": evaluation.probe_accuracy(policy, tok, probe, probe_len, c.gen_batch_size,
                                                            cfg.verifier, engine)}

    name = f"{method.name}@{Path(args.teacher).name}" if method.teacher else f"align-{method.name}"  # the stage's name
    inputs = [args.prompts, args.sft, *([args.reward] if rm is not None else []),
              *([args.teacher] if method.teacher else [])]  # a checkpoint resumes only with the same inputs
    run = train.fit(name, policy, c, cfg.seed, tracker, inputs, plan, steps=c.steps, device=device, t0=t0,
                    probe=probe_fn)
    held = 1 + (ref is not None and (method.teacher or not c.lora.r)) + (rm is not None)  # a LoRA reference: the policy
    return policy, tok, {**run.metrics, "cost/models_in_memory": held}, run
