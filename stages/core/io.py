"""Atomic outputs: every file or directory a stage produces appears whole or not at all.

A writer works on a temporary sibling (same directory, so the final rename is atomic on POSIX) and
renames it into place only when it is complete. A failed or killed stage leaves at most a
`.tmp-*` sibling, never an output that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from .config import ConfigError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_leftovers(path: Path) -> None:
    """Remove the temporaries a killed writer of `path` left beside it (.tmp-<name>-<pid>-…,
    .old-<name>-<pid>): the ones whose process is gone; a live writer's are left alone."""
    if not path.parent.is_dir():
        return
    for kind in (".tmp", ".old"):
        for leftover in path.parent.glob(f"{kind}-{path.name}-*"):
            pid = leftover.name[len(f"{kind}-{path.name}-"):].split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)


def _tmp_sibling(path: Path, is_dir: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(path)
    prefix = f".tmp-{path.name}-{os.getpid()}-"
    if is_dir:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
    os.close(fd)
    return Path(name)


def _replace(tmp: Path, path: Path) -> None:
    """Move tmp over path; an existing directory at path is removed only after tmp is complete."""
    if path.is_dir() and not path.is_symlink():
        old = path.with_name(f".old-{path.name}-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if path.is_symlink() or path.exists():
            path.unlink()
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` when the block exits without error."""
    path = Path(path)
    tmp = _tmp_sibling(path, is_dir=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Yield an open file handle; the file becomes `path` when the block exits without error."""
    path = Path(path)
    tmp = _tmp_sibling(path, is_dir=False)
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _replace(tmp, path)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_file(path) as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as fh:
        return json.load(fh)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_file(path) as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
            n += 1
    return n


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    rows = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: row {lineno}: not valid JSON ({e.msg})") from None
    return rows


def write_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    """Rows of dicts → csv by pandas' writer, the union of keys as header in the order first seen (DVC plots read
    it); floats to 6 significant digits; a value that could not be measured (None) an empty cell, as a missing key."""
    import pandas as pd

    with atomic_file(path) as fh:
        pd.DataFrame(rows).to_csv(fh, index=False, float_format="%.6g", lineterminator="\n")


def file_digest(path: str | os.PathLike, algorithm: str = "md5") -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks (a model file need not fit in memory twice)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split_source(source: str) -> tuple[str, str | None, bool]:
    """A data source as params name it (a file, a dataset directory, or a hub dataset `name[:split]`) →
    (name, split or None, whether it must be a local path: it starts with . / ~, has more than one /,
    or ends in a data-file suffix; a missing one is then an error, not a hub id)."""
    name, split = source, None
    if ":" in source and not Path(source).expanduser().exists():
        name, _, split = source.rpartition(":")
    local = name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).suffix.lower() in DATA_SUFFIXES
    return name, split, local


def check_model_path(name_or_path: str, field: str, root: Path = Path(".")) -> None:
    """A local directory must hold a saved model, a local file must be a .gguf; anything path-like that
    is missing is an error here, before any work. A hub id (`org/name`) is left to the caller (the
    loader reads the local HF cache; stages/check.py checks it is there). root: where the stages run."""
    p = root / Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ConfigError(f"{field}: {name_or_path!r} is a directory without config.json (not a saved model)")
        return
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ConfigError(f"{field}: {name_or_path!r} is a file; give a model directory, a hub id or a .gguf file")
        return
    if not is_hub_id(name_or_path) or p.suffix.lower() == ".gguf":
        raise ConfigError(f"{field}: model path {name_or_path!r} does not exist")


def is_hub_id(name_or_path: str) -> bool:
    """Whether a missing model path reads as a hub id (`org/name` or `name`), not a local path."""
    return not name_or_path.startswith((".", "/", "~")) and name_or_path.count("/") <= 1


DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
