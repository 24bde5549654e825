"""End to end: `dvc repro` in a temporary copy of the repo, on the tiny synthetic dataset.

Checks the contract's artifacts exist with the right shapes, that a params change reruns only the stages
downstream of it, and that a no-op repro runs nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import ALL_STAGES, DVC, ran_stages, run

pytestmark = pytest.mark.timeout(900)


def test_repro_corrupt_then_everything(repo: Path):
    out = run([DVC, "repro", "corrupt"], repo)
    assert ran_stages(out) == {"corrupt"}
    table = pq.read_table(repo / "data/corrupted/train.parquet")
    assert table.column_names == ["sample_id", "clean_label", "noisy_label", "is_noisy"]
    out = run([DVC, "repro"], repo)
    assert ran_stages(out) == ALL_STAGES - {"corrupt"}
    metrics = json.loads((repo / "metrics/evaluate.json").read_text())
    for name in ("dsink", "imbalance_teacher", "noise_teacher"):
        for key in ("top1", "many", "medium", "few"):
            assert metrics[name][key] is None or 0.0 <= metrics[name][key] <= 1.0
    assert 0.0 <= metrics["dsink"]["corrected"] <= 1.0
    logits = pq.read_table(repo / "data/logits/noise.parquet")
    assert logits.schema.field("logits").type.list_size == 4
    for png in ("per_class", "confusion", "curves", "corrected"):
        assert (repo / "plots" / f"{png}.png").stat().st_size > 1000
    # nothing changed: nothing runs
    assert ran_stages(run([DVC, "repro"], repo)) == set()
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline"], repo)


def test_params_change_reruns_only_downstream(repo: Path):
    if not (repo / "dvc.lock").exists():
        pytest.skip("needs the pipeline from the previous test")
    out = run([DVC, "exp", "run", "-S", "teachers.noise.epochs=1"], repo)
    assert ran_stages(out) == {"train_teacher@noise", "dump_logits@noise", "distill", "evaluate"}
    out = run([DVC, "exp", "run", "-S", "evaluate.few_threshold=10"], repo)
    assert ran_stages(out) == {"evaluate"}
    out = run([DVC, "exp", "run", "-S", "data.noise.rate=0.2", "corrupt"], repo)
    assert ran_stages(out) == {"corrupt"}
