"""Losses as pure functions of log-probs and rewards.

Each returns per-example (or per-token) losses and detached statistics; the caller reduces. Notation
(shared/ALGORITHMS.md): logp(y|x) is the SUM of per-token log-probs over completion tokens and
ρ = logp_θ(y|x) − logp_ref(y|x).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1 (all of them, or along `dim`)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def sft_loss(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on response tokens only: −mean over completion tokens of log p(y_t | x, y_<t).

    token_logps [B, C], mask [B, C] → scalar. Prompt tokens never enter (they are not in [B, C]).
    """
    return -masked_mean(token_logps, mask)


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | None = None, center_coef: float = 0.0):
    """Reward-model loss (Bradley & Terry 1952; Ouyang et al. 2022, arXiv 2203.02155 eq. 1).

        L_i = −log σ(r_c − r_r − m)  +  c · (r_c + r_r)²

    chosen_rewards, rejected_rewards [B] → (losses [B], accuracies [B] = 1[r_c > r_r], detached).
    The centering term (Eisenstein et al. 2023) keeps rewards near zero; c = 0 turns it off.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)
    if center_coef:
        losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2
    return losses, (chosen_rewards > rejected_rewards).float().detach()


def dpo_loss(pi_chosen_logps: torch.Tensor, pi_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float, label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023, arXiv 2305.18290, eq. 7), conservative with label smoothing ε.

        Δ = (logp_θ(y_c) − logp_ref(y_c)) − (logp_θ(y_r) − logp_ref(y_r))
        L = −(1 − ε) log σ(βΔ) − ε log σ(−βΔ)

    All inputs [B] sequence log-probs → (losses [B], chosen_rewards [B], rejected_rewards [B]),
    rewards = β ρ, detached (the implicit reward TRL logs as rewards/chosen, rewards/rejected).
    ε = 0 is plain DPO. TRL ≥ 0.29 ignores ε for the sigmoid loss; we keep the conservative form
    (TRL ≤ 0.28, OpenRLHF, torchtune).
    """
    chosen_ratio = pi_chosen_logps - ref_chosen_logps
    rejected_ratio = pi_rejected_logps - ref_rejected_logps
    logits = beta * (chosen_ratio - rejected_ratio)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def ipo_loss(pi_chosen_logps: torch.Tensor, pi_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor,
             beta: float, length_normalize: bool = True):
    """IPO (Azar et al. 2023, arXiv 2310.12036, eq. 17): regress the log-ratio margin onto 1/(2β).

        h = ρ_c/|y_c| − ρ_r/|y_r|      (length_normalize: TRL's form; the IPO authors confirmed it)
        h = ρ_c − ρ_r                  (summed: OpenRLHF's form; differs by the completion lengths)
        L = (h − 1/(2β))²

    Inputs [B] (lengths: completion tokens) → (losses [B], chosen_rewards [B], rejected_rewards [B]),
    rewards = β·ρ (summed), detached.
    """
    chosen_ratio = pi_chosen_logps - ref_chosen_logps
    rejected_ratio = pi_rejected_logps - ref_rejected_logps
    if length_normalize:
        h = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
    else:
        h = chosen_ratio - rejected_ratio
    losses = (h - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def simpo_loss(pi_chosen_logps: torch.Tensor, pi_rejected_logps: torch.Tensor,
               chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor,
               beta: float, gamma: float, label_smoothing: float = 0.0):
    """SimPO (Meng et al. 2024, arXiv 2405.14734, eq. 6): reference-free, the margin of the length-normalised
    log-likelihoods against a target margin γ.

        h = logp_θ(y_c)/|y_c| − logp_θ(y_r)/|y_r|
        L = −(1 − ε) log σ(βh − γ) − ε log σ(−(βh − γ))

    Inputs [B] (lengths: completion tokens) → (losses [B], chosen_rewards [B], rejected_rewards [B]),
    rewards = β·logp/|y|, detached (TRL's CPOTrainer with loss_type="simpo": its logits are h − γ/β).
    """
    avg_c = pi_chosen_logps / chosen_lengths.clamp(min=1)
    avg_r = pi_rejected_logps / rejected_lengths.clamp(min=1)
    logits = beta * (avg_c - avg_r) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * avg_c.detach(), beta * avg_r.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, stable at both ends (Mächler 2012): log(−expm1(x)) above −ln 2, else
    log1p(−exp(x)). x is capped at −1e-6 first: a completion the model is certain of (every token's
    log-prob rounds to 0 in fp32) would give log 0 = −inf and a NaN loss; TRL's has no cap."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(pi_chosen_logps: torch.Tensor, pi_rejected_logps: torch.Tensor,
              chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, lam: float):
    """ORPO (Hong et al. 2024, arXiv 2403.07691, eq. 6-7): SFT on the chosen completion plus the odds-ratio
    term, reference-free. With p̄(y) = exp(logp_θ(y)/|y|) (the per-token mean, as the paper and TRL),

        log odds(y) = log p̄(y) − log(1 − p̄(y))
        L = −logp_θ(y_c)/|y_c|  −  λ · log σ(log odds(y_c) − log odds(y_r))

    Inputs [B] → (losses [B], chosen_rewards [B], rejected_rewards [B]), rewards = λ·logp/|y| detached
    (TRL's ORPOTrainer logs these). The SFT term is each pair's per-token mean (the paper, LLaMA-Factory);
    TRL's ORPOTrainer takes the token mean over all chosen completions of the batch instead, which weighs
    long completions more (equal lengths: the same).
    """
    avg_c = pi_chosen_logps / chosen_lengths.clamp(min=1)
    avg_r = pi_rejected_logps / rejected_lengths.clamp(min=1)
    log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
    losses = -avg_c - lam * F.logsigmoid(log_odds)
    return losses, lam * avg_c.detach(), lam * avg_r.detach()


