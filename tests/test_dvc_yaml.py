"""dvc.yaml declares, for each stage, exactly the dsink/ modules its entry point can import.

The import graph is read statically (every ``import dsink...`` / ``from dsink... import`` at any depth,
function-level imports included), so a module a stage may load is always a dependency, and a module it
never loads never makes it stale.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def module_file(name: str) -> Path | None:
    """The file of dotted module ``name`` under the repo, or None."""
    base = ROOT.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def imported_files(path: Path) -> set[Path]:
    """Files of dsink modules imported by ``path`` (with the packages their import executes)."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] != "dsink":
                continue
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, ...
                f = module_file(".".join(parts[:i]))
                if f is not None:
                    found.add(f)
    return found


def closure(entry: Path) -> set[str]:
    todo, seen = [entry], set()
    while todo:
        f = todo.pop()
        for g in imported_files(f):
            if g not in seen:
                seen.add(g)
                todo.append(g)
    return {str(p.relative_to(ROOT)) for p in seen}


def declared_dsink_deps(stage: dict) -> set[str]:
    out = set()
    for dep in stage["deps"]:
        p = ROOT / dep
        if not dep.startswith("dsink"):
            continue
        if p.is_dir():
            out |= {str(f.relative_to(ROOT)) for f in p.rglob("*.py")}
        else:
            out.add(dep)
    return out


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_are_exactly_its_imports(name):
    stage = STAGES[name]
    script = next(w for w in stage["cmd"].split() if w.startswith("stages/") and w.endswith(".py"))
    assert script in stage["deps"], f"{name}: its entry point {script} must be a dependency"
    imported = closure(ROOT / script)
    declared = declared_dsink_deps(stage)
    assert imported - declared == set(), f"{name}: imports missing from deps"
    assert declared - imported == set(), f"{name}: deps it never imports"


def test_pycache_is_ignored_by_dvc():
    assert "__pycache__" in (ROOT / ".dvcignore").read_text().split()
