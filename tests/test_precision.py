"""``bf16`` / ``channels_last: auto``: the engine times each setting and keeps the faster, as plain bools.

No test measures real time: the decision logic gets injected timers, and the real step timer an injected
clock.
"""

from __future__ import annotations

import itertools
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsink import losses
from dsink.data.sources import synthetic
from dsink.data.views import Normalizer, TrainingSet
from dsink.engine import train
from dsink.models import build_model
from dsink.params import TrainParams
from dsink.precision import (
    Precision,
    pick_precision,
    precision_candidates,
    resolve_precision,
    step_timer,
)
from dsink.runtime import Runtime

FP32, BF16, CL, BOTH = Precision(), Precision(True, False), Precision(False, True), Precision(True, True)
CPU = Runtime(torch.device("cpu"))


def table_timer(times: dict[Precision, float], calls: list | None = None):
    def time_step(prec: Precision) -> float:
        if calls is not None:
            calls.append(prec)
        return times[prec]

    return time_step


def never_called():
    raise AssertionError("timed although nothing is auto (or on a rank that must not time)")


def test_candidates_try_auto_fields_both_ways_and_keep_fixed_ones():
    assert precision_candidates(False, False) == [FP32]
    assert precision_candidates(True, True) == [BOTH]
    assert precision_candidates("auto", False) == [FP32, BF16]
    assert precision_candidates(True, "auto") == [BF16, BOTH]  # the plain one (first) keeps bf16
    assert precision_candidates("auto", "auto") == [FP32, CL, BF16, BOTH]


@pytest.mark.parametrize(
    "times, expected",
    [
        ({FP32: 1.0, CL: 0.9, BF16: 0.4, BOTH: 0.5}, BF16),  # a CPU with AMX / AVX-512 BF16, or a GPU
        ({FP32: 0.2, CL: 0.3, BF16: 1.1, BOTH: 1.2}, FP32),  # this repo's 2-core EPYC: bf16 is slower
        ({FP32: 1.0, CL: 0.6, BF16: 0.9, BOTH: 0.7}, CL),
        ({FP32: 1.0, CL: 0.97, BF16: 0.98, BOTH: 0.96}, FP32),  # under 5 % better: keep exact fp32
    ],
)
def test_pick_precision_takes_the_fastest(times, expected):
    calls: list[Precision] = []
    chosen, measured = pick_precision(list(times), table_timer(times, calls))
    assert chosen == expected
    assert measured == times
    assert sorted(calls, key=repr) == sorted(times, key=repr)  # each setting timed exactly once


def test_resolve_precision_without_auto_times_nothing():
    p = TrainParams(bf16=True, channels_last=False)
    assert resolve_precision(p, CPU, never_called) == BF16


def test_resolve_precision_prints_the_decision(capsys):
    p = TrainParams(bf16="auto", channels_last=False)
    chosen = resolve_precision(p, CPU, lambda: table_timer({FP32: 0.3, BF16: 0.1}), desc="teacher[noise]")
    assert chosen == BF16
    out = capsys.readouterr().out
    assert "teacher[noise]: precision auto -> bf16" in out
    assert "fp32 300.0 ms" in out and "bf16 100.0 ms" in out


def test_resolve_precision_reuses_a_resumed_runs_decision():
    p = TrainParams(bf16="auto", channels_last="auto")
    saved = {"bf16": False, "channels_last": True}
    assert resolve_precision(p, CPU, never_called, saved=saved) == CL


def tiny_set():
    src = synthetic(3, 8, 1, 30, 5)
    ids = np.arange(len(src.train), dtype=np.int64)
    ts = TrainingSet(src.train, ids, torch.from_numpy(src.train.labels), "synthetic", src.image_size)
    return ts, Normalizer.for_source(src)


def ce(logits, labels, rows, progress):
    return losses.cross_entropy(logits, labels)


def run_train(p: TrainParams, **kw):
    ts, norm = tiny_set()
    torch.manual_seed(0)
    return train(build_model("small_cnn", 3, 1), ce, ts, norm, p, 0, CPU, **kw)


@pytest.mark.parametrize("fastest", [FP32, CL, BF16, BOTH])
def test_auto_resolves_to_plain_bools_before_training(fastest):
    times = {c: (0.1 if c == fastest else 1.0) for c in (FP32, CL, BF16, BOTH)}
    calls: list[Precision] = []
    p = TrainParams(
        model="small_cnn", epochs=1, batch_size=16, track_every=0, bf16="auto", channels_last="auto"
    )
    result = run_train(p, precision_timer=table_timer(times, calls))
    assert result.precision == fastest
    assert type(result.precision.bf16) is bool and type(result.precision.channels_last) is bool
    assert len(calls) == 4
    # the setting took effect: the trained model's conv weights are in the chosen layout
    conv = next(m for m in result.model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) == fastest.channels_last


