"""The comparison models of `train_baseline@*`: objectives, logits spaces, and the stage end to end."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dsink import losses
from dsink.artifacts import read_corrupted, read_logits
from dsink.baselines import baseline_recipe
from dsink.losses import MAX_FORGET_RATE
from dsink.noise_rate import NoiseRateEstimate
from dsink.params import Params, from_dict

ROOT = Path(__file__).resolve().parents[1]


class _Index:
    num_classes = 3
    noisy_label = np.array([0, 0, 0, 0, 1, 1, 2])


def _params(**la_small_loss) -> Params:
    return from_dict(Params, {"baselines": {"la_small_loss": la_small_loss}})


LP = torch.log(torch.tensor([5.0, 3.0, 2.0]) / 10.0)  # add-one smoothed counts 4, 2, 1 of _Index


def _la_ce(z: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-sample logit-adjusted CE by hand: ``logsumexp(z + tau log pi) - (z + tau log pi)_y``."""
    a = z.double() + tau * LP.double()
    return torch.logsumexp(a, 1) - a[torch.arange(len(y)), y]


def test_ce_recipe_is_plain_cross_entropy_in_train_space():
    r = baseline_recipe("ce", _params(), _Index())
    z, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    assert torch.equal(r.objective(z, y, torch.arange(5), 0.0), losses.cross_entropy(z, y))
    assert r.space == "train" and torch.equal(r.train_offset, torch.zeros(3))
    assert r.state is None


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_la_small_loss_recipe_adjusts_by_the_noisy_label_prior(tau):
    r = baseline_recipe("la_small_loss", _params(tau=tau), _Index())
    assert r.space == "balanced" and torch.allclose(r.train_offset, tau * LP)
    assert r.state is r.objective and r.objective.estimates  # forget_rate null: estimated
    z, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    # no estimate yet: logit-adjusted CE over every sample, whatever the epoch
    for progress in (0.0, 12.0):
        assert torch.allclose(r.objective(z, y, torch.arange(5), progress), _la_ce(z, y, tau).mean().float())
    assert baseline_recipe("la_small_loss", _params(tau=0.0), _Index()).space == "train"


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Eight samples: class 0's label logit falls with the index (its LA-CE rises), classes 1 and 2 few."""
    y = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])
    z = torch.zeros(8, 3)
    z[torch.arange(8), y] = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0])
    return z, y


def test_la_small_loss_is_la_ce_over_a_hand_computed_kept_set():
    """forget_rate 0.4, no ramp. per_class keeps ceil(0.6 n_c) of each class: class 0 (5) its 3 smallest
    losses (samples 0, 1, 2), class 1 (2) both (ceil 1.2), class 2 (1) its one; global keeps the
    ceil(0.6 * 8) = 5 smallest of the batch: samples 0-4, no tail sample."""
    z, y = _batch()
    rows = torch.arange(8)
    per_class = baseline_recipe("la_small_loss", _params(forget_rate=0.4, ramp_epochs=0), _Index())
    glob = baseline_recipe(
        "la_small_loss", _params(forget_rate=0.4, ramp_epochs=0, selection="global"), _Index()
    )
    la = _la_ce(z, y, 1.0)
    assert la.argsort().tolist()[:5] == [0, 1, 2, 3, 4]  # the batch-wide order the global rule uses
    assert torch.allclose(per_class.objective(z, y, rows, 0.0), la[[0, 1, 2, 5, 6, 7]].mean().float())
    assert torch.allclose(glob.objective(z, y, rows, 0.0), la[[0, 1, 2, 3, 4]].mean().float())


