"""The ``corrupt`` stage's logic: a long-tailed, label-noisy index over a source training set.

A validation split first (``data.validation.per_class`` clean images of each class, held out of the
source training set), then the long tail (by clean label) over the rest, then noise on the kept samples,
all from seeded generators derived from ``params.seed`` so the same params give byte-identical output on
any machine. With no validation split the long tail and the noise are exactly what they were before the
split existed (the hold-out has its own random stream).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dsink.artifacts import CorruptedIndex, ValidationSplit
from dsink.data.longtail import hold_out, long_tail_indices
from dsink.data.noise import inject, pair_map_for, read_label_file
from dsink.params import DataParams, to_dict

# Independent streams: changing the noise settings never changes which samples the long tail keeps.
_LONGTAIL_STREAM, _NOISE_STREAM, _PAIRS_STREAM, _VALIDATION_STREAM = 1, 2, 3, 4


def rng_for(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream]))


def validation_split(
    labels: np.ndarray, num_classes: int, class_names: list[str], data: DataParams, seed: int
) -> ValidationSplit:
    """``data.validation.per_class`` seeded images of each class of the source training set (clean labels)."""
    labels = np.asarray(labels, dtype=np.int64)
    per_class = data.validation.per_class
    ids = hold_out(labels, num_classes, per_class, rng_for(seed, _VALIDATION_STREAM), class_names)
    meta = {
        "dataset": data.dataset,
        "num_classes": int(num_classes),
        "per_class": int(per_class),
        "seed": int(seed),
    }
    return ValidationSplit(ids, labels[ids], meta)


def corrupt_labels(
    labels: np.ndarray,
    num_classes: int,
    class_names: list[str],
    data: DataParams,
    seed: int,
    exclude: np.ndarray | None = None,
) -> CorruptedIndex:
    """Build the corrupted index from the source's clean training ``labels``.

    ``exclude``: source ids the long tail must not keep (the validation split); the long tail's ``n_max``
    is then the smallest class size of what is left.
    """
    labels = np.asarray(labels, dtype=np.int64)
    pool = np.arange(labels.size, dtype=np.int64)
    if exclude is not None and len(exclude):
        pool = np.setdiff1d(pool, np.asarray(exclude, dtype=np.int64))
    imb = data.imbalance
    kept = long_tail_indices(
        labels[pool], num_classes, imb.profile, imb.ratio, imb.head, rng_for(seed, _LONGTAIL_STREAM)
    )
    ids = pool[kept]
    clean = labels[ids]
    noise = data.noise
    pair_map = None
    if noise.type == "file":
        assert noise.file is not None
        noisy = read_label_file(noise.file, noise.key, labels.size, num_classes)[ids]
    else:
        if noise.type == "asymmetric":
            pair_map = pair_map_for(data.dataset, num_classes, rng_for(seed, _PAIRS_STREAM), data.root)
        noisy = inject(
            clean,
            noise.type,
            noise.rate,
            num_classes,
            rng_for(seed, _NOISE_STREAM),
            include_true=noise.include_true,
            pair_map=pair_map,
        )
    is_noisy = noisy != clean
    counts = np.bincount(clean, minlength=num_classes)
    meta: dict[str, Any] = {
        "dataset": data.dataset,
        "num_classes": int(num_classes),
        "class_names": list(class_names),
        "imbalance": to_dict(imb),
        "noise": to_dict(noise),
        "seed": int(seed),
        "class_counts": counts.tolist(),
        "noisy_class_counts": np.bincount(noisy, minlength=num_classes).tolist(),
        "noise_rate": float(is_noisy.mean()),
        "source_train_size": int(labels.size),
        "validation": to_dict(data.validation),
        "validation_size": int(labels.size - pool.size),
    }
    if pair_map is not None:
        meta["pair_map"] = {str(k): int(v) for k, v in sorted(pair_map.items())}
    return CorruptedIndex(ids, clean, noisy, is_noisy, meta)


def corrupt_metrics(idx: CorruptedIndex, val: ValidationSplit | None = None) -> dict[str, Any]:
    """``metrics/corrupt.json`` (contract keys plus a few that help reading sweeps)."""
    counts = idx.clean_counts()
    present = counts[counts > 0]
    return {
        "num_samples": int(idx.sample_id.size),
        "num_val": int(val.sample_id.size) if val is not None else 0,
        "noise_rate": float(idx.is_noisy.mean()),
        "imbalance_ratio": float(present.max() / present.min()),
        "num_noisy": int(idx.is_noisy.sum()),
        "num_classes": idx.num_classes,
    }
