"""Small-loss selection's noise-rate estimate, taken from the model being trained.

With ``forget_rate: null`` a small-loss objective (the noise teacher, the ``la_small_loss`` baseline)
keeps every sample for ``estimate_epochs`` epochs; then :func:`estimate_hook` predicts the samples the
model trains on and hands the estimate (:mod:`dsink.noise_rate`) to the objective.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dsink.engine import Runtime, predict_logits
from dsink.noise_rate import estimate_noise_rate
from dsink.params import SmallLossParams
from dsink.runs import Corpus


def noise_rate_of_model(
    model: torch.nn.Module, corpus: Corpus, mixture: str, rt: Runtime, rows: np.ndarray | None = None
) -> float:
    """The noise rate estimated from ``model``'s eval-mode logits on the training samples it trained on.

    ``rows``: positions in the corrupted index (a cross-fitting fold's training part); None = all.

    Rank 0 predicts (fp32) and fits; the value is broadcast, so every rank, whatever the world size,
    uses the number a single process would have computed.
    """
    value = torch.zeros(1, dtype=torch.float64, device=rt.device)
    if rt.is_main:
        net = getattr(model, "module", model)
        idx = corpus.index
        take = np.arange(idx.sample_id.size) if rows is None else np.asarray(rows, dtype=np.int64)
        z = predict_logits(
            net,
            corpus.source.train,
            idx.sample_id[take],
            corpus.normalizer,
            rt.device,
            512,
            desc="noise rate",
            rt=rt,
        )
        value[0] = estimate_noise_rate(z, idx.noisy_label[take], mixture)
    if rt.distributed:
        dist.broadcast(value, src=0)
    return float(value.item())


def estimate_hook(
    objective: Any, corpus: Corpus, tp: SmallLossParams, rt: Runtime, rows: np.ndarray | None = None
) -> Callable[[torch.nn.Module, int], None]:
    """An ``on_epoch_start`` callback: before epoch ``tp.estimate_epochs`` (0-based), i.e. once that many
    epochs are done, estimate the noise rate and hand it to the objective. A run resumed later has it
    from its checkpoint; one resumed exactly there computes it from the same model."""

    def on_epoch_start(model: torch.nn.Module, epoch: int) -> None:
        if objective.noise_rate_estimate is None and epoch >= tp.estimate_epochs:
            objective.set_estimate(noise_rate_of_model(model, corpus, tp.estimate_mixture, rt, rows))

    return on_epoch_start
