"""check: validate params.yaml and record what the pipeline's inputs are, before any other stage runs.

    python -m stages.check --out inputs.lock.json

DVC runs it on every `dvc repro` (always_changed), so it runs on every entry point (`make run`, the
Prefect flow, a plain `dvc repro`): a mistake in params.yaml fails here, as one line, even when no
stage is stale. So does a mistake in what params.yaml names that can be found without running it
(check_names): a missing model or data path, a hub id not in the local cache, a chat template file
that is not there, a reward function whose module cannot be found or does not define it (no user
code runs). It writes the digest of every local file or directory that params.yaml names as an input
(data.sft, data.preference, data.prompts, data.eval, model.name_or_path, align.distill.external's teachers)
and, for a hub id, the revision the local Hugging Face cache holds. prepare and teacher@<name> depend on that
file, so editing your data or your model directory reruns them and everything after: DVC itself cannot track
a path that is only a param's value. Unchanged inputs give the same file, so nothing downstream goes stale.

Only the config schema and hashing are imported here (no torch): the no-op `dvc repro` stays fast.
Digests of large files are reused while their size and modification time stay the same (a cache in
.dvc/tmp, which DVC keeps out of git).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import os
import re
import sys
from importlib.machinery import PathFinder
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


def hf_home() -> Path:
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))


def hub_revision(name: str) -> str | None:
    """The commit the local Hugging Face cache resolves `org/name` to (refs/main), if it holds it."""
    cache = Path(os.environ.get("HF_HUB_CACHE") or hf_home() / "hub")
    for kind in ("models", "datasets"):
        ref = cache / f"{kind}--{name.split(':')[0].replace('/', '--')}" / "refs" / "main"
        if ref.is_file():
            return ref.read_text().strip()
    return None


def named_inputs(cfg: config.Params) -> dict[str, str]:
    """params key → the input it names (a local path, a hub id, or "embedded")."""
    named = {f"data.{k}": getattr(cfg.data, k) for k in ("sft", "preference", "prompts", "eval")}
    teachers = {f"align.distill.external.{name}": source for name, source in cfg.align.distill.external.items()}
    return {**named, "model.name_or_path": cfg.model.name_or_path, **teachers}


def names_a_model(field: str) -> bool:
    return field == "model.name_or_path" or field.startswith("align.distill.external.")


def inputs(cfg: config.Params, cache: dict) -> dict[str, dict]:
    """Every input params.yaml names: a local path's digest, a hub id's cached revision, or "embedded"."""
    out = {}
    for field, source in named_inputs(cfg).items():
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


# ---------------------------------------------------------------------------------------------- names

def check_names(cfg: config.Params, root: Path = Path(".")) -> None:
    """What params.yaml names, checked without running any of it, so a mistake fails here and not hours
    later in the stage that uses it: the model (a saved model directory or .gguf file, or a hub id in the
    local cache), each dataset (a local file or directory, or a cached hub dataset), a chat template file,
    and every reward function a stage will call (its module found, the function defined in it).
    root: the directory the stages run in. A ConfigError naming the key otherwise."""
    for field, source in named_inputs(cfg).items():
        if source != "embedded":
            check_source(field, source, root)
    template = cfg.model.chat_template
    if template and not re.search(r"\{[{%]", template) and not (root / Path(template).expanduser()).is_file():
        raise config.ConfigError(f"model.chat_template: {template}: no such file (and not a Jinja template)")
    for field, name in reward_functions(cfg):
        why = function_problem(name, [str(root), *sys.path])
        if why:
            raise config.ConfigError(f"{field}: {name}: {why}")


TRUE = ("1", "ON", "YES", "TRUE")
"""What huggingface_hub and datasets read as true in HF_HUB_OFFLINE and HF_DATASETS_OFFLINE."""


def check_source(field: str, source: str, root: Path) -> None:
    """A model or dataset params names: present on disk, or a hub id the local Hugging Face cache holds
    (nothing is downloaded at run time: every stage sets HF_HUB_OFFLINE unless you set it to 0)."""
    model = names_a_model(field)
    if model:
        io.check_model_path(source, field, root)
    name, _, local = io.split_source(source)
    if (root / Path(name).expanduser()).exists():
        return
    if local:
        raise config.ConfigError(f"{field}: {source}: no such file or directory")
    offline = os.environ.get("HF_HUB_OFFLINE" if model else "HF_DATASETS_OFFLINE", "1").upper() in TRUE
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or hf_home() / "datasets")
    if offline and hub_revision(source) is None and (model or not (datasets_cache / name.replace("/", "___")).is_dir()):
        kind = "model" if model else "dataset"
        raise config.ConfigError(f"{field}: {source}: no such path, and no {kind} of that name in the local Hugging "
                                 f"Face cache (nothing is downloaded at run time: `hf download {name}"
                                 f"{'' if model else ' --repo-type dataset'}` first)")


def reward_functions(cfg: config.Params) -> list[tuple[str, str]]:
    """(params key, `module:function`) of every user reward function a stage will call (weight > 0):
    those of pairs.score and of each listed method's reward section."""
    sections = {"pairs.score": cfg.pairs.score}
    for m in cfg.align.running():
        if isinstance(getattr(cfg.align.method(m), "reward", None), config.RewardWeights):
            sections[f"align.{m}.reward"] = cfg.align.method(m).reward
    return [(f"{key}.functions", name) for key, weights in sections.items()
            for name, weight in weights.functions.items() if weight > 0]


