"""Train one teacher end to end: open the corrupted set, build the recipe's objective, run the engine.

Only the noisy labels reach the weights. The noise teacher's small-loss selection, when its
``forget_rate`` is null, forgets a share estimated from the noisy data (:mod:`dsink.noise_rate`) after
``estimate_epochs`` epochs; the estimate is logged with every later epoch, kept in the checkpoint, and
written to ``estimate_out`` for ``dump_logits`` to put in the logits metadata (``noise_rate_estimate``).

With ``folds: k >= 2`` the teacher is cross-fitted (:mod:`dsink.cross_fit`): k fold models are trained
one after another, model ``j`` on the rows outside fold ``j``, each exactly as the single model would be
(same recipe, DDP path and checkpointing, its own seed and checkpoint directory, so a killed run resumes
in the fold it was in). The noise rate is estimated per fold model from the rows it trains on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsink.artifacts import write_json
from dsink.checkpoints import clear_checkpoint, cpu_state_dict, save_state_dict
from dsink.cross_fit import assign_folds, fold_seed, save_fold_models, training_rows
from dsink.fitting import fit_recipe, run_checkpoint_dir, training_run
from dsink.live import write_curves
from dsink.runs import Corpus
from dsink.runtime import Runtime
from dsink.selection import noise_rate_of_model
from dsink.teachers import recipe_for


def fit_teacher(
    params: Any,
    role: str,
    corrupted: str,
    model_out: str,
    live_dir: str | None,
    estimate_out: str | None = None,
) -> dict[str, Any]:
    """Train the ``role`` teacher end to end (resuming when a checkpoint of the same run exists).

    ``estimate_out`` (JSON): ``role``, ``noise_rate_estimate`` (null unless the noise teacher estimated
    it), ``noise_rate_estimate_per_class`` (the per-class rates class-aware selection uses, or null)
    and ``forget_rate`` (the rate small-loss selection ramped to; null for other methods). With
    ``folds: k >= 2`` these are the mean over the fold models, and ``folds``,
    ``noise_rate_estimate_folds`` and ``forget_rate_folds`` (one value per fold model) are added.
    """
    tp = getattr(params.teachers, role)
    if tp.folds >= 2:
        return _fit_cross_fitted(params, role, corrupted, model_out, live_dir, estimate_out)

    with training_run(params, corrupted) as (rt, corpus):
        recipe = recipe_for(role, tp, corpus.index)
        obj = recipe.objective
        ckpt = _checkpoint_root(params, role, corrupted)
        result = fit_recipe(rt, corpus, recipe, tp, params.seed, ckpt, live_dir, f"teacher[{role}]")
        _finish_estimate(obj, result.model, corpus, tp, rt)
        if rt.is_main:
            save_state_dict(result.model, model_out)
            if estimate_out is not None:
                write_json(
                    estimate_out,
                    {
                        "role": role,
                        "noise_rate_estimate": getattr(obj, "noise_rate_estimate", None),
                        "noise_rate_estimate_per_class": _plain(
                            getattr(obj, "noise_rate_estimate_per_class", None)
                        ),
                        "forget_rate": _forget_rate(obj, tp),
                    },
                )
            clear_checkpoint(ckpt)
        return result.history[-1] if result.history else {}


def _checkpoint_root(params: Any, role: str, corrupted: str) -> Path:
    """The ``role`` teacher's checkpoint directory (with folds: one ``fold_<j>`` subdirectory per model)."""
    return run_checkpoint_dir(params, f"train_teacher-{role}", f"teachers.{role}", corrupted)


def _finish_estimate(
    obj: Any, model: torch.nn.Module, corpus: Corpus, tp: Any, rt: Runtime, rows: np.ndarray | None = None
) -> None:
    """A run that ended before ``estimate_epochs`` trained on every sample: estimate from the trained
    model anyway, so the estimate is always recorded."""
    if getattr(obj, "estimates", False) and obj.noise_rate_estimate is None:
        obj.set_estimate(noise_rate_of_model(model, corpus, tp.estimate_mixture, rt, rows))


