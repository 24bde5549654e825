"""The one training loop every model in the project uses (the teachers, the baselines, the D-SINK student).

- Runs unchanged on 1 CPU, 1 GPU or N GPUs/processes: under ``torchrun`` it uses DDP (gloo on CPU, nccl
  on GPU; :mod:`dsink.runtime`). Each rank takes its slice of torch's ``DistributedSampler`` order and
  ``batch_size / world`` samples per step, so a global step sees the same samples as the single-process
  run; only rank 0 writes.
- Deterministic on CPU: model init from ``seed``; order and augmentation from ``(seed, epoch)``.
- Checkpoints after every epoch to a directory *outside* DVC's outs, keyed by the caller (a hash of the
  params and inputs), so a killed stage resumes where it stopped and a params change never resumes a
  stale run. Written atomically; loaded with ``weights_only=True`` (:mod:`dsink.checkpoints`).
- tqdm progress (silent when stderr is not a TTY or TQDM_DISABLE is set), dvclive metrics per epoch
  (:mod:`dsink.live`), and every ``track_every`` epochs the caller's ``evaluate`` measurements.
- ``bf16`` / ``channels_last``: ``true``, ``false`` or ``"auto"``, decided before the first epoch
  (:mod:`dsink.precision`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from dsink.checkpoints import checkpoint_file, load_checkpoint, restore_checkpoint, save_checkpoint
from dsink.data.views import (
    Normalizer,
    TrainingSet,
    augment,
    augmentation_draws,
    crop_pad,
    epoch_order,
    epoch_positions,
    iterate,
)
from dsink.errors import DsinkError
from dsink.live import log_epoch, open_live
from dsink.params import TrainParams
from dsink.precision import Precision, StepTimer, resolve_precision, step_timer
from dsink.runtime import Runtime, barrier, data_parallel, progress, sum_over_ranks


class Objective(Protocol):
    """A training loss over a batch. ``rows`` index the corrupted set (per-sample state, teacher logits).

    An objective may also define ``epoch_metrics() -> dict[str, float]``: called once at the end of every
    epoch (every rank), its values join that epoch's record (dvclive curves, checkpoint history). The
    D-SINK objective reports its Sinkhorn solves there, the noise teacher its noise-rate estimate.
    """

    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, epoch_progress: float
    ) -> torch.Tensor: ...


def lr_lambda(p: TrainParams, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base LR at optimizer step ``s``: linear warm-up, then cosine / step / constant."""
    total = p.epochs * steps_per_epoch
    warm = p.warmup_epochs * steps_per_epoch

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if p.schedule == "cosine":
            t = (step - warm) / max(1, total - warm)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
        if p.schedule == "step":
            epoch = step // steps_per_epoch
            return p.gamma ** sum(epoch >= m for m in p.milestones)
        return 1.0

    return f


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, float]]
    resumed_from_epoch: int
    precision: Precision = field(default_factory=Precision)


def train(
    model: nn.Module,
    objective: Objective,
    data: TrainingSet,
    normalizer: Normalizer,
    p: TrainParams,
    seed: int,
    rt: Runtime,
    *,
    checkpoint_dir: str | Path | None = None,
    live_dir: str | Path | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    on_epoch_start: Callable[[nn.Module, int], None] | None = None,
    objective_state: Any = None,
    desc: str = "train",
    precision_timer: StepTimer | None = None,
) -> TrainResult:
    """Train ``model`` on ``data`` with ``objective``; resume from ``checkpoint_dir`` when it holds a run.

    ``evaluate(model)`` (rank 0, eval mode) adds metrics per epoch; ``on_epoch_start(model, epoch)`` lets
    the D-SINK dataset scope re-solve its targets; ``objective_state`` is anything with ``state_dict`` /
    ``load_state_dict`` (e.g. ELR's target buffer) saved in the checkpoint. ``precision_timer`` replaces
    the measurement behind ``bf16`` / ``channels_last: auto`` (tests); the decision is
    ``TrainResult.precision``.
    """
    model = model.to(rt.device)
    if p.batch_size % rt.world_size:
        raise DsinkError(f"batch_size {p.batch_size} is not divisible by the world size {rt.world_size}")
    ckpt = checkpoint_file(checkpoint_dir)
    state = load_checkpoint(ckpt)

    def make_timer() -> StepTimer:
        if precision_timer is not None:
            return precision_timer
        return _first_batch_timer(model, data, normalizer, p, seed, rt)

    saved = state.get("precision") if state is not None else None
    prec = resolve_precision(p, rt, make_timer, saved=saved, desc=desc)
    if prec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = _optimizer(model, p)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(p, _steps_per_epoch(len(data), p, rt)))
    history: list[dict[str, float]] = []
    start_epoch = 0
    if state is not None:
        history, start_epoch = restore_checkpoint(state, model, opt, sched, objective_state)
        if rt.is_main:
            print(f"{desc}: resuming after epoch {start_epoch} from {ckpt}", flush=True)
    net = data_parallel(model, rt)
    live = open_live(live_dir, history) if rt.is_main and live_dir is not None else None
    for epoch in range(start_epoch, p.epochs):
        if on_epoch_start is not None:
            on_epoch_start(model, epoch)
        record = _train_epoch(net, objective, data, normalizer, p, seed, rt, epoch, opt, sched, prec, desc)
        epoch_metrics = getattr(objective, "epoch_metrics", None)
        if epoch_metrics is not None:
            record.update({k: float(v) for k, v in epoch_metrics().items()})
        if evaluate is not None and rt.is_main and _tracked(p, epoch):
            model.eval()
            record.update(evaluate(model))
        history.append(record)
        if rt.is_main:
            if live is not None:
                log_epoch(live, record)
            if ckpt is not None:
                precision = {"bf16": prec.bf16, "channels_last": prec.channels_last}
                save_checkpoint(ckpt, model, opt, sched, history, epoch, precision, objective_state)
        barrier(rt)
    if live is not None:
        live.end()
    model.eval()
    return TrainResult(model, history, start_epoch, prec)


