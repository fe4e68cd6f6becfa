"""Training modes against the mode they must equal, through the stages' real entry points on the tiny
model (fp32): gradient accumulation (micro_batch_size) against the whole batch at once, for every
training stage and loss aggregation; chunked log-probs and gradient checkpointing against neither.

Tolerance: the split changes only the order of float additions (padding to a micro-batch's own
longest row changes no value: positions and attention ignore pads), so after a few AdamW steps the
weights agree to ~1e-7; 2e-5 leaves room for another CPU's kernels while a wrong share (a
micro-batch weighted 1/k too much or too little) moves them by > 1e-3.
"""

import json
import shutil

import pytest
import torch

from stages import align, reward, sft
from tests.test_methods import align_args, upstream  # noqa: F401  (the fixture)
from tests.test_stages import smoke_params, weights

pytestmark = pytest.mark.smoke
TOL = 2e-5

SFT_ARGS = ["--train", "data/sft.jsonl", "--probe", "data/prompts.jsonl", "--base", "models/base"]
REWARD_ARGS = ["--pairs", "data/preference.jsonl", "--sft", "models/sft", "--base", "models/base"]


def trained(d, monkeypatch, tag: str, section: str, keep: bool = False, **settings):
    """Run one training stage in-process with `settings` in its params section → (its saved weights, its
    metrics); the output directory models/<tag> is removed unless `keep`."""
    monkeypatch.chdir(d)
    params = d / "params.yaml"
    backup = params.read_text()
    smoke_params(params, **{f"{section}.{k}": v for k, v in settings.items()})
    out = f"models/{tag}"
    try:
        if section == "sft":
            sft.main(SFT_ARGS + ["--out", out, "--metrics", f"{out}.json", "--plots", f"{out}.csv"])
        elif section == "reward":
            reward.main(REWARD_ARGS + ["--out", out, "--metrics", f"{out}.json", "--plots", f"{out}.csv"])
        else:
            align.main(align_args(section.split(".")[1], out))
    finally:
        params.write_text(backup)
    w = weights(d / out) if (d / out / "model.safetensors").exists() else {}
    if not keep:
        shutil.rmtree(d / out)
    return w, json.loads((d / f"{out}.json").read_text())


