"""Evaluation metrics on hand-made predictions (values worked out by hand in the comments)."""

from __future__ import annotations

import numpy as np
import pytest

from dsink.evaluation import (
    class_groups,
    confusion_matrix,
    label_repair,
    per_class_accuracy,
    shot_accuracy,
)

# 3 classes; training sizes 500 (many), 50 (medium), 5 (few) with thresholds many > 100, few < 20.
COUNTS = np.array([500, 50, 5])
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
PRED = np.array([0, 0, 0, 1, 1, 1, 0, 0, 2, 0, 0, 0])


def test_groups_follow_thresholds():
    g = class_groups(COUNTS, 100, 20)
    assert g["many"].tolist() == [0] and g["medium"].tolist() == [1] and g["few"].tolist() == [2]
    # boundaries: exactly 100 is not many, exactly 20 is not few
    g = class_groups(np.array([101, 100, 20, 19]), 100, 20)
    assert g["many"].tolist() == [0] and g["medium"].tolist() == [1, 2] and g["few"].tolist() == [3]


def test_top1_and_shot_groups():
    m = shot_accuracy(PRED, LABELS, COUNTS, 100, 20)
    assert m["top1"] == pytest.approx(6 / 12)  # 3 + 2 + 1 correct
    assert m["many"] == pytest.approx(3 / 4)
    assert m["medium"] == pytest.approx(2 / 4)
    assert m["few"] == pytest.approx(1 / 4)


def test_empty_group_is_null():
    m = shot_accuracy(PRED, LABELS, np.array([500, 400, 300]), 100, 20)
    assert m["medium"] is None and m["few"] is None and m["many"] == pytest.approx(0.5)


def test_per_class_and_confusion():
    acc = per_class_accuracy(PRED, LABELS, 4)
    assert acc[:3].tolist() == [0.75, 0.5, 0.25] and np.isnan(acc[3])
    cm = confusion_matrix(PRED, LABELS, 3)
    assert cm.tolist() == [[3, 1, 0], [2, 2, 0], [3, 0, 1]]
    assert cm.sum() == LABELS.size


def test_label_repair_counts_only_noisy_samples():
    clean = np.array([0, 1, 2, 0, 1])
    noisy = np.array([1, 1, 0, 2, 1])  # samples 0, 2, 3 are noisy
    pred = np.array([0, 0, 0, 1, 1])  # 0: corrected, 2: memorised, 3: neither
    r = label_repair(pred, clean, noisy)
    assert r["corrected"] == pytest.approx(1 / 3) and r["memorised"] == pytest.approx(1 / 3)
    assert label_repair(pred, clean, clean) == {"corrected": None, "memorised": None}


def test_average_probabilities_is_the_mean_of_softmaxes():
    from dsink.evaluation import Predictions, average_probabilities

    rng = np.random.default_rng(0)
    a = Predictions(rng.normal(size=(7, 4)) * 3, rng.normal(size=(5, 4)) * 3)
    b = Predictions(rng.normal(size=(7, 4)) * 3, rng.normal(size=(5, 4)) * 3)

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    avg = average_probabilities(a, b)
    for split in ("train", "test"):
        expected = (softmax(getattr(a, split)) + softmax(getattr(b, split))) / 2
        np.testing.assert_allclose(np.exp(getattr(avg, split)), expected, rtol=1e-12)


def test_average_probabilities_survives_confident_rows():
    from dsink.evaluation import Predictions, average_probabilities

    # probabilities that underflow float32: the ensemble still prefers the class both models like
    a = Predictions(np.array([[0.0, -2000.0, -5000.0]]), np.array([[0.0, -2000.0, -5000.0]]))
    b = Predictions(np.array([[-3000.0, 0.0, -1000.0]]), np.array([[-3000.0, 0.0, -1000.0]]))
    avg = average_probabilities(a, b)
    assert np.isfinite(avg.test).all()
    np.testing.assert_allclose(avg.test[0, :2], np.log(0.5), atol=1e-12)
    with pytest.raises(ValueError):
        average_probabilities()


# ---------------------------------------------------------------- one (balanced) space for every model


class _File:
    """What ``read_logits`` returns, made by hand: train/test/val arrays and the metadata."""

    def __init__(self, train, test, meta, val=None):
        self.train, self.test, self.meta, self.val = train, test, meta, val


class _Index:
    """The corrupted-index surface evaluation reads."""

    def __init__(self, clean, noisy, C, meta=None):
        self.clean_label, self.noisy_label, self.num_classes = np.asarray(clean), np.asarray(noisy), C
        self.meta = meta or {}

    def clean_counts(self):
        return np.bincount(self.clean_label, minlength=self.num_classes)