def test_la_small_loss_ranks_by_the_adjusted_loss_and_ramps_to_the_estimate():
    """Two samples with equal plain CE (labels 0 and 2): the logit adjustment makes the tail sample's loss
    the larger, so global selection of one sample keeps the head one, ranked by LA-CE not CE."""
    z = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    y = torch.tensor([0, 2])
    r = baseline_recipe(
        "la_small_loss", _params(forget_rate=0.5, ramp_epochs=0, selection="global"), _Index()
    )
    ce = losses.cross_entropy(z, y, reduction="none")
    la = _la_ce(z, y, 1.0)
    assert torch.allclose(ce[0], ce[1]) and la[0] < la[1]
    assert torch.allclose(r.objective(z, y, torch.arange(2), 0.0), la[0].float())

    # estimated per class: before the estimate everything, then each class ramps to its own rate
    r = baseline_recipe("la_small_loss", _params(ramp_epochs=4), _Index())
    z, y = _batch()
    r.objective.set_estimate(NoiseRateEstimate(0.3, (0.5, 0.0, 0.99)))
    assert r.objective.small_loss.forget_rates == (0.5, 0.0, MAX_FORGET_RATE)
    la = _la_ce(z, y, 1.0)
    # epoch 2 of a 4-epoch ramp: keep shares 0.75, 1, 1 - 0.95/2 -> ceil: 4 of class 0, 2, 1
    assert torch.allclose(r.objective(z, y, torch.arange(8), 2.0), la[[0, 1, 2, 3, 5, 6, 7]].mean().float())
    # the estimate is checkpointed with the objective
    other = baseline_recipe("la_small_loss", _params(ramp_epochs=4), _Index())
    other.state.load_state_dict(r.state.state_dict())
    assert other.objective.noise_rate_estimate == 0.3
    assert other.objective.noise_rate_estimate_per_class == (0.5, 0.0, 0.99)
    assert r.objective.epoch_metrics() == {"noise_rate_estimate": 0.3}


def test_unknown_baseline_is_refused():
    with pytest.raises(ValueError, match="baseline 'focal'"):
        baseline_recipe("focal", _params(), _Index())


def _load_stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("method", ["ce", "la_small_loss"])
def test_stage_writes_model_and_contract_logits(method, tmp_path, monkeypatch, write_params):
    C = 3
    # la_small_loss: estimated after the first of two epochs, then selected by it
    extra = {f"baselines.{method}.estimate_epochs": 1, f"baselines.{method}.epochs": 2}
    write_params(
        tmp_path,
        {
            "data.dataset": "synthetic",
            "data.root": str(tmp_path / "raw"),
            "data.imbalance.ratio": 4,
            "data.synthetic.num_classes": C,
            "data.synthetic.image_size": 8,
            "data.synthetic.train_per_class": 30,
            "data.validation.per_class": 3,
            "data.synthetic.test_per_class": 10,
            f"baselines.{method}.epochs": 1,
            f"baselines.{method}.batch_size": 16,
            f"baselines.{method}.track_every": 1,
            **(extra if method == "la_small_loss" else {}),
        },
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    _load_stage("corrupt").cli([])
    _load_stage("train_baseline").cli(["--method", method])
    idx = read_corrupted("data/corrupted/train.parquet")
    t = read_logits(f"data/baselines/{method}/logits.parquet", idx, 10 * C)
    assert t.train.shape == (idx.sample_id.size, C) and t.test.shape == (10 * C, C)
    assert t.meta["method"] == method and t.meta["space"] in ("train", "balanced")
    assert len(t.meta["train_offset"]) == C
    state = torch.load(f"data/baselines/{method}/model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert (tmp_path / f"dvclive/baseline_{method}/metrics.json").exists()
    if method == "la_small_loss":
        assert t.meta["space"] == "balanced"
        assert 0 <= t.meta["noise_rate_estimate"] <= 1 and len(t.meta["noise_rate_estimate_per_class"]) == C
        assert (tmp_path / "dvclive/baseline_la_small_loss/plots/metrics/noise_rate_estimate.tsv").exists()
    else:
        assert "noise_rate_estimate" not in t.meta
    # rerun: byte-identical logits (DVC's cache holds)
    first = Path(f"data/baselines/{method}/logits.parquet").read_bytes()
    _load_stage("train_baseline").cli(["--method", method])
    assert Path(f"data/baselines/{method}/logits.parquet").read_bytes() == first
    assert yaml.safe_load(Path("params.yaml").read_text())["baselines"][method]["epochs"] in (1, 2)
