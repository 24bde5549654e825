"""The noise teacher's small-loss schedule with an estimated noise rate: before and after the estimate,
the override, its checkpoint, a resumed run, the world size, and how the estimate reaches the logits."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dsink import fitting, losses, selection
from dsink import teacher_training as tt
from dsink.artifacts import CorruptedIndex, read_corrupted, read_logits
from dsink.noise_rate import NoiseRateEstimate
from dsink.params import NoiseTeacherParams, load_params
from dsink.teachers import MAX_FORGET_RATE, noise_recipe

ROOT = Path(__file__).resolve().parents[1]


def _index(n: int = 40, C: int = 4) -> CorruptedIndex:
    y = np.arange(n) % C
    return CorruptedIndex(np.arange(n), y, y, np.zeros(n, bool), {"dataset": "synthetic", "num_classes": C})


def _batch(n: int = 40, C: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, generator=g) * 3, torch.randint(0, C, (n,), generator=g), torch.arange(n)


def _kept_mean(z: torch.Tensor, y: torch.Tensor, keep: float) -> torch.Tensor:
    per = losses.cross_entropy(z, y, reduction="none")
    return per[losses.small_loss_keep_mask(per, keep)].mean()


def _brute_per_class_mask(loss: torch.Tensor, y: torch.Tensor, keeps: list[float]) -> torch.Tensor:
    """Sort each class's samples by (NaN last, loss, index) in Python and keep ``ceil(keep_c * n_c)``."""
    mask = torch.zeros(loss.numel(), dtype=torch.bool)
    values, labels = loss.tolist(), y.tolist()
    for c in set(labels):
        members = sorted(
            (i for i, lab in enumerate(labels) if lab == c),
            key=lambda i: (math.isnan(values[i]), values[i] if not math.isnan(values[i]) else 0.0, i),
        )
        k = max(1, math.ceil(keeps[c] * len(members) - 1e-9))
        mask[members[:k]] = True
    return mask


def _per_class_kept_mean(z: torch.Tensor, y: torch.Tensor, keeps: list[float]) -> torch.Tensor:
    per = losses.cross_entropy(z, y, reduction="none")
    return per[_brute_per_class_mask(per, y, keeps)].mean()


@pytest.mark.parametrize("rule", ["global", "per_class"])
def test_small_loss_keeps_everything_until_the_estimate_then_ramps_to_it(rule):
    p = NoiseTeacherParams(method="small_loss", ramp_epochs=10, selection=rule)
    obj = noise_recipe(p, _index()).objective
    z, y, rows = _batch()
    assert obj.estimates and obj.forget_rate is None and obj.epoch_metrics() == {}
    for progress in (0.0, 3.5, 12.0):  # no estimate yet: plain CE whatever the epoch
        assert torch.equal(obj(z, y, rows, progress), losses.cross_entropy(z, y))
    obj.set_estimate(0.4)  # a bare share: every class gets it
    assert obj.forget_rate == 0.4 and obj.epoch_metrics() == {"noise_rate_estimate": 0.4}
    assert obj.noise_rate_estimate_per_class == (0.4,) * 4
    # the co-teaching ramp, as for a set rate: 1 - 0.4 * min(1, epoch / 10)
    if rule == "global":
        assert torch.equal(obj(z, y, rows, 5.0), _kept_mean(z, y, 0.8))
        assert torch.equal(obj(z, y, rows, 10.0), _kept_mean(z, y, 0.6))
    else:
        assert torch.equal(obj(z, y, rows, 5.0), _per_class_kept_mean(z, y, [0.8] * 4))
        assert torch.equal(obj(z, y, rows, 10.0), _per_class_kept_mean(z, y, [0.6] * 4))
    assert not torch.equal(obj(z, y, rows, 10.0), losses.cross_entropy(z, y))
    obj.set_estimate(0.99)  # recorded as estimated, but selection must keep some samples
    assert obj.noise_rate_estimate == 0.99 and obj.forget_rate == MAX_FORGET_RATE
    with pytest.raises(ValueError, match="share in"):
        obj.set_estimate(1.5)


