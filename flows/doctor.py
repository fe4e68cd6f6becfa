"""`alignpipe doctor`: what this machine and checkout have for each part of the pipeline, found the way
the stages find it (the same functions), with what to do where something is missing or will be slow.

Each line: `ok`, `--` (works, with a limit worth knowing) or `!!` (a stage that needs it will fail).
"""

from __future__ import annotations

import os
import platform
import urllib.request
from pathlib import Path


def report(repo: Path) -> str:
    lines = [f"alignpipe doctor: {platform.node()}, Python {platform.python_version()}, in {repo}", ""]
    for check in (params, device, processes, sandbox, engine, dvc_remote, mlflow, prefect):
        try:
            lines += [f"{mark} {name:<11} {text}" for mark, name, text in check(repo)]
        except Exception as e:  # a check that breaks says so and the others still run
            lines.append(f"!! {check.__name__:<11} could not be checked: {str(e).splitlines()[0] if str(e) else e!r}")
    return "\n".join(lines) + "\n"


def params(repo: Path):
    from stages.core import config

    path = repo / "params.yaml"
    if not path.exists():
        yield "!!", "params", f"no params.yaml in {repo}: run from a checkout (or a workspace it made)"
        return
    try:
        cfg = config.load(str(path))
    except config.ConfigError as e:
        yield "!!", "params", str(e)
        return
    model = cfg.model.name_or_path
    yield "ok", "params", (f"params.yaml is valid: model {model}, methods {', '.join(cfg.align.methods)}"
                           + (f", distilled from {', '.join(cfg.align.distill.teachers)}" if cfg.align.distill.teachers
                              else ""))


def device(repo: Path):
    import torch

    from stages.core import models

    d = models.pick_device()
    if d.type == "cuda":
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        bf16 = torch.cuda.is_bf16_supported()
        yield "ok", "device", f"CUDA: {torch.cuda.device_count()} × {', '.join(names)} (torch {torch.__version__})"
        yield ("ok" if bf16 else "--"), "precision", ("bf16 autocast, fp32 weights" if bf16 else
                                                       "fp32: this GPU has no bf16 (slower, more activation memory)")
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    build = f"torch {torch.__version__}" + (", a CUDA build" if torch.version.cuda else "")
    yield "--", "device", (f"CPU, {cores} cores ({build}): fine for the embedded default; a real model wants a GPU "
                           "(ALIGNPIPE_DEVICE picks one)")
    fast = models.cpu_has_fast_bf16()
    yield ("ok" if fast else "--"), "precision", (
        "bf16 autocast for models of 64 MiB or more (this CPU has AMX or AVX-512-BF16)" if fast else
        "fp32 (no AMX or AVX-512-BF16 on this CPU: bf16 would be emulated, slower than fp32)")


def processes(repo: Path):
    from stages.core import dist

    path, settings = dist.machine_config()
    n = dist.wanted_processes()
    source = ("ALIGNPIPE_PROCESSES" if os.environ.get("ALIGNPIPE_PROCESSES") else
              str(path) if settings else "no accelerate config")
    sharding = "FSDP (weights, gradients and optimizer state sharded)" if dist._fsdp_wanted() else "data parallel"
    yield "ok", "processes", (f"{n} per stage ({source})" + (f", {sharding}" if n > 1 else
                              "; `accelerate config` (num_processes, distributed_type FSDP) runs stages on several"))


def sandbox(repo: Path):
    from stages.core import sandbox as sb

    iso = sb.isolation()
    whole = iso.landlock and iso.namespaces and iso.process_limit
    yield ("ok" if whole else "--"), "sandbox", (f"the code verifier runs generated code with {iso.describe()}"
                                                 + ("" if whole else " (a kernel or container setting; only the code "
                                                                     "task runs generated code)"))


def engine(repo: Path):
    from stages.core import config
    from stages.core import engine as eng

    chosen = "hf"
    if (repo / "params.yaml").exists():
        try:
            chosen = config.load(str(repo / "params.yaml")).generation.engine
        except config.ConfigError:
            pass
    py = eng.engine_python()
    here = py.exists()
    mark = "ok" if here or chosen != "vllm" else "!!"
    yield mark, "generation", (f"generation.engine {chosen}; vLLM's environment "
                               + (f"at {py.parent.parent}" if here else "not installed (`make vllm` makes .venv-vllm)")
                               + ("" if here or chosen != "vllm" else ": stages that sample will fail"))


def dvc_remote(repo: Path):
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        with Repo(str(repo)) as r:
            remotes, default = list(r.config["remote"]), r.config["core"].get("remote")
    except NotDvcRepoError:
        yield "!!", "dvc", "not a DVC repo here: run in the checkout or a workspace (python -m flows.workspace DIR)"
        return
    yield ("ok" if default else "--"), "dvc", (
        f"remote {default}: stages can run on workers (--pool)" if default else
        f"no default remote{' (' + ', '.join(remotes) + ' defined)' if remotes else ''}: everything runs here; workers "
        "need one every machine reaches (dvc remote add -d store s3://…)")


def mlflow(repo: Path):
    from stages.core import tracking

    uri = tracking.tracking_uri(repo)
    if os.environ.get("ALIGNPIPE_TRACKING") == "off":
        yield "--", "mlflow", "tracking off (ALIGNPIPE_TRACKING=off): no runs are logged"
    elif uri.startswith("http"):
        ok = _reachable(uri.rstrip("/") + "/health")
        yield ("ok" if ok else "!!"), "mlflow", f"tracking server {uri}" + ("" if ok else " does not answer")
    else:
        yield "ok", "mlflow", f"{uri} (local; set MLFLOW_TRACKING_URI to a server for workers on other machines)"


def prefect(repo: Path):
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    if not api:
        yield "--", "prefect", ("no server (PREFECT_API_URL unset): each flow starts a temporary one (~15 s) and "
                                "its runs are gone after; `prefect server start` keeps them and serves the UI")
        return
    ok = _reachable(api.rstrip("/") + "/health")
    yield ("ok" if ok else "!!"), "prefect", f"API {api}" + ("" if ok else " does not answer (prefect server start?)")


def _reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3):
            return True
    except OSError:
        return False
