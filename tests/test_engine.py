"""The training engine: learns, resumes exactly after an interruption, and matches itself under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dsink import losses
from dsink.data.sources import synthetic
from dsink.data.views import Normalizer, TrainingSet, augment, epoch_order
from dsink.engine import lr_lambda, train
from dsink.inference import predict_logits
from dsink.models import build_model
from dsink.params import TrainParams
from dsink.runtime import Runtime

ROOT = Path(__file__).resolve().parents[1]


def tiny_set(num_classes: int = 3, per_class: int = 40, size: int = 8, channels: int = 1):
    src = synthetic(num_classes, size, channels, per_class, 10)
    ids = np.arange(len(src.train), dtype=np.int64)
    ts = TrainingSet(src.train, ids, torch.from_numpy(src.train.labels), "synthetic", src.image_size)
    return src, ts, Normalizer.for_source(src)


def ce_objective(logits, labels, rows, progress):
    return losses.cross_entropy(logits, labels)


def params(**kw) -> TrainParams:
    base = dict(model="small_cnn", epochs=4, batch_size=16, lr=0.05, track_every=0)
    base.update(kw)
    return TrainParams(**base)


def test_engine_overfits_a_tiny_set():
    torch.manual_seed(0)
    src, ts, norm = tiny_set()
    model = build_model("small_cnn", 3, 1)
    p = params(epochs=12, augment=False)
    result = train(model, ce_objective, ts, norm, p, seed=0, rt=Runtime(torch.device("cpu")))
    z = predict_logits(result.model, src.train, ts.ids, norm, torch.device("cpu"))
    acc = float((z.argmax(1) == src.train.labels).mean())
    assert acc > 0.95, acc
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


class Boom(Exception):
    pass


def test_resume_after_interruption_gives_identical_weights(tmp_path):
    _, ts, norm = tiny_set()
    p = params(epochs=4)
    rt = Runtime(torch.device("cpu"))

    torch.manual_seed(0)
    ref = train(build_model("small_cnn", 3, 1), ce_objective, ts, norm, p, 0, rt).model.state_dict()

    ckpt = tmp_path / "ckpt"

    def die_at_epoch_2(model, epoch):
        if epoch == 2:
            raise Boom

    torch.manual_seed(0)
    with pytest.raises(Boom):
        train(
            build_model("small_cnn", 3, 1),
            ce_objective,
            ts,
            norm,
            p,
            0,
            rt,
            checkpoint_dir=ckpt,
            on_epoch_start=die_at_epoch_2,
        )
    assert (ckpt / "last.pt").exists()
    state = torch.load(ckpt / "last.pt", weights_only=True)
    assert state["epoch"] == 1
    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    resumed = train(build_model("small_cnn", 3, 1), ce_objective, ts, norm, p, 0, rt, checkpoint_dir=ckpt)
    assert resumed.resumed_from_epoch == 2
    assert len(resumed.history) == 4
    for k, v in ref.items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_schedule_shapes():
    f = lr_lambda(params(epochs=10, warmup_epochs=2), steps_per_epoch=5)
    assert f(0) == pytest.approx(1 / 10) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(49) < 0.01
    g = lr_lambda(params(epochs=10, schedule="step", milestones=[3, 6], gamma=0.1), steps_per_epoch=5)
    assert g(14) == 1.0 and g(15) == pytest.approx(0.1) and g(30) == pytest.approx(0.01)


def test_augment_is_a_crop_of_the_padded_image_and_flip():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    dy = torch.tensor([1, 0])
    dx = torch.tensor([1, 2])
    flip = torch.tensor([False, True])
    out = augment(x, dy, dx, flip, pad=1)
    assert torch.equal(out[0], x[0])  # offset (1, 1) with pad 1 is the identity crop
    padded = torch.nn.functional.pad(x[1], (1, 1, 1, 1))
    assert torch.equal(out[1], padded[:, 0:4, 2:6].flip(-1))


def test_distributed_order_partitions_the_single_process_order():
    single = epoch_order(10, 3, 1, 1, 0)
    r0, r1 = epoch_order(10, 3, 1, 2, 0), epoch_order(10, 3, 1, 2, 1)
    assert sorted(single.tolist()) == list(range(10))
    interleaved = np.empty(10, dtype=np.int64)
    interleaved[0::2], interleaved[1::2] = r0, r1
    assert np.array_equal(interleaved, single)


DDP_SCRIPT = """
import sys, torch, numpy as np
sys.path.insert(0, {tests!r})
from test_engine import tiny_set, ce_objective, params
from dsink.checkpoints import save_state_dict
from dsink.engine import train
from dsink.runtime import setup_runtime, teardown_runtime
from dsink.models import build_model
rt = setup_runtime()
src, ts, norm = tiny_set()
torch.manual_seed(0)
res = train(build_model("small_cnn", 3, 1), ce_objective, ts, norm, params(epochs=2, batch_size=16), 0, rt)
if rt.is_main:
    save_state_dict(res.model, sys.argv[1])
teardown_runtime(rt)
"""


@pytest.mark.timeout(300)
def test_torchrun_two_processes_matches_single_process(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    single = tmp_path / "single.pt"
    double = tmp_path / "ddp.pt"
    subprocess.run([sys.executable, str(script), str(single)], check=True, env=env, cwd=ROOT, timeout=240)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            str(double),
        ],
        check=True,
        env=env,
        cwd=ROOT,
        timeout=240,
    )
    a = torch.load(single, weights_only=True)
    b = torch.load(double, weights_only=True)
    # Same global batches and augmentation; only BatchNorm statistics are per rank (half batches), so the
    # weights agree closely but not bit for bit.
    num = sum(float((a[k].float() - b[k].float()).norm() ** 2) for k in a if a[k].is_floating_point())
    den = sum(float(a[k].float().norm() ** 2) for k in a if a[k].is_floating_point())
    assert (num / den) ** 0.5 < 0.05
    src, ts, norm = tiny_set()
    accs = []
    for state in (a, b):
        m = build_model("small_cnn", 3, 1)
        m.load_state_dict(state)
        z = predict_logits(m, src.test, np.arange(len(src.test)), norm, torch.device("cpu"))
        accs.append(float((z.argmax(1) == src.test.labels).mean()))
    assert abs(accs[0] - accs[1]) <= 0.1, accs


def test_saved_model_files_are_byte_identical(tmp_path):
    from dsink.checkpoints import save_state_dict

    torch.manual_seed(0)
    model = build_model("small_cnn", 3, 1)
    save_state_dict(model, tmp_path / "a" / "model.pt")
    save_state_dict(model, tmp_path / "b" / "other_name.pt")
    assert (tmp_path / "a" / "model.pt").read_bytes() == (tmp_path / "b" / "other_name.pt").read_bytes()