def test_per_class_selection_ramps_each_class_to_its_own_estimate():
    obj = noise_recipe(NoiseTeacherParams(method="small_loss", ramp_epochs=10), _index()).objective
    z, y, rows = _batch(n=64)
    est = NoiseRateEstimate(0.3, (0.1, 0.5, 0.0, 0.99))
    obj.set_estimate(est)
    assert obj.noise_rate_estimate == 0.3 and obj.forget_rate == 0.3
    assert obj.noise_rate_estimate_per_class == est.per_class
    assert obj.small_loss.forget_rates == (0.1, 0.5, 0.0, MAX_FORGET_RATE)  # capped like the overall one
    for progress in (0.0, 2.5, 10.0, 14.0):
        ramp = min(1.0, progress / 10)
        keeps = [1 - f * ramp for f in (0.1, 0.5, 0.0, MAX_FORGET_RATE)]
        assert torch.equal(obj(z, y, rows, progress), _per_class_kept_mean(z, y, keeps))
    with pytest.raises(ValueError, match="classes"):
        obj.set_estimate(NoiseRateEstimate(0.3, (0.1, 0.5)))


def test_a_set_forget_rate_overrides_and_nothing_is_estimated():
    z, y, rows = _batch()
    for rule, expected in (
        ("global", _kept_mean(z, y, 0.8)),
        ("per_class", _per_class_kept_mean(z, y, [0.8] * 4)),
    ):
        p = NoiseTeacherParams(method="small_loss", forget_rate=0.2, ramp_epochs=0, selection=rule)
        obj = noise_recipe(p, _index()).objective
        assert not obj.estimates and obj.forget_rate == 0.2
        assert torch.equal(obj(z, y, rows, 0.0), expected)
    for method in ("gce", "elr", "ce"):
        assert not noise_recipe(NoiseTeacherParams(method=method), _index()).objective.estimates


def test_a_set_forget_rate_is_every_class_s_rate():
    p = NoiseTeacherParams(method="small_loss", forget_rate=0.25, ramp_epochs=4)
    obj = noise_recipe(p, _index()).objective
    obj.set_estimate(NoiseRateEstimate(0.3, (0.1, 0.5, 0.0, 0.9)))  # not used: the set rate decides
    z, y, rows = _batch()
    assert torch.equal(obj(z, y, rows, 2.0), _per_class_kept_mean(z, y, [0.875] * 4))


@pytest.mark.parametrize("seed", range(30))
def test_per_class_keep_mask_is_a_per_class_sort(seed):
    g = torch.Generator().manual_seed(seed)
    C = int(torch.randint(1, 7, (1,), generator=g))
    n = int(torch.randint(1, 60, (1,), generator=g))
    loss = torch.randint(0, 6, (n,), generator=g).double()  # many ties
    loss[torch.rand(n, generator=g) < 0.1] = float("nan")
    y = torch.randint(0, C, (n,), generator=g) ** 2 % C  # uneven: some classes 0-2 samples
    keeps = (torch.rand(C, generator=g) * 0.99 + 0.01).tolist()
    keeps[0] = 1.0
    mask = losses.small_loss_keep_mask_per_class(loss, y, keeps)
    assert torch.equal(mask, _brute_per_class_mask(loss, y, keeps))
    assert set(y[mask].tolist()) == set(y.tolist())  # no class present is dropped
    # one class: the global mask
    one = torch.zeros(n, dtype=torch.long)
    assert torch.equal(
        losses.small_loss_keep_mask_per_class(loss, one, [keeps[-1]]),
        losses.small_loss_keep_mask(loss, keeps[-1]),
    )


def test_per_class_rounding_of_a_class_with_one_or_two_samples():
    keep = losses.small_loss_keep_mask_per_class
    loss, y = torch.tensor([5.0, 1.0, 9.0]), torch.tensor([1, 0, 0])
    assert keep(loss, y, [0.05, 0.05]).tolist() == [True, True, False]  # one sample: always kept
    assert keep(loss, y, [0.51, 1.0]).tolist() == [True, True, True]  # two: both while keep > 1/2
    assert keep(loss, y, [0.5, 1.0]).tolist() == [True, True, False]  # then the smaller loss
    with pytest.raises(ValueError, match="labels span"):
        keep(loss, torch.tensor([0, 2, 1]), [0.5, 0.5])
    with pytest.raises(ValueError, match="keep_fractions"):
        keep(loss, y, [0.0, 1.0])


