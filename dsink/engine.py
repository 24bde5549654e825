"""The one training loop every model in the project uses (both teachers and the D-SINK student).

- Runs unchanged on 1 CPU, 1 GPU or N GPUs/processes: under ``torchrun`` it uses DDP (gloo on CPU, nccl
  on GPU). Each rank takes its slice of torch's ``DistributedSampler`` order and ``batch_size / world``
  samples per step, so a global step sees the same samples as the single-process run; only rank 0 writes.
- Deterministic on CPU: model init from ``seed``; order and augmentation from ``(seed, epoch)``.
- Checkpoints after every epoch to a directory *outside* DVC's outs, keyed by the caller (a hash of the
  params and inputs), so a killed stage resumes where it stopped and a params change never resumes a
  stale run. Written atomically; loaded with ``weights_only=True``.
- tqdm progress (silent when stderr is not a TTY or TQDM_DISABLE is set), dvclive metrics per epoch.
- ``bf16`` / ``channels_last``: ``true``, ``false`` or ``"auto"``. ``auto`` is decided per machine before the
  first epoch: a few forward/backward steps of this model on the run's first batch are timed each way
  (:func:`pick_precision`; rank 0 decides and broadcasts under DDP), the faster is kept and printed, and a
  resumed run reuses the decision saved in its checkpoint. Whether bf16 pays off depends on the CPU
  (AVX-512 BF16 / AMX) or GPU: on a CPU without them it is several times *slower* (``bench/precision.py``).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dsink.data.sources import Split
from dsink.data.views import (
    Normalizer,
    TrainingSet,
    augment,
    augmentation_draws,
    crop_pad,
    epoch_order,
    epoch_positions,
    eval_batches,
    iterate,
)
from dsink.errors import DsinkError
from dsink.params import AUTO, TrainParams

log = logging.getLogger(__name__)


class Objective(Protocol):
    """A training loss over a batch. ``rows`` index the corrupted set (per-sample state, teacher logits).

    An objective may also define ``epoch_metrics() -> dict[str, float]``: called once at the end of every
    epoch (every rank), its values join that epoch's record (dvclive curves, checkpoint history). The
    D-SINK objective reports its Sinkhorn solves there, the noise teacher its noise-rate estimate.
    """

    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, epoch_progress: float
    ) -> torch.Tensor: ...


@dataclass
class Runtime:
    """Where this process runs: device, rank and world size (1 outside torchrun)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime() -> Runtime:
    """Detect torchrun (``WORLD_SIZE`` > 1) and initialise the process group; else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
            backend = "nccl"
        else:
            device = torch.device("cpu")
            backend = "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        return Runtime(device, dist.get_rank(), dist.get_world_size())
    return Runtime(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def teardown_runtime(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def progress(iterable: Any, rt: Runtime, **kwargs: Any) -> Any:
    """tqdm on rank 0 when stderr is a terminal (``disable=None``), silent otherwise or with TQDM_DISABLE."""
    from tqdm.auto import tqdm

    quiet = not rt.is_main or os.environ.get("TQDM_DISABLE", "") not in ("", "0")
    return tqdm(iterable, disable=True if quiet else None, leave=False, dynamic_ncols=True, **kwargs)


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
class EpochStats:
    loss: float
    noisy_label_acc: float  # train-mode predictions vs the labels trained on
    lr: float
    extra: dict[str, float] = field(default_factory=dict)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # Through a file handle: torch.save(obj, path) names the zip records after the (temporary) file name,
    # which would make identical weights hash differently from run to run.
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
    os.replace(tmp, path)


def save_state_dict(model: nn.Module, path: str | Path) -> None:
    """Atomically save a model's state dict (CPU tensors) for ``torch.load(weights_only=True)``."""
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    _atomic_torch_save({k: v.detach().cpu() for k, v in module.state_dict().items()}, Path(path))


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict refusing anything but tensors and plain containers (never unpickles code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise DsinkError(f"{path}: model file not found") from exc
    except Exception as exc:  # weights_only refusal, truncation, garbage
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DsinkError(f"{path}: refused to load as a plain state dict ({first[:200]})") from exc


@dataclass(frozen=True)
class Precision:
    """How a training step runs: bfloat16 autocast or not, channels-last layout or not (plain bools)."""

    bf16: bool = False
    channels_last: bool = False

    @property
    def label(self) -> str:
        parts = [name for name, on in (("bf16", self.bf16), ("channels_last", self.channels_last)) if on]
        return "+".join(parts) or "fp32"


StepTimer = Callable[[Precision], float]  # seconds one training step takes under a setting


def precision_candidates(bf16: bool | str, channels_last: bool | str) -> list[Precision]:
    """Every setting the params allow, ``auto`` fields tried both ways; the first is the plain one."""
    b = (False, True) if bf16 == AUTO else (bool(bf16),)
    c = (False, True) if channels_last == AUTO else (bool(channels_last),)
    return [Precision(x, y) for x in b for y in c]


def pick_precision(
    candidates: list[Precision], time_step: StepTimer, min_gain: float = 0.05
) -> tuple[Precision, dict[Precision, float]]:
    """The fastest candidate by ``time_step``; the first (plain) one unless another saves >= ``min_gain``.

    Timing noise on a busy machine is a few percent, and the plain setting is the exact one (fp32), so a
    switch must pay for itself.
    """
    times = {c: float(time_step(c)) for c in candidates}
    plain = candidates[0]
    best = min(candidates, key=lambda c: times[c])
    if times[best] > (1.0 - min_gain) * times[plain]:
        best = plain
    return best, times


def step_timer(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int = 3,
    warmup: int = 1,
    give_up: float = 1.5,
    hopeless: float = 10.0,
    clock: Callable[[], float] = time.perf_counter,
) -> StepTimer:
    """A :data:`StepTimer` for ``model`` on batch ``(x, labels)``: the median of ``steps`` timed
    forward + backward passes after ``warmup`` untimed ones, on a copy of the model (the real one, its
    BatchNorm statistics and the global RNG are left as they were).

    A setting whose every timed step so far is over ``give_up`` times the best median measured by this
    timer stops early, and one whose warm-up step alone took over ``hopeless`` times that median is not
    timed further (its warm-up time is its figure): bf16 on a CPU without bf16 units is several times
    slower, up to 30x for ResNet-32 on the 2-core EPYC of ``bench/precision.py``, and timing it fully
    would cost more than choosing could save.
    """
    device = x.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = [math.inf]  # the fastest median so far, across calls

    def measure(prec: Precision) -> float:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            m = copy.deepcopy(model).train()
            xx = x
            if prec.channels_last:
                m = m.to(memory_format=torch.channels_last)
                xx = x.contiguous(memory_format=torch.channels_last)
            samples = []
            for i in range(warmup + steps):
                sync()
                start = clock()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec.bf16):
                    z = m(xx)
                loss = nn.functional.cross_entropy(z.float(), labels)
                m.zero_grad(set_to_none=True)
                loss.backward()
                sync()
                elapsed = clock() - start
                if i < warmup:
                    if elapsed > hopeless * best[0]:
                        samples = [elapsed]
                        break
                    continue
                samples.append(elapsed)
                if min(samples) > give_up * best[0]:
                    break
            del m
        median = statistics.median(samples)
        best[0] = min(best[0], median)
        return median

    return measure