def function_problem(name: str, path: list[str]) -> str | None:
    """Why `module:function` cannot be imported, found without running any user code (None: it can, or
    that cannot be told without running it): the module is located on `path` without importing it or its
    parent packages, and its source is parsed for a top-level definition of the function."""
    module, _, attr = name.partition(":")
    spec, why = module_spec(module, path)
    if spec is None:
        return why
    if spec.origin is None:  # a directory without __init__.py: its attributes are only its submodules
        return f"no function named {attr!r} in {module} (a namespace package, no __init__.py)"
    source = Path(spec.origin)
    if source.suffix != ".py" or not source.is_file():  # built-in, compiled or zipped: cannot be read
        return None
    shown = os.path.relpath(source) if source.is_relative_to(Path.cwd()) else str(source)
    try:
        names = bound_names(ast.parse(source.read_bytes(), str(source)))
    except SyntaxError as e:
        return f"{shown}:{e.lineno}: cannot be imported ({e.msg})"
    if attr in names or {"*", "__getattr__"} & names:  # a star import or a module __getattr__: cannot tell
        return None
    return f"no function named {attr!r} in {shown}"


def module_spec(module: str, path: list[str]):
    """(spec, None) of a module found on `path`, or (None, why not). Only finders run, never a module: a
    dotted name is followed package by package through each one's directories (importlib.util.find_spec
    would import the parent packages, running their code)."""
    if module in sys.modules:  # imported already (os.path, which importing os puts there): nothing runs
        return getattr(sys.modules[module], "__spec__", None), None
    parts = module.split(".")
    try:
        spec = PathFinder.find_spec(parts[0], path) or importlib.util.find_spec(parts[0])  # editable installs
    except (ImportError, ValueError):
        spec = None
    for i in range(1, len(parts) + 1):
        if spec is None:
            return None, f"no module named {'.'.join(parts[:i])!r} (looked in the project root and the Python path)"
        if i == len(parts):
            return spec, None
        if spec.submodule_search_locations is None:
            return None, f"{'.'.join(parts[:i])} is a module, not a package"
        sub = PathFinder.find_spec(".".join(parts[:i + 1]), list(spec.submodule_search_locations))
        if sub is None and extends_path(spec):  # its submodules may be anywhere: cannot tell without running it
            return None, None
        spec = sub
    return spec, None


def extends_path(package) -> bool:
    """Whether a package's __init__.py edits its own __path__ (pkgutil.extend_path and the like)."""
    origin = Path(package.origin or "")
    return origin.suffix == ".py" and origin.is_file() and "__path__" in origin.read_text(errors="replace")


def bound_names(tree: ast.Module) -> set[str]:
    """Names a module binds at import: definitions, imports and assignments at its top level, also inside
    if/try/for/with blocks (not inside functions or classes, but a name a function declares `global`);
    `*` for a star import."""
    names, todo = set(), list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            names.update(n for g in ast.walk(node) if isinstance(g, ast.Global) for n in g.names)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).partition(".")[0] for a in node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        if not isinstance(node, ast.Lambda):
            todo.extend(ast.iter_child_nodes(node))
    return names


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    cfg = config.load(args.params)
    check_names(cfg)
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