def test_auto_choosing_fp32_trains_exactly_like_fp32():
    """The decision is all auto changes: deciding fp32 gives the plain run's weights bit for bit."""
    base = dict(model="small_cnn", epochs=2, batch_size=16, track_every=0)
    ref = run_train(TrainParams(**base)).model.state_dict()
    times = {FP32: 0.1, CL: 1.0, BF16: 1.0, BOTH: 1.0}
    got = run_train(
        TrainParams(**base, bf16="auto", channels_last="auto"), precision_timer=table_timer(times)
    )
    assert got.precision == FP32
    state = got.model.state_dict()
    assert all(torch.equal(ref[k], state[k]) for k in ref)


class Stop(Exception):
    pass


def test_a_resumed_run_keeps_its_first_decision(tmp_path):
    p = TrainParams(
        model="small_cnn", epochs=3, batch_size=16, track_every=0, bf16="auto", channels_last="auto"
    )

    def stop_at_epoch_1(model, epoch):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        run_train(
            p,
            checkpoint_dir=tmp_path,
            precision_timer=table_timer({FP32: 1.0, CL: 0.1, BF16: 1.0, BOTH: 1.0}),
            on_epoch_start=stop_at_epoch_1,
        )
    # a later timing would favour bf16, but the checkpoint's weights were trained channels-last in fp32
    resumed = run_train(
        p, checkpoint_dir=tmp_path, precision_timer=table_timer({FP32: 1.0, CL: 1.0, BF16: 0.1, BOTH: 1.0})
    )
    assert resumed.resumed_from_epoch == 1
    assert resumed.precision == CL


def test_step_timer_reports_the_median_and_leaves_model_and_rng_alone():
    torch.manual_seed(0)
    model = build_model("resnet32", 3, 3)  # BatchNorm: a forward in train mode would move its statistics
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    ticks = itertools.count()
    durations = iter([9.0, 3.0, 1.0, 2.0])  # warm-up (ignored), then three timed steps

    def clock():
        # start/stop pairs: the start is the tick, the stop is the start plus the next duration
        n = next(ticks)
        return float(n) if n % 2 == 0 else float(n - 1) + next(durations)

    measure = step_timer(model, x, y, steps=3, warmup=1, clock=clock)
    assert measure(BOTH) == 2.0  # median of 3, 1, 2
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(rng, torch.get_rng_state())
    assert model.training  # untouched mode too
    assert not any(prm.grad is not None for prm in model.parameters())


def test_step_timer_stops_timing_a_setting_that_is_clearly_slower():
    model = build_model("small_cnn", 3, 1)
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    # fp32 1 s/step, bf16 9 s/step, channels_last: a 20 s warm-up
    durations = iter([1.0, 1.0, 1.0, 1.0, 9.0, 9.0, 20.0, 9.0, 9.0, 9.0])
    calls = itertools.count()
    now = [0.0]

    def clock():  # calls alternate start, stop; a stop is the start plus the next duration
        if next(calls) % 2:
            now[0] += next(durations)
        return now[0]

    measure = step_timer(model, x, y, steps=3, warmup=1, give_up=1.5, hopeless=10.0, clock=clock)
    assert measure(FP32) == 1.0
    assert measure(BF16) == 9.0  # its first timed step is over 1.5 x 1.0: no second one
    assert measure(CL) == 20.0  # its warm-up alone is over 10 x 1.0: no timed step
    assert next(calls) == 2 * (4 + 2 + 1)  # fp32: warm-up + 3 steps; bf16: warm-up + 1; cl: warm-up
    assert list(durations) == [9.0, 9.0, 9.0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        rt = Runtime(torch.device("cpu"), rank, 2)
        p = TrainParams(bf16="auto", channels_last="auto")
        # only rank 0 may time; rank 1 learns the decision from the broadcast
        timer = table_timer({FP32: 1.0, CL: 1.0, BF16: 0.1, BOTH: 1.0})
        chosen = resolve_precision(p, rt, (lambda: timer) if rank == 0 else never_called)
        with open(os.path.join(out_dir, f"rank{rank}"), "w") as fh:
            fh.write(f"{chosen.bf16} {chosen.channels_last}")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_under_ddp_rank_0_decides_for_every_rank(tmp_path):
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank0").read_text() == "True False"
    assert (tmp_path / "rank1").read_text() == "True False"
