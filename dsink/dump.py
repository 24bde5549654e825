"""Eval-mode logits of a trained model on the kept training samples, the validation split and the test set.

Written as the contract's logits Parquet (``split``, ``sample_id``, ``logits`` fixed-size float32, zstd,
metadata under ``dsink``; ``val`` rows only when the corpus has a validation split). Inference is
chunked (``dump.batch_size`` images at a time), so memory holds one chunk of images plus the float32
logits.

A cross-fitted teacher (``folds: k >= 2``, :mod:`dsink.cross_fit`) gives *out-of-fold* logits: each
training sample's come from the fold model that did not train on it, and the validation and test
samples' are the mean of the k fold models' raw logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dsink.artifacts import logits_table, write_logits
from dsink.checkpoints import load_state_dict
from dsink.cross_fit import is_fold_bundle, read_fold_bundle
from dsink.errors import DsinkError
from dsink.inference import predict_logits
from dsink.models import build_model
from dsink.runs import Corpus
from dsink.runtime import Runtime


def load_model(name: str, path: str, num_classes: int, channels: int) -> torch.nn.Module:
    """Build architecture ``name`` and load a state dict (``weights_only``) that must fit it exactly."""
    return load_teacher(name, path, num_classes, channels).models[0]


@dataclass
class Teacher:
    """A loaded teacher: one model (``fold`` None), or k cross-fitted fold models and the fold of every
    corrupted-index row (model ``j`` did not train on the rows with ``fold == j``)."""

    models: list[torch.nn.Module]
    fold: np.ndarray | None = None


def load_teacher(
    name: str,
    path: str,
    num_classes: int,
    channels: int,
    folds: int = 1,
    sample_id: np.ndarray | None = None,
    folds_key: str = "folds",
) -> Teacher:
    """The model file at ``path`` (``weights_only``) as ``folds`` models of architecture ``name``.

    ``folds: 1`` wants a plain state dict, ``k >= 2`` a cross-fitted file of k fold models trained on
    the corrupted index ``sample_id``; anything else is one :class:`DsinkError` line naming ``folds_key``.
    """
    state = load_state_dict(path)
    if not isinstance(state, dict):
        raise DsinkError(f"{path}: expected a state dict, got {type(state).__name__}")
    if is_fold_bundle(state):
        k = state.get("folds")
        if k != folds:
            raise DsinkError(
                f"{path} holds {k} cross-fitted fold models but {folds_key} = {folds}; "
                "rerun train_teacher with these params"
            )
        states, fold = read_fold_bundle(state, path, sample_id)
        return Teacher([_fit(name, s, path, num_classes, channels) for s in states], fold)
    if folds != 1:
        raise DsinkError(
            f"{path} holds one model (a plain state dict) but {folds_key} = {folds} asks for "
            f"{folds} cross-fitted fold models; rerun train_teacher with these params"
        )
    return Teacher([_fit(name, state, path, num_classes, channels)])


def _fit(name: str, state: dict, path: str, num_classes: int, channels: int) -> torch.nn.Module:
    model = build_model(name, num_classes, channels)
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


def teacher_logits(teacher: Teacher, corpus: Corpus, batch_size: int, desc: str) -> ModelLogits:
    """A teacher's logits: its model's (:func:`model_logits`), or out of fold for a cross-fitted one.

    Cross-fitted: training row ``i`` gets fold model ``fold[i]``'s logits (the model that held it out);
    test and validation rows the mean of the fold models' raw logits (float64 sum, stored as float32).
    """
    if teacher.fold is None:
        return model_logits(teacher.models[0], corpus, batch_size, desc)
    fold = teacher.fold
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rt = Runtime(device)
    ids = corpus.index.sample_id
    test_ids = np.arange(len(corpus.source.test), dtype=np.int64)
    val_ids = corpus.val_ids
    C = corpus.index.num_classes
    train = np.zeros((ids.size, C), dtype=np.float32)
    test = np.zeros((test_ids.size, C), dtype=np.float64)
    val = np.zeros((val_ids.size, C), dtype=np.float64)
    k = len(teacher.models)
    for j, model in enumerate(teacher.models):
        model = model.to(device)
        tag = f"{desc} fold {j + 1}/{k}"
        rows = np.flatnonzero(fold == j)
        if rows.size:
            train[rows] = predict_logits(
                model,
                corpus.source.train,
                ids[rows],
                corpus.normalizer,
                device,
                batch_size,
                desc=f"{tag} train",
                rt=rt,
            )
        test += predict_logits(
            model,
            corpus.source.test,
            test_ids,
            corpus.normalizer,
            device,
            batch_size,
            desc=f"{tag} test",
            rt=rt,
        )
        if val_ids.size:
            val += predict_logits(
                model,
                corpus.source.train,
                val_ids,
                corpus.normalizer,
                device,
                batch_size,
                desc=f"{tag} val",
                rt=rt,
            )
        teacher.models[j] = model.cpu()
    return ModelLogits(train, (test / k).astype(np.float32), (val / k).astype(np.float32))


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