def test_balanced_logits_by_hand():
    from dsink.evaluation import balanced_logits

    raw = np.array([[1.0, 2.0, 3.0]])
    offset = np.array([0.5, -1.0, 0.0])
    log_prior = np.log([0.5, 0.25, 0.25])
    # 1 + 0.5 + log 2 = 2.19315, 2 - 1 + log 4 = 2.38629, 3 + 0 + log 4 = 4.38629
    np.testing.assert_allclose(
        balanced_logits(raw, offset, log_prior), [[2.193147, 2.386294, 4.386294]], atol=1e-6
    )
    # no offset: a training-prior model, read with the prior divided out
    np.testing.assert_allclose(
        balanced_logits(raw, None, log_prior), [[1.693147, 3.386294, 4.386294]], atol=1e-6
    )


def test_balanced_predictions_reads_the_files_metadata():
    from dsink.errors import DsinkError
    from dsink.evaluation import balanced_predictions

    # noisy labels 0,0,0,1 over 3 classes: add-one prior (3+1, 1+1, 0+1) / (4+3) = 4/7, 2/7, 1/7
    idx = _Index([0, 0, 1, 1], [0, 0, 0, 1], 3)
    raw = np.zeros((4, 3))
    lp = np.log([4 / 7, 2 / 7, 1 / 7])
    # no metadata: training-prior logits, balanced = raw - log prior
    p = balanced_predictions(_File(raw, raw[:1], {}), idx)
    np.testing.assert_allclose(p.test, [-lp], atol=1e-12)
    assert p.val is None
    # a logit-adjusted model (offset = log prior of the noisy labels): balanced = raw
    p = balanced_predictions(_File(raw, raw[:1], {"train_offset": lp.tolist()}, val=raw[:2]), idx)
    np.testing.assert_allclose(p.test, [[0.0, 0.0, 0.0]], atol=1e-12)
    np.testing.assert_allclose(p.val, np.zeros((2, 3)), atol=1e-12)
    # the file's own training prior (the student's) replaces the noisy-label one
    meta = {"train_offset": [1.0, 1.0, 1.0], "train_log_prior": [-1.0, -2.0, -3.0]}
    p = balanced_predictions(_File(raw, raw[:1], meta), idx)
    np.testing.assert_allclose(p.test, [[2.0, 3.0, 4.0]], atol=1e-12)
    for bad in ({"train_offset": [1.0, 2.0]}, {"train_log_prior": [0.0, float("nan"), 0.0]}):
        with pytest.raises(DsinkError, match=f"x.parquet: metadata {next(iter(bad))} must be 3 finite"):
            balanced_predictions(_File(raw, raw[:1], bad), idx, "x.parquet")


def test_teacher_average_of_a_balanced_and_a_train_space_model():
    """The average is of the two *balanced* softmaxes, whatever space each file's raw logits are in."""
    from dsink.evaluation import average_probabilities, balanced_predictions

    rng = np.random.default_rng(3)
    noisy = np.array([0] * 6 + [1] * 3 + [2] * 1)
    idx = _Index(noisy, noisy, 3)
    pi = np.array([7, 4, 2]) / 13  # (6+1, 3+1, 1+1) / (10+3)
    la_raw = {s: rng.normal(size=(n, 3)) * 2 for s, n in (("train", 10), ("test", 5), ("val", 4))}
    ce_raw = {s: rng.normal(size=(n, 3)) * 2 for s, n in (("train", 10), ("test", 5), ("val", 4))}
    la = _File(la_raw["train"], la_raw["test"], {"train_offset": np.log(pi).tolist()}, la_raw["val"])
    ce = _File(ce_raw["train"], ce_raw["test"], {}, ce_raw["val"])

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    avg = average_probabilities(balanced_predictions(la, idx), balanced_predictions(ce, idx))
    for split in ("train", "test", "val"):
        # the LA model's raw softmax is balanced; CE's balanced softmax is softmax(raw - log pi)
        expected = (softmax(la_raw[split]) + softmax(ce_raw[split] - np.log(pi))) / 2
        np.testing.assert_allclose(np.exp(getattr(avg, split)), expected, rtol=1e-10)
    # without validation rows on one model, the average has none
    ce_no_val = balanced_predictions(_File(ce_raw["train"], ce_raw["test"], {}), idx)
    assert average_probabilities(balanced_predictions(la, idx), ce_no_val).val is None


def test_val_metrics_by_hand():
    from dsink.evaluation import Predictions, evaluate_models

    # training sizes 500 / 50 / 5 -> many / medium / few at thresholds 100 / 20 (COUNTS above)
    clean = np.repeat([0, 1, 2], COUNTS)
    idx = _Index(clean, clean, 3, {"class_names": ["a", "b", "c"]})
    val_labels = np.array([0, 0, 1, 1, 2, 2])
    val_pred = np.array([0, 1, 1, 1, 0, 0])  # class 0: 1/2, class 1: 2/2, class 2: 0/2
    onehot = np.eye(3)
    m = Predictions(onehot[clean], onehot[PRED], onehot[val_pred])
    no_val = Predictions(onehot[clean], onehot[PRED])
    metrics, _ = evaluate_models({"dsink": m, "ce": no_val}, LABELS, idx, 100, 20, val_labels=val_labels)
    assert metrics["dsink"]["val"] == pytest.approx({"top1": 3 / 6, "many": 1 / 2, "medium": 1.0, "few": 0.0})
    assert metrics["dsink"]["top1"] == pytest.approx(6 / 12)  # the test metrics are unchanged beside it
    assert metrics["ce"]["val"] is None
    metrics, _ = evaluate_models({"dsink": m}, LABELS, idx, 100, 20)
    assert metrics["dsink"]["val"] is None


