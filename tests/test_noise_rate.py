"""The noise-rate estimate (dsink.noise_rate): known mixtures, planted noise, and its pieces."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dsink.noise_rate import (
    MIN_GROUP,
    class_noise_rates,
    estimate_noise_rate,
    estimate_noise_rates,
    high_component_share,
    log_losses,
)

ROOT = Path(__file__).resolve().parents[1]


def logits_with_log_losses(log_loss: np.ndarray, labels: np.ndarray, C: int) -> np.ndarray:
    """Logits whose CE loss on ``labels`` is ``exp(log_loss)``: zeros, and the label's logit set so that
    ``softplus(log(C - 1) - z_y) = exp(log_loss)``."""
    t = np.log(np.expm1(np.exp(log_loss)))
    z = np.zeros((labels.size, C))
    z[np.arange(labels.size), labels] = np.log(C - 1) - t
    return z


def test_log_losses_are_the_log_of_cross_entropy_and_finite_when_it_underflows():
    g = np.random.default_rng(0)
    z = g.normal(size=(50, 5)) * 3
    y = g.integers(0, 5, 50)
    ce = F.cross_entropy(torch.from_numpy(z), torch.from_numpy(y), reduction="none").numpy()
    assert np.allclose(log_losses(z, y), np.log(ce), atol=1e-10)
    # a confident row: CE = log(1 + 4 e^-60) rounds to 0 in float64, its log is -60 + log 4
    confident = np.array([[60.0, 0.0, 0.0, 0.0, 0.0]])
    assert log_losses(confident, np.array([0]))[0] == pytest.approx(-60 + np.log(4), abs=1e-9)
    # the helper that builds logits for a target log-loss agrees
    target = np.array([-9.0, -1.0, 0.0, 2.0])
    y0 = np.zeros(4, int)
    assert np.allclose(log_losses(logits_with_log_losses(target, y0, 3), y0), target)


@pytest.mark.parametrize("share", [0.1, 0.3, 0.45])
def test_two_separated_gaussians_give_their_proportion(share):
    g = np.random.default_rng(1)
    n = 4000
    k = int(share * n)
    x = np.concatenate([g.normal(-2.0, 0.5, n - k), g.normal(2.0, 0.7, k)])
    assert high_component_share(x) == pytest.approx(share, abs=0.01)
    assert high_component_share(g.permutation(x)) == pytest.approx(share, abs=0.01)


def test_degenerate_inputs_are_one_component():
    assert high_component_share(np.array([1.0, 2.0, 3.0])) == 0.0  # too few to fit two components
    assert high_component_share(np.full(100, 0.7)) == 0.0
    assert high_component_share(np.r_[np.zeros(95), np.ones(5)]) == 0.0  # 10th and 90th percentiles equal


def test_per_class_mixture_recovers_planted_noise_where_classes_differ_in_difficulty():
    """An easy class (clean log-loss -9, its noisy samples -1) and a hard one (clean 0, noisy 3).

    One mixture over everything splits the easy class from the rest instead of clean from noisy; one
    mixture per class finds each class's own split.
    """
    g = np.random.default_rng(2)
    sizes, shares, clean_mu, noisy_mu = (3000, 1000), (0.1, 0.5), (-9.0, 0.0), (-1.0, 3.0)
    xs, ys = [], []
    for c in range(2):
        k = int(shares[c] * sizes[c])
        xs.append(np.r_[g.normal(clean_mu[c], 0.5, sizes[c] - k), g.normal(noisy_mu[c], 0.5, k)])
        ys.append(np.full(sizes[c], c))
    x, y = np.concatenate(xs), np.concatenate(ys)
    z = logits_with_log_losses(x, y, 3)
    truth = (0.1 * 3000 + 0.5 * 1000) / 4000
    assert estimate_noise_rate(z, y, "per_class") == pytest.approx(truth, abs=0.01)
    assert estimate_noise_rate(z, y, "global") > truth + 0.1  # the failure mode per_class avoids
    assert estimate_noise_rate(z, y) == estimate_noise_rate(z, y, "per_class")  # the default


def test_small_classes_are_fitted_together():
    """Classes below MIN_GROUP samples are pooled into one mixture instead of each fitting its own."""
    g = np.random.default_rng(3)
    per = MIN_GROUP // 2
    x, y = [], []
    for c in range(7):  # 7 tiny classes with 3 noisy samples of 10
        x.append(np.r_[g.normal(-3.0, 0.3, per - 3), g.normal(1.0, 0.3, 3)])
        y.append(np.full(per, c))
    # an all-clean tiny class in two tight clusters inside the clean bump: alone it splits in half
    x.append(np.r_[np.full(per // 2, -3.5), np.full(per - per // 2, -2.5)])
    y.append(np.full(per, 7))
    x, y = np.concatenate(x), np.concatenate(y)
    z = logits_with_log_losses(x, y, 8)
    assert estimate_noise_rate(z, y, "per_class") == pytest.approx(21 / 80, abs=1e-12)
    assert estimate_noise_rate(z, y, "per_class", min_group=1) == pytest.approx(26 / 80, abs=1e-12)


def test_per_class_rates_are_each_class_s_own_mixture():
    """Per-class rates against direct fits: a big class's rate is the mixture fitted on its samples
    alone, the small classes share the pooled fit, an absent class is 0; the overall estimate is their
    count-weighted mean. ``global``: the one mixture's share for every class present."""
    g = np.random.default_rng(4)
    C = 6
    sizes = {0: 400, 1: 150, 2: 60, 3: MIN_GROUP - 1, 4: 5}  # class 5: no sample
    shares = {0: 0.1, 1: 0.3, 2: 0.5, 3: 0.4, 4: 0.4}
    xs, ys = [], []
    for c, n in sizes.items():
        k = int(shares[c] * n)
        xs.append(np.r_[g.normal(-4.0 + c, 0.6, n - k), g.normal(1.0 + c, 0.6, k)])
        ys.append(np.full(n, c))
    perm = g.permutation(sum(sizes.values()))
    x, y = np.concatenate(xs)[perm], np.concatenate(ys)[perm]
    z = logits_with_log_losses(x, y, C)
    lx = log_losses(z, y)

    rates = class_noise_rates(z, y, "per_class")
    assert rates.shape == (C,) and rates.dtype == np.float64
    for c in (0, 1, 2):
        assert rates[c] == high_component_share(lx[y == c])
        assert rates[c] == pytest.approx(shares[c], abs=0.05)
    pooled = high_component_share(lx[(y == 3) | (y == 4)])
    assert rates[3] == rates[4] == pooled and rates[5] == 0.0
    counts = np.bincount(y, minlength=C)
    est = estimate_noise_rates(z, y, "per_class")
    assert est.per_class == tuple(rates) and float(est) == est.overall
    assert est.overall == estimate_noise_rate(z, y, "per_class")
    assert est.overall == pytest.approx(float(counts @ rates) / y.size, abs=1e-12)

    glob = class_noise_rates(z, y, "global")
    assert glob.tolist() == [high_component_share(lx)] * 5 + [0.0]
    assert estimate_noise_rate(z, y, "global") == high_component_share(lx)
    # min_group=1: every class present is fitted alone
    alone = class_noise_rates(z, y, "per_class", min_group=1)
    assert alone[3] == high_component_share(lx[y == 3]) and alone[4] == high_component_share(lx[y == 4])