def test_per_class_selection_keeps_a_tail_class_that_global_selection_drops():
    """A head class with small losses fills the batch; the two tail samples have the largest losses,
    one of them its clean sample. Forgetting 60 %, the global rule keeps the 40 % smallest of the batch,
    all from the head; the per-class rule keeps 40 % of each class (rounded up), so the tail's smaller
    loss stays."""
    C, n_head = 4, 30
    labels = torch.tensor([0] * n_head + [3, 3])
    loss = torch.cat([torch.linspace(0.1, 1.0, n_head), torch.tensor([2.0, 6.0])])
    sel = {
        s: losses.SmallLossSelection(C, forget_rate=0.6, ramp_epochs=0, selection=s)
        for s in ("global", "per_class")
    }
    glob = sel["global"].keep_mask(loss, labels, 0.0)
    per = sel["per_class"].keep_mask(loss, labels, 0.0)
    assert not glob[labels == 3].any() and int(glob.sum()) == math.ceil(0.4 * 32)
    assert per[labels == 3].tolist() == [True, False]
    assert int(per[labels == 0].sum()) == math.ceil(0.4 * n_head)
    assert torch.equal(sel["per_class"](loss, labels, 0.0), loss[per].mean())


def test_estimate_and_elr_targets_survive_the_checkpoint():
    p = NoiseTeacherParams(method="small_loss")
    a, b = noise_recipe(p, _index()), noise_recipe(p, _index())
    assert a.state is a.objective  # the engine checkpoints the objective itself
    b.state.load_state_dict(a.state.state_dict())
    assert b.objective.noise_rate_estimate is None  # none yet: none after loading
    a.objective.set_estimate(0.3125)
    state = a.state.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # loadable with weights_only=True
    b.state.load_state_dict(state)
    assert b.objective.noise_rate_estimate == 0.3125
    assert b.objective.noise_rate_estimate_per_class == (0.3125,) * 4
    a.objective.set_estimate(NoiseRateEstimate(0.25, (0.125, 0.5, 0.0, 0.375)))
    b.state.load_state_dict(a.state.state_dict())
    assert b.objective.noise_rate_estimate == 0.25
    assert b.objective.noise_rate_estimate_per_class == (0.125, 0.5, 0.0, 0.375)
    z, y, rows = _batch()
    assert torch.equal(a.objective(z, y, rows, 20.0), b.objective(z, y, rows, 20.0))
    # a checkpoint from before the per-class rates: every class gets the overall one
    b.state.load_state_dict({"noise_rate_estimate": torch.tensor(0.2, dtype=torch.float64)})
    assert b.objective.noise_rate_estimate_per_class == (0.2,) * 4

    e1, e2 = (
        noise_recipe(NoiseTeacherParams(method="elr"), _index()),
        noise_recipe(NoiseTeacherParams(method="elr"), _index()),
    )
    z, y, rows = _batch()
    e1.objective(z, y, rows, 0.0)  # fills ELR's running targets
    e2.state.load_state_dict(e1.state.state_dict())
    assert torch.equal(e2.objective.elr.target, e1.objective.elr.target)
    e2.state.load_state_dict({"target": torch.zeros_like(e1.objective.elr.target)})  # an older checkpoint
    assert e2.objective.noise_rate_estimate is None and not e2.objective.elr.target.any()


# ---------------------------------------------------------------------------------------- stage level


