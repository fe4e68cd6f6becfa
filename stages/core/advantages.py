"""Advantage estimators: group-normalised (GRPO), leave-one-out (RLOO), token returns (REINFORCE++), the
teacher's per-token signal (on-policy distillation), GAE (PPO), whitening.

Rewards may hold NaN for "no reward" (a reward that could not be computed): statistics skip them
and their advantage is 0, so they neither teach nor shift the baseline of the others.
"""

from __future__ import annotations

import torch


def _nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Unbiased (n − 1) standard deviation ignoring NaN (as trl.trainer.utils.nanstd)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    n = (~torch.isnan(x)).sum(dim=dim, keepdim=True) if dim is not None else (~torch.isnan(x)).sum()
    var = torch.nansum((x - mean) ** 2, dim=dim, keepdim=True) / (n - 1).clamp(min=1)
    std = var.sqrt()
    return std if keepdim or dim is None else std.squeeze(dim)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4):
    """GRPO (Shao et al. 2024): A_i = (r_i − mean_group(r)) / (std + ε), std unbiased.

    rewards [N], consecutive blocks of `group_size` share a prompt. scale: "group" (per-group std,
    TRL's default), "batch" (one std over all rewards; still centred per group), "none" (Dr. GRPO:
    no division). A group whose rewards are all equal gets A = 0.  → [N]
    """
    r = rewards.view(-1, group_size)  # [P, K]
    centred = r - torch.nanmean(r, dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (_nanstd(r, dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (_nanstd(r) + eps)
    elif scale != "none":
        raise ValueError(f"unknown scale {scale!r}")
    return torch.nan_to_num(centred.reshape(-1), nan=0.0)


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int, normalize_batch: bool = False,
                             eps: float = 1e-4) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): b_i = (Σ_j r_j − r_i)/(K′ − 1) over the group's K′ scored
    completions, A_i = r_i − b_i. rewards [N] grouped → [N].

    A completion with no reward, or with no scored sibling, carries no signal: its advantage is 0,
    and `normalize_batch` (A − mean)/(std + ε) takes its statistics over the others only (as TRL).
    """
    r = rewards.view(-1, group_size)  # [P, K]
    scored = (~torch.isnan(r)).sum(dim=1, keepdim=True)
    baseline = (torch.nansum(r, dim=1, keepdim=True) - r) / (scored - 1).clamp(min=1)
    adv = torch.where(scored > 1, r - baseline, torch.full_like(r, float("nan"))).reshape(-1)  # NaN: no signal
    if normalize_batch:
        adv = (adv - torch.nanmean(adv)) / (_nanstd(adv) + eps)
    return torch.nan_to_num(adv, nan=0.0)


def rewards_with_kl(rewards: torch.Tensor, old_seq_logps: torch.Tensor, ref_seq_logps: torch.Tensor,
                    beta: float) -> torch.Tensor:
    """RLOO's KL folded into the reward (k1, summed over the sequence): r_i − β (logp_old − logp_ref)."""
    return rewards - beta * (old_seq_logps - ref_seq_logps)


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None, beta: float,
                            group_size: int | None = None) -> torch.Tensor:
    """REINFORCE++ (Hu 2025, arXiv 2501.03262, eq. 5-7): token-level returns of the reward with a per-token KL
    penalty folded in, normalised over the whole batch.

        r_t = −β·KL_t + 1[t = last] · R          (KL_t = logp_old − logp_ref, k1)
        G_t = Σ_{s ≥ t} r_s                      (γ = 1)
        A_t = (G_t − mean) / (std + ε)           (mean, std over every valid token of the batch)

    group_size: the baseline variant (REINFORCE++-baseline, the paper's reasoning setting; OpenRLHF's
    reinforce_baseline) subtracts the group mean from R first. rewards [N] (NaN: no reward; such rows must be
    masked out already), mask [N, T], kl [N, T] or None → [N, T], 0 on padding.
    """
    r = rewards.to(mask.dtype)
    if group_size:
        g = r.view(-1, group_size)
        r = (g - torch.nanmean(g, dim=1, keepdim=True)).reshape(-1)
    r = torch.nan_to_num(r, nan=0.0)
    m = mask.to(r.dtype)
    last = (m.cumsum(-1) == m.sum(-1, keepdim=True)) & (m > 0)  # the last valid token of each row
    token_rewards = -beta * kl * m if kl is not None and beta else torch.zeros_like(m)
    token_rewards = token_rewards + last.to(m.dtype) * r[:, None]
    returns = token_rewards.flip(-1).cumsum(-1).flip(-1) * m  # G_t = Σ_{s ≥ t} r_s
    return whiten(returns, m) * m


def distill_advantages(student_logps: torch.Tensor, teacher_logps: torch.Tensor, mask: torch.Tensor,
                       coef: float = 1.0) -> torch.Tensor:
    """On-policy distillation (Agarwal et al. 2024, GKD, in its per-token reverse-KL form; Thinking Machines'
    "On-policy distillation" and tinker-cookbook's incorporate_kl_penalty): each sampled token's reward is
    the negative per-token reverse-KL estimate, with the batch mean as baseline, no discount.

        d_t = logp_student(y_t) − logp_teacher(y_t)      (a sample of KL(student ‖ teacher) at step t)
        A_t = −coef · (d_t − mean_batch(d))               (mean over every valid token of the batch)

    The student's log-probs are those it sampled with (old), so a token the teacher finds likelier than the
    student did is pushed up. student_logps, teacher_logps, mask [N, T] → [N, T], 0 on padding.
    """
    m = mask.to(student_logps.dtype)
    d = (student_logps - teacher_logps) * m
    mean = d.sum() / m.sum().clamp(min=1)
    return -coef * (d - mean) * m


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise over the masked entries: (x − mean)/sqrt(var + ε), unbiased var; the mean is put
    back when shift_mean is False (used to whiten rewards without moving them)."""
    m = mask.to(x.dtype)
    n = m.sum()
    if n == 0:  # nothing scored: no signal, not NaN
        return torch.zeros_like(x)
    mean = (x * m).sum() / n
    var = (((x - mean) ** 2) * m).sum() / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016) over each sequence's valid tokens.

        δ_t = r_t + γ V_{t+1} − V_t,   Â_t = δ_t + γλ Â_{t+1},   returns R_t = Â_t + V_t

    V after the last valid token is 0. rewards, values, mask [B, T] → (advantages, returns) [B, T],
    0 on padding.
    """
    m = mask.to(values.dtype)
    values = values * m
    adv = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    return adv, (adv + values) * m
