"""End to end: `dvc repro` in a temporary copy of the repo, on the tiny synthetic dataset.

Checks the contract's artifacts exist with the right shapes, that a params change reruns only the stages
downstream of it, and that a no-op repro runs nothing.
"""

from __future__ import annotations

import json
import re
import time
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
    for name in ("dsink", "imbalance_teacher", "noise_teacher", "teacher_average", "ce", "la_gce"):
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


def test_bring_your_own_teacher_reruns_only_distill_and_evaluate(repo: Path):
    """A contract-shaped logits file from elsewhere replaces the noise teacher without training it."""
    if not (repo / "dvc.lock").exists():
        pytest.skip("needs the pipeline from the first test")
    run(["git", "checkout", "-q", "--", "."], repo)
    run([DVC, "checkout", "-q"], repo)
    import numpy as np

    from dsink.artifacts import logits_table, read_corrupted, write_logits

    idx = read_corrupted(repo / "data/corrupted/train.parquet")
    n_tr, n_te = idx.sample_id.size, 4 * 15
    # "another framework": a model that knows the clean labels of the training set and nothing of the test set
    z = np.concatenate([np.eye(4)[idx.clean_label] * 5, np.zeros((n_te, 4))]).astype(np.float32)
    split = np.array(["train"] * n_tr + ["test"] * n_te, dtype=object)
    ids = np.concatenate([idx.sample_id, np.arange(n_te)])
    write_logits(repo / "data/logits/noise.parquet", logits_table(split, ids, z, {"role": "noise"}))
    run([DVC, "commit", "-f", "dump_logits@noise"], repo)
    out = run([DVC, "repro"], repo)
    assert ran_stages(out) == {"distill", "evaluate"}


def test_queued_sweep_lists_each_experiment(repo: Path):
    if not (repo / "dvc.lock").exists():
        pytest.skip("needs the pipeline from the first test")
    run(["git", "checkout", "-q", "--", "."], repo)
    run([DVC, "checkout", "-q", "--force"], repo)
    run([DVC, "exp", "run", "--queue", "-S", "data.noise.rate=0.2,0.4"], repo)
    run([DVC, "queue", "start", "-j", "1"], repo)
    deadline = time.time() + 600
    while time.time() < deadline:  # the worker runs in the background
        status = run([DVC, "queue", "status"], repo)
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(3)
    assert "Failed" not in status, status
    shown = json.loads(run([DVC, "exp", "show", "--json"], repo))
    rates = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                params = data.get("params", {}).get("params.yaml", {}).get("data", {})
                metrics = data.get("metrics", {}).get("metrics/evaluate.json", {}).get("data", {})
                rate = params.get("data", {}).get("noise", {}).get("rate")
                if rate is not None and metrics:
                    rates[rate] = metrics["dsink"]["top1"]
    assert {0.2, 0.4} <= set(rates), rates
