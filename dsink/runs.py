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

import torch

from dsink.artifacts import CorruptedIndex, read_corrupted
from dsink.data.sources import Source, load_source
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
    """The source dataset and the corrupted index over it, checked against each other."""

    source: Source
    index: CorruptedIndex
    normalizer: Normalizer

    def training_set(self) -> TrainingSet:
        return TrainingSet(
            self.source.train,
            self.index.sample_id,
            torch.from_numpy(self.index.noisy_label),
            self.source.name,
            self.source.image_size,
        )


def open_corpus(params: Params, corrupted_path: str | Path) -> Corpus:
    index = read_corrupted(corrupted_path)
    source = load_source(params.data)
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
    return Corpus(source, index, Normalizer.for_source(source))


def stage_config(params: Params, *sections: str) -> dict[str, Any]:
    """The params a stage reads, as a plain dict (for fingerprints and metadata)."""
    out: dict[str, Any] = {}
    for dotted in sections:
        obj: Any = params
        for part in dotted.split("."):
            obj = getattr(obj, part)
        out[dotted] = to_dict(obj) if hasattr(obj, "__dataclass_fields__") else obj
    return out
