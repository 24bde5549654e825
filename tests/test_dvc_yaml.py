"""dvc.yaml declares, for each stage, exactly the dsink/ modules its entry point can import.

The import graph is read statically (every ``import dsink...`` / ``from dsink... import`` at any depth,
function-level imports included), so a module a stage may load is always a dependency, and a module it
never loads never makes it stale.
"""

from __future__ import annotations

import ast
import re
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


def _expanded(stage: dict, key: str) -> set[str]:
    """``stage[key]`` paths (a ``{path: {...}}`` entry counts as its path), matrix placeholders expanded."""
    items = [next(iter(e)) if isinstance(e, dict) else e for e in stage.get(key, [])]
    out = set()
    for item in items:
        m = re.search(r"\$\{item\.(\w+)\}", item)
        values = stage.get("matrix", {}).get(m.group(1), []) if m else [None]
        out |= {item.replace(m.group(0), v) if m else item for v in values}
    return out


def _entry_point(stage: dict) -> Path:
    return ROOT / next(w for w in stage["cmd"].split() if w.startswith("stages/") and w.endswith(".py"))


@pytest.mark.parametrize("name", sorted(STAGES))
def test_a_stage_that_loads_the_source_depends_on_the_dataset(name):
    """Pixels (or test labels) come from ${data.root}: new images must rerun every stage that reads them."""
    stage = STAGES[name]
    if "dsink/data/sources.py" in closure(_entry_point(stage)):
        assert "${data.root}" in stage["deps"], f"{name} loads the source dataset but does not depend on it"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_a_stage_that_reads_the_validation_split_depends_on_it(name):
    """``open_corpus`` (dsink/runs.py) reads the validation split; ``evaluate`` reads it for val metrics."""
    stage = STAGES[name]
    script = _entry_point(stage)
    reads = "dsink/runs.py" in closure(script) or "read_validation" in script.read_text()
    if reads:
        assert "data/corrupted/val.parquet" in stage["deps"], name
    outs = _expanded(stage, "outs")
    if name == "corrupt":
        assert {"data/corrupted/train.parquet", "data/corrupted/val.parquet"} <= outs


def test_evaluate_depends_on_every_curve_it_plots():
    """The dvclive folders evaluate reads for curves.png / corrected.png are its deps, and they are the
    training stages' declared plots (so DVC orders evaluate after the trainings and reruns it on new
    curves)."""
    source = (ROOT / "stages" / "evaluate.py").read_text()
    read = {f"dvclive/{d}/plots/metrics" for d in re.findall(r'Path\(args\.live\) / "(\w+)"', source)}
    assert len(read) == 5, read
    deps = {d for d in STAGES["evaluate"]["deps"] if d.startswith("dvclive/")}
    assert deps == read
    produced = set()
    for name, stage in STAGES.items():
        if name != "evaluate":
            produced |= {p for p in _expanded(stage, "plots") if p.startswith("dvclive/")}
    assert read == produced


# The stages that train or load a model read its training keys: the shared `train` section and the model's
# own section, whose keys override it (dsink/params.py resolves the two into the section's values).
MODEL_SECTIONS = {
    "train_teacher": "teachers.${item.role}",
    "dump_logits": "teachers.${item.role}",  # the model's architecture, to load it
    "train_baseline": "baselines.${item.method}",
    "distill": "distill",
}


def test_every_training_stage_declares_the_shared_train_section_and_its_own():
    """Changing `train.<key>` reruns every training; changing one model's override reruns only that model
    (its own section is the only other training params it declares)."""
    from dsink.params import TRAINED_SECTIONS

    covered = set()
    for name, section in MODEL_SECTIONS.items():
        params = STAGES[name]["params"]
        assert "train" in params, f"{name} reads training keys but does not declare `train`"
        assert section in params, f"{name} does not declare {section}"
        others = [p for p in params if p != section and any(p.startswith(s) for s in TRAINED_SECTIONS)]
        assert others == [], f"{name} declares another model's section: {others}"
        covered |= _expanded({"matrix": STAGES[name].get("matrix", {}), "x": [section]}, "x")
    assert covered == set(TRAINED_SECTIONS)
    readers = {name for name, stage in STAGES.items() if "train" in stage.get("params", [])}
    assert readers == set(MODEL_SECTIONS), "only the stages that train or load a model read `train`"
