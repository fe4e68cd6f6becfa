"""`dvc repro`, after what the flow does before any stage: the habit for running DVC by hand.

    python -m flows.repro [dvc repro options]      # make repro ARGS="align@dpo --force"

1. params.yaml is read against the params schema before DVC reads it. DVC expands `align.methods`
   into stages when it loads dvc.yaml, before any stage (the `check` stage included) can run, so
   `align.methods: dpo` (a string) would otherwise fail as DVC's "'Value' object is not iterable".
2. A `.dvc/tmp/rwlock` half-written by a killed `dvc repro` is removed, when no DVC command holds
   the repo (see recover_dvc_lock).
Then it is `dvc repro` with the arguments given, run by this interpreter's DVC, with this
interpreter's environment first on PATH (DVC runs the stages as `python -m stages.<name>`).
Bad params: one line on stderr, exit 2, nothing run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from flows import params as params_edit


def preflight(repo: Path):
    """Before DVC reads the repo: recover a stale lock of a killed run, and validate params.yaml → the
    params (raises ConfigError naming the key)."""
    recover_dvc_lock(repo)
    return params_edit.loads((repo / "params.yaml").read_text(), "params.yaml")


def recover_dvc_lock(repo: Path) -> bool:
    """A `dvc repro` killed while it rewrote .dvc/tmp/rwlock can leave that file half-written, and every
    later repro then fails ("JSON structure is corrupted") until it is removed by hand. Remove it when it
    is unreadable and no DVC command holds this repo's lock (a running one always does, and a killed
    one's lock dies with it), so it was left by a dead run → whether it was removed. A readable rwlock
    is DVC's own business: it drops the entries of dead processes itself."""
    from dvc.lock import LockError, make_lock

    rwlock = repo / ".dvc" / "tmp" / "rwlock"
    try:
        json.loads(rwlock.read_text())
        return False
    except FileNotFoundError:
        return False
    except ValueError:
        pass
    lock = make_lock(str(rwlock.parent / "lock"), tmp_dir=str(rwlock.parent), friendly=False)
    try:
        lock.lock()
    except LockError:
        return False  # a live DVC command in this repo: not ours to touch
    try:
        rwlock.unlink(missing_ok=True)
    finally:
        lock.unlock()
    print(f"removed {rwlock.relative_to(repo)}: half-written by a killed dvc run, no DVC command holds the repo")
    return True


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        preflight(Path.cwd())
    except params_edit.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    os.execv(sys.executable, [sys.executable, "-m", "dvc", "repro", *argv])


if __name__ == "__main__":
    main()
