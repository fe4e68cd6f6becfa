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
    text = applied(path, changes)
    with atomic_file(path) as fh:
        fh.write(text)


def check(path: str | Path, changes: dict[str, Any], where: str) -> None:
    """ConfigError naming `where` if setting `changes` in the params file would not validate."""
    try:
        applied(path, changes)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def applied(path: str | Path, changes: dict[str, Any]) -> str:
    """The params file's text with dotted keys set (comments and order kept), validated."""
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
    return text


def describe(key: str, current=None) -> str:
    """What a param means, from the params schema (stages/core/config.py, the single source): a field's
    type, range, default, its value in `current` (validated params, or None) and its docstring; a
    section's fields one per line; the top-level sections with no key. ConfigError for an unknown key."""
    from pydantic import BaseModel

    from stages.core import config

    cls: type[BaseModel] = config.Params
    default: object = config.Params()
    value: object = current
    doc = "alignpipe's params (params.yaml): one section per stage."
    for i, part in enumerate(key.split(".") if key else []):
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            where = ".".join(key.split(".")[:i]) or "params.yaml"
            known = ", ".join(cls.model_fields) if isinstance(cls, type) and issubclass(cls, BaseModel) else "none"
            raise ConfigError(f"{key}: no such param ({where} has: {known})")
        field = cls.model_fields[part]
        doc = field.description or (field.annotation.__doc__ or "").strip()
        default, value = getattr(default, part), getattr(value, part) if value is not None else None
        cls = field.annotation
        last = field
    if isinstance(default, BaseModel):
        lines = [f"{key or 'params.yaml'}: {doc.splitlines()[0] if doc else ''}".rstrip(), ""]
        for name, f in type(default).model_fields.items():
            sub = getattr(default, name)
            if isinstance(sub, BaseModel):
                what = (f.description or type(sub).__doc__ or "").strip().splitlines()
                lines.append(f"  {name + '.':<22} {what[0] if what else '(section)'}")
                continue
            now = getattr(value, name) if value is not None else None
            shown = "" if value is None or now == sub else f"  (params.yaml: {now!r})"
            what = (f.description or "").splitlines()[0]
            lines.append(f"  {name:<22} {type_name(f.annotation)} = {sub!r}{shown}  {what}")
        return "\n".join(lines) + "\n"
    out = [f"{key}: {type_name(last.annotation)}{range_text(last)}", f"  default: {default!r}"]
    if current is not None:
        out.append(f"  params.yaml: {value!r}")
    out += ["", *("  " + line for line in doc.splitlines())]
    return "\n".join(out) + "\n"


def type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) \
        else str(annotation).replace("typing.", "")


def range_text(field) -> str:
    bounds = [f"{op} {getattr(m, attr)}" for m in field.metadata
              for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")) if hasattr(m, attr)]
    return f", {' and '.join(bounds)}" if bounds else ""
