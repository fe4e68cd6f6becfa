"""Scratch workspaces: a fresh git + DVC repo holding the pipeline's code with a chosen params file.

`make smoke` and the integration tests run the real pipeline in one, so they never touch the
project's own outputs, cache or dvc.lock. A workspace is what a new checkout of the project is.

    python -m flows.workspace DEST [--params params.smoke.yaml]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTENTS = ["stages", "flows", "dvc.yaml", ".dvcignore", ".gitignore", "inputs"]


def _run(cmd: list[str], cwd: Path) -> None:
    # `dvc init` runs before the workspace's config turns analytics off: no report daemon for it either
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed in {cwd}: {out.stderr.strip() or out.stdout.strip()}")


def create(dest: str | Path, params: str | Path | None = None, src: Path = ROOT) -> Path:
    """Copy the pipeline into `dest` (which must not exist), with `params` as its params.yaml, and
    make it a committed git + DVC repo."""
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} exists; a workspace is always made fresh")
    dest.mkdir(parents=True)
    copy_code(dest, params, src)
    git = ["git", "-c", "user.name=alignpipe", "-c", "user.email=alignpipe@localhost"]
    _run(["git", "init", "-q"], dest)
    dvc = [sys.executable, "-m", "dvc"]
    _run(dvc + ["init", "-q"], dest)
    # A model is stored once: the workspace's copy is a hardlink to DVC's cache (a symlink across
    # filesystems), not a second copy; DVC marks it read-only and stages only ever replace outputs
    # (atomic renames), so the cache cannot be edited through it. (With reflink listed first, DVC 3.67
    # commits a stage's outputs by copying them on a filesystem without reflinks, such as ext4.)
    for key, value in (("core.analytics", "false"), ("core.check_update", "false"), ("core.autostage", "false"),
                       ("cache.type", "hardlink,symlink,copy")):
        _run(dvc + ["config", key, value], dest)
    _run(["git", "add", "-A"], dest)
    _run(git + ["commit", "-q", "-m", "workspace"], dest)
    return dest


def copy_code(dest: Path, params: str | Path | None = None, src: Path = ROOT) -> None:
    """The pipeline's code, dvc.yaml and `params` (as params.yaml) into `dest`, replacing what is there.
    Outputs, DVC's cache and dvc.lock stay: a later `dvc repro` reruns only what the new code made stale."""
    for name in CONTENTS:
        s = src / name
        if s.is_dir():  # the user's inputs/ as hardlinks where it can: a model directory is not copied
            shutil.rmtree(dest / name, ignore_errors=True)
            shutil.copytree(s, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                            copy_function=_link_or_copy if name == "inputs" else shutil.copy2)
        else:
            shutil.copy2(s, dest / name)
    shutil.copy2(Path(params) if params else src / "params.yaml", dest / "params.yaml")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dest")
    p.add_argument("--params", help="params file to use as the workspace's params.yaml (default: the project's)")
    args = p.parse_args()
    print(create(args.dest, args.params))


if __name__ == "__main__":
    main()
