"""Editing params.yaml from a flow run or the command line, keeping its comments.

Changes are validated against the params schema before the file is touched, and the file is
replaced atomically: a bad override leaves params.yaml as it was.
"""

from __future__ import annotations

import io as _io
from pathlib import Path
from typing import Any

import yaml

from stages.core.config import ConfigError, loads
from stages.core.io import atomic_file


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """["align.dpo.beta=0.05", "align.methods=[dpo, kto]"] → {"align.dpo.beta": 0.05, ...} (YAML values)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


MISSING = object()


def get(doc: dict, key: str) -> Any:
    """The value of a dotted key in a loaded params document (MISSING when it is not there)."""
    node: Any = doc
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


def apply(path: str | Path, changes: dict[str, Any]) -> None:
    """Set dotted keys in a params file (comments and order kept), validate, write atomically."""
    from ruamel.yaml import YAML

    path = Path(path)
    rt = YAML()
    rt.preserve_quotes = True
    doc = rt.load(path.read_text()) or {}
    for key, value in changes.items():
        node = doc
        parts = key.split(".")
        for part in parts[:-1]:
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"{path}: {key}: {part} is not a section")
        node[parts[-1]] = value
    buf = _io.StringIO()
    rt.dump(doc, buf)
    text = buf.getvalue()
    loads(text, str(path))  # raises ConfigError naming the key
    with atomic_file(path) as fh:
        fh.write(text)