def _load_stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _setup(d: Path, write_params, **extra) -> Path:
    overrides = {
        "data.dataset": "synthetic",
        "data.root": str(d / "raw"),
        "data.imbalance.ratio": 4,
        "data.noise.rate": 0.3,
        "data.synthetic.num_classes": 3,
        "data.synthetic.image_size": 8,
        "data.synthetic.train_per_class": 60,
        "data.synthetic.test_per_class": 10,
        "data.validation.per_class": 5,
        "teachers.noise.method": "small_loss",
        "teachers.noise.forget_rate": None,
        "teachers.noise.estimate_epochs": 1,
        "teachers.noise.ramp_epochs": 2,
        "teachers.noise.epochs": 4,
        "teachers.noise.batch_size": 16,
        "teachers.noise.track_every": 0,
        "teachers.noise.folds": 1,  # one model: these tests count its estimates (folds: test_cross_fit)
    }
    overrides.update(extra)
    write_params(d, overrides)
    cwd = os.getcwd()
    os.chdir(d)
    try:
        _load_stage("corrupt").cli([])
    finally:
        os.chdir(cwd)
    return d


class _Crash(Exception):
    pass


def _fit(d: Path, monkeypatch, crash_at: int | None = None, before_estimate: bool = True) -> list[int]:
    """fit_teacher in ``d``; ``crash_at``: raise at the start of that epoch (after the estimate hook when
    ``before_estimate`` is false). Returns the epochs at which the noise rate was computed."""
    computed: list[int] = []
    real_hook, real_of_model = fitting.estimate_hook, tt.noise_rate_of_model

    def counting_of_model(*args, **kwargs):
        computed.append(len(computed))
        return real_of_model(*args, **kwargs)

    def hook(objective, corpus, tp, rt, rows=None, offset=None):
        inner = real_hook(objective, corpus, tp, rt, rows, offset)

        def on_epoch_start(model, epoch):
            if epoch == crash_at and before_estimate:
                raise _Crash
            inner(model, epoch)
            if epoch == crash_at:
                raise _Crash

        return on_epoch_start

    monkeypatch.setattr(fitting, "estimate_hook", hook)
    monkeypatch.setattr(tt, "noise_rate_of_model", counting_of_model)
    monkeypatch.setattr(selection, "noise_rate_of_model", counting_of_model)
    monkeypatch.chdir(d)
    params = load_params("params.yaml")
    try:
        tt.fit_teacher(
            params,
            "noise",
            "data/corrupted/train.parquet",
            "data/teachers/noise/model.pt",
            "dvclive/teacher_noise",
            "data/teachers/noise/estimate.json",
        )
    except _Crash:
        pass
    monkeypatch.undo()
    return computed


def _outputs(d: Path) -> tuple[bytes, dict, str]:
    return (
        (d / "data/teachers/noise/model.pt").read_bytes(),
        json.loads((d / "data/teachers/noise/estimate.json").read_text()),
        (d / "dvclive/teacher_noise/plots/metrics/noise_rate_estimate.tsv").read_text(),
    )


@pytest.mark.parametrize(
    ("crash_at", "before_estimate", "recomputed"),
    [(1, True, 1), (2, True, 0), (1, False, 1)],
    ids=["killed-before-the-estimate", "killed-after-the-estimate", "killed-right-after-estimating"],
)
def test_a_resumed_run_keeps_or_recomputes_the_same_estimate(
    crash_at, before_estimate, recomputed, tmp_path, monkeypatch, write_params
):
    ref = _setup(tmp_path / "ref", write_params)
    assert _fit(ref, monkeypatch) == [0]  # estimated once, before epoch 2 (after 1 warm-up epoch)
    reference = _outputs(ref)
    assert reference[1]["noise_rate_estimate"] == reference[1]["forget_rate"] > 0
    assert len(reference[2].split()) == 2 + 2 * 3  # header, then epochs 2, 3 and 4 carry the estimate

    d = _setup(tmp_path / "crashed", write_params)
    _fit(d, monkeypatch, crash_at, before_estimate)
    assert not (d / "data/teachers/noise/model.pt").exists()
    assert list((d / ".dsink/checkpoints").rglob("last.pt"))
    # resumed: from the checkpoint when it holds the estimate, recomputed from the same model otherwise
    assert len(_fit(d, monkeypatch)) == recomputed
    assert _outputs(d) == reference


