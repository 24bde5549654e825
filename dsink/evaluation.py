"""Metrics on the clean, balanced test set and on the noisy training labels.

- ``top1``, and ``many`` / ``medium`` / ``few``: accuracy over test samples of classes with more than
  ``many_threshold`` training samples, fewer than ``few_threshold``, and the rest (class sizes are the
  clean counts of the long-tailed training set). A group with no class is reported as ``null``.
- ``corrected``: share of noisy training labels whose prediction equals the clean label;
  ``memorised``: share whose prediction equals the noisy label (``method.md``, benchmark regime).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def class_groups(train_counts: np.ndarray, many_threshold: int, few_threshold: int) -> dict[str, np.ndarray]:
    counts = np.asarray(train_counts)
    many = counts > many_threshold
    few = counts < few_threshold
    return {"many": np.flatnonzero(many), "medium": np.flatnonzero(~many & ~few), "few": np.flatnonzero(few)}


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy of each class (NaN for a class with no test sample)."""
    hits = np.bincount(labels, weights=(pred == labels).astype(np.float64), minlength=num_classes)
    totals = np.bincount(labels, minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits / totals


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``M[true, predicted]`` counts."""
    return np.bincount(labels * num_classes + pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def shot_accuracy(
    pred: np.ndarray, labels: np.ndarray, train_counts: np.ndarray, many_threshold: int, few_threshold: int
) -> dict[str, Any]:
    """Top-1 and many/medium/few accuracy (sample-weighted within each group)."""
    pred = np.asarray(pred)
    labels = np.asarray(labels)
    hit = pred == labels
    out: dict[str, Any] = {"top1": float(hit.mean())}
    for name, classes in class_groups(train_counts, many_threshold, few_threshold).items():
        sel = np.isin(labels, classes)
        out[name] = float(hit[sel].mean()) if sel.any() else None
    return out


def label_repair(pred: np.ndarray, clean: np.ndarray, noisy: np.ndarray) -> dict[str, float | None]:
    """Share of noisy training labels corrected (pred == clean) and memorised (pred == noisy)."""
    wrong = clean != noisy
    if not wrong.any():
        return {"corrected": None, "memorised": None}
    return {
        "corrected": float((pred[wrong] == clean[wrong]).mean()),
        "memorised": float((pred[wrong] == noisy[wrong]).mean()),
    }


MODELS = ("dsink", "imbalance_teacher", "noise_teacher")
# What D-SINK is compared against besides its own teachers: the naive ensemble of the two teachers and the
# baselines trained by ``train_baseline@*`` (plain CE, and GCE on logit-adjusted logits).
COMPARISONS = ("teacher_average", "ce", "la_gce")


@dataclass
class Predictions:
    """Train and test logits (or log-probabilities) of one model, aligned like a logits file."""

    train: np.ndarray
    test: np.ndarray


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def average_probabilities(*models: Any) -> Predictions:
    """The naive ensemble: log of the mean of each model's softmax probabilities (train and test).

    Each model is read as it predicts on its own (raw logits, whatever prior they are under), which is
    what a user averaging two off-the-shelf models gets. Float64 log-sum-exp, so confident rows neither
    underflow nor tie.
    """
    if not models:
        raise ValueError("average_probabilities needs at least one model")

    def mean_log_prob(split: str) -> np.ndarray:
        stacked = np.stack([_log_softmax(getattr(m, split)) for m in models])
        top = stacked.max(axis=0)
        return top + np.log(np.exp(stacked - top).mean(axis=0))

    return Predictions(mean_log_prob("train"), mean_log_prob("test"))


def evaluate_models(
    logits: dict[str, Any], test_labels: np.ndarray, index: Any, many_threshold: int, few_threshold: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``metrics/evaluate.json`` content and the per-class / confusion tables for the plots.

    ``logits`` maps each model name (those of :data:`MODELS` first, then any of :data:`COMPARISONS`) to
    an object with ``train`` / ``test`` logit arrays (a validated :class:`~dsink.artifacts.TeacherLogits`
    or :class:`Predictions`); the report keeps that order. The confusion matrix is the one of ``dsink``.
    """
    C = index.num_classes
    counts = index.clean_counts()
    metrics: dict[str, Any] = {}
    per_class_rows = []
    confusion = None
    per_class = {}
    for name in logits:
        t = logits[name]
        pred_test = t.test.argmax(1)
        m = shot_accuracy(pred_test, test_labels, counts, many_threshold, few_threshold)
        m.update(label_repair(t.train.argmax(1), index.clean_label, index.noisy_label))
        metrics[name] = m
        per_class[name] = per_class_accuracy(pred_test, test_labels, C)
        if name == "dsink":
            confusion = confusion_matrix(pred_test, test_labels, C)
    names = index.meta.get("class_names") or [str(c) for c in range(C)]
    for c in range(C):
        row = {"class": int(c), "class_name": str(names[c]), "class_size": int(counts[c])}
        for name in logits:
            v = per_class[name][c]
            row[name] = None if np.isnan(v) else float(v)
        per_class_rows.append(row)
    groups = class_groups(counts, many_threshold, few_threshold)
    metrics["groups"] = {k: [int(c) for c in v] for k, v in groups.items()}
    return metrics, {
        "per_class": per_class_rows,
        "confusion": confusion,
        "class_names": [str(n) for n in names],
    }