def max_gap(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


ACCUMULATION = [
    ("sft", {"steps": 4}, 5),  # 16 examples as 5 + 5 + 5 + 1, token-mean loss
    ("reward", {"steps": 4}, 6),
    ("align.dpo", {"steps": 3, "lr": 1e-3}, 3),
    ("align.ipo", {"steps": 3, "lr": 1e-3}, 3),
    ("align.kto", {"steps": 3, "lr": 1e-3}, 3),  # z0 from the whole batch
    ("align.grpo", {"steps": 2, "lr": 1e-3, "reward": {"reward_model": 1.0, "verifier": 1.0}}, 5),  # dapo
    ("align.grpo", {"steps": 2, "lr": 1e-3, "loss_type": "grpo", "reward": {"reward_model": 1.0}}, 5),
    ("align.grpo", {"steps": 2, "lr": 1e-3, "loss_type": "bnpo", "reward": {"reward_model": 1.0}}, 5),
    ("align.grpo", {"steps": 2, "lr": 1e-3, "loss_type": "dr_grpo", "reward": {"reward_model": 1.0}}, 5),
    ("align.rloo", {"steps": 2, "lr": 1e-3, "reward": {"reward_model": 1.0}}, 3),
    ("align.ppo", {"steps": 2, "lr": 1e-3}, 3),
    ("align.simpo", {"steps": 3, "lr": 1e-3}, 3),
    ("align.orpo", {"steps": 3, "lr": 1e-3}, 3),
    ("align.gspo", {"steps": 2, "lr": 1e-3, "reward": {"reward_model": 1.0}, "epsilon": 0.05, "epsilon_high": 0.05}, 3),
    ("align.cispo", {"steps": 2, "lr": 1e-3, "reward": {"reward_model": 1.0}, "epsilon_max": 1.05}, 3),  # dapo
    ("align.reinforce_pp", {"steps": 2, "lr": 1e-3, "reward": {"reward_model": 1.0}}, 5),
    ("align.distill", {"steps": 2, "lr": 1e-3}, 5),
    ("align.distill", {"steps": 2, "lr": 1e-3, "divergence": "jsd"}, 5),  # the whole-vocabulary divergence
]


@pytest.mark.parametrize("section, settings, micro", ACCUMULATION,
                         ids=[f"{s}-{v.get('loss_type', v.get('divergence', ''))}".rstrip("-")
                              for s, v, _ in ACCUMULATION])
def test_accumulation_equals_the_whole_batch(upstream, monkeypatch, section, settings, micro):  # noqa: F811
    whole, m_whole = trained(upstream, monkeypatch, "whole", section, **settings)
    split, m_split = trained(upstream, monkeypatch, "split", section, **settings, micro_batch_size=micro)
    start = weights(upstream / ("models/base" if section == "sft" else "models/sft"))
    moved = max(float((whole[k] - start[k]).abs().max()) for k in whole if k in start)
    assert moved > 100 * TOL  # training did move the weights
    assert max_gap(whole, split) < TOL
    # AdamW is blind to a gradient's scale; the loss and the gradient norm are not
    for key in ("train/loss", "train/grad_norm"):
        assert m_split[key] == pytest.approx(m_whole[key], rel=1e-4, abs=1e-6), key


def test_a_wrong_share_would_be_caught(upstream, monkeypatch):  # noqa: F811
    """The tolerance is tight enough: weighting micro-batches equally instead of by their tokens (a
    plausible bug) moves SFT's weights by far more than TOL."""
    from stages.core import train

    whole, _ = trained(upstream, monkeypatch, "whole", "sft", steps=4)
    real = train.micro_batches
    monkeypatch.setattr(train, "micro_batches", lambda rows, size, units=None: [
        (part, 1 / len(real(rows, size))) for part, _ in real(rows, size)])
    wrong, _ = trained(upstream, monkeypatch, "wrong", "sft", steps=4, micro_batch_size=5)
    assert max_gap(whole, wrong) > 50 * TOL


@pytest.mark.parametrize("section, settings", [
    ("sft", {"steps": 3}), ("align.dpo", {"steps": 3}),
    ("align.grpo", {"steps": 2, "reward": {"reward_model": 1.0}}),
])
def test_chunked_logprobs_and_gradient_checkpointing_change_nothing(upstream, monkeypatch, section, settings):  # noqa: F811
    plain, _ = trained(upstream, monkeypatch, "plain", section, **settings)
    other, _ = trained(upstream, monkeypatch, "other", section, **settings, logprob_chunk=2,
                       gradient_checkpointing=True)
    assert max_gap(plain, other) < TOL


def test_chunked_token_logps_and_gradients(tiny_model, tok):
    """token_logps with chunk: the same values, entropies and gradients as in one piece."""
    from stages.core import data
    from stages.core.logprobs import token_logps

    seqs = data.collate([[1, 5, 6], [7]], [[8, 9, 10, 11, 12], [13, 14]], tok.pad_token_id)
    results = []
    for chunk in (0, 2):
        tiny_model.zero_grad()
        logps, entropy = token_logps(tiny_model, seqs, temperature=0.7, with_entropy=True, chunk=chunk)
        logps.sum().backward()
        grads = [p.grad.clone() for p in tiny_model.parameters() if p.grad is not None]
        results.append((logps.detach(), entropy, grads))
    tiny_model.zero_grad()
    (a, ea, ga), (b, eb, gb) = results
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(ea, eb, atol=1e-6)
    assert len(ga) == len(gb) and all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ga, gb))
