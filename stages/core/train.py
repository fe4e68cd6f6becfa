"""Training-loop helpers shared by every stage: optimizer and schedule, a resumable data order,
a guarded optimizer step, checkpoints that resume exactly, and per-step logging.

Checkpoints live in `.checkpoints/<stage>/`, outside DVC's outputs: a `persist: true` output would
switch off DVC's run-cache for the stage (dvc/stage/cache.py `_can_hash`), and restoring a stage
from the run-cache is worth more than tracking a file that only matters while the stage runs. A
checkpoint carries a fingerprint of the stage's params and inputs; a different fingerprint is never
resumed, and the checkpoint is removed once the stage's outputs are written.

ALIGNPIPE_CHECKPOINTS moves them: a directory (a shared filesystem), or a URL (s3://bucket/prefix, any
fsspec store) that every save is uploaded to and a resume downloads from, so a stage retried on another
machine resumes (flows/workers.py sets it for the jobs it dispatches).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import dist, fsdp, models
from .io import atomic_dir
from .stage import StageFailed


def make_optimizer(params, cfg, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW. fused: one kernel over all tensors (7x faster steps for a 135M model on a 2-core CPU: 0.58 s
    against 4.1 s), equal to the reference loop up to the last float bit; callers use it wherever they
    do not compute in exact fp32 (models.exact), so the embedded default's figures stay bit-for-bit."""
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.999), fused=fused or None)
    # the fused kernel leaves torch's version counters as they were: without the hook the vLLM engine
    # (engine.weights_version) would never see an update
    if fused:
        opt.register_step_post_hook(_bump_versions)
    return opt


def _bump_versions(opt, args, kwargs) -> None:
    """After a fused step: mark every parameter modified, as a non-fused step does (no data touched)."""
    from torch.autograd.graph import increment_version

    increment_version([p for group in opt.param_groups for p in group["params"]])


def lr_at(step: int, cfg, total: int) -> float:
    """Learning rate of a 0-based step: linear warm-up, then cosine (to 10%), linear (to 0) or constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return cfg.lr * (1.0 - progress)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def batch_indices(n_rows: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Rows of a 0-based step. The order depends only on (seed, epoch), so a resumed run sees exactly
    the batches the interrupted one would have seen, with no dataloader state to restore."""
    per_epoch = max(1, n_rows // batch_size)
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n_rows, generator=g)
    return perm[k * batch_size:(k + 1) * batch_size].tolist()


@dataclass
class Micro:
    """One forward and backward of an optimizer update. `loss()` → (loss, stats, tokens processed),
    the loss averaged over this micro-batch's own units (tokens, sequences or pairs, as the method's
    loss averages); `share` is this micro-batch's part of the update's units, so that Σ share·loss is
    the loss of the whole batch however it is split (micro_batches)."""

    loss: Callable[[], tuple[torch.Tensor, dict, int]]
    share: float = 1.0


@dataclass
class Plan:
    """What one training step does: its optimizer updates, each a list of micro-batches whose gradients
    add up before the update, and metrics of its own (an online step's rollout)."""

    updates: list[list[Micro]]
    metrics: dict = field(default_factory=dict)
    gen_seconds: float = 0.0
    """Wall time the step spent generating (online methods)."""
    generated: int = 0
    """Completion tokens the step generated."""


def micro_batches(rows: list, micro_batch_size: int, units: list[float] | None = None) -> list[tuple[list, float]]:
    """Split a batch's rows into micro-batches of at most `micro_batch_size` (0: one, or one per process when
    launched on several) → [(rows, share)],
    share = the micro-batch's units / the batch's (units per row: 1 each when None)."""
    size = micro_batch_size or math.ceil(len(rows) / dist.world()) or 1  # launched: one per process
    units = [1.0] * len(rows) if units is None else units
    total = float(sum(units))
    parts = []
    for i in range(0, len(rows), size):
        u = float(sum(units[i:i + size]))
        parts.append((rows[i:i + size], u / total if total else (len(rows[i:i + size]) / len(rows))))
    return parts


