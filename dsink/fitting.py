"""How a teacher or a baseline is trained: one path from a recipe to a trained model.

:func:`training_run` sets up the process (one process, or a rank under torchrun) and opens the corpus;
:func:`fit_recipe` seeds and builds the section's backbone and trains it with the recipe's objective
(:func:`dsink.engine.train`: resumable from its checkpoint directory, tracked every ``track_every``
epochs, and, for a small-loss objective whose ``forget_rate`` is null, with the noise-rate estimate
taken after ``estimate_epochs`` epochs, :func:`dsink.selection.estimate_hook`). The callers write what
their stage outputs: :mod:`dsink.teacher_training` (one model or k cross-fitted fold models, the
estimate JSON) and :mod:`dsink.baselines` (the model and its logits).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsink.engine import TrainResult, train
from dsink.models import build_model
from dsink.params import Params
from dsink.priors import label_log_prior
from dsink.runs import Corpus, checkpoint_dir, open_corpus, stage_config
from dsink.runtime import Runtime, setup_runtime, teardown_runtime
from dsink.selection import estimate_hook
from dsink.teachers import TeacherRecipe
from dsink.tracking import epoch_tracker


@contextmanager
def training_run(params: Params, corrupted: str) -> Iterator[tuple[Runtime, Corpus]]:
    """This process's runtime and the corpus of the corrupted index at ``corrupted``; the process group
    (under torchrun) is torn down on the way out, whatever happened."""
    rt = setup_runtime()
    try:
        yield rt, open_corpus(params, corrupted)
    finally:
        teardown_runtime(rt)


def run_checkpoint_dir(params: Params, stage: str, section: str, corrupted: str) -> Path:
    """The checkpoint directory of ``stage``'s run: keyed by ``seed``, ``data``, the params ``section``
    the model trains with and the bytes of the corrupted index."""
    return checkpoint_dir(stage, stage_config(params, "seed", "data", section), [corrupted])


def fit_recipe(
    rt: Runtime,
    corpus: Corpus,
    recipe: TeacherRecipe,
    tp: Any,
    seed: int,
    ckpt: Path,
    live_dir: str | None,
    desc: str,
    rows: np.ndarray | None = None,
    estimate_offset: torch.Tensor | None = None,
) -> TrainResult:
    """Train a ``tp.model`` backbone (initialised from ``seed``) with ``recipe`` on the corpus's training
    rows (``rows``: corrupted-index positions, a cross-fitting fold's training part; None = all),
    resuming from ``ckpt`` when it holds this run.

    ``tp`` is the model's training section. When the objective estimates its noise rate, the estimate
    is taken from the rows it trains on, on ``raw + estimate_offset`` logits (None: the raw logits).
    """
    obj = recipe.objective
    estimating = bool(getattr(obj, "estimates", False))
    torch.manual_seed(seed)
    model = build_model(tp.model, corpus.index.num_classes, corpus.source.channels)
    return train(
        model,
        obj,
        corpus.training_set(rows),
        corpus.normalizer,
        tp,
        seed,
        rt,
        checkpoint_dir=ckpt,
        live_dir=live_dir,
        objective_state=recipe.state,
        evaluate=(
            epoch_tracker(
                corpus,
                rt.device,
                512,
                recipe.train_offset.numpy(),
                label_log_prior(corpus.index.noisy_label, corpus.index.num_classes),
            )
            if tp.track_every
            else None
        ),
        on_epoch_start=estimate_hook(obj, corpus, tp, rt, rows, estimate_offset) if estimating else None,
        desc=desc,
    )
