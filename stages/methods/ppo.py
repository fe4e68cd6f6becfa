"""RLHF with PPO and a critic (Schulman et al. 2017; Ouyang et al. 2022): four models in memory.

policy (trained), reference (the SFT model, frozen), reward model (frozen) and a value model
(trained). The value model is initialised from the reward model, as in InstructGPT: its backbone and
its scalar head, applied at every position instead of only the last, so V_t starts out as the reward
model's opinion of the prefix.

Per rollout: r_t = −kl_coef·KL_t (k1 or k3 against the reference) on every completion token, plus
the score (reward mix, minus missing_eos_penalty when there is no EOS) on the last one; GAE gives
Â and returns; Â is whitened over valid tokens. Then `num_iterations` epochs × `minibatches` of
clipped policy and value losses, one optimizer over both models. kl_coef is fixed or adapted towards
kl_target (Ziegler et al. 2019).
"""

from __future__ import annotations

from functools import partial

import torch

from stages.core import advantages, evaluation, losses, models, rollout, train
from stages.core.logprobs import position_ids, token_logps
from stages.methods.online import (
    check_signal,
    collect,
    exact_sampler,
    importance,
    load_models,
    micro_split,
    read_prompts,
    rollout_metrics,
    sampler_gap,
)


def token_values(value_model, seqs) -> torch.Tensor:
    """V of the state before each completion token: the head on positions P-1 … P+C-2.  → [B, C]"""
    hidden = models.backbone(value_model)(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask,
                                    position_ids=position_ids(seqs.attention_mask)).last_hidden_state  # [B, T, H]
    n_completion = seqs.input_ids.shape[1] - seqs.prompt_len
    states = hidden[:, seqs.prompt_len - 1:seqs.prompt_len - 1 + n_completion]  # [B, C, H]
    return value_model.score(states).squeeze(-1).float()  # [B, C]


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """−kl_coef·KL_t on every token, + the sequence's score on its last real token.  [B, C]"""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # [B]
    rewards[torch.arange(len(score), device=score.device), last] += score * (mask.sum(-1) > 0)
    return rewards


@torch.no_grad()
def rollout_targets(b, value_model, kl_fn, kl_coef: float, c, device):
    """Old values, per-token KL, whitened GAE advantages and returns of one rollout.  → four [N, C]"""
    mask = b.mask
    with models.autocast(device):
        old_values = token_values(value_model, b.seqs) * mask
    score = torch.nan_to_num(b.scores.total.to(device)) - c.missing_eos_penalty * b.truncated.to(device)
    kl = kl_fn(b.old_logps, b.ref_logps) * mask
    r = token_rewards(score, kl, mask, kl_coef)
    if c.whiten_rewards:
        r = advantages.whiten(r, mask, shift_mean=False) * mask
    adv, returns = advantages.gae(r, old_values, mask, c.gamma, c.lam)
    return old_values, kl, advantages.whiten(adv, mask) * mask, returns


class AdaptiveKL:
    """Ziegler et al. 2019: kl_coef ← kl_coef·(1 + clip(KL/target − 1, ±0.2)·n/horizon)."""

    def __init__(self, coef: float, target: float, horizon: float, adaptive: bool):
        self.coef, self.target, self.horizon, self.adaptive = coef, target, horizon, adaptive

    def update(self, kl: float, n_samples: int) -> None:
        if self.adaptive:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.coef *= 1 + error * n_samples / self.horizon


