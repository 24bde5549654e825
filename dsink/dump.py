"""Eval-mode logits of a trained model on every kept training sample and the whole test set.

Written as the contract's logits Parquet (``split``, ``sample_id``, ``logits`` fixed-size float32, zstd,
metadata under ``dsink``). Inference is chunked (``dump.batch_size`` images at a time), so memory holds
one chunk of images plus the float32 logits.
"""

from __future__ import annotations

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


def model_logits(
    model: torch.nn.Module, corpus: Corpus, batch_size: int, desc: str
) -> tuple[np.ndarray, np.ndarray]:
    """(train logits in corrupted-index order, test logits in test order)."""
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
    return train, test


def write_model_logits(
    out: str, train: np.ndarray, test: np.ndarray, corpus: Corpus, meta: dict[str, Any]
) -> None:
    n_tr, n_te = train.shape[0], test.shape[0]
    split = np.array(["train"] * n_tr + ["test"] * n_te, dtype=object)
    ids = np.concatenate([corpus.index.sample_id, np.arange(n_te, dtype=np.int64)])
    full_meta = {"dataset": corpus.index.dataset, "num_classes": corpus.index.num_classes, **meta}
    write_logits(out, logits_table(split, ids, np.concatenate([train, test]), full_meta))
