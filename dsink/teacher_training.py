"""Train one teacher end to end: open the corrupted set, build the recipe's objective, run the engine.

Only the noisy labels reach the weights. The noise teacher's small-loss selection, when its
``forget_rate`` is null, forgets a share estimated from the noisy data (:mod:`dsink.noise_rate`) after
``estimate_epochs`` epochs; the estimate is logged with every later epoch, kept in the checkpoint, and
written to ``estimate_out`` for ``dump_logits`` to put in the logits metadata (``noise_rate_estimate``).
"""

from __future__ import annotations

from typing import Any

import torch

from dsink.artifacts import write_json
from dsink.engine import (
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
    it) and ``forget_rate`` (the rate small-loss selection ramped to; null for other methods).
    """

    rt = setup_runtime()
    try:
        corpus = open_corpus(params, corrupted)
        tp = getattr(params.teachers, role)
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
                forget = (
                    getattr(obj, "forget_rate", None) if getattr(tp, "method", "") == "small_loss" else None
                )
                write_json(
                    estimate_out,
                    {
                        "role": role,
                        "noise_rate_estimate": getattr(obj, "noise_rate_estimate", None),
                        "forget_rate": forget,
                    },
                )
            clear_checkpoint(ckpt)
        return result.history[-1] if result.history else {}
    finally:
        teardown_runtime(rt)
