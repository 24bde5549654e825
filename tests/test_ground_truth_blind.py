"""No ground truth on the training side: the clean labels reach reports, never weights.

The same corrupted set is given two different, self-consistent ground truths (same sample ids and noisy
labels; other clean labels, with ``is_noisy``, ``noise_rate`` and ``class_counts`` recomputed). Every
training stage runs on both, with the tracking path on (it reads the clean labels for its dvclive
curves) and the noise teacher estimating its forget rate: every model file, every logits file and the
noise-rate estimate must come out byte-identical.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dsink.artifacts import CorruptedIndex, read_corrupted, read_logits, write_corrupted

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(900)
C = 3


def _load_stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def other_ground_truth(idx: CorruptedIndex, seed: int = 7) -> CorruptedIndex:
    """The same ids and noisy labels with independently drawn clean labels, metadata recomputed."""
    g = np.random.default_rng(seed)
    flip = (idx.noisy_label + 1 + g.integers(0, C - 1, idx.noisy_label.size)) % C
    clean = np.where(g.random(idx.noisy_label.size) < 0.5, idx.noisy_label, flip).astype(np.int64)
    is_noisy = clean != idx.noisy_label
    meta = dict(idx.meta)
    meta.update(
        class_counts=np.bincount(clean, minlength=C).tolist(),
        noise_rate=float(is_noisy.mean()),
    )
    return CorruptedIndex(idx.sample_id.copy(), clean, idx.noisy_label.copy(), is_noisy, meta)


TRAININGS = ("teachers.imbalance", "teachers.noise", "baselines.ce", "baselines.la_small_loss", "distill")
ARTIFACTS = (
    "data/teachers/imbalance/model.pt",
    "data/teachers/noise/model.pt",
    "data/teachers/noise/estimate.json",
    "data/teachers/imbalance/estimate.json",
    "data/logits/imbalance.parquet",
    "data/logits/noise.parquet",
    "data/baselines/ce/model.pt",
    "data/baselines/ce/logits.parquet",
    "data/baselines/la_small_loss/model.pt",
    "data/baselines/la_small_loss/logits.parquet",
    "data/student/model.pt",
    "data/student/logits.parquet",
)


def _train_everything(d: Path, monkeypatch) -> None:
    monkeypatch.chdir(d)
    for role in ("imbalance", "noise"):
        _load_stage("train_teacher").cli(["--role", role])
        _load_stage("dump_logits").cli(["--role", role])
    for method in ("ce", "la_small_loss"):
        _load_stage("train_baseline").cli(["--method", method])
    _load_stage("distill").cli([])


def test_every_trained_artifact_ignores_the_clean_labels(tmp_path, monkeypatch, write_params):
    overrides = {
        "data.dataset": "synthetic",
        "data.root": str(tmp_path / "raw"),
        "data.imbalance.ratio": 4,
        "data.noise.rate": 0.3,
        "data.synthetic.num_classes": C,
        "data.synthetic.image_size": 8,
        "data.synthetic.train_per_class": 60,
        "data.synthetic.test_per_class": 10,
        "data.validation.per_class": 5,
        "teachers.noise.method": "small_loss",
        "teachers.noise.forget_rate": None,  # the estimate path
        "teachers.noise.estimate_epochs": 1,
        "teachers.noise.ramp_epochs": 1,
        "baselines.la_small_loss.estimate_epochs": 1,  # its estimate and selection too
        "baselines.la_small_loss.ramp_epochs": 1,
    }
    for section in TRAININGS:
        overrides.update({f"{section}.epochs": 2, f"{section}.batch_size": 16, f"{section}.track_every": 1})
    a, b = tmp_path / "truth", tmp_path / "other"
    write_params(a, overrides)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.chdir(a)
    _load_stage("corrupt").cli([])
    shutil.copytree(a, b)
    original = read_corrupted(a / "data/corrupted/train.parquet")
    other = other_ground_truth(original)
    write_corrupted(b / "data/corrupted/train.parquet", other)
    back = read_corrupted(b / "data/corrupted/train.parquet")
    assert np.array_equal(back.noisy_label, original.noisy_label)
    assert np.array_equal(back.sample_id, original.sample_id)
    assert not np.array_equal(back.clean_label, original.clean_label)
    assert back.meta["noise_rate"] != original.meta["noise_rate"]
    assert back.clean_counts().tolist() == back.meta["class_counts"] != original.meta["class_counts"]

    _train_everything(a, monkeypatch)
    _train_everything(b, monkeypatch)
    for rel in ARTIFACTS:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    # the estimate is the noise teacher's, and it travels to the logits metadata
    est = json.loads((a / "data/teachers/noise/estimate.json").read_text())["noise_rate_estimate"]
    assert est is not None and 0 < est < 1
    assert read_logits(a / "data/logits/noise.parquet", original).meta["noise_rate_estimate"] == est
    assert (
        json.loads((a / "data/teachers/imbalance/estimate.json").read_text())["noise_rate_estimate"] is None
    )
    baseline = read_logits(a / "data/baselines/la_small_loss/logits.parquet", original).meta
    assert 0 < baseline["noise_rate_estimate"] < 1 and len(baseline["noise_rate_estimate_per_class"]) == C
    # the check has teeth: the clean labels were read, for the curves only, and differ between the runs
    for live in ("teacher_noise", "teacher_imbalance", "baseline_ce", "baseline_la_small_loss", "student"):
        ma = json.loads((a / "dvclive" / live / "metrics.json").read_text())
        mb = json.loads((b / "dvclive" / live / "metrics.json").read_text())
        repaired = [
            k for k in ma if k.startswith("train_") and k not in ("train_loss", "train_noisy_label_acc")
        ]
        assert repaired, (live, sorted(ma))
        assert any(ma[k] != mb[k] for k in repaired), (live, ma, mb)
