"""check: validate params.yaml and record what the pipeline's inputs are, before any other stage runs.

    python -m stages.check --out inputs.lock.json

DVC runs it on every `dvc repro` (always_changed), so it runs on every entry point (`make run`, the
Prefect flow, a plain `dvc repro`): a mistake in params.yaml fails here, as one line, even when no
stage is stale. It writes the digest of every local file or directory that params.yaml names as an
input (data.sft, data.preference, data.prompts, data.eval, model.name_or_path) and, for a hub id, the
revision the local Hugging Face cache holds. prepare depends on that file, so editing your data or
your model directory reruns prepare and everything after it: DVC itself cannot track a path that is
only a param's value. Unchanged inputs give the same file, so nothing downstream goes stale.

Only the config schema and hashing are imported here (no torch): the no-op `dvc repro` stays fast.
Digests of large files are reused while their size and modification time stay the same (a cache in
.dvc/tmp, which DVC keeps out of git).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from stages.core import config, io

CACHE = Path(".dvc") / "tmp" / "alignpipe-input-digests.json"


def file_digest(path: Path, cache: dict) -> str:
    """md5 of a file's bytes, from the cache while its size and mtime are unchanged."""
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    if key not in cache:
        cache[key] = io.file_digest(path)
    return cache[key]


def digest(path: Path, cache: dict) -> dict:
    """{"md5": …, "files": n} of a file, or of a directory's files (names and contents)."""
    if path.is_file():
        return {"md5": file_digest(path, cache), "files": 1}
    files = sorted(f for f in path.rglob("*") if f.is_file())
    lines = "".join(f"{f.relative_to(path).as_posix()} {file_digest(f, cache)}\n" for f in files)
    return {"md5": hashlib.md5(lines.encode()).hexdigest(), "files": len(files)}


def hub_revision(name: str) -> str | None:
    """The commit the local Hugging Face cache resolves `org/name` to (refs/main), if it holds it."""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    cache = Path(os.environ.get("HF_HUB_CACHE") or home / "hub")
    for kind in ("models", "datasets"):
        ref = cache / f"{kind}--{name.split(':')[0].replace('/', '--')}" / "refs" / "main"
        if ref.is_file():
            return ref.read_text().strip()
    return None


def inputs(cfg: config.Params, cache: dict) -> dict[str, dict]:
    """Every input params.yaml names: a local path's digest, a hub id's cached revision, or "embedded"."""
    named = {f"data.{k}": getattr(cfg.data, k) for k in ("sft", "preference", "prompts", "eval")}
    named["model.name_or_path"] = cfg.model.name_or_path
    out = {}
    for field, source in named.items():
        name, _, local = io.split_source(source)
        path = Path(name).expanduser()
        if source == "embedded":
            out[field] = {"source": "embedded"}
        elif path.exists():
            out[field] = {"source": source, **digest(path, cache)}
        elif local or path.suffix.lower() == ".gguf":
            raise config.ConfigError(f"{field}: {source}: no such file or directory")
        else:
            out[field] = {"source": source, "hub_revision": hub_revision(source)}
    return out


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    cfg = config.load(args.params)
    cache = json.loads(CACHE.read_text()) if CACHE.is_file() else {}
    found = inputs(cfg, cache)
    if CACHE.parent.is_dir():
        io.write_json(CACHE, cache)
    text = json.dumps(found, indent=1, sort_keys=True) + "\n"
    if not Path(args.out).is_file() or Path(args.out).read_text() != text:  # unchanged: left untouched
        with io.atomic_file(args.out) as fh:
            fh.write(text)
    local = sum("md5" in v for v in found.values())
    return f"check: {args.params} is valid; {local} local input(s) hashed → {args.out}"


if __name__ == "__main__":
    try:
        print(main())
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
