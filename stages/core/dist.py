"""Several processes for one stage: N CPU processes (gloo) or N GPUs (NCCL), the same code either way.

How many is the machine's business, not a param, so the same params give the same artifacts on a
laptop and on an 8-GPU worker: ALIGNPIPE_PROCESSES, else `num_processes` in the machine's accelerate
config (what `accelerate config` writes: $HF_HOME/accelerate/default_config.yaml, by default
~/.cache/huggingface/accelerate/default_config.yaml), else 1. A stage started as `python -m stages.X`
(by `dvc repro`, say) starts its N processes itself (`launch`); each runs the same code on its share
of every optimizer update's micro-batches, their gradients are summed across processes before the
update (so the update is the one a single process makes on the whole batch), and only the main
process writes outputs, checkpoints, metrics and MLflow runs. Generation and the no-grad scoring
passes (reference log-probs, reward-model scores) are sharded too: each process computes a contiguous
share of the rows (`share`, `map_rows`) and every process gets all of them back, so what follows is
the same on every process.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

_MAX_BUCKET = 1 << 24  # gradient elements per all-reduce


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def machine_config() -> tuple[Path, dict]:
    """The machine's accelerate config (what `accelerate config` writes) → (its path, its settings;
    {} when there is none)."""
    from .config import ConfigError

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    home = Path(os.environ.get("HF_HOME", cache / "huggingface"))
    path = Path(os.environ.get("ACCELERATE_CONFIG_FILE", home / "accelerate" / "default_config.yaml"))
    if not path.exists():
        return path, {}
    import yaml

    try:
        settings = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        settings = None
    if not isinstance(settings, dict):
        raise ConfigError(f"{path}: not a readable accelerate config (a YAML mapping)")
    return path, settings


def wanted_processes() -> int:
    """Processes this machine runs a stage on: ALIGNPIPE_PROCESSES, else its accelerate config's num_processes."""
    from .config import ConfigError

    if os.environ.get("ALIGNPIPE_PROCESSES"):
        try:
            return max(1, int(os.environ["ALIGNPIPE_PROCESSES"]))
        except ValueError:
            raise ConfigError(f"ALIGNPIPE_PROCESSES: {os.environ['ALIGNPIPE_PROCESSES']!r} is not a number") from None
    path, settings = machine_config()
    try:
        return max(1, int(settings.get("num_processes") or 1))
    except (ValueError, TypeError):
        raise ConfigError(f"{path}: num_processes is not a number (the machine's accelerate config)") from None


@functools.cache
def _fsdp_wanted() -> bool:
    flag = os.environ.get("ALIGNPIPE_FSDP")
    if flag:
        return flag.lower() in ("1", "true", "yes")
    return str(machine_config()[1].get("distributed_type", "")).upper() == "FSDP"


def fsdp() -> bool:
    """Launched with the model's weights, gradients and optimizer state sharded across the processes
    (FSDP, stages/core/fsdp.py) rather than copied on each: ALIGNPIPE_FSDP=1, or `distributed_type: FSDP`
    in the machine's accelerate config."""
    return world() > 1 and _fsdp_wanted()


def launch(module: str, argv: list[str], n: int) -> int:
    """Run `python -m module argv` as n processes on this machine and wait → the exit code. The main
    process speaks for the stage (its summary line or its one-line error); another's error is shown
    only when the main one did not fail first. A failed process stops the others."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // n))
    logs, procs = [], []
    for r in range(n):
        env = {**os.environ, "WORLD_SIZE": str(n), "RANK": str(r), "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": threads}
        log = None if r == 0 else tempfile.TemporaryFile(mode="w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, "-m", module, *argv], env=env, preexec_fn=_die_with_parent,
                                      stdout=None if r == 0 else subprocess.DEVNULL, stderr=log))
    codes: list[int | None] = [None] * n
    failed_at = None
    try:
        while any(c is None for c in codes):
            for i, p in enumerate(procs):
                if codes[i] is None:
                    codes[i] = p.poll()
            if failed_at is None and any(codes):
                failed_at = time.monotonic()  # the others likely fail the same way: give them time to say so
            if failed_at is not None and time.monotonic() - failed_at > 10:
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
            time.sleep(0.05)
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    if codes[0] and codes[0] > 0:  # the main process failed and said why
        return codes[0]
    for i, code in enumerate(codes):
        if code and i:
            logs[i].seek(0)
            lines = [x for x in logs[i].read().splitlines() if x.strip()]
            print(f"error: process {i} of {n}: {lines[-1] if lines else f'exited {code}'}", file=sys.stderr)
            return code if code > 0 else 1
    return 1 if codes[0] else 0


def _die_with_parent() -> None:
    """Linux: a process of a launched stage is killed when the launcher dies (a killed `dvc repro`
    leaves no orphan training on)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def init(device: torch.device) -> None:
    """Join the process group of a launched stage (no-op alone): NCCL on CUDA, gloo on the CPU."""
    if world() > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             rank=rank(), world_size=world())


