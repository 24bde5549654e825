"""K-fold cross-fitting of a teacher (``teachers.<role>.folds: k >= 2``): the fold assignment and the
model file that holds the k fold models.

Why: a teacher that predicts the very samples it trained on gives *in-sample* logits. Once it memorises
the noisy labels those logits approach the noisy one-hots, and the D-SINK student, distilling them,
learns the noise back. With cross-fitting every training sample is predicted by the fold model that
never saw it (*out-of-fold* logits), so a wrong label shows as disagreement instead of being echoed.
Validation and test samples, which no fold model saw, get the average of the k models' raw logits.

The assignment is stratified by the label each model trains on (the noisy one; no clean label is
read), so every fold model sees every class in about the same proportion as the whole set, and is a
pure function of ``(seed, noisy labels, k)``: the training and the dump stages, and any rerun, agree on
which model held out which row without storing anything but the model file.

Model file with ``k >= 2`` (``torch.load(weights_only=True)`` loads it; only tensors, ints, strings and
plain containers): ``{"format": "dsink.cross_fit", "folds": k, "fold": int64 (n,), "sample_id": int64
(n,), "models": [state dict of fold 0, ..., fold k-1]}``. ``fold[i]`` is the fold of corrupted-index row
``i`` (model ``j`` trained on the rows with ``fold != j``); ``sample_id`` is the corrupted index's, so a
model file meets only the index it was trained on. ``folds: 1`` keeps the plain state dict of one model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsink.checkpoints import atomic_torch_save
from dsink.errors import DsinkError

FORMAT = "dsink.cross_fit"


def assign_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold id (int64, 0..k-1) of every row, stratified by ``labels`` (the noisy labels).

    Within each class (in increasing label order) the rows are shuffled (seeded) and dealt to the folds
    in turn, the turn carrying over from one class to the next. So every class's count per fold differs
    by at most one, fold sizes differ by at most one, and a class with fewer than ``k`` rows has each
    row in a different fold.
    """
    labels = np.asarray(labels)
    if k < 2:
        raise ValueError(f"cross-fitting needs k >= 2 folds, got {k}")
    if labels.ndim != 1 or labels.size < k:
        raise DsinkError(f"{labels.size} training samples cannot be split into {k} folds")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xF01D]))
    fold = np.empty(labels.size, dtype=np.int64)
    turn = 0
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        fold[rows] = (turn + np.arange(rows.size)) % k
        turn = (turn + rows.size) % k
    return fold


def training_rows(fold: np.ndarray, j: int) -> np.ndarray:
    """Corrupted-index rows fold model ``j`` trains on: every row not in fold ``j`` (ascending)."""
    return np.flatnonzero(np.asarray(fold) != j).astype(np.int64)


def fold_seed(seed: int, j: int) -> int:
    """The seed of fold model ``j`` (its initialisation, sample order and augmentation), from ``seed``."""
    return int(np.random.SeedSequence([int(seed), 0xF01D, j]).generate_state(1)[0])


def save_fold_models(
    states: Sequence[Mapping[str, torch.Tensor]], fold: np.ndarray, sample_id: np.ndarray, path: str | Path
) -> None:
    """Atomically write the k fold models' state dicts and the fold assignment (the format above)."""
    bundle = {
        "format": FORMAT,
        "folds": len(states),
        "fold": torch.from_numpy(np.asarray(fold, dtype=np.int64).copy()),
        "sample_id": torch.from_numpy(np.asarray(sample_id, dtype=np.int64).copy()),
        "models": [{k: v.detach().cpu() for k, v in s.items()} for s in states],
    }
    atomic_torch_save(bundle, Path(path))


def is_fold_bundle(obj: Any) -> bool:
    """Does a loaded model file hold cross-fitted fold models (rather than one state dict)?"""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def read_fold_bundle(
    obj: Any, path: str | Path, sample_id: np.ndarray | None = None
) -> tuple[list[dict[str, torch.Tensor]], np.ndarray]:
    """The fold models' state dicts and the fold of every corrupted-index row, checked.

    ``sample_id``: the corrupted index the caller predicts; the file must have been trained on it.
    """
    k, fold, ids, models = (obj.get(key) for key in ("folds", "fold", "sample_id", "models"))
    if (
        not isinstance(k, int)
        or k < 2
        or not isinstance(models, list)
        or len(models) != k
        or not all(isinstance(m, dict) for m in models)
        or not isinstance(fold, torch.Tensor)
        or not isinstance(ids, torch.Tensor)
        or fold.ndim != 1
        or fold.shape != ids.shape
    ):
        raise DsinkError(
            f"{path}: malformed cross-fitted model file (expected {FORMAT!r} with k >= 2 models)"
        )
    fold_np = fold.numpy().astype(np.int64)
    if fold_np.size and (fold_np.min() < 0 or fold_np.max() >= k):
        raise DsinkError(f"{path}: fold ids outside 0..{k - 1}")
    if sample_id is not None and not np.array_equal(ids.numpy(), np.asarray(sample_id)):
        raise DsinkError(
            f"{path}: its fold models were trained on another corrupted index ({ids.numel()} samples, "
            f"this one has {np.asarray(sample_id).size} or other ids); rerun train_teacher"
        )
    return models, fold_np