def test_bad_input_is_refused():
    z, y = np.zeros((4, 3)), np.zeros(4, int)
    with pytest.raises(ValueError, match="mixture"):
        estimate_noise_rate(z, y, "median")
    with pytest.raises(ValueError, match="labels outside"):
        estimate_noise_rate(z, np.full(4, 3), "global")
    with pytest.raises(ValueError, match="non-finite"):
        estimate_noise_rate(np.full((4, 3), np.nan), y, "global")
    with pytest.raises(ValueError, match="labels shape"):
        estimate_noise_rate(z, np.zeros(3, int), "global")


def _load_stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(("rate", "ratio"), [(0.3, 1), (0.3, 4)])
def test_planted_noise_on_the_synthetic_set(rate, ratio, tmp_path, monkeypatch, write_params):
    """The noise teacher's own estimate (two warm-up epochs) lands near the planted rate.

    (After one epoch this toy set can still have a class the model does not predict yet: with ratio 4
    and seed 0, class 1's clean samples then split like noise and the estimate is 0.42 for 0.31.)
    """
    write_params(
        tmp_path,
        {
            "data.dataset": "synthetic",
            "data.root": str(tmp_path / "raw"),
            "data.imbalance.ratio": ratio,
            "data.noise.rate": rate,
            "data.synthetic.num_classes": 4,
            "data.synthetic.image_size": 8,
            "data.synthetic.train_per_class": 200,
            "data.synthetic.test_per_class": 10,
            "data.validation.per_class": 5,
            "teachers.noise.method": "small_loss",
            "teachers.noise.forget_rate": None,
            "teachers.noise.estimate_epochs": 2,
            "teachers.noise.epochs": 3,
            "teachers.noise.batch_size": 16,
            "teachers.noise.track_every": 0,
        },
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    _load_stage("corrupt").cli([])
    _load_stage("train_teacher").cli(["--role", "noise"])
    est = json.loads(Path("data/teachers/noise/estimate.json").read_text())
    truth = json.loads(Path("metrics/corrupt.json").read_text())["noise_rate"]
    assert est["role"] == "noise" and est["forget_rate"] == est["noise_rate_estimate"]
    assert est["noise_rate_estimate"] == pytest.approx(truth, abs=0.02)
    # logged to dvclive with the epochs after the estimate
    metrics = json.loads(Path("dvclive/teacher_noise/metrics.json").read_text())
    assert metrics["noise_rate_estimate"] == est["noise_rate_estimate"]
    tsv = Path("dvclive/teacher_noise/plots/metrics/noise_rate_estimate.tsv").read_text().split()
    assert tsv[0] == "step" and len(tsv) == 4 and float(tsv[3]) == est["noise_rate_estimate"]


@pytest.mark.parametrize("mixture", ["per_class", "global"])
def test_above_chance_counts_only_labels_given_less_than_chance_probability(mixture):
    """Oracle by construction (C = 4, chance loss log 4, log log 4 = 0.33): class 0 has no wrong label,
    its losses in two bumps both below chance (log loss -4 and -1); class 1 has 30 % wrong labels far above
    chance (log loss 1.5). The plain mixture calls class 0's hard bump wrong; above chance it is clean,
    and class 1 keeps its planted share. ``global`` splits the pooled losses the same way."""
    g = np.random.default_rng(11)
    x0 = np.r_[g.normal(-4.0, 0.2, 280), g.normal(-1.0, 0.2, 120)]  # 30 % hard but plausible
    x1 = np.r_[g.normal(-4.0, 0.2, 280), g.normal(1.5, 0.2, 120)]  # 30 % unfitted, wrong
    assert np.log(np.log(4)) == pytest.approx(0.3266, abs=1e-4)
    x = np.r_[x0, x1]
    y = np.repeat([0, 1], 400)
    z = logits_with_log_losses(x, y, 4)
    plain = estimate_noise_rates(z, y, mixture)
    gated = estimate_noise_rates(z, y, mixture, above_chance=True)
    if mixture == "per_class":
        assert plain.per_class[:2] == pytest.approx((0.3, 0.3), abs=1e-12)
        assert gated.per_class[:2] == pytest.approx((0.0, 0.3), abs=1e-12)
        assert gated.overall == pytest.approx(0.15, abs=1e-12)
    else:  # one mixture over both: the bump at -4 against the rest (-1 and 1.5)
        assert plain.overall == pytest.approx(0.3, abs=1e-12)
        assert gated.overall == pytest.approx(0.15, abs=1e-12)
        assert gated.per_class[:2] == pytest.approx((0.15, 0.15), abs=1e-12)
    assert gated.per_class[2:] == (0.0, 0.0)  # classes with no sample
    # the gate never adds a sample: it only drops those at or below chance
    assert all(a <= b for a, b in zip(gated.per_class, plain.per_class, strict=True))
