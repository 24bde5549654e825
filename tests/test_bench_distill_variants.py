"""bench/distill_variants.py: overrides on an experiment's params, the inputs it takes from the DVC
cache (by the md5s of a `dvc.lock`), and clear refusals (unknown experiment, missing cache entry)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _load(script: str):
    spec = importlib.util.spec_from_file_location(f"bench_{script}", ROOT / "bench" / f"{script}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


dv = _load("distill_variants")


def test_overrides_set_nested_keys_with_yaml_types_and_leave_the_original_alone():
    params = {"distill": {"alpha": 1.0, "sinkhorn": {"reg": 2.0}}, "seed": 0}
    out = dv.with_overrides(
        params, ["distill.sinkhorn.reg=0.5", "distill.cost_imbalance_weight=0.3", "seed=3"]
    )
    assert out == {
        "distill": {"alpha": 1.0, "sinkhorn": {"reg": 0.5}, "cost_imbalance_weight": 0.3},
        "seed": 3,
    }
    assert params["distill"]["sinkhorn"]["reg"] == 2.0
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        dv.with_overrides(params, ["distill.alpha"])


def _lock(md5s: dict[str, str]) -> str:
    outs = [{"path": p, "md5": m} for p, m in md5s.items()]
    return yaml.safe_dump({"stages": {"a": {"outs": outs[:2]}, "b": {"outs": outs[2:]}}})


def test_extract_copies_each_input_by_its_lock_md5_and_refuses_a_missing_one(tmp_path, monkeypatch):
    cache = tmp_path / "repo/.dvc/cache/files/md5"
    md5s = {}
    for i, path in enumerate(dv.INPUTS):
        md5 = f"{i:02d}" + "ab" * 15
        md5s[path] = md5
        (cache / md5[:2]).mkdir(parents=True, exist_ok=True)
        (cache / md5[:2] / md5[2:]).write_bytes(path.encode())
    files = {"dvc.lock": _lock(md5s), "params.yaml": "seed: 0\n", "metrics/evaluate.json": "{}"}
    monkeypatch.setattr(dv, "ROOT", tmp_path / "repo")
    monkeypatch.setattr(dv, "_git_show", lambda rev, path: files[path])
    cell = dv.extract("exp-a", "0" * 40, tmp_path / "work")
    for path, name in dv.INPUTS.items():
        assert (cell / name).read_bytes() == path.encode()
    assert (cell / "params.yaml").read_text() == "seed: 0\n"

    gone = next(iter(md5s.values()))
    (cache / gone[:2] / gone[2:]).unlink()
    with pytest.raises(SystemExit, match="not in the DVC cache"):
        dv.extract("exp-b", "0" * 40, tmp_path / "work")
    files["dvc.lock"] = _lock({k: v for k, v in list(md5s.items())[1:]})
    with pytest.raises(SystemExit, match="dvc.lock has no"):
        dv.extract("exp-c", "0" * 40, tmp_path / "work")


def test_unknown_experiments_are_refused_before_anything_runs(monkeypatch):
    monkeypatch.setattr(dv, "find_experiments", lambda root: {"mem-r100-sym0.4-s0": "0" * 40})
    with pytest.raises(SystemExit, match="not finished experiments: nope"):
        dv.main(["--exps", "nope", "--variant", "paper"])


def test_class_totals_diagnostic_total_variation_by_hand():
    ct = _load("class_totals")
    assert ct.total_variation([10, 0], [5, 5]) == pytest.approx(0.5)
    assert ct.total_variation([2, 2, 4], [1, 1, 2]) == pytest.approx(0.0)  # scale does not matter
    assert ct.total_variation([3, 1, 0], [0, 1, 3]) == pytest.approx(0.75)