def local_device(device: torch.device) -> torch.device:
    """cuda → this process's own GPU (cuda:LOCAL_RANK) when launched; anything else unchanged."""
    if device.type == "cuda" and device.index is None and world() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def sum_grads(params: list[torch.Tensor]) -> None:
    """Sum every parameter's gradient over the processes, in place (a process that ran no micro-batch
    of this update contributes zeros), in buckets of flattened gradients."""
    if world() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets: list[list[torch.Tensor]] = [[]]
    size = 0
    for p in params:
        if buckets[-1] and size + p.numel() > _MAX_BUCKET:
            buckets.append([])
            size = 0
        buckets[-1].append(p.grad)
        size += p.numel()
    for grads in buckets:
        if not grads:
            continue
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def gather(obj) -> list:
    """Every process's `obj` (picklable), in rank order; [obj] alone."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    torch.distributed.all_gather_object(out, obj)
    return out


def share(n: int, group: int = 1) -> slice:
    """This process's contiguous share of n rows, in whole groups of `group` rows (a prompt's
    completions stay together); shares differ in size by at most one group."""
    if n % group:
        raise ValueError(f"{n} rows are not whole groups of {group}")
    groups, r, w = n // group, rank(), world()
    return slice(groups * r // w * group, groups * (r + 1) // w * group)


def lockstep(count: int) -> int:
    """The number of forward passes this process runs for its `count`: under FSDP every pass is a
    collective (each gathers the layers' weights from all processes), so each runs as many as the
    busiest one, repeating a pass and dropping its result where it has fewer (a collective); otherwise
    count."""
    return max(gather(count)) if fsdp() else count


def any_process(flag: bool, device) -> bool:
    """flag on any process (a collective under FSDP, where a decode loop goes on while any process has
    a row still generating); otherwise this process's flag."""
    if not fsdp():
        return flag
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def map_rows(fn, n: int, batch: int | None = None, group: int = 1, device=None):
    """fn(rows: slice) on this process's share of n rows, every process's results gathered in order:
    tensors concatenated along dim 0 (on `device`, else the CPU), lists joined. Every process must call
    it (a collective). batch: fn runs forward passes on `batch` rows at a time, and under FSDP (where a
    forward pass is a collective) each process makes as many calls as the busiest one (lockstep);
    None: one call on the whole share, for an fn that runs no model."""
    mine = share(n, group)
    size = batch or max(1, mine.stop - mine.start)
    starts = range(mine.start, mine.stop, size)
    extra = lockstep(len(starts)) - len(starts) if batch else 0  # before any pass: FSDP's collectives in order
    parts = [fn(slice(i, min(i + size, mine.stop))) for i in starts]
    for _ in range(extra):
        fn(slice(0, 1))  # in step with the others; the result is not this process's
    if world() == 1:
        return _join(parts)
    out = _join(parts) if parts else None
    parts = [p for p in gather(out.cpu() if isinstance(out, torch.Tensor) else out) if p is not None]
    return _join(parts, device or "cpu")


def _join(parts: list, device=None):
    if parts and isinstance(parts[0], torch.Tensor):
        return torch.cat(parts).to(device) if device else torch.cat(parts)
    return [x for p in parts for x in p]


def barrier() -> None:
    if world() > 1:
        torch.distributed.barrier()
