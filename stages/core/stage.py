"""What every stage entry point shares: argument parsing, the one-line error exit, the summary line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

from . import dist, fsdp, models, tracking
from .config import ConfigError
from .io import atomic_dir, write_csv, write_json


class StageFailed(Exception):
    """The stage ran but its result fails a gate the params set (e.g. reward.min_accuracy)."""


def parser(description: str, *paths: str) -> argparse.ArgumentParser:
    """The stage's command line: --params, and one required option per path dvc.yaml passes."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    for flag in paths:
        p.add_argument(flag, required=True)
    return p


def write_trained(model, tok, out: str, metrics_path: str, metrics: dict, plots_path: str, rows: list[dict],
                  tracker, step: int, c=None) -> None:
    """A training stage's outputs, each written atomically (the model directory with its tokenizer, in
    float32: models.save says why; a LoRA model merged, or its adapter alone when c.lora.output says so;
    the metrics json, the per-step plot csv), and its final metrics to MLflow."""
    state = fsdp.full_state(model, tied_once=True) if fsdp.is_sharded(model) else None  # every process: a collective
    if not dist.is_main():
        return
    bad, names = models.non_finite_weights(model, state)
    if bad:  # never recorded as a result: DVC would cache it and every later stage would read it
        raise StageFailed(f"{bad} weights are NaN or infinite after training (in {names[0]}"
                          f"{f' and {len(names) - 1} more tensors' if len(names) > 1 else ''}; "
                          f"train/skipped_steps {metrics.get('train/skipped_steps', 0):g}); no model written")
    with atomic_dir(out) as tmp:
        models.save(model, tok, tmp, adapter_only=c is not None and c.lora.output == "adapter", state=state)
    write_json(metrics_path, metrics)
    write_csv(plots_path, rows)
    tracker.log_metrics(metrics, step=step)


def _error(e: Exception, code: int) -> None:
    """The one-line error on a line of its own (open progress bars closed first), then exit `code`."""
    try:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", [])):
            bar.close()
    except ImportError:
        pass
    print(f"error: {e}", file=sys.stderr)
    sys.exit(code)


def run(main: Callable[[list[str] | None], str], argv: list[str] | None = None, parallel: bool = False) -> None:
    """Run a stage's main; print its one-line summary, or a one-line error and exit non-zero.

    ConfigError (bad params, bad input row, missing path) exits 2 before any work is done;
    StageFailed (a gate not met) exits 1 after the work, with no output written. parallel: a training
    stage, started on as many processes as the machine says (dist.wanted_processes).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bars
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    t0 = time.perf_counter()
    try:
        if parallel and dist.world() == 1 and dist.wanted_processes() > 1:
            sys.exit(dist.launch(sys.modules["__main__"].__spec__.name, sys.argv[1:] if argv is None else argv,
                                 dist.wanted_processes()))
        tracking.prestart()
        summary = main(argv)
    except ConfigError as e:
        _error(e, 2)
    except StageFailed as e:
        _error(e, 1)
    except KeyboardInterrupt:
        print("interrupted: no output was written (a checkpoint, if any, resumes on rerun)", file=sys.stderr)
        sys.exit(130)
    if dist.is_main():
        print(f"{summary} [{time.perf_counter() - t0:.1f}s]")
