"""Metrics on the clean, balanced test set and on the noisy training labels.

- ``top1``, and ``many`` / ``medium`` / ``few``: accuracy over test samples of classes with more than
  ``many_threshold`` training samples, fewer than ``few_threshold``, and the rest (class sizes are the
  clean counts of the long-tailed training set). A group with no class is reported as ``null``.
- ``corrected``: share of noisy training labels whose prediction equals the clean label;
  ``memorised``: share whose prediction equals the noisy label (``method.md``, benchmark regime).
- ``val``: ``top1`` / ``many`` / ``medium`` / ``few`` on the validation split (clean labels, held out of
  the source training set), the numbers a benchmark chooses its settings on; ``null`` without one.

**One space for every comparison.** Every model is read in the **balanced** space (as if every class were
equally frequent) before anything is measured or averaged: :func:`balanced_logits` turns raw logits into
``raw + train_offset - train_log_prior``. ``raw + train_offset`` is the model's training-prior logit (the
file's ``train_offset`` metadata; 0 for a file without it, i.e. a model whose raw logits are
training-prior) and ``train_log_prior`` is the log class prior the model was trained under (the file's
``train_log_prior`` metadata, else the noisy-label prior of :func:`dsink.priors.label_log_prior`).
So a logit-adjusted model (tau = 1) is read as its raw logits, and a plain-CE model gets post-hoc logit
adjustment (Menon et al. 2021), the strong version of CE a user would deploy on a balanced test set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dsink.errors import DsinkError
from dsink.priors import label_log_prior


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
# baselines trained by ``train_baseline@*`` (plain CE, and logit-adjusted CE on the samples class-aware
# small-loss selection keeps).
COMPARISONS = ("teacher_average", "ce", "la_small_loss")


@dataclass
class Predictions:
    """Train, test (and validation) logits or log-probabilities of one model, aligned like a logits file."""

    train: np.ndarray
    test: np.ndarray
    val: np.ndarray | None = None  # None: no validation rows


def balanced_logits(
    raw: np.ndarray, train_offset: np.ndarray | None, train_log_prior: np.ndarray
) -> np.ndarray:
    """``raw + train_offset - train_log_prior`` (float64): a model's logits in the balanced space.

    ``raw + train_offset`` is the training-prior logit (``train_offset`` None = 0) and subtracting the
    log prior the model was trained under leaves the class-conditional part, the balanced posterior's
    logit (Bayes' rule with a uniform prior).
    """
    z = np.asarray(raw, dtype=np.float64)
    if train_offset is not None:
        z = z + np.asarray(train_offset, dtype=np.float64)
    return z - np.asarray(train_log_prior, dtype=np.float64)


def _class_vector(meta: dict[str, Any], key: str, C: int, where: str) -> np.ndarray | None:
    value = meta.get(key)
    if value is None:
        return None
    try:
        v = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        v = np.empty(0)
    if v.shape != (C,) or not np.all(np.isfinite(v)):
        raise DsinkError(f"{where}: metadata {key} must be {C} finite numbers (one per class)")
    return v


def balanced_predictions(t: Any, index: Any, where: str = "logits") -> Predictions:
    """A logits file (:class:`~dsink.artifacts.TeacherLogits`) read in the balanced space, every split.

    ``train_offset`` and ``train_log_prior`` come from the file's metadata (see the module docstring);
    a missing ``train_log_prior`` is the noisy-label prior of ``index``.
    """
    C = index.num_classes
    offset = _class_vector(t.meta, "train_offset", C, where)
    log_prior = _class_vector(t.meta, "train_log_prior", C, where)
    if log_prior is None:
        log_prior = label_log_prior(index.noisy_label, C)
    val = getattr(t, "val", None)
    return Predictions(
        balanced_logits(t.train, offset, log_prior),
        balanced_logits(t.test, offset, log_prior),
        None if val is None else balanced_logits(val, offset, log_prior),
    )


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def average_probabilities(*models: Any) -> Predictions:
    """The naive ensemble: log of the mean of each model's softmax probabilities (train, test, val).

    The models must already be in one space (``evaluate`` passes balanced-space
    :func:`balanced_predictions`); averaging a balanced and a training-prior softmax mixes two priors.
    Float64 log-sum-exp, so confident rows neither underflow nor tie. ``val`` is None unless every model
    has validation rows.
    """
    if not models:
        raise ValueError("average_probabilities needs at least one model")

    def mean_log_prob(split: str) -> np.ndarray:
        stacked = np.stack([_log_softmax(getattr(m, split)) for m in models])
        top = stacked.max(axis=0)
        return top + np.log(np.exp(stacked - top).mean(axis=0))

    has_val = all(getattr(m, "val", None) is not None for m in models)
    return Predictions(
        mean_log_prob("train"), mean_log_prob("test"), mean_log_prob("val") if has_val else None
    )


def evaluate_models(
    logits: dict[str, Any],
    test_labels: np.ndarray,
    index: Any,
    many_threshold: int,
    few_threshold: int,
    val_labels: np.ndarray | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``metrics/evaluate.json`` content and the per-class / confusion tables for the plots.

    ``logits`` maps each model name (those of :data:`MODELS` first, then any of :data:`COMPARISONS`) to
    its :class:`Predictions` in one space (``evaluate`` passes the balanced space); every metric is the
    argmax of what it is given. The report keeps that order. The confusion matrix is the one of ``dsink``.
    ``val_labels``: clean labels of the validation split, aligned with each model's ``val`` rows; a model
    without val rows (or no validation split) gets ``val: null``.
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
        val = getattr(t, "val", None)
        m["val"] = (
            shot_accuracy(val.argmax(1), val_labels, counts, many_threshold, few_threshold)
            if val is not None and val_labels is not None and len(val_labels)
            else None
        )
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
