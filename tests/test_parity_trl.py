"""Our losses against TRL 1.16's own code on identical inputs (fp32, within 1e-5; values and grads)."""

from types import SimpleNamespace

import pytest
import torch

from stages.core import losses
from tests.trl_oracle import FusedLM, layout, trainer_self

trl = pytest.importorskip("trl")
TOL = 1e-5


def grads(loss, *leaves):
    return torch.autograd.grad(loss, leaves)


@pytest.fixture
def paired():
    """3 pairs of completions (rows: chosen then rejected) with ragged lengths, per-token log-probs."""
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0],
                         [1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    policy = (-2 * torch.rand(6, 5, generator=g)).requires_grad_()
    ref = -2 * torch.rand(6, 5, generator=g)
    return mask, policy, ref


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_trl(paired, beta):
    from trl import DPOTrainer

    mask, policy, ref = paired
    ids, am, cm = layout(mask)
    s = trainer_self(beta=beta, loss_types=["sigmoid"], loss_weights=[1.0], ld_alpha=None, precompute_ref_logps=True,
                     f_divergence_type="reverse_kl", label_smoothing=0.0, use_weighting=False)
    ref_seq = (ref * mask).sum(1)
    inputs = dict(input_ids=ids, attention_mask=am, completion_mask=cm,
                  ref_chosen_logps=ref_seq[:3], ref_rejected_logps=ref_seq[3:])
    trl_loss = DPOTrainer._compute_loss(s, FusedLM([(ids, policy)]), inputs, return_outputs=False)

    pi = (policy * mask).sum(1)
    per_pair, r_c, r_r = losses.dpo_loss(pi[:3], pi[3:], ref_seq[:3], ref_seq[3:], beta)
    ours = per_pair.mean()
    assert ours.item() == pytest.approx(trl_loss.item(), abs=TOL)
    assert torch.allclose(grads(ours, policy)[0], grads(trl_loss, policy)[0], atol=TOL)
    m = {k: v[-1] for k, v in s._metrics["train"].items()}
    assert r_c.mean().item() == pytest.approx(m["rewards/chosen"], abs=TOL)
    assert r_r.mean().item() == pytest.approx(m["rewards/rejected"], abs=TOL)
    assert (r_c - r_r).mean().item() == pytest.approx(m["rewards/margins"], abs=TOL)
    assert (r_c > r_r).float().mean().item() == pytest.approx(m["rewards/accuracies"], abs=TOL)


@pytest.mark.parametrize("center", [None, 0.01])
@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry_matches_trl_reward_trainer(center, with_margin):
    from trl import RewardTrainer

    g = torch.Generator().manual_seed(1)
    scores = torch.randn(8, generator=g).requires_grad_()  # rows: 4 chosen then 4 rejected (TRL's layout)
    margin = torch.tensor([0.5, 0.0, 1.0, 0.2])

    class ScoreModel(torch.nn.Module):
        def forward(self, **_):
            return SimpleNamespace(logits=scores[:, None])

    s = trainer_self()
    s.args = SimpleNamespace(center_rewards_coefficient=center)
    inputs = dict(input_ids=torch.ones(8, 3, dtype=torch.long), attention_mask=torch.ones(8, 3, dtype=torch.long))
    if with_margin:
        inputs["margin"] = margin
    trl_loss = RewardTrainer.compute_loss(s, ScoreModel(), inputs)
    per_pair, _ = losses.bradley_terry_loss(scores[:4], scores[4:], margin if with_margin else None, center or 0.0)
    ours = per_pair.mean()
    assert ours.item() == pytest.approx(trl_loss.item(), abs=TOL)
    assert torch.allclose(grads(ours, scores)[0], grads(trl_loss, scores)[0], atol=TOL)
