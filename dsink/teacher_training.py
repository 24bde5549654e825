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

from typing import Any

import numpy as np
import torch

from dsink.artifacts import write_json
from dsink.cross_fit import assign_folds, fold_seed, save_fold_models, training_rows
from dsink.engine import (
    _open_live,
    clear_checkpoint,
    save_state_dict,
    setup_runtime,
    teardown_runtime,
    train,
)
from dsink.models import build_model
from dsink.runs import checkpoint_dir, open_corpus, stage_config
from dsink.selection import estimate_hook, noise_rate_of_model
from dsink.teachers import recipe_for
from dsink.tracking import epoch_tracker


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

    rt = setup_runtime()
    try:
        corpus = open_corpus(params, corrupted)
        recipe = recipe_for(role, tp, corpus.index)
        obj = recipe.objective
        estimating = bool(getattr(obj, "estimates", False))
        torch.manual_seed(params.seed)
        model = build_model(tp.model, corpus.index.num_classes, corpus.source.channels)
        ckpt = checkpoint_dir(
            f"train_teacher-{role}", stage_config(params, "seed", "data", f"teachers.{role}"), [corrupted]
        )
        result = train(
            model,
            obj,
            corpus.training_set(),
            corpus.normalizer,
            tp,
            params.seed,
            rt,
            checkpoint_dir=ckpt,
            live_dir=live_dir,
            objective_state=recipe.state,
            evaluate=epoch_tracker(corpus, rt.device, 512) if tp.track_every else None,
            on_epoch_start=estimate_hook(obj, corpus, tp, rt) if estimating else None,
            desc=f"teacher[{role}]",
        )
        if estimating and obj.noise_rate_estimate is None:
            # training ended before estimate_epochs: all of it was plain CE; record the estimate anyway
            obj.set_estimate(noise_rate_of_model(result.model, corpus, tp.estimate_mixture, rt))
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
    finally:
        teardown_runtime(rt)


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
    rt = setup_runtime()
    try:
        corpus = open_corpus(params, corrupted)
        tp = getattr(params.teachers, role)
        k = tp.folds
        fold = assign_folds(corpus.index.noisy_label, k, params.seed)
        root = checkpoint_dir(
            f"train_teacher-{role}", stage_config(params, "seed", "data", f"teachers.{role}"), [corrupted]
        )
        states: list[dict[str, torch.Tensor]] = []
        histories: list[list[dict[str, float]]] = []
        objectives: list[Any] = []
        for j in range(k):
            rows = training_rows(fold, j)
            recipe = recipe_for(role, tp, corpus.index)
            obj = recipe.objective
            estimating = bool(getattr(obj, "estimates", False))
            seed = fold_seed(params.seed, j)
            torch.manual_seed(seed)
            model = build_model(tp.model, corpus.index.num_classes, corpus.source.channels)
            result = train(
                model,
                obj,
                corpus.training_set(rows),
                corpus.normalizer,
                tp,
                seed,
                rt,
                checkpoint_dir=root / f"fold_{j}",
                live_dir=None,
                objective_state=recipe.state,
                evaluate=epoch_tracker(corpus, rt.device, 512) if tp.track_every else None,
                on_epoch_start=estimate_hook(obj, corpus, tp, rt, rows) if estimating else None,
                desc=f"teacher[{role}] fold {j + 1}/{k}",
            )
            if estimating and obj.noise_rate_estimate is None:
                obj.set_estimate(noise_rate_of_model(result.model, corpus, tp.estimate_mixture, rt, rows))
            states.append({name: v.detach().cpu() for name, v in result.model.state_dict().items()})
            histories.append(result.history)
            objectives.append(obj)
            del model, result
        merged = _merge_histories(histories)
        if rt.is_main:
            save_fold_models(states, fold, corpus.index.sample_id, model_out)
            if live_dir is not None:
                _write_live(live_dir, merged)
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
    finally:
        teardown_runtime(rt)


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


def _write_live(live_dir: str, history: list[dict[str, float]]) -> None:
    """The merged curves as a fresh dvclive run in ``live_dir`` (one step per epoch)."""
    _open_live(live_dir, history).end()