# ---------------------------------------------------------------- the evaluate stage on hand-made logits


def _stage(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "stages" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"stage_{name}_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_evaluate_stage_val_metrics_balanced_space_and_noise_rate(tmp_path, monkeypatch, write_params):
    import json

    from dsink.artifacts import logits_table, read_corrupted, read_validation, write_logits

    C, PER_VAL = 3, 4
    write_params(
        tmp_path,
        {
            "data.dataset": "synthetic",
            "data.root": str(tmp_path / "raw"),
            "data.imbalance.ratio": 4,
            "data.synthetic.num_classes": C,
            "data.synthetic.train_per_class": 40,
            "data.synthetic.test_per_class": 10,
            "data.validation.per_class": PER_VAL,
            "evaluate.many_threshold": 20,
            "evaluate.few_threshold": 10,
        },
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    _stage("corrupt").cli([])
    idx = read_corrupted("data/corrupted/train.parquet")
    val = read_validation("data/corrupted/val.parquet")
    # n_max = 40 - 4 held out = 36; floor(36 * 4 ** (-c / 2)) = 36, 18, 9 -> many / medium / few
    assert idx.clean_counts().tolist() == [36, 18, 9]
    from dsink.data.sources import synthetic

    test_labels = synthetic(C, 8, 1, 40, 10).test.labels  # what the stage's load_source gives
    eye = np.eye(C, dtype=np.float32)
    # noisy-label prior with add-one smoothing, computed here independently of dsink.priors
    n = np.bincount(idx.noisy_label, minlength=C)
    log_pi = np.log((n + 1) / (n.sum() + C)).astype(np.float32)
    # val predictions: class 0 all right, class 1 half right, class 2 all wrong (predicted as 0)
    rank = np.array([np.sum(val.label[:i] == val.label[i]) for i in range(len(val))])
    val_pred = np.where(val.label == 0, 0, np.where((val.label == 1) & (rank < PER_VAL // 2), 1, 0))

    def write(path, train, test, val_rows, meta):
        z = np.concatenate([train, test, val_rows]).astype(np.float32)
        split = ["train"] * len(train) + ["test"] * len(test) + ["val"] * len(val_rows)
        ids = np.concatenate([idx.sample_id, np.arange(len(test)), val.sample_id])
        write_logits(path, logits_table(np.array(split, dtype=object), ids, z, meta))

    balanced = {"train_offset": [0.0] * C, "train_log_prior": [0.0] * C}
    good = (eye[idx.clean_label], eye[test_labels], eye[val_pred])
    write("data/student/logits.parquet", *good, balanced)
    write("data/logits/imbalance.parquet", *good, balanced)
    write("data/logits/noise.parquet", *good, {**balanced, "noise_rate_estimate": 0.25})
    # plain CE, training-prior raw logits: log pi plus a small class signal. Its raw argmax is the head
    # class for every test sample; read in the balanced space (post-hoc logit adjustment) it is perfect.
    ce_test = log_pi + 0.1 * eye[test_labels]
    assert (ce_test.argmax(1) == 0).all()
    write("data/baselines/ce/logits.parquet", eye[idx.clean_label], ce_test, eye[val.label] + log_pi, {})
    write("data/baselines/la_small_loss/logits.parquet", *good, balanced)
    _stage("evaluate").cli([])
    metrics = json.loads((tmp_path / "metrics/evaluate.json").read_text())
    assert metrics["dsink"]["val"] == pytest.approx({"top1": 6 / 12, "many": 1.0, "medium": 0.5, "few": 0.0})
    assert metrics["dsink"]["top1"] == 1.0
    assert metrics["ce"]["top1"] == 1.0 and metrics["ce"]["val"]["top1"] == 1.0
    assert metrics["teacher_average"]["val"] == metrics["dsink"]["val"]
    assert metrics["noise_rate"] == {"estimate": 0.25, "true": pytest.approx(idx.meta["noise_rate"])}
    # a noise teacher without an estimate: null; a file without val rows: val null
    z = np.concatenate([good[0], good[1]])
    ids = np.concatenate([idx.sample_id, np.arange(len(test_labels))])
    split = np.array(["train"] * len(idx.sample_id) + ["test"] * len(test_labels), dtype=object)
    write_logits("data/logits/noise.parquet", logits_table(split, ids, z, {}))
    _stage("evaluate").cli([])
    metrics = json.loads((tmp_path / "metrics/evaluate.json").read_text())
    assert metrics["noise_rate"]["estimate"] is None
    assert metrics["noise_teacher"]["val"] is None and metrics["teacher_average"]["val"] is None
    assert metrics["dsink"]["val"]["top1"] == pytest.approx(0.5)
