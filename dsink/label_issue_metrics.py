"""How well a set of flagged training labels matches the injected noise: precision, recall, F1, AUROC.

Evaluation only: it reads the ground truth (``is_noisy``) that the training side never sees. Used by the
``label_issues`` stage (when the corrupted set carries ground truth) and by the cleanlab benchmark, so
that D-SINK's flags and every comparison are scored by the same code.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def auroc(score: np.ndarray, truth: np.ndarray) -> float | None:
    """Area under the ROC curve of ``score`` for the positives ``truth`` (None when one class is absent).

    The Mann-Whitney form: the probability that a random positive outscores a random negative, ties
    counted one half (average ranks), so it is exact for any number of tied scores.
    """
    score = np.asarray(score, dtype=np.float64)
    truth = np.asarray(truth, dtype=bool)
    n_pos = int(truth.sum())
    n_neg = truth.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(score, kind="stable")
    s = score[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # average rank (1-based) of each run of equal scores
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], s.size]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    u = ranks[truth].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def detection_scores(is_issue: np.ndarray, score: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """``num_flagged``, ``num_noisy``, ``precision``, ``recall``, ``f1`` of ``is_issue`` and ``auroc`` of
    ``score`` against ``truth``. A ratio with an empty denominator is None (e.g. precision of no flag)."""
    flag = np.asarray(is_issue, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    tp = int((flag & truth).sum())
    n_flag, n_true = int(flag.sum()), int(truth.sum())
    precision = tp / n_flag if n_flag else None
    recall = tp / n_true if n_true else None
    f1 = 2 * tp / (n_flag + n_true) if (n_flag + n_true) else None
    return {
        "num_flagged": n_flag,
        "num_noisy": n_true,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "auroc": auroc(score, truth),
    }


def grouped_detection_scores(
    is_issue: np.ndarray,
    score: np.ndarray,
    truth: np.ndarray,
    given_label: np.ndarray,
    groups: dict[str, np.ndarray],
) -> dict[str, Any]:
    """:func:`detection_scores` overall and for each class group (samples grouped by their *given* label,
    the class a user sees them under, so a rare class's flood of false flags shows in its group)."""
    out: dict[str, Any] = {"overall": detection_scores(is_issue, score, truth)}
    given = np.asarray(given_label)
    for name, classes in groups.items():
        sel = np.isin(given, np.asarray(classes))
        out[name] = detection_scores(
            np.asarray(is_issue)[sel], np.asarray(score)[sel], np.asarray(truth)[sel]
        )
    return out


def has_ground_truth(meta: dict[str, Any]) -> bool:
    """Does the corrupted set know which labels are wrong? Yes when noise was injected into known clean
    labels (any ``data.noise.type`` but ``none``); a set whose given labels are its only labels (``none``,
    e.g. your own ImageFolder) has nothing to score the flags against."""
    noise = meta.get("noise")
    return isinstance(noise, dict) and noise.get("type", "none") != "none"
