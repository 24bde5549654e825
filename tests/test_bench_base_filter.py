"""bench/base_filter.py: the filter diagnostic's shares against a count by hand, and strict JSON."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_base_filter", ROOT / "bench" / "base_filter.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


bf = _load()


def test_report_counts_kept_and_forgotten_labels_per_given_class():
    # given label 0: four samples, one wrong (clean 1), the wrong one and one clean one dropped;
    # given label 1: two clean samples, both kept; class 2: nobody is labelled with it
    noisy = np.array([0, 0, 0, 0, 1, 1])
    clean = np.array([0, 0, 0, 1, 1, 1])
    keep = np.array([True, True, False, False, True, True])
    r = bf.filter_report(keep, noisy, clean, num_classes=3)
    assert r["kept_wrong"] == 0.0
    assert r["kept_clean"] == pytest.approx(4 / 5)
    assert r["forgot"][:2] == pytest.approx([2 / 4, 0.0]) and math.isnan(r["forgot"][2])
    assert r["wrong"][:2] == pytest.approx([1 / 4, 0.0])
    assert r["clean_kept"][:2] == pytest.approx([2 / 3, 1.0])
    assert r["wrong_kept"][0] == 0.0 and all(math.isnan(v) for v in r["wrong_kept"][1:])
    # a mask that keeps everything keeps every wrong label
    assert bf.filter_report(np.ones(6, bool), noisy, clean, 3)["kept_wrong"] == 1.0


def test_json_rows_hold_no_nan_and_the_command(tmp_path):
    """The diagnostics' JSON (``distill_variants.write_rows``) is strict: an empty class's NaN is null."""
    rows = [{"forgot": [0.5, float("nan")], "kept_wrong": float("nan"), "name": "x"}]
    out = bf.write_rows(tmp_path / "sub" / "rows.json", "base_filter.py", ["--exps", "e1"], rows)
    payload = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert payload == {
        "command": "python bench/base_filter.py --exps e1",
        "rows": [{"forgot": [0.5, None], "kept_wrong": None, "name": "x"}],
    }
    assert [f.name for f in out.parent.iterdir()] == ["rows.json"]  # no temporary file left
