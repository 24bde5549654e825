"""Small-loss selection's noise-rate estimate, taken from the model being trained.

With ``forget_rate: null`` a small-loss objective (the noise teacher, the ``la_small_loss`` baseline)
keeps every sample for ``estimate_epochs`` epochs; then :func:`estimate_hook` predicts the samples the
model trains on and hands the estimate (:mod:`dsink.noise_rate`: overall and per given-label class) to the
objective, whose :class:`dsink.losses.SmallLossSelection` forgets it from then on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dsink.inference import predict_logits
from dsink.noise_rate import NoiseRateEstimate, estimate_noise_rates
from dsink.params import SmallLossParams
from dsink.runs import Corpus
from dsink.runtime import Runtime


def noise_rate_of_model(
    model: torch.nn.Module,
    corpus: Corpus,
    mixture: str,
    rt: Runtime,
    rows: np.ndarray | None = None,
    offset: torch.Tensor | np.ndarray | None = None,
) -> NoiseRateEstimate:
    """The noise rate, overall and per given-label class, estimated from ``model``'s eval-mode logits on
    the training samples it trained on.

    ``rows``: positions in the corrupted index (a cross-fitting fold's training part); None = all.
    ``offset`` (C,): added to the raw logits first, so the losses are those the model was trained on (a
    logit-adjusted model's ``train_offset = tau * log prior``); None = the raw logits.

    Rank 0 predicts (fp32) and fits; the values are broadcast, so every rank, whatever the world size,
    uses the numbers a single process would have computed.
    """
    idx = corpus.index
    C = idx.num_classes
    value = torch.zeros(1 + C, dtype=torch.float64, device=rt.device)  # overall, then per class
    if rt.is_main:
        net = getattr(model, "module", model)
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
        if offset is not None:
            off = offset.detach().cpu().numpy() if isinstance(offset, torch.Tensor) else offset
            z = z.astype(np.float64) + np.asarray(off, dtype=np.float64).reshape(1, C)
        est = estimate_noise_rates(z, idx.noisy_label[take], mixture)
        value[0] = est.overall
        value[1:] = torch.tensor(est.per_class, dtype=torch.float64)
    if rt.distributed:
        dist.broadcast(value, src=0)
    v = value.cpu().tolist()
    return NoiseRateEstimate(v[0], tuple(v[1:]))


def estimate_hook(
    objective: Any,
    corpus: Corpus,
    tp: SmallLossParams,
    rt: Runtime,
    rows: np.ndarray | None = None,
    offset: torch.Tensor | np.ndarray | None = None,
) -> Callable[[torch.nn.Module, int], None]:
    """An ``on_epoch_start`` callback: before epoch ``tp.estimate_epochs`` (0-based), i.e. once that many
    epochs are done, estimate the noise rate (overall and per class, see :func:`noise_rate_of_model` for
    ``rows`` and ``offset``) and hand it to the objective. A run resumed later has it from its checkpoint;
    one resumed exactly there computes it from the same model."""

    def on_epoch_start(model: torch.nn.Module, epoch: int) -> None:
        if objective.noise_rate_estimate is None and epoch >= tp.estimate_epochs:
            est = noise_rate_of_model(model, corpus, tp.estimate_mixture, rt, rows, offset)
            objective.set_estimate(est)

    return on_epoch_start