def test_a_set_forget_rate_records_no_estimate_and_dump_adds_none(tmp_path, monkeypatch, write_params):
    d = _setup(tmp_path, write_params, **{"teachers.noise.forget_rate": 0.25, "teachers.noise.epochs": 2})
    assert _fit(d, monkeypatch) == []
    est = json.loads((d / "data/teachers/noise/estimate.json").read_text())
    assert est == {
        "role": "noise",
        "noise_rate_estimate": None,
        "noise_rate_estimate_per_class": None,
        "forget_rate": 0.25,
    }
    monkeypatch.chdir(d)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    _load_stage("dump_logits").cli(["--role", "noise"])
    meta = read_logits("data/logits/noise.parquet", read_corrupted("data/corrupted/train.parquet")).meta
    assert "noise_rate_estimate" not in meta


def test_training_shorter_than_the_warm_up_records_the_estimate(tmp_path, monkeypatch, write_params):
    d = _setup(tmp_path, write_params, **{"teachers.noise.epochs": 1, "teachers.noise.estimate_epochs": 3})
    assert _fit(d, monkeypatch) == [0]  # after the only epoch, for the record (all of it was plain CE)
    est = json.loads((d / "data/teachers/noise/estimate.json").read_text())
    assert 0 <= est["noise_rate_estimate"] <= 1


@pytest.mark.parametrize(
    ("content", "must"),
    [
        ("[1, 2]", "expected a JSON object"),
        ('{"noise_rate_estimate": 1.5}', "expected a share"),
        ("{", "JSON"),
    ],
)
def test_dump_refuses_a_bad_estimate_file(content, must, tmp_path, monkeypatch, write_params, capsys):
    from dsink.checkpoints import save_state_dict
    from dsink.models import build_model

    d = _setup(tmp_path, write_params)
    monkeypatch.chdir(d)
    save_state_dict(build_model("small_cnn", 3, 1), "data/teachers/noise/model.pt")
    Path("data/teachers/noise/estimate.json").write_text(content)
    with pytest.raises(SystemExit) as exc:
        _load_stage("dump_logits").cli(["--role", "noise"])
    err = capsys.readouterr().err
    assert (
        exc.value.code == 2 and must in err and "estimate.json" in err and len(err.strip().splitlines()) == 1
    )
    assert not Path("data/logits/noise.parquet").exists()


DDP_SCRIPT = """
import sys, torch, torch.distributed as dist
from dsink.models import build_model
from dsink.params import load_params
from dsink.runs import open_corpus
from dsink.runtime import setup_runtime, teardown_runtime
from dsink.selection import noise_rate_of_model

rt = setup_runtime()
params = load_params("params.yaml")
corpus = open_corpus(params, "data/corrupted/train.parquet")
torch.manual_seed(rt.rank)  # every rank holds other weights: only rank 0's may decide
model = build_model("small_cnn", corpus.index.num_classes, corpus.source.channels)
est = noise_rate_of_model(model, corpus, "per_class", rt)
value = torch.tensor([est.overall, *est.per_class], dtype=torch.float64)  # overall, then per class
per_rank = [torch.empty_like(value) for _ in range(rt.world_size)]
if rt.distributed:
    dist.all_gather(per_rank, value)
else:
    per_rank = [value]
if rt.is_main:
    torch.save(torch.stack(per_rank), sys.argv[1])
teardown_runtime(rt)
"""


@pytest.mark.timeout(300)
def test_every_rank_gets_the_estimate_of_rank_0(tmp_path, write_params):
    """Under torchrun (2 CPU processes, gloo) every rank uses the values (overall and per class) one process
    computes from rank 0's model, even when the ranks' weights differ."""
    d = _setup(tmp_path, write_params)
    script = d / "ddp_estimate.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    subprocess.run(
        [*run, "--nproc_per_node=2", str(script), "ddp.pt"], check=True, env=env, cwd=d, timeout=240
    )
    subprocess.run([sys.executable, str(script), "one.pt"], check=True, env=env, cwd=d, timeout=240)
    ddp, one = torch.load(d / "ddp.pt"), torch.load(d / "one.pt")
    assert ddp.shape == (2, 1 + 3) and torch.equal(ddp[0], ddp[1]) and torch.equal(ddp[0], one[0])