def _forget_rate(obj: Any, tp: Any) -> Any:
    """The rate small-loss selection ramped to; None for other methods."""
    return getattr(obj, "forget_rate", None) if getattr(tp, "method", "") == "small_loss" else None


def _fit_cross_fitted(
    params: Any,
    role: str,
    corrupted: str,
    model_out: str,
    live_dir: str | None,
    estimate_out: str | None,
) -> dict[str, Any]:
    """:func:`fit_teacher` with ``folds: k >= 2``: k fold models, written together with the assignment.

    The fold models' per-epoch records go to ``live_dir`` once all are trained: the mean over the
    folds under the usual names (what ``evaluate`` plots) and each fold's own as ``fold_<j>/<name>``.
    """
    with training_run(params, corrupted) as (rt, corpus):
        tp = getattr(params.teachers, role)
        k = tp.folds
        fold = assign_folds(corpus.index.noisy_label, k, params.seed)
        root = _checkpoint_root(params, role, corrupted)
        states: list[dict[str, torch.Tensor]] = []
        histories: list[list[dict[str, float]]] = []
        objectives: list[Any] = []
        for j in range(k):
            rows = training_rows(fold, j)
            recipe = recipe_for(role, tp, corpus.index)
            desc = f"teacher[{role}] fold {j + 1}/{k}"
            result = fit_recipe(
                rt, corpus, recipe, tp, fold_seed(params.seed, j), root / f"fold_{j}", None, desc, rows
            )
            _finish_estimate(recipe.objective, result.model, corpus, tp, rt, rows)
            states.append(cpu_state_dict(result.model))
            histories.append(result.history)
            objectives.append(recipe.objective)
            del result
        merged = _merge_histories(histories)
        if rt.is_main:
            save_fold_models(states, fold, corpus.index.sample_id, model_out)
            if live_dir is not None:
                write_curves(live_dir, merged)
            if estimate_out is not None:
                estimates = [getattr(o, "noise_rate_estimate", None) for o in objectives]
                per_class = [getattr(o, "noise_rate_estimate_per_class", None) for o in objectives]
                forgets = [_forget_rate(o, tp) for o in objectives]
                write_json(
                    estimate_out,
                    {
                        "role": role,
                        "noise_rate_estimate": _fold_mean(estimates),
                        "noise_rate_estimate_per_class": _fold_mean(per_class),
                        "forget_rate": _fold_mean(forgets),
                        "folds": k,
                        "noise_rate_estimate_folds": [_plain(v) for v in estimates],
                        "forget_rate_folds": [_plain(v) for v in forgets],
                    },
                )
            clear_checkpoint(root)
        return merged[-1] if merged else {}


def _plain(value: Any) -> Any:
    """A JSON-able copy of an objective's value (a float, a per-class vector, or None)."""
    if value is None:
        return None
    arr = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=np.float64)
    return float(arr) if arr.ndim == 0 else arr.tolist()


def _fold_mean(values: list[Any]) -> Any:
    """The (elementwise) mean over the fold models; None when any of them has none."""
    if any(v is None for v in values):
        return None
    return _plain(np.mean([np.asarray(_plain(v), dtype=np.float64) for v in values], axis=0))


def _merge_histories(histories: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """One record per epoch: the mean over the folds of every key all of them logged that epoch, then
    each fold's values as ``fold_<j>/<key>``."""
    merged: list[dict[str, float]] = []
    for epoch in range(min((len(h) for h in histories), default=0)):
        records = [h[epoch] for h in histories]
        shared = [key for key in records[0] if all(key in r for r in records)]
        record = {key: float(np.mean([r[key] for r in records])) for key in shared}
        for j, r in enumerate(records):
            record.update({f"fold_{j}/{key}": float(v) for key, v in r.items() if key != "epoch"})
        merged.append(record)
    return merged
