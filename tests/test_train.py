"""Training-loop helpers: exact resume of the data order, guarded steps, schedules, checkpoints."""

import math

import pytest
import torch

from stages.core import config, stage, train


def test_batch_order_depends_only_on_seed_and_step():
    first = [train.batch_indices(10, 4, s, seed=3) for s in range(6)]
    again = [train.batch_indices(10, 4, s, seed=3) for s in range(3, 6)]
    assert first[3:] == again  # a run resumed at step 3 sees the same batches
    epoch0 = sum(first[:2], [])
    assert len(set(epoch0)) == 8  # no repeats inside an epoch (10 // 4 = 2 full batches)
    assert train.batch_indices(10, 4, 0, seed=4) != first[0]


def test_lr_schedule():
    c = config.SFTConfig(lr=1.0, warmup_steps=2, steps=12, schedule="cosine")
    lrs = [train.lr_at(s, c, 12) for s in range(12)]
    assert lrs[:2] == [0.5, 1.0]
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 9 / 10)))
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert train.lr_at(5, config.SFTConfig(lr=0.5, schedule="constant"), 10) == 0.5


def test_guarded_step_drops_nonfinite_updates():
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    step = train.GuardedStep([w], opt, max_grad_norm=10.0, max_skips=2)
    assert math.isnan(step((w * float("nan")).sum(), lr=0.1))
    assert w.tolist() == [1.0, 1.0] and step.skipped == 1  # the NaN update was not applied
    assert w.grad is None
    step((w * 2).sum(), lr=0.1)
    assert w.tolist() == pytest.approx([0.8, 0.8])
    step(torch.tensor(float("inf")), lr=0.1)
    with pytest.raises(stage.StageFailed, match="2 optimizer steps in a row had a non-finite loss"):
        step(torch.tensor(float("nan")), lr=0.1)


def test_checkpoint_resumes_only_its_own_fingerprint(tmp_path):
    inp = tmp_path / "data.jsonl"
    inp.write_text("a\n")
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters())
    ck = train.Checkpoint("sft", {"lr": 1}, [inp], root=tmp_path / "ck")
    ck.maybe_save(4, every=2, total=10, model=model, optimizer=opt, rows=[{"step": 2}])
    ck.maybe_save(5, every=2, total=10, model=model, optimizer=opt, rows=[])  # not a multiple: no save
    fresh = torch.nn.Linear(2, 1)
    start, rows, _ = train.Checkpoint("sft", {"lr": 1}, [inp], root=tmp_path / "ck").resume(
        fresh, torch.optim.AdamW(fresh.parameters()))
    assert (start, rows) == (4, [{"step": 2}])
    assert torch.equal(fresh.weight, model.weight)
    assert train.Checkpoint("sft", {"lr": 2}, [inp], root=tmp_path / "ck").load() is None  # other params
    inp.write_text("b\n")
    assert train.Checkpoint("sft", {"lr": 1}, [inp], root=tmp_path / "ck").load() is None  # other inputs
    ck.clear()
    assert not (tmp_path / "ck" / "sft").exists()


def test_probe_steps():
    assert train.probe_steps(100, 4) == {25, 50, 75, 100}
    assert train.probe_steps(3, 10) == {1, 2, 3}
    assert train.probe_steps(10, 0) == set()
