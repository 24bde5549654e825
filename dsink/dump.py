"""Eval-mode logits of a trained model on the kept training samples, the validation split and the test set.

Written as the contract's logits Parquet (``split``, ``sample_id``, ``logits`` fixed-size float32, zstd,
metadata under ``dsink``; ``val`` rows only when the corpus has a validation split). Inference is
chunked (``dump.batch_size`` images at a time), so memory holds one chunk of images plus the float32
logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dsink.artifacts import logits_table, write_logits
from dsink.engine import Runtime, load_state_dict, predict_logits
from dsink.errors import DsinkError
from dsink.models import build_model
from dsink.runs import Corpus


def load_model(name: str, path: str, num_classes: int, channels: int) -> torch.nn.Module:
    """Build architecture ``name`` and load a state dict (``weights_only``) that must fit it exactly."""
    model = build_model(name, num_classes, channels)
    state = load_state_dict(path)
    if not isinstance(state, dict):
        raise DsinkError(f"{path}: expected a state dict, got {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise DsinkError(
            f"{path} does not fit model {name!r} with {num_classes} classes and {channels} "
            f"channels: {str(exc).splitlines()[0]}"
        ) from exc
    return model


@dataclass
class ModelLogits:
    """One model's logits on each split of a corpus."""

    train: np.ndarray  # (n_train, C), corrupted-index order
    test: np.ndarray  # (n_test, C), test order
    val: np.ndarray  # (n_val, C), validation-split order; zero rows without a validation split


def model_logits(model: torch.nn.Module, corpus: Corpus, batch_size: int, desc: str) -> ModelLogits:
    """The model's logits on the training samples, the test set and the validation split."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    rt = Runtime(device)
    train = predict_logits(
        model,
        corpus.source.train,
        corpus.index.sample_id,
        corpus.normalizer,
        device,
        batch_size,
        desc=f"{desc} train",
        rt=rt,
    )
    test_ids = np.arange(len(corpus.source.test), dtype=np.int64)
    test = predict_logits(
        model, corpus.source.test, test_ids, corpus.normalizer, device, batch_size, desc=f"{desc} test", rt=rt
    )
    val_ids = corpus.val_ids
    if val_ids.size:
        val = predict_logits(
            model,
            corpus.source.train,
            val_ids,
            corpus.normalizer,
            device,
            batch_size,
            desc=f"{desc} val",
            rt=rt,
        )
    else:
        val = np.empty((0, train.shape[1]), dtype=train.dtype)
    return ModelLogits(train, test, val)


def write_model_logits(out: str, z: ModelLogits, corpus: Corpus, meta: dict[str, Any]) -> None:
    """The contract's logits Parquet: train rows, then test rows, then val rows (if any)."""
    n_tr, n_te, n_va = z.train.shape[0], z.test.shape[0], z.val.shape[0]
    val_ids = corpus.val_ids
    if n_tr != corpus.index.sample_id.size or n_va != val_ids.size:
        raise ValueError(
            f"logits rows ({n_tr} train, {n_va} val) do not match the corpus "
            f"({corpus.index.sample_id.size} train, {val_ids.size} val)"
        )
    split = np.array(["train"] * n_tr + ["test"] * n_te + ["val"] * n_va, dtype=object)
    ids = np.concatenate([corpus.index.sample_id, np.arange(n_te, dtype=np.int64), val_ids])
    full_meta = {"dataset": corpus.index.dataset, "num_classes": corpus.index.num_classes, **meta}
    write_logits(out, logits_table(split, ids, np.concatenate([z.train, z.test, z.val]), full_meta))
