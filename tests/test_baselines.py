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
from dsink.params import Params, from_dict

ROOT = Path(__file__).resolve().parents[1]


class _Index:
    num_classes = 3
    noisy_label = np.array([0, 0, 0, 0, 1, 1, 2])


def _params(**la_gce) -> Params:
    return from_dict(Params, {"baselines": {"la_gce": la_gce}})


def test_ce_recipe_is_plain_cross_entropy_in_train_space():
    r = baseline_recipe("ce", _params(), _Index())
    z, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    assert torch.equal(r.objective(z, y, torch.arange(5), 0.0), losses.cross_entropy(z, y))
    assert r.space == "train" and torch.equal(r.train_offset, torch.zeros(3))


@pytest.mark.parametrize("tau,q", [(1.0, 0.7), (0.5, 0.3)])
def test_la_gce_recipe_adjusts_by_the_noisy_label_prior(tau, q):
    r = baseline_recipe("la_gce", _params(tau=tau, q=q), _Index())
    lp = torch.log(torch.tensor([5.0, 3.0, 2.0]) / 10.0)  # add-one smoothed counts 4, 2, 1
    z, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    expected = losses.gce(z + tau * lp, y, q=q)
    assert torch.allclose(r.objective(z, y, torch.arange(5), 0.0), expected)
    assert r.space == "balanced"
    assert torch.allclose(r.train_offset, tau * lp)


def test_la_gce_without_adjustment_is_train_space():
    assert baseline_recipe("la_gce", _params(tau=0.0), _Index()).space == "train"


def test_unknown_baseline_is_refused():
    with pytest.raises(ValueError, match="baseline 'focal'"):
        baseline_recipe("focal", _params(), _Index())


def _load_stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("method", ["ce", "la_gce"])
def test_stage_writes_model_and_contract_logits(method, tmp_path, monkeypatch, write_params):
    C = 3
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
    # rerun: byte-identical logits (DVC's cache holds)
    first = Path(f"data/baselines/{method}/logits.parquet").read_bytes()
    _load_stage("train_baseline").cli(["--method", method])
    assert Path(f"data/baselines/{method}/logits.parquet").read_bytes() == first
    assert yaml.safe_load(Path("params.yaml").read_text())["baselines"][method]["epochs"] == 1