class GuardedStep:
    """Accumulate, clip, check, step. A non-finite loss or gradient skips the update (the gradients are
    dropped, not applied) and is counted; `max_skips` in a row stops the stage."""

    def __init__(self, model_params, optimizer, max_grad_norm: float, max_skips: int = 10):
        self.params = [p for p in model_params if p.requires_grad]
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.max_skips = max_skips
        self.skipped = 0
        self._in_a_row = 0

    def update(self, micros: list[Micro], lr: float) -> tuple[float, float, dict, int]:
        """One optimizer update from the summed gradients of its micro-batches → (loss, grad norm (NaN when
        skipped), stats averaged over the micro-batches by share, tokens). Launched on several processes,
        each runs every world-th micro-batch and the gradients are summed across them (dist)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total, stats, weights, tokens, finite = 0.0, {}, {}, 0, True
        sharded = dist.fsdp()
        mine, pads = self._mine(micros, sharded)
        for i, m in enumerate(mine):
            loss, st, n = m.loss()
            tokens += n if i < len(mine) - pads else 0  # a pad's tokens were counted by the process that owns them
            if not torch.isfinite(loss):
                finite = False
                if not sharded:  # under FSDP every process runs every backward pass, in step
                    break
            scale = m.share * dist.world() if sharded else m.share  # FSDP averages the gradients over processes
            (loss * scale if scale != 1.0 else loss).backward()
            total += m.share * loss.item()
            for k, v in st.items():
                if v is not None and not k.startswith("_"):  # _name: for the method's own checks
                    stats[k] = stats.get(k, 0.0) + m.share * float(v)
                    weights[k] = weights.get(k, 0.0) + m.share
        if dist.world() > 1:
            parts = dist.gather((total, stats, weights, tokens, finite))
            total, tokens, finite = sum(p[0] for p in parts), sum(p[3] for p in parts), all(p[4] for p in parts)
            stats = {k: sum(p[1].get(k, 0.0) for p in parts) for k in dict.fromkeys(k for p in parts for k in p[1])}
            weights = {k: sum(p[2].get(k, 0.0) for p in parts) for k in stats}
            if finite and not sharded:
                dist.sum_grads(self.params)
        if not finite:
            return float("nan"), self._skip("loss"), {}, tokens
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP
        if not math.isfinite(grad_norm):
            return total, self._skip("gradient"), {}, tokens
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._in_a_row = 0
        return total, grad_norm, {k: v / weights[k] for k, v in stats.items() if weights[k]}, tokens

    @staticmethod
    def _mine(micros: list[Micro], sharded: bool) -> tuple[list[Micro], int]:
        """This process's micro-batches (every world-th one) and how many pads end the list: under FSDP
        each process must run as many forward and backward passes as the others, so the short ones
        repeat the update's first micro-batch with share 0."""
        mine = micros[dist.rank()::dist.world()]
        pads = -(-len(micros) // dist.world()) - len(mine) if sharded else 0
        return mine + [Micro(micros[0].loss, 0.0)] * pads, pads

    def __call__(self, loss: torch.Tensor, lr: float) -> float:
        """An update from one precomputed loss → grad norm."""
        return self.update([Micro(lambda: (loss, {}, 0))], lr)[1]

    def _skip(self, what: str) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        self._in_a_row += 1
        if self._in_a_row >= self.max_skips:
            raise StageFailed(f"{self._in_a_row} optimizer steps in a row had a non-finite {what} (lower the learning "
                              "rate or check the data); stopped, no model written")
        return float("nan")


# ---------------------------------------------------------------------------------------------- checkpoints

def fingerprint(cfg_dump: dict, inputs: list[str | Path]) -> str:
    """Hash of a stage's params and the content of its input files and directories."""
    h = hashlib.sha256(json.dumps(cfg_dump, sort_keys=True, default=str).encode())
    for root in map(Path, inputs):
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        for f in files:
            if f.is_file():
                h.update(str(f.relative_to(root.parent)).encode())
                h.update(hashlib.md5(f.read_bytes()).digest())
    return h.hexdigest()[:16]


class Checkpoint:
    """A resumable checkpoint of one stage: model, optimizer, step, logged rows and RNG state.

    `stage` names the directory (.checkpoints/<stage>); `cfg_dump` and `inputs` make the fingerprint.
    """

    def __init__(self, stage: str, cfg_dump: dict, inputs: list[str | Path], root: str | Path | None = None):
        root = str(root or os.environ.get("ALIGNPIPE_CHECKPOINTS") or ".checkpoints")
        self.stage = stage
        self.store = f"{root.rstrip('/')}/{stage}" if "://" in root else None  # a URL: the local copy is a cache
        self.dir = Path(".checkpoints" if self.store else root) / stage
        self.fp = fingerprint({**cfg_dump, **({"fsdp": True} if dist.fsdp() else {})}, inputs)  # FSDP's own format

    def resume(self, model, optimizer) -> tuple[int, list[dict], dict]:
        """Restore model and optimizer from a matching checkpoint → (start step, logged rows, extra)."""
        state = self.load()
        if state is None:
            return 0, [], {}
        if fsdp.is_sharded(model):
            fsdp.load(model, optimizer, state["model"], state["optimizer"])
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        print(f"{self.stage}: resuming from step {state['step']} (checkpoint {self.dir})")
        return state["step"], state["rows"], state.get("extra", {})

    def maybe_save(self, step: int, every: int, total: int, model, optimizer, rows: list[dict],
                   extra: Callable[[], dict] | None = None) -> None:
        """Save after 1-based `step` when it is a multiple of `every` (not at the end: outputs are);
        `extra()`: the loop's and the method's own state, asked for only when saving."""
        if step % every == 0 and step < total:
            if fsdp.is_sharded(model):  # gathered by every process, written by the main one
                weights, opt_state = fsdp.full_state(model), fsdp.full_optimizer_state(model, optimizer)
            else:
                weights, opt_state = model.state_dict(), optimizer.state_dict()
            self.save({"step": step, "model": weights, "optimizer": opt_state,
                       "rows": rows, "rng": torch.get_rng_state(), "extra": extra() if extra else {}})

    def load(self) -> dict | None:
        """The saved state, or None when there is none or it belongs to other params/inputs."""
        meta = self.dir / "meta.json"
        if self.store and not (meta.exists() and json.loads(meta.read_text()).get("fingerprint") == self.fp):
            self._download()
        if not meta.exists():
            return None
        if json.loads(meta.read_text()).get("fingerprint") != self.fp:
            return None
        return torch.load(self.dir / "state.pt", weights_only=False)

    def save(self, state: dict) -> None:
        if not dist.is_main():
            return
        with atomic_dir(self.dir) as tmp:
            torch.save(state, tmp / "state.pt")
            (tmp / "meta.json").write_text(json.dumps({"fingerprint": self.fp, "step": state.get("step")}))
        if self.store:
            self._upload(state.get("step"))

    def clear(self) -> None:
        if dist.is_main():
            shutil.rmtree(self.dir, ignore_errors=True)
            if self.store:
                fs, path = _store(self.store)
                if fs.exists(path):
                    fs.rm(path, recursive=True)

    def _upload(self, step: int) -> None:
        """The local checkpoint to the store: the state under a name of its own, then meta.json naming it
        (an object store has no rename: a reader never sees a meta.json whose state is not all there),
        then the older states removed."""
        fs, path = _store(self.store)
        fs.makedirs(path, exist_ok=True)
        name = f"state-{self.fp}-{step}.pt"
        fs.put_file(str(self.dir / "state.pt"), f"{path}/{name}")
        with fs.open(f"{path}/meta.json", "w") as fh:
            fh.write(json.dumps({"fingerprint": self.fp, "step": step, "state": name}))
        for old in fs.ls(path, detail=False):
            if old.rsplit("/", 1)[-1].startswith("state-") and not old.endswith(name):
                fs.rm(old)

    def _download(self) -> None:
        """The store's checkpoint into the local copy, when it has one of these params and inputs."""
        fs, path = _store(self.store)
        if not fs.exists(f"{path}/meta.json"):
            return
        meta = json.loads(fs.cat_file(f"{path}/meta.json"))
        if meta.get("fingerprint") != self.fp:
            return
        with atomic_dir(self.dir) as tmp:
            fs.get_file(f"{path}/{meta['state']}", str(tmp / "state.pt"))
            (tmp / "meta.json").write_text(json.dumps({"fingerprint": self.fp, "step": meta["step"]}))
        print(f"{self.stage}: checkpoint of step {meta['step']} downloaded from {self.store}")


def _store(url: str):
    """(filesystem, path) of a checkpoint store URL (fsspec: s3:// needs s3fs, which dvc-s3 brings)."""
    import fsspec

    return fsspec.core.url_to_fs(url)


def probe_steps(total: int, probes: int) -> set[int]:
    """1-based steps after which the probe runs: `probes` of them, evenly spread, the last one included."""
    if probes <= 0:
        return set()
    return {max(1, round(total * (i + 1) / probes)) for i in range(probes)}


# ---------------------------------------------------------------------------------------------- logging

class StepLog:
    """Per-step metrics → the tracker (every `every` steps), rows for the DVC plot csv, a progress bar."""

    def __init__(self, tracker, total: int, every: int, desc: str, start: int = 0, rows: list[dict] | None = None,
                 tokens: int = 0, seconds: float = 0.0):
        """tokens, seconds: processed and spent before a resume, so throughput counts the whole run."""
        from tqdm.auto import tqdm

        self.tracker, self.every = tracker, every
        self.rows: list[dict] = rows or []
        self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, mininterval=1.0,
                        disable=not dist.is_main())
        self.t0 = time.perf_counter() - seconds
        self.tokens = tokens

    def step(self, step: int, metrics: dict, tokens: int = 0) -> None:
        """Record a 1-based step's metrics; tokens processed feed perf/tokens_per_sec."""
        self.tokens += tokens
        self.bar.update(1)
        always = {k for k in metrics if k.startswith("probe/")}  # rare and costly: never dropped, nor what it cost
        always |= {k for k in metrics if k.startswith("cost/")} if always else set()
        if step % self.every and step != self.bar.total:
            metrics = {k: metrics[k] for k in always}
            if not metrics:
                return
        elapsed = time.perf_counter() - self.t0
        metrics = {k: float(v) for k, v in metrics.items() if v is not None}
        if self.tokens:
            metrics["perf/tokens_per_sec"] = self.tokens / max(elapsed, 1e-9)
        self.rows.append({"step": step, **metrics})
        self.tracker.log_metrics(metrics, step=step)
        self.bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in list(metrics.items())[:3]}, refresh=False)

    def last(self) -> dict:
        """The latest logged value of every metric."""
        out: dict = {}
        for row in self.rows:
            out.update({k: v for k, v in row.items() if k != "step"})
        return out

    def close(self) -> None:
        self.bar.close()