def fit(method, cfg, args, device, tracker, t0: float, engine=None):
    """PPO from the SFT policy → (model, tokenizer, final metrics, train.Run)."""
    c = cfg.align.method(method.name)
    prompts = read_prompts(args.prompts, c, cfg.verifier)
    probe = prompts[:c.probe_size]
    tok, policy, ref, rm = load_models(cfg, c, args, device, needs_ref=True)
    value_model = models.load_reward_model(args.reward, device, trainable=True)
    value_model = models.disable_dropout(models.for_training(value_model, c, task="SEQ_CLS"))
    both = torch.nn.ModuleDict({"policy": policy, "value": value_model})  # one optimizer, one checkpoint
    kl_ctl = AdaptiveKL(c.kl_coef, c.kl_target, c.kl_horizon, c.adaptive_kl)
    kl_fn = losses.KL_ESTIMATORS[c.kl_estimator]
    seen: list[torch.Tensor] = []  # rewards of the first steps, for check_signal

    def micro(b, targets, idx, first: bool):
        old_values, _, adv, returns = targets
        part, m = b.seqs.select(idx), b.mask[idx]
        with models.autocast(device):
            logps, entropy = token_logps(policy, part, c.temperature, with_entropy=True, chunk=c.logprob_chunk)
            values = token_values(value_model, part)
        stats = {"rollout/logp_gap": sampler_gap(logps, b, idx, strict=exact_sampler(device, engine))} if first else {}
        weight, mismatch = importance(logps, b, idx)
        pg_loss, clipfrac = losses.ppo_policy_loss(logps.float(), b.old_logps[idx], adv[idx], m, c.epsilon, weight)
        stats.update(mismatch)
        vf_loss, vf_clipfrac = losses.ppo_value_loss(values, old_values[idx], returns[idx], m, c.cliprange_value)
        stats.update({"train/pg_loss": pg_loss.item(), "train/vf_loss": vf_loss.item(), "policy/clipfrac": clipfrac,
                      "policy/vf_clipfrac": vf_clipfrac, "policy/entropy": float(losses.masked_mean(entropy, m))})
        return pg_loss + c.vf_coef * vf_loss, stats, int(part.attention_mask.sum())

    def plan(step: int) -> train.Plan:
        rows = [prompts[i] for i in train.batch_indices(len(prompts), c.prompts_per_step, step, cfg.seed)]
        b = collect(policy, ref, rm, tok, rows, c, rollout.stream_seed(cfg.seed, step), device, need_old=True,
                    verifier=cfg.verifier, engine=engine, gen=cfg.generation)
        check_signal(seen, b, step, c, method.name)
        targets = rollout_targets(b, value_model, kl_fn, kl_ctl.coef, c, device)
        kl, mask = targets[1], b.mask
        seq_kl = float(kl.sum(-1)[mask.sum(-1) > 0].mean()) if mask.any() else 0.0  # over scored rows
        kl_ctl.update(seq_kl, len(b.seqs))  # the next rollout's coefficient
        perm = torch.randperm(len(b.seqs), generator=torch.Generator().manual_seed(cfg.seed + step)).to(device)
        updates = [[train.Micro(partial(micro, b, targets, sub, it == 0 and j == 0 and k == 0), share)
                    for k, (sub, share) in enumerate(micro_split(idx, mask[idx].sum(-1).tolist(), c.micro_batch_size))]
                   for it in range(c.num_iterations) for j, idx in enumerate(perm.chunk(c.minibatches))]
        return train.Plan(updates, {**rollout_metrics(b, c.num_generations), "policy/kl": seq_kl,
                                    "policy/kl_coef": kl_ctl.coef}, b.gen_seconds, b.n_tokens)

    def probe_fn() -> dict:
        probe_len = c.probe_max_new_tokens or c.max_new_tokens
        return {"probe/accuracy": evaluation.probe_accuracy(policy, tok, probe, probe_len, c.gen_batch_size,
                                                            cfg.verifier, engine)}

    def restore(extra: dict) -> None:
        kl_ctl.coef = extra["kl_coef"]

    run = train.fit(f"align-{method.name}", both, c, cfg.seed, tracker, [args.prompts, args.sft, args.reward], plan,
                    steps=c.steps, device=device, t0=t0, probe=probe_fn, restore=restore,
                    state=lambda: {"kl_coef": kl_ctl.coef})
    return policy, tok, {**run.metrics, "cost/models_in_memory": 3 if c.lora.r else 4}, run