def resolve_precision(
    p: TrainParams,
    rt: Runtime,
    make_timer: Callable[[], StepTimer],
    *,
    saved: dict[str, bool] | None = None,
    desc: str = "train",
) -> Precision:
    """``p.bf16`` / ``p.channels_last`` as plain bools; ``auto`` fields decided by timing.

    ``make_timer()`` builds the :data:`StepTimer` (called on rank 0 only when a field is auto, so the
    timing batch is only loaded then). ``saved``: the decision of the run being resumed. Under DDP only
    rank 0 times and the result is broadcast, so every rank trains the same way.
    """
    candidates = precision_candidates(p.bf16, p.channels_last)
    if len(candidates) == 1:
        return candidates[0]
    if saved is not None:
        chosen = Precision(bool(saved["bf16"]), bool(saved["channels_last"]))
        if rt.is_main:
            print(f"{desc}: precision auto -> {chosen.label} (from the checkpoint)", flush=True)
        return chosen
    chosen = candidates[0]
    if rt.is_main:
        chosen, times = pick_precision(candidates, make_timer())
        shown = ", ".join(f"{c.label} {times[c] * 1e3:.1f} ms" for c in candidates)
        msg = f"{desc}: precision auto -> {chosen.label} (one training step: {shown})"
        log.info(msg)
        print(msg, flush=True)
    if rt.distributed:
        flags = torch.tensor([int(chosen.bf16), int(chosen.channels_last)], device=rt.device)
        dist.broadcast(flags, src=0)
        chosen = Precision(bool(flags[0].item()), bool(flags[1].item()))
    return chosen


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
    device = rt.device
    model = model.to(device)
    if p.batch_size % rt.world_size:
        raise DsinkError(f"batch_size {p.batch_size} is not divisible by the world size {rt.world_size}")
    local_bs = p.batch_size // rt.world_size
    n = len(data)
    ckpt = Path(checkpoint_dir) / "last.pt" if checkpoint_dir is not None else None
    state = (
        torch.load(ckpt, map_location="cpu", weights_only=True)
        if ckpt is not None and ckpt.exists()
        else None
    )

    def make_timer() -> StepTimer:
        if precision_timer is not None:
            return precision_timer
        first = next(iterate(data, epoch_order(n, seed, 0, rt.world_size, rt.rank), np.arange(n), local_bs))
        return step_timer(model, normalizer(first.images, device), first.labels.to(device))

    prec = resolve_precision(
        p, rt, make_timer, saved=state.get("precision") if state is not None else None, desc=desc
    )
    if prec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    steps_per_epoch = math.ceil(math.ceil(n / rt.world_size) / local_bs)
    decay, no_decay = [], []
    for prm in model.parameters():
        (no_decay if prm.ndim <= 1 else decay).append(prm)
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": p.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=p.lr,
        momentum=p.momentum,
        nesterov=p.momentum > 0,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(p, steps_per_epoch))
    history: list[dict[str, float]] = []
    start_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if objective_state is not None and "objective" in state:
            objective_state.load_state_dict(state["objective"])
        history = list(state["history"])
        start_epoch = int(state["epoch"]) + 1
        if rt.is_main:
            print(f"{desc}: resuming after epoch {start_epoch} from {ckpt}", flush=True)
    if rt.distributed:
        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        train_model: nn.Module = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    else:
        train_model = model
    live = _open_live(live_dir, history) if rt.is_main and live_dir is not None else None
    pad = crop_pad(data.dataset, data.image_size)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec.bf16)
    positions = epoch_positions(n, rt.world_size, rt.rank)
    for epoch in range(start_epoch, p.epochs):
        if on_epoch_start is not None:
            on_epoch_start(model, epoch)
        train_model.train()
        order = epoch_order(n, seed, epoch, rt.world_size, rt.rank)
        draws = augmentation_draws(positions.size * rt.world_size, pad, seed, epoch) if p.augment else None
        tot_loss = torch.zeros((), dtype=torch.float64, device=device)
        tot_hit = torch.zeros((), dtype=torch.float64, device=device)
        tot_n = torch.zeros((), dtype=torch.float64, device=device)
        batches = iterate(data, order, positions, local_bs)
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
                logits = train_model(x)
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
            stats = torch.stack([tot_loss, tot_hit, tot_n])
            dist.all_reduce(stats)
            tot_loss, tot_hit, tot_n = stats
        record = {
            "epoch": float(epoch + 1),
            "train_loss": float(tot_loss / tot_n),
            "train_noisy_label_acc": float(tot_hit / tot_n),
            "lr": float(opt.param_groups[0]["lr"]),
        }
        epoch_metrics = getattr(objective, "epoch_metrics", None)
        if epoch_metrics is not None:
            record.update({k: float(v) for k, v in epoch_metrics().items()})
        tracked = p.track_every > 0 and ((epoch + 1) % p.track_every == 0 or epoch + 1 == p.epochs)
        if evaluate is not None and rt.is_main and tracked:
            model.eval()
            record.update(evaluate(model))
        history.append(record)
        if rt.is_main:
            if live is not None:
                _log_epoch(live, record)
            if ckpt is not None:
                state = {
                    "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "history": history,
                    "epoch": epoch,
                    "precision": {"bf16": prec.bf16, "channels_last": prec.channels_last},
                }
                if objective_state is not None:
                    state["objective"] = objective_state.state_dict()
                _atomic_torch_save(state, ckpt)
        if rt.distributed:
            dist.barrier()
    if live is not None:
        live.end()
    model.eval()
    return TrainResult(model, history, start_epoch, prec)


