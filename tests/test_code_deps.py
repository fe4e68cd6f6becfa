"""dvc.yaml's code deps are exactly the code each stage runs, derived from its imports: a stage that
imports a project module its entry does not list would not rerun when that module changes (a stale
result taken as fresh), and one that lists code it never imports reruns for nothing (hours on a real
model). tracking.py is the one module left out on purpose: it logs to MLflow and writes nothing a
stage outputs, so fixing it must not rerun SFT and everything after it."""

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
NO_EFFECT_ON_OUTPUTS = {"stages/core/tracking.py"}
STARTS = {"stages/core/engine.py": {"stages/core/vllm_server.py"}}
"""Files a module runs as a process of its own (not imported): the vLLM server, in the engine's environment."""


def module_file(module: str) -> Path | None:
    p = ROOT / Path(*module.split("."))
    for f in (p.with_suffix(".py"), p / "__init__.py"):
        if f.exists():
            return f
    return None


def imported_modules(path: Path) -> set[str]:
    """Project modules a file imports anywhere (top level or inside a function), relative ones resolved."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[:len(package) - node.level + 1], *([node.module] if node.module else [])])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] in ("stages", "flows")}


def code_closure(module: str) -> set[str]:
    """Every project file `python -m module` may run (empty __init__.py files aside)."""
    seen, todo = set(), [module]
    while todo:
        f = module_file(todo.pop())
        if f is None or f in seen:
            continue
        seen.add(f)
        todo.extend(imported_modules(f))
        todo.extend(s.removesuffix(".py").replace("/", ".") for s in STARTS.get(str(f.relative_to(ROOT)), ()))
    return {str(f.relative_to(ROOT)) for f in seen if f.name != "__init__.py" or f.read_text().strip()}


def stage_bodies() -> list[tuple[str, dict]]:
    """dvc.yaml's stages (a foreach stage's `do` body in its place)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return [(name, stage.get("do", stage)) for name, stage in stages.items()]


def test_every_stage_lists_exactly_the_code_it_runs():
    for name, stage in stage_bodies():
        module = stage["cmd"].split()[2]  # python -m stages.<name> …
        code = {d for d in stage["deps"] if d.startswith(("stages/", "flows/"))}
        runs = code_closure(module) - NO_EFFECT_ON_OUTPUTS
        assert not runs - code, f"{name}: runs {sorted(runs - code)} but dvc.yaml does not list them"
        assert not code - runs, f"{name}: lists {sorted(code - runs)}, code it never runs"


def test_the_closure_sees_imports_inside_functions():
    assert "stages/core/config.py" in code_closure("stages.core.dist")  # imported inside wanted_processes only
    assert "stages/core/train.py" not in code_closure("stages.prepare")


def test_every_stage_that_samples_depends_on_the_engine_choice():
    """generation.engine is a param, so DVC never hands back an artifact sampled by the other engine: every
    stage that runs the engine code lists the `generation` section (and only those)."""
    sampling = set()
    for name, stage in stage_bodies():
        runs = code_closure(stage["cmd"].split()[2])
        lists = "generation" in stage.get("params", [])
        assert lists == ("stages/core/engine.py" in runs), name
        sampling |= {name} if lists else set()
    assert {"sft", "pairs", "align", "evaluate_sft", "evaluate"} <= sampling
