"""Losses as pure functions of log-probs and rewards.

Each returns per-example (or per-token) losses and detached statistics; the caller reduces. Notation
(shared/ALGORITHMS.md): logp(y|x) is the SUM of per-token log-probs over completion tokens and
ρ = logp_θ(y|x) − logp_ref(y|x).
"""

from __future__ import annotations

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