# ---------------------------------------------------------------------------------------------- the loop

@dataclass
class Run:
    """A finished training loop: final metrics, logged rows, and the checkpoint, which the stage clears
    once its outputs are written (a crash while writing them still resumes)."""

    metrics: dict
    rows: list[dict]
    checkpoint: Checkpoint
    prior_s: float
    """Wall seconds of the segments before a resume: a stage's cost/wall_s adds them."""


def fit(name: str, model, c, seed: int, tracker, inputs: list, plan: Callable[[int], Plan], *, steps: int,
        device, t0: float, probe: Callable[[], dict] | None = None, state: Callable[[], dict] | None = None,
        restore: Callable[[dict], None] | None = None) -> Run:
    """The training loop every stage runs: `steps` steps of `plan(step)` (0-based) on `model` with the
    optimizer, schedule, clipping and non-finite guard of section `c`; resume from a matching checkpoint
    in .checkpoints/<name> (fingerprint: seed, `c` and the `inputs` files); `probe()` at c.probes steps;
    per-step metrics (each update's stats averaged over its micro-batches, then over the step's updates)
    to `tracker` and the rows of the plot csv; a checkpoint every c.checkpoint_every steps with
    `state()` (the method's own state: RNG, counters), given back to `restore` on resume. t0: when the
    stage started (perf_counter), so that cost figures add up across resumes."""
    opt = make_optimizer(model.parameters(), c, fused=not models.exact(device))
    guard = GuardedStep(model.parameters(), opt, c.max_grad_norm)
    ckpt = Checkpoint(name, {"seed": seed, **c.model_dump()}, inputs)
    start, logged, extra = ckpt.resume(model, opt)
    if restore is not None and extra:
        restore(extra)
    prior_s = extra.get("elapsed_s", 0.0)
    probe_at = probe_steps(steps, c.probes) if probe is not None else set()
    log = StepLog(tracker, steps, c.log_every, name.replace("align-", "align@"), start, logged,
                  *extra.get("log", (0, 0.0)))
    gen = {"gen_seconds": 0.0, "step_seconds": 0.0, "generated": 0, **extra.get("gen", {})}
    for step in range(start, steps):
        t_step = time.perf_counter()
        p = plan(step)
        lr = lr_at(step, c, steps)
        model.train()
        done = [guard.update(micros, lr) for micros in p.updates]  # [(loss, grad norm, stats, tokens)]
        metrics = {"train/loss": _mean([d[0] for d in done]), "train/lr": lr,
                   "train/grad_norm": _mean([d[1] for d in done])}
        for key in dict.fromkeys(k for d in done for k in d[2]):
            metrics[key] = _mean([d[2][key] for d in done if key in d[2]])
        metrics.update(p.metrics)
        if p.generated:
            step_seconds = time.perf_counter() - t_step
            metrics.update({"perf/gen_share": p.gen_seconds / step_seconds,
                            "perf/rollout_tokens_per_sec": p.generated / max(p.gen_seconds, 1e-9)})
            gen = {"gen_seconds": gen["gen_seconds"] + p.gen_seconds,
                   "step_seconds": gen["step_seconds"] + step_seconds, "generated": gen["generated"] + p.generated}
        if step + 1 in probe_at:  # every process: its generation is sharded
            metrics.update(probe())
        metrics.update({"cost/tokens_generated": gen["generated"], "cost/wall_s": prior_s + time.perf_counter() - t0})
        log.step(step + 1, metrics, tokens=sum(d[3] for d in done))
        ckpt.maybe_save(step + 1, c.checkpoint_every, steps, model, opt, log.rows,
                        lambda: {**(state() if state else {}), "elapsed_s": prior_s + time.perf_counter() - t0,
                                 "log": (log.tokens, time.perf_counter() - log.t0), "gen": gen})
    log.close()
    final = {**log.last(), "train/skipped_steps": guard.skipped, "cost/tokens_generated": gen["generated"]}
    if gen["generated"]:  # over the whole run, not the last step
        final.update({"perf/gen_share": gen["gen_seconds"] / max(gen["step_seconds"], 1e-9),
                      "perf/rollout_tokens_per_sec": gen["generated"] / max(gen["gen_seconds"], 1e-9)})
    return Run(final, log.rows, ckpt, prior_s)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
