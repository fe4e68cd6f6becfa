"""`dvc repro`, after what the flow does before any stage: the habit for running DVC by hand.

    python -m flows.repro [dvc repro options]      # make repro ARGS="align@dpo --force"

1. params.yaml is read against the params schema before DVC reads it. DVC expands `align.methods`
   into stages when it loads dvc.yaml, before any stage (the `check` stage included) can run, so
   `align.methods: dpo` (a string) would otherwise fail as DVC's "'Value' object is not iterable", and
   a missing `align.distill.teachers` as "Could not find" (DVC reads the file, not the schema's defaults).
2. What params.yaml names is checked as the `check` stage checks it (stages/check.py: model and data
   paths, cached hub ids, reward functions).
3. Another DVC command running in this workspace (holding DVC's repo lock `.dvc/tmp/lock`, or, while
   a stage runs, its paths in `.dvc/tmp/rwlock`) stops it first, with one line giving its pid; a lock
   is never removed.
4. A `.dvc/tmp/rwlock` half-written by a killed `dvc repro` is removed (never one a live DVC command
   is writing: see recover_dvc_lock).
Then it is `dvc repro` with the arguments given, run by this interpreter's DVC, with this
interpreter's environment first on PATH (DVC runs the stages as `python -m stages.<name>`).
Bad params: one line on stderr, exit 2, nothing run; a busy workspace: one line, exit 1.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from flows import params as params_edit
from stages import check


class WorkspaceBusy(RuntimeError):
    """Another DVC command holds this workspace's repo lock."""


def preflight(repo: Path):
    """Before DVC reads the repo: stop when another DVC command is running here (WorkspaceBusy), recover a
    stale lock of a killed run, validate params.yaml and what it names → the params (raises ConfigError
    naming the key)."""
    holder = dvc_lock_holder(repo)
    if holder:
        raise WorkspaceBusy(f"another DVC command is running in this workspace (pid {holder}): wait for it or stop it")
    recover_dvc_lock(repo)
    text = (repo / "params.yaml").read_text()
    cfg = params_edit.loads(text, "params.yaml")
    check_matrix_keys(text)
    check.check_names(cfg, repo)
    return cfg


MATRIX_KEYS = {"align.methods": "[dpo]", "align.distill.teachers": "[]", "align.distill.external": "{}"}
"""The params dvc.yaml expands into stages (with an example value): DVC reads them from the file itself, where the
schema's default is no help."""


def check_matrix_keys(text: str) -> None:
    import yaml

    raw = yaml.safe_load(text) or {}
    for key in MATRIX_KEYS:
        if params_edit.get(raw, key) in (params_edit.MISSING, None):
            parent, leaf = key.rsplit(".", 1)
            raise params_edit.ConfigError(f"params.yaml: {key}: missing; dvc.yaml makes its stages from it, so "
                                          f"it must be written out (e.g. `{leaf}: {MATRIX_KEYS[key]}` under {parent})")


def dvc_lock_holder(repo: Path) -> str | None:
    """The pid of a DVC command running in this workspace, or None: the holder of DVC's repo lock
    (.dvc/tmp/lock, the pid as zc.lockfile wrote it; only tried, with a lock that writes nothing, and let
    go at once), else a live process in .dvc/tmp/rwlock (DVC lets go of the repo lock while a stage's
    command runs and holds the stage's paths there). Neither file is ever removed: a lock whose holder
    has gone is harmless, the next DVC command takes it over."""
    import zc.lockfile

    tmp = repo / ".dvc" / "tmp"
    if (tmp / "lock").is_file():
        try:
            zc.lockfile.SimpleLockFile(str(tmp / "lock")).close()
        except zc.lockfile.LockError:
            return ((tmp / "lock").read_text().split() or ["?"])[0]
    return next(iter(rwlock_pids(tmp / "rwlock")), None)


def rwlock_pids(rwlock: Path) -> list[str]:
    """The live processes DVC's rwlock names (DVC drops a dead one's entries itself; psutil, as DVC checks)."""
    import psutil

    try:
        lock = json.loads(rwlock.read_text())
        infos = [*lock.get("write", {}).values(), *(i for infos in lock.get("read", {}).values() for i in infos)]
        pids = [int(info["pid"]) for info in infos]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # missing or half-written: no one named
        return []
    return [str(pid) for pid in dict.fromkeys(pids) if 0 < pid != os.getpid() and psutil.pid_exists(pid)]


def recover_dvc_lock(repo: Path) -> bool:
    """A `dvc repro` killed while it rewrote .dvc/tmp/rwlock can leave that file half-written, and every
    later repro then fails ("JSON structure is corrupted") until it is removed by hand. DVC writes that
    file only while it holds .dvc/tmp/rwlock.lock, so a file still unreadable once we hold that guard was
    left by a dead writer: remove it → whether it was removed. A guard held by a live DVC command is left
    alone (it is mid-write). A readable rwlock is DVC's own business: it drops dead processes' entries."""
    from dvc.lock import LockError, make_lock

    rwlock = repo / ".dvc" / "tmp" / "rwlock"
    if _readable(rwlock):
        return False
    guard = make_lock(str(rwlock.parent / "rwlock.lock"), tmp_dir=str(rwlock.parent), friendly=False)
    try:
        guard.lock()
    except LockError:
        return False  # a live DVC command is editing it: not ours to touch
    try:
        if _readable(rwlock):  # finished by a live writer between the two reads
            return False
        rwlock.unlink()
    finally:
        guard.unlock()
    print(f"removed {rwlock.relative_to(repo)}: half-written by a killed dvc run", flush=True)
    return True


def _readable(rwlock: Path) -> bool:
    """Whether DVC can read the rwlock (a missing one counts: DVC starts a new one)."""
    try:
        json.loads(rwlock.read_text())
    except FileNotFoundError:
        return True
    except ValueError:
        return False
    return True


def venv_path() -> str:
    """PATH with this interpreter's directory first: DVC runs the stages as `python -m stages.<name>`."""
    return f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):  # this command's own words, then dvc repro's options
        print(__doc__.split("\n\n")[0].strip() + "\n\nIts options are dvc repro's:\n", flush=True)
        os.execv(sys.executable, [sys.executable, "-m", "dvc", "repro", "--help"])
    try:
        preflight(Path.cwd())
    except params_edit.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except WorkspaceBusy as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # no params.yaml here: not the project's root
        print(f"error: {e.filename}: {e.strerror} (run it in the project's root)", file=sys.stderr)
        sys.exit(2)
    os.environ["PATH"] = venv_path()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "dvc", "repro", *argv])


if __name__ == "__main__":
    main()