def kto_loss(pi_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             pi_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """KTO (Ethayarajh et al. 2024, arXiv 2402.01306, eq. 7-8) on unpaired examples.

        z0  = max(0, mean over mismatched pairs (x_i, y_j≠i) of logp_θ(y_j|x_i) − logp_ref(y_j|x_i)), detached
        L_D = λ_D (1 − σ(β(ρ − z0)))     for desirable y
        L_U = λ_U (1 − σ(β(z0 − ρ)))     for undesirable y

    pi_logps, ref_logps, desirable (bool) [B]; pi_kl_logps, ref_kl_logps [M] (the mismatched pairs)
    → (losses [B], rewards [B] = β·ρ detached, z0 scalar). The caller's mean over B matches TRL's
    mean over concat(λ_D L_D, λ_U L_U).
    """
    z0 = (pi_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()
    ratio = pi_logps - ref_logps
    desirable_loss = desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0)))
    undesirable_loss = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio)))
    losses = torch.where(desirable, desirable_loss, undesirable_loss)
    return losses, beta * ratio.detach(), z0


def kto_weight_ratio_ok(n_desirable: int, n_undesirable: int, desirable_weight: float,
                        undesirable_weight: float) -> tuple[bool, float]:
    """The KTO paper's eq. 8 range: λ_D·n_D / (λ_U·n_U) in [1, 4/3] → (inside?, ratio). TRL warns outside."""
    ratio = (desirable_weight * max(n_desirable, 1)) / (undesirable_weight * max(n_undesirable, 1))
    return 1.0 <= ratio <= 4 / 3 + 1e-9, ratio


# ---------------------------------------------------------------------------------------------- online RL

