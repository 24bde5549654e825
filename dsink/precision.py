"""``bf16`` / ``channels_last`` of a training: ``true``, ``false`` or ``"auto"``, as plain bools.

``auto`` is decided per machine before the first epoch: a few forward/backward steps of the run's model
on its first batch are timed each way (:func:`pick_precision`; rank 0 decides and broadcasts under DDP),
the faster is kept and printed, and a resumed run reuses the decision saved in its checkpoint. Whether
bf16 pays off depends on the CPU (AVX-512 BF16 / AMX) or GPU: on a CPU without them it is several times
*slower* (``bench/precision.py``).
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dsink.params import AUTO, TrainParams
from dsink.runtime import Runtime

log = logging.getLogger(__name__)


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
