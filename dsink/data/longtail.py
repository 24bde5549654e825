"""Long-tail profiles and seeded subsampling by clean label.

The paper's protocol (and every long-tail benchmark since Cui et al. 2019) keeps
``n_c = floor(n_max * ratio ** (-c / (C - 1)))`` samples of the class at rank ``c``; the ``step`` profile
keeps ``n_max`` for the first half of the classes and ``floor(n_max / ratio)`` for the rest. Which class is
at rank 0 (the head) is the natural order or a seeded permutation.

A validation split (:func:`hold_out`) is drawn *before* the long tail, ``per_class`` seeded images of every
class, so even the head class, whose every remaining image the long tail keeps, has validation images.
The long tail is then cut from what is left.
"""

from __future__ import annotations

import numpy as np

from dsink.errors import DsinkError


def class_counts(profile: str, ratio: float, n_max: int, num_classes: int) -> np.ndarray:
    """Target count for each *rank* (0 = head) under ``profile``; int64 array of length ``num_classes``."""
    if ratio < 1:
        raise DsinkError(f"params.yaml: data.imbalance.ratio = {ratio} is invalid: expected a value >= 1")
    ranks = np.arange(num_classes, dtype=np.float64)
    if profile == "none" or num_classes == 1:
        counts = np.full(num_classes, float(n_max))
    elif profile == "exp":
        counts = n_max * ratio ** (-ranks / (num_classes - 1))
    elif profile == "step":
        counts = np.where(ranks < num_classes // 2, float(n_max), n_max / ratio)
    else:
        raise DsinkError(
            f"params.yaml: data.imbalance.profile = {profile!r} is invalid: expected exp, step or none"
        )
    # Exactly the published formula; a class is never emptied (at least one sample), which only matters
    # when n_max / ratio < 1.
    return np.maximum(np.floor(counts).astype(np.int64), 1)


def head_order(num_classes: int, head: str, rng: np.random.Generator) -> np.ndarray:
    """``order[r]`` is the class at rank ``r`` (natural: class r; permuted: a seeded permutation)."""
    if head == "natural":
        return np.arange(num_classes, dtype=np.int64)
    return rng.permutation(num_classes).astype(np.int64)


def subsample(labels: np.ndarray, per_class: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices keeping ``min(per_class[c], available)`` random samples of each class ``c``.

    Vectorised: one random permutation, a stable sort by label, and a per-class rank cut.
    """
    labels = np.asarray(labels, dtype=np.int64)
    perm = rng.permutation(labels.size)
    by_class = perm[np.argsort(labels[perm], kind="stable")]
    sorted_labels = labels[by_class]
    starts = np.searchsorted(sorted_labels, np.arange(per_class.size))
    rank = np.arange(labels.size) - starts[sorted_labels]
    keep = by_class[rank < per_class[sorted_labels]]
    return np.sort(keep)


def long_tail_indices(
    labels: np.ndarray, num_classes: int, profile: str, ratio: float, head: str, rng: np.random.Generator
) -> np.ndarray:
    """Indices of the long-tailed subset of a training set with clean ``labels``.

    ``n_max`` is the smallest class size of the source, so every target count is attainable on a balanced
    source and the realised ratio equals the requested one up to flooring.
    """
    available = np.bincount(labels, minlength=num_classes)
    if available.min() == 0:
        missing = np.flatnonzero(available == 0).tolist()
        raise DsinkError(f"dataset has no training samples for classes {missing}; cannot build a long tail")
    by_rank = class_counts(profile, ratio, int(available.min()), num_classes)
    order = head_order(num_classes, head, rng)
    per_class = np.empty(num_classes, dtype=np.int64)
    per_class[order] = by_rank
    return subsample(labels, per_class, rng)


def hold_out(
    labels: np.ndarray,
    num_classes: int,
    per_class: int,
    rng: np.random.Generator,
    class_names: list[str] | None = None,
) -> np.ndarray:
    """Sorted indices of ``per_class`` random samples of every class (empty for ``per_class = 0``).

    Every class must keep at least one training sample after the hold-out; otherwise a
    :class:`DsinkError` names the smallest class and the largest ``per_class`` the dataset allows.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if per_class == 0:
        return np.empty(0, dtype=np.int64)
    available = np.bincount(labels, minlength=num_classes)
    small = int(np.argmin(available))
    if available[small] <= per_class:
        name = class_names[small] if class_names is not None else str(small)
        raise DsinkError(
            f"params.yaml: data.validation.per_class = {per_class} is too large: class {name!r} has "
            f"{int(available[small])} training images; expected at most {max(int(available[small]) - 1, 0)} "
            "(every class keeps at least one training image)"
        )
    return subsample(labels, np.full(num_classes, per_class, dtype=np.int64), rng)
