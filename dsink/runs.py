"""What the training stages share: opening the corrupted set, run fingerprints, checkpoint locations.

Checkpoints live under ``.dsink/checkpoints/<stage>/<fingerprint>/`` (outside every DVC out, so DVC's
removal of outs before a run cannot delete them). The fingerprint hashes the params the stage reads and
the bytes of its input artifacts, so a params or data change starts a fresh run instead of resuming a
stale one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsink.artifacts import CorruptedIndex, ValidationSplit, read_corrupted, read_validation
from dsink.data.sources import Source, load_source, resident
from dsink.data.views import Normalizer, TrainingSet
from dsink.errors import DsinkError
from dsink.params import Params, to_dict

CHECKPOINT_ROOT = Path(".dsink") / "checkpoints"


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(config: Any, files: list[str | Path]) -> str:
    """A short hash of a JSON-able config and the contents of ``files``."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for f in files:
        h.update(file_digest(f).encode())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:16]


def checkpoint_dir(stage: str, config: Any, files: list[str | Path]) -> Path:
    return CHECKPOINT_ROOT / stage / fingerprint(config, files)


@dataclass
class Corpus:
    """The source dataset, the corrupted index and the validation split, checked against each other."""

    source: Source
    index: CorruptedIndex
    normalizer: Normalizer
    val: ValidationSplit | None = None  # None: no validation split

    @property
    def val_ids(self) -> np.ndarray:
        """Source training ids of the validation split (empty when there is none)."""
        return self.val.sample_id if self.val is not None else np.empty(0, dtype=np.int64)

    def training_set(self, rows: np.ndarray | None = None) -> TrainingSet:
        """Every kept sample with its noisy label; ``rows`` (corrupted-index positions): only those."""
        if rows is None:
            return TrainingSet(
                self.source.train,
                self.index.sample_id,
                torch.from_numpy(self.index.noisy_label),
                self.source.name,
                self.source.image_size,
            )
        rows = np.asarray(rows, dtype=np.int64)
        return TrainingSet(
            self.source.train,
            self.index.sample_id[rows],
            torch.from_numpy(self.index.noisy_label[rows]),
            self.source.name,
            self.source.image_size,
            rows,
        )


def validation_path(corrupted_path: str | Path) -> Path:
    """Where ``corrupt`` writes the validation split: ``val.parquet`` beside the corrupted index."""
    return Path(corrupted_path).with_name("val.parquet")


def open_validation(
    params: Params, index: CorruptedIndex, source: Source, path: str | Path
) -> ValidationSplit | None:
    """The validation split at ``path``, checked against the index and the source (None if it is empty).

    A missing file is an error when ``data.validation.per_class`` asks for a split, and no split otherwise
    (an index made by hand, or before validation splits existed).
    """
    path = Path(path)
    per_class = params.data.validation.per_class
    if not path.is_file():
        if per_class:
            raise DsinkError(
                f"{path}: file not found, but data.validation.per_class = {per_class}; "
                "rerun `dvc repro corrupt`"
            )
        return None
    val = read_validation(path, index)
    if val.sample_id.size and val.sample_id.max() >= len(source.train):
        raise DsinkError(f"{path}: sample_id outside the source training set (0..{len(source.train) - 1})")
    if not np.array_equal(val.label, source.train.labels[val.sample_id]):
        raise DsinkError(f"{path}: labels differ from the dataset's; rerun `dvc repro corrupt`")
    if val.meta.get("per_class", per_class) != per_class:
        raise DsinkError(
            f"{path} holds {val.meta['per_class']} images per class but data.validation.per_class = "
            f"{per_class}; rerun `dvc repro corrupt`"
        )
    return val if len(val) else None


def open_corpus(params: Params, corrupted_path: str | Path, val_path: str | Path | None = None) -> Corpus:
    """The source, the corrupted index at ``corrupted_path`` and the validation split (default: beside it)."""
    index = read_corrupted(corrupted_path)
    source = resident(load_source(params.data))
    if index.dataset != source.name:
        raise DsinkError(
            f"{corrupted_path} was made from dataset {index.dataset!r} but data.dataset is "
            f"{source.name!r}; rerun `dvc repro corrupt`"
        )
    if index.num_classes != source.num_classes:
        raise DsinkError(
            f"{corrupted_path} has {index.num_classes} classes; dataset {source.name} has "
            f"{source.num_classes}"
        )
    if index.sample_id.max() >= len(source.train) or index.sample_id.min() < 0:
        raise DsinkError(
            f"{corrupted_path}: sample_id outside the source training set (0..{len(source.train) - 1})"
        )
    val = open_validation(
        params, index, source, validation_path(corrupted_path) if val_path is None else val_path
    )
    return Corpus(source, index, Normalizer.for_source(source), val)


def stage_config(params: Params, *sections: str) -> dict[str, Any]:
    """The params a stage reads, as a plain dict (for fingerprints and metadata)."""
    out: dict[str, Any] = {}
    for dotted in sections:
        obj: Any = params
        for part in dotted.split("."):
            obj = getattr(obj, part)
        out[dotted] = to_dict(obj) if hasattr(obj, "__dataclass_fields__") else obj
    return out