def clear_checkpoint(checkpoint_dir: str | Path | None) -> None:
    """Remove a finished run's checkpoint (its outputs are in DVC's cache from now on)."""
    if checkpoint_dir is not None and Path(checkpoint_dir).exists():
        shutil.rmtree(checkpoint_dir, ignore_errors=True)


def _open_live(live_dir: str | Path, history: list[dict[str, float]]) -> Any:
    """A fresh dvclive run; on resume the saved epochs are re-logged so the curves stay whole."""
    from dvclive import Live

    shutil.rmtree(live_dir, ignore_errors=True)
    live = Live(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None)
    for record in history:
        _log_epoch(live, record)
    return live


def _log_epoch(live: Any, record: dict[str, float]) -> None:
    for key, value in record.items():
        if key != "epoch":
            live.log_metric(key, value, plot=True)
    live.next_step()


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    split: Split,
    ids: np.ndarray,
    normalizer: Normalizer,
    device: torch.device,
    batch_size: int = 512,
    channels_last: bool = False,
    bf16: bool = False,
    desc: str = "predict",
    rt: Runtime | None = None,
) -> np.ndarray:
    """Eval-mode logits (float32, (len(ids), C)) in the order of ``ids``, chunked so memory stays bounded."""
    model.eval()
    out: np.ndarray | None = None
    chunks = eval_batches(split, ids, batch_size)
    total = math.ceil(ids.size / batch_size)
    for start, imgs in progress(chunks, rt or Runtime(device), total=total, desc=desc):
        x = normalizer(imgs, device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            z = model(x)
        z = z.float().cpu().numpy()
        if out is None:
            out = np.empty((ids.size, z.shape[1]), dtype=np.float32)
        out[start : start + z.shape[0]] = z
    assert out is not None
    return out