def _local_batch_size(p: TrainParams, rt: Runtime) -> int:
    return p.batch_size // rt.world_size


def _steps_per_epoch(n: int, p: TrainParams, rt: Runtime) -> int:
    """Optimizer steps per epoch: this rank's share of ``n`` samples in batches of its share."""
    return math.ceil(math.ceil(n / rt.world_size) / _local_batch_size(p, rt))


def _tracked(p: TrainParams, epoch: int) -> bool:
    """Whether 0-based ``epoch`` gets the ``evaluate`` measurements: every ``track_every``-th and the last."""
    return p.track_every > 0 and ((epoch + 1) % p.track_every == 0 or epoch + 1 == p.epochs)


def _optimizer(model: nn.Module, p: TrainParams) -> torch.optim.SGD:
    """SGD (Nesterov when there is momentum), weight decay on the weights only (not biases or norms)."""
    decay, no_decay = [], []
    for prm in model.parameters():
        (no_decay if prm.ndim <= 1 else decay).append(prm)
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": p.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=p.lr,
        momentum=p.momentum,
        nesterov=p.momentum > 0,
    )


def _first_batch_timer(
    model: nn.Module, data: TrainingSet, normalizer: Normalizer, p: TrainParams, seed: int, rt: Runtime
) -> StepTimer:
    """The :data:`~dsink.precision.StepTimer` of ``model`` on this rank's first batch of epoch 0."""
    n = len(data)
    order = epoch_order(n, seed, 0, rt.world_size, rt.rank)
    first = next(iterate(data, order, np.arange(n), _local_batch_size(p, rt)))
    return step_timer(model, normalizer(first.images, rt.device), first.labels.to(rt.device))


def _train_epoch(
    net: nn.Module,
    objective: Objective,
    data: TrainingSet,
    normalizer: Normalizer,
    p: TrainParams,
    seed: int,
    rt: Runtime,
    epoch: int,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    prec: Precision,
    desc: str,
) -> dict[str, float]:
    """One optimizer pass over this rank's share of ``data`` (0-based ``epoch``); the epoch's record:
    mean loss and accuracy on the labels trained on over every rank, and the LR after its last step."""
    device = rt.device
    n = len(data)
    steps_per_epoch = _steps_per_epoch(n, p, rt)
    positions = epoch_positions(n, rt.world_size, rt.rank)
    pad = crop_pad(data.dataset, data.image_size)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec.bf16)
    net.train()
    order = epoch_order(n, seed, epoch, rt.world_size, rt.rank)
    draws = augmentation_draws(positions.size * rt.world_size, pad, seed, epoch) if p.augment else None
    tot_loss = torch.zeros((), dtype=torch.float64, device=device)
    tot_hit = torch.zeros((), dtype=torch.float64, device=device)
    tot_n = torch.zeros((), dtype=torch.float64, device=device)
    batches = iterate(data, order, positions, _local_batch_size(p, rt))
    for step, batch in enumerate(
        progress(batches, rt, total=steps_per_epoch, desc=f"{desc} {epoch + 1}/{p.epochs}")
    ):
        x = normalizer(batch.images, device)
        if draws is not None:
            dy, dx, flip = (d[batch.order_pos].to(device) for d in draws)
            x = augment(x, dy, dx, flip, pad)
        if prec.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        labels = batch.labels.to(device)
        with autocast:
            logits = net(x)
        logits = logits.float()
        loss = objective(logits, labels, batch.rows.to(device), epoch + step / steps_per_epoch)
        if not torch.isfinite(loss):
            raise DsinkError(
                f"{desc}: loss became {loss.item()} at epoch {epoch + 1}, step {step}; "
                "lower the learning rate"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            tot_loss += loss.detach().double() * labels.numel()
            tot_hit += (logits.argmax(1) == labels).sum()
            tot_n += labels.numel()
    if rt.distributed:
        tot_loss, tot_hit, tot_n = sum_over_ranks(torch.stack([tot_loss, tot_hit, tot_n]), rt)
    return {
        "epoch": float(epoch + 1),
        "train_loss": float(tot_loss / tot_n),
        "train_noisy_label_acc": float(tot_hit / tot_n),
        "lr": float(opt.param_groups[0]["lr"]),
    }