def kl_k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k1 estimator of KL(π‖π_ref) per token: logp_θ − logp_ref (unbiased, can be negative)."""
    return logps - ref_logps


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k3 estimator (Schulman 2020) per token: exp(logp_ref − logp_θ) − (logp_ref − logp_θ) − 1 ≥ 0."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float):
    """PPO's clipped objective as a loss: −min(r·A, clip(r, 1−ε_low, 1+ε_high)·A), elementwise.
    → (loss, clipped: 1 where the clipped term was the one taken)."""
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * advantages
    return -torch.min(unclipped, clipped), (clipped < unclipped).float().detach()


def aggregate_tokens(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str,
                     max_completion_length: int | None = None, batch_tokens: float | None = None) -> torch.Tensor:
    """Reduce per-token losses [B, T] to a scalar (the GRPO family's choices, as in TRL):

        grpo     mean over sequences of (Σ_t loss / |y_i|)                (Shao et al. 2024);
                 a sequence with no valid token (no reward) is not counted
        bnpo     Σ loss / tokens in this (micro-)batch
        dr_grpo  Σ loss / (B × max_completion_length)                      (Liu et al. 2025, Dr. GRPO)
        dapo     Σ loss / batch_tokens, the tokens of the whole generation batch divided by the number
                 of optimizer steps it feeds (Yu et al. 2025, DAPO; TRL's default)
    """
    mask = mask.to(per_token.dtype)
    total = (per_token * mask).sum()
    if loss_type == "grpo":
        lengths = mask.sum(-1)
        return ((per_token * mask).sum(-1) / lengths.clamp(min=1)).sum() / (lengths > 0).sum().clamp(min=1)
    if loss_type == "bnpo":
        return total / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return total / (per_token.shape[0] * max_completion_length)
    if loss_type == "dapo":
        return total / max(batch_tokens, 1.0)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def generalized_jsd(student_logps: torch.Tensor, teacher_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """The generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 1) per position, between the
    student's and the teacher's next-token distributions over the whole vocabulary.  [B, T, V] log-probs → [B, T]

        M = β·T + (1 − β)·S,   JSD_β = β·KL(T ‖ M) + (1 − β)·KL(S ‖ M)

    with TRL's GKDTrainer convention at the ends: β = 0 is the forward KL(T ‖ S), β = 1 the reverse KL(S ‖ T)
    (the mixture form would give 0 there). The teacher's side carries no gradient."""
    s, t = student_logps.float(), teacher_logps.float().detach()

    def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:  # KL(p ‖ q) from log-probs
        return (p.exp() * (p - q)).sum(-1)

    if beta == 0.0:
        return kl(t, s)
    if beta == 1.0:
        return kl(s, t)
    m = torch.logsumexp(torch.stack([s + math.log1p(-beta), t + math.log(beta)]), dim=0)
    return beta * kl(t, m) + (1 - beta) * kl(s, m)


def token_units(mask: torch.Tensor, loss_type: str) -> list[float] | None:
    """What each sequence counts for in aggregate_tokens's mean, so that micro-batches weighted by their
    share of these units add up to the whole batch's loss: tokens (bnpo), sequences with tokens (grpo),
    sequences (dr_grpo); None for dapo, already divided by the whole generation batch's tokens.  [B, C] → [B]"""
    lengths = mask.sum(-1)
    if loss_type == "bnpo":
        return lengths.tolist()
    if loss_type == "grpo":
        return (lengths > 0).float().tolist()
    if loss_type == "dr_grpo":
        return [1.0] * len(lengths)
    return None


def truncated_is_weight(trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, cap: float,
                        level: str = "token") -> tuple[torch.Tensor, dict]:
    """Truncated importance sampling (TIS; Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"; TRL's vllm_importance_sampling_correction, verl's rollout_is): the rollout was
    drawn by another engine (π_sampler) than the one the loss differentiates (π_trainer, at sampling time),
    so each token's policy loss is weighted by

        token:     w_t = min(exp(logp_trainer_t − logp_sampler_t), C)
        sequence:  w   = min(exp(Σ_t (logp_trainer_t − logp_sampler_t)), C)   (one weight for every token)

    trainer_logps, sampler_logps, mask [B, T] → (weight [B, T] (sequence: [B, 1]), detached, 0 where masked
    at token level; stats: mean |Δ log p| over the tokens, the share of weights capped, the mean weight).
    """
    diff = (trainer_logps.detach().float() - sampler_logps.float()) * mask  # [B, T]
    if level == "sequence":
        weight = torch.exp(diff.sum(-1, keepdim=True)).clamp(max=cap)  # [B, 1]
        rows = (mask.sum(-1) > 0).float()[:, None]  # [B, 1]
        capped = masked_mean((weight >= cap).float(), rows)
        mean_w = masked_mean(weight, rows)
    else:
        weight = torch.exp(diff).clamp(max=cap) * mask  # [B, T]
        capped = masked_mean((weight >= cap).float(), mask)
        mean_w = masked_mean(weight, mask)
    stats = {"rollout/sampler_logp_gap": float(masked_mean(diff.abs(), mask)), "rollout/tis_capped": float(capped),
             "rollout/tis_weight": float(mean_w)}
    return weight, stats


def sequence_ratio(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's importance ratio (Zheng et al. 2025, arXiv 2507.18071, eq. 7): the length-normalised
    geometric mean of the token ratios, s_i = exp((1/|y_i|) Σ_t (logp_θ − logp_old)).  [B, T] → [B, 1]"""
    log_ratio = ((logps - old_logps) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return torch.exp(log_ratio)[:, None]


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, eps_low: float, eps_high: float, beta: float,
              loss_type: str, max_completion_length: int | None = None, batch_tokens: float | None = None,
              is_weight: torch.Tensor | None = None, level: str = "token"):
    """GRPO (Shao et al. 2024, arXiv 2402.03300, eq. 3) per token, then aggregated.

        r_t = exp(logp_θ − logp_old)
        ℓ_t = −min(r_t A, clip(r_t, 1−ε_low, 1+ε_high) A) + β·k3_t      (k3 to the reference)

    level "sequence" is GSPO (Zheng et al. 2025): every token of sequence i takes the sequence ratio s_i
    (sequence_ratio), clipped per sequence; TRL's importance_sampling_level="sequence".
    logps, old_logps, ref_logps, mask [B, T]; advantages [B] (per sequence) or [B, T] (per token:
    REINFORCE++) → (loss, stats) with stats detached: clipfrac (share of tokens where clipping bound),
    kl (mean k3 per token).
    The KL term is the textbook k3; TRL 1.16 multiplies it by r_t by default (use_bias_correction_kl).
    is_weight [B, T] or [B, 1]: the rollout's truncated importance weight (truncated_is_weight), which
    multiplies the policy term, not the KL (as TRL).
    """
    ratio = sequence_ratio(logps, old_logps, mask) if level == "sequence" else torch.exp(logps - old_logps)
    per_token, clipped = clipped_surrogate(ratio, advantages if advantages.dim() == 2 else advantages[:, None],
                                           eps_low, eps_high)
    loss, kl = weighted_with_kl(per_token, is_weight, logps, ref_logps, beta, mask, loss_type, max_completion_length,
                                batch_tokens)
    return loss, {"clipfrac": masked_mean(clipped, mask).item(), "kl": kl}


def weighted_with_kl(per_token, is_weight, logps, ref_logps, beta: float, mask, loss_type: str,
                     max_completion_length: int | None, batch_tokens: float | None) -> tuple[torch.Tensor, float]:
    """The GRPO family's tail: the policy term times the rollout's importance weight, plus β·k3 to the
    reference, aggregated over tokens → (loss, mean k3 per token, detached)."""
    if is_weight is not None:
        per_token = per_token * is_weight
    kl = kl_k3(logps, ref_logps) if ref_logps is not None else torch.zeros_like(logps)
    if beta:
        per_token = per_token + beta * kl
    loss = aggregate_tokens(per_token, mask, loss_type, max_completion_length, batch_tokens)
    return loss, masked_mean(kl.detach(), mask).item()


def cispo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
               advantages: torch.Tensor, mask: torch.Tensor, eps_max: float, beta: float, loss_type: str,
               max_completion_length: int | None = None, batch_tokens: float | None = None,
               is_weight: torch.Tensor | None = None):
    """CISPO (MiniMax-M1, arXiv 2506.13585, eq. 4) per token, then aggregated: the importance weight is
    clipped and detached and multiplies the log-probability, so a token whose ratio is clipped still
    passes its gradient (a PPO-clipped token passes none).

        ℓ_t = −sg(min(r_t, ε_max)) · A · logp_θ(y_t) + β·k3_t

    Only the upper bound, as TRL 1.16's loss_type="cispo" (its epsilon_high is ε_max; ScaleRL, arXiv
    2510.13786, and TRL recommend 5.0); the paper's lower bound is left unset there too.
    Shapes and stats as grpo_loss; clipfrac: the share of tokens whose weight was capped with A > 0 (TRL's
    cispo_clip_ratio).
    """
    ratio = torch.exp(logps - old_logps)
    adv = advantages if advantages.dim() == 2 else advantages[:, None]
    per_token = -torch.clamp(ratio, max=eps_max).detach() * adv * logps
    loss, kl = weighted_with_kl(per_token, is_weight, logps, ref_logps, beta, mask, loss_type, max_completion_length,
                                batch_tokens)
    capped = ((ratio > eps_max) & (adv > 0)).float()
    return loss, {"clipfrac": masked_mean(capped, mask).item(), "kl": kl}


def rloo_loss(seq_logps: torch.Tensor, old_seq_logps: torch.Tensor, advantages: torch.Tensor,
              eps_low: float, eps_high: float, is_weight: torch.Tensor | None = None):
    """RLOO's policy loss (Ahmadian et al. 2024, arXiv 2402.14740; TRL ≥ 0.22): a sequence-level
    clipped ratio, r_i = exp(logp_θ(y_i) − logp_old(y_i)), ℓ_i = −min(r_i A_i, clip(r_i) A_i).

    [B] summed log-probs and advantages → (losses [B], clipped [B] detached). The KL lives in the
    reward (see rewards_with_kl), not in the loss. is_weight [B]: the sequence-level truncated importance
    weight of a rollout from another engine (truncated_is_weight).
    """
    loss, clipped = clipped_surrogate(torch.exp(seq_logps - old_seq_logps), advantages, eps_low, eps_high)
    return (loss * is_weight if is_weight is not None else loss), clipped


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    eps: float, is_weight: torch.Tensor | None = None):
    """PPO's clipped policy loss per token (Schulman et al. 2017, eq. 7), masked mean over tokens:
    masked_mean(max(−Â r_t, −Â clip(r_t, 1−ε, 1+ε))).  [B, T] → (loss, clipfrac). is_weight [B, T] or
    [B, 1]: a rollout's truncated importance weight (truncated_is_weight)."""
    per_token, clipped = clipped_surrogate(torch.exp(logps - old_logps), advantages, eps, eps)
    if is_weight is not None:
        per_token = per_token * is_weight
    return masked_mean(per_token, mask), masked_mean(clipped, mask).item()


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   eps_value: float):
    """PPO's clipped value loss: 0.5 · masked_mean(max((V − R)², (clip(V, V_old ± ε_v) − R)²)).
    [B, T] → (loss, clipfrac: share of tokens where the clipped error was larger)."""
    clipped_values = old_values + torch.clamp(values - old_values, -eps_value, eps_value)
    err, err_clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * masked_mean(torch.max(err, err_clipped), mask), masked_mean((err_clipped > err).float(), mask).item()
