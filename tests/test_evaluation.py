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
