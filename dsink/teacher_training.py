"""Train one teacher end to end: open the corrupted set, build the recipe's objective, run the engine."""

from __future__ import annotations

from typing import Any

import torch

from dsink.engine import clear_checkpoint, save_state_dict, setup_runtime, teardown_runtime, train
from dsink.models import build_model
from dsink.runs import checkpoint_dir, open_corpus, stage_config
from dsink.teachers import recipe_for
from dsink.tracking import epoch_tracker


def fit_teacher(
    params: Any, role: str, corrupted: str, model_out: str, live_dir: str | None
) -> dict[str, Any]:
    """Train the ``role`` teacher end to end (resuming when a checkpoint of the same run exists)."""

    rt = setup_runtime()
    try:
        corpus = open_corpus(params, corrupted)
        tp = getattr(params.teachers, role)
        recipe = recipe_for(role, tp, corpus.index, float(corpus.index.meta.get("noise_rate", 0.0)))
        torch.manual_seed(params.seed)
        model = build_model(tp.model, corpus.index.num_classes, corpus.source.channels)
        ckpt = checkpoint_dir(
            f"train_teacher-{role}", stage_config(params, "seed", "data", f"teachers.{role}"), [corrupted]
        )
        result = train(
            model,
            recipe.objective,
            corpus.training_set(),
            corpus.normalizer,
            tp,
            params.seed,
            rt,
            checkpoint_dir=ckpt,
            live_dir=live_dir,
            objective_state=recipe.state,
            evaluate=epoch_tracker(corpus, rt.device, 512) if tp.track_every else None,
            desc=f"teacher[{role}]",
        )
        if rt.is_main:
            save_state_dict(result.model, model_out)
            clear_checkpoint(ckpt)
        return result.history[-1] if result.history else {}
    finally:
        teardown_runtime(rt)
