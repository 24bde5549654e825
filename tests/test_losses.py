"""Losses against their closed-form gradients (autograd in float64 as the oracle), their limits,
small-loss selection, ELR's buffer, and argument validation."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from dsink import losses

torch.set_num_threads(1)

N, C = 6, 4
_g = torch.Generator().manual_seed(0)
Z = 2.0 * torch.randn(N, C, generator=_g, dtype=torch.float64)
Y = torch.tensor([0, 1, 2, 3, 0, 2])
ONEHOT = F.one_hot(Y, C).double()
PRIOR = torch.tensor([0.55, 0.25, 0.15, 0.05], dtype=torch.float64)
LOG_PRIOR = PRIOR.log()
P = torch.softmax(Z, 1)
PY = P[torch.arange(N), Y]


def grad_of(fn, z: torch.Tensor = Z) -> torch.Tensor:
    z = z.clone().requires_grad_(True)
    fn(z).backward()
    return z.grad


# ------------------------------------------------------------------------------------ gradients


def test_cross_entropy_value_and_gradient():
    assert torch.allclose(losses.cross_entropy(Z, Y, reduction="none"), -PY.log())
    assert torch.allclose(losses.cross_entropy(Z, Y), -PY.log().mean())
    assert torch.allclose(grad_of(lambda z: losses.cross_entropy(z, Y)), (P - ONEHOT) / N)


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 2.0])
def test_logit_adjusted_gradient(tau):
    g = grad_of(lambda z: losses.logit_adjusted_ce(z, Y, LOG_PRIOR, tau))
    assert torch.allclose(g, (torch.softmax(Z + tau * LOG_PRIOR, 1) - ONEHOT) / N)


@pytest.mark.parametrize("q", [0.05, 0.3, 0.7, 1.0])
def test_gce_value_and_gradient(q):
    assert torch.allclose(losses.gce(Z, Y, q, reduction="none"), (1 - PY**q) / q)
    # d/dz (1 - p_y^q)/q = -p_y^(q-1) * dp_y/dz = -p_y^(q-1) * p_y (onehot - p) = -p_y^q (onehot - p)
    expected = -(PY**q).unsqueeze(1) * (ONEHOT - P) / N
    assert torch.allclose(grad_of(lambda z: losses.gce(z, Y, q)), expected)


def test_soft_cross_entropy_value_and_gradient():
    q = torch.softmax(torch.randn(N, C, generator=_g, dtype=torch.float64), 1)
    assert torch.allclose(losses.soft_cross_entropy(Z, q, reduction="none"), -(q * P.log()).sum(1))
    assert torch.allclose(grad_of(lambda z: losses.soft_cross_entropy(z, q)), (P - q) / N)
    # one-hot targets are plain CE
    assert torch.allclose(losses.soft_cross_entropy(Z, ONEHOT), losses.cross_entropy(Z, Y))


@pytest.mark.parametrize(
    "fn",
    [
        lambda z, r: losses.cross_entropy(z, Y, reduction=r),
        lambda z, r: losses.logit_adjusted_ce(z, Y, LOG_PRIOR, 0.7, reduction=r),
        lambda z, r: losses.balanced_softmax_ce(z, Y, LOG_PRIOR, reduction=r),
        lambda z, r: losses.gce(z, Y, 0.5, reduction=r),
        lambda z, r: losses.soft_cross_entropy(z, P, reduction=r),
    ],
)
def test_reductions(fn):
    per = fn(Z, "none")
    assert per.shape == (N,)
    assert torch.allclose(fn(Z, "mean"), per.mean())


# ------------------------------------------------------------------------------------- limits


def test_logit_adjusted_limits():
    assert torch.equal(losses.logit_adjusted_ce(Z, Y, LOG_PRIOR, 0.0), losses.cross_entropy(Z, Y))
    assert torch.equal(
        losses.logit_adjusted_ce(Z, Y, LOG_PRIOR, 0.0, "none"), losses.cross_entropy(Z, Y, "none")
    )
    assert torch.equal(
        losses.balanced_softmax_ce(Z, Y, LOG_PRIOR, "none"),
        losses.logit_adjusted_ce(Z, Y, LOG_PRIOR, 1.0, "none"),
    )


def test_logit_adjusted_minimiser_is_the_balanced_posterior():
    # For one input whose labels follow the training posterior p_train(y|x), the expected LA (tau=1) loss
    # is stationary where softmax(raw) = p_train / prior (normalised): the balanced posterior.
    p_train = torch.tensor([0.6, 0.25, 0.1, 0.05], dtype=torch.float64)
    balanced = p_train / PRIOR / (p_train / PRIOR).sum()
    z = balanced.log().unsqueeze(0).expand(C, C).clone().requires_grad_(True)
    per = losses.logit_adjusted_ce(z, torch.arange(C), LOG_PRIOR, 1.0, reduction="none")
    (per * p_train).sum().backward()
    assert z.grad.sum(0).abs().max() < 1e-12
    # plain CE is stationary at the training posterior instead
    z = p_train.log().unsqueeze(0).expand(C, C).clone().requires_grad_(True)
    (losses.cross_entropy(z, torch.arange(C), reduction="none") * p_train).sum().backward()
    assert z.grad.sum(0).abs().max() < 1e-12


def test_gce_limits():
    ce = losses.cross_entropy(Z, Y).item()
    assert math.isclose(losses.gce(Z, Y, 1e-4).item(), ce, rel_tol=1e-3)
    assert math.isclose(losses.gce(Z, Y, 1e-9).item(), ce, rel_tol=1e-6)  # expm1: no cancellation
    assert torch.allclose(losses.gce(Z, Y, 1.0, "none"), 1 - PY)


def test_losses_are_stable_for_extreme_logits():
    z = torch.tensor([[400.0, -400.0, 0.0, 0.0], [-1e4, 1e4, 0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([1, 0])  # p_y underflows to 0
    for fn in (
        lambda t: losses.cross_entropy(t, y),
        lambda t: losses.gce(t, y, 0.7),
        lambda t: losses.gce(t, y, 1e-6),
        lambda t: losses.logit_adjusted_ce(t, y, LOG_PRIOR),
    ):
        g = grad_of(fn, z)
        assert torch.isfinite(fn(z)) and torch.isfinite(g).all()
    assert losses.gce(z, y, 0.7).item() == pytest.approx(1 / 0.7)


def test_low_precision_logits_are_upcast():
    zb = Z.to(torch.bfloat16)
    for value in (
        losses.cross_entropy(zb, Y),
        losses.gce(zb, Y),
        losses.logit_adjusted_ce(zb, Y, LOG_PRIOR.float()),
        losses.soft_cross_entropy(zb, P.float()),
    ):
        assert value.dtype == torch.float32 and torch.isfinite(value)
    assert losses.cross_entropy(zb, Y).item() == pytest.approx(
        losses.cross_entropy(zb.double(), Y).item(), rel=1e-5
    )


# -------------------------------------------------------------------------- small-loss selection


def test_small_loss_keep_mask_with_ties():
    loss = torch.tensor([0.5, 0.1, 0.9, 0.1, 0.3, 0.1])
    keep = losses.small_loss_keep_mask
    assert torch.nonzero(keep(loss, 1 / 3)).flatten().tolist() == [1, 3]  # 3 tied at 0.1: lowest indices
    assert torch.nonzero(keep(loss, 0.5)).flatten().tolist() == [1, 3, 5]
    assert torch.nonzero(keep(loss, 0.51)).flatten().tolist() == [1, 3, 4, 5]  # ceil(3.06) = 4
    assert torch.nonzero(keep(loss, 0.01)).flatten().tolist() == [1]  # at least one
    assert keep(loss, 1.0).all()
    assert keep(torch.tensor([0.2, 0.4, 0.3, 0.1, 0.5]), 0.6).tolist() == [True, False, True, True, False]
    nan = torch.tensor([float("nan"), 0.2, 0.1])
    assert keep(nan, 2 / 3).tolist() == [False, True, True]
    assert keep(loss, 0.5).dtype == torch.bool


def test_small_loss_keep_mask_ignores_autograd():
    loss = torch.tensor([0.3, 0.1, 0.2], requires_grad=True)
    assert losses.small_loss_keep_mask(loss, 0.5).tolist() == [False, True, True]


def test_small_loss_schedule():
    f = losses.small_loss_keep_fraction
    assert f(0, 0.4, 10) == 1.0
    assert f(5, 0.4, 10) == pytest.approx(0.8)
    assert f(10, 0.4, 10) == pytest.approx(0.6)
    assert f(50, 0.4, 10) == pytest.approx(0.6)
    assert f(0, 0.4, 0) == pytest.approx(0.6)
    assert f(2.5, 0.2, 5) == pytest.approx(0.9)
    assert f(3, 0.0, 5) == 1.0


# ------------------------------------------------------------------------------------------- ELR


def test_elr_buffer_update_and_value_by_hand():
    elr = losses.ELRLoss(num_samples=4, num_classes=3, beta=0.7, lam=3.0)
    z = torch.tensor([[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 1])
    idx = torch.tensor([2, 0])
    loss = elr(z, y, idx)
    p0, p1 = torch.full((3,), 1 / 3), torch.tensor([0.5, 0.25, 0.25])
    assert torch.allclose(elr.target[2], 0.3 * p0)
    assert torch.allclose(elr.target[0], 0.3 * p1)
    assert elr.target[1].abs().sum() == 0 and elr.target[3].abs().sum() == 0
    # CE = mean(log 3, -log 0.25); <t, p> = 0.1 and 0.3 * 0.375 = 0.1125
    expected = (math.log(3) - math.log(0.25)) / 2 + 3.0 * (math.log(0.9) + math.log(1 - 0.1125)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.isfinite(z.grad).all()
    # second visit: t <- 0.7 t + 0.3 p = 0.51 p
    elr(z.detach(), y, idx)
    assert torch.allclose(elr.target[0], 0.51 * p1)


def test_elr_clamps_and_renormalises():
    elr = losses.ELRLoss(2, 3)
    z = torch.tensor([[100.0, 0.0, 0.0]], requires_grad=True)
    loss = elr(z, torch.tensor([1]), torch.tensor([1]))
    p = torch.tensor([1 - 1e-4, 1e-4, 1e-4])
    assert torch.allclose(elr.target[1], 0.3 * p / p.sum(), atol=1e-7)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_elr_regulariser_pulls_towards_the_early_target():
    # lam only matters through the regulariser; its gradient raises the logit the buffer favours
    elr0, elr3 = losses.ELRLoss(1, 3, lam=0.0), losses.ELRLoss(1, 3, lam=3.0)
    for elr in (elr0, elr3):
        elr.load_state_dict({"target": torch.tensor([[0.0, 0.9, 0.1]])})
    y, idx = torch.tensor([0]), torch.tensor([0])
    g0, g3 = (grad_of(lambda t, e=e: e(t, y, idx), torch.zeros(1, 3)) for e in (elr0, elr3))
    assert (g3 - g0)[0, 1] < 0  # descending the regulariser increases logit 1


def test_elr_state_round_trip():
    elr = losses.ELRLoss(10, C)
    idx = torch.tensor([1, 4, 5, 6, 7, 9])
    elr(Z.float(), Y, idx)
    buf = io.BytesIO()
    torch.save(elr.state_dict(), buf)
    buf.seek(0)
    other = losses.ELRLoss(10, C)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(other.target, elr.target)
    # the state is a copy, and both continue identically
    elr.state_dict()["target"].fill_(7.0)
    assert torch.equal(other.target, elr.target)
    assert torch.equal(elr(Z.float(), Y, idx), other(Z.float(), Y, idx))
    with pytest.raises(ValueError, match="shape"):
        losses.ELRLoss(11, C).load_state_dict(elr.state_dict())


# ------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: losses.gce(Z, Y, q=0.0), "q = 0"),
        (lambda: losses.gce(Z, Y, q=1.5), "q = 1.5"),
        (lambda: losses.gce(Z, Y, q=float("nan")), "q = nan"),
        (lambda: losses.logit_adjusted_ce(Z, Y, LOG_PRIOR, tau=-1.0), "tau = -1"),
        (lambda: losses.logit_adjusted_ce(Z, Y, LOG_PRIOR[:3]), "log_prior shape"),
        (lambda: losses.logit_adjusted_ce(Z, Y, torch.tensor([0.0, -math.inf, 0, 0])), "log_prior"),
        (lambda: losses.small_loss_keep_mask(torch.ones(3), 0.0), "keep_fraction = 0"),
        (lambda: losses.small_loss_keep_mask(torch.ones(3), 1.2), "keep_fraction = 1.2"),
        (lambda: losses.small_loss_keep_mask(torch.ones(3, 1), 0.5), "per_sample_loss shape"),
        (lambda: losses.small_loss_keep_fraction(1, 1.0, 3), "forget_rate = 1"),
        (lambda: losses.small_loss_keep_fraction(-1, 0.2, 3), "epoch = -1"),
        (lambda: losses.small_loss_keep_fraction(1, 0.2, -3), "ramp_epochs = -3"),
        (lambda: losses.cross_entropy(Z, Y[:3]), "target shape"),
        (lambda: losses.cross_entropy(Z[0], Y[:1]), "logits shape"),
        (lambda: losses.cross_entropy(Z, Y.double()), "target dtype"),
        (lambda: losses.soft_cross_entropy(Z, Z[:3]), "soft_targets shape"),
        (lambda: losses.cross_entropy(Z, Y, reduction="sum"), "reduction = 'sum'"),
        (lambda: losses.ELRLoss(4, C, beta=1.0), "beta = 1"),
        (lambda: losses.ELRLoss(4, C, lam=-1.0), "lam = -1"),
        (lambda: losses.ELRLoss(4, C)(Z, Y, torch.arange(N)), "index values"),
        (lambda: losses.ELRLoss(10, C + 1)(Z, Y, torch.arange(N)), "num_classes"),
        (lambda: losses.ELRLoss(10, C)(Z, Y, torch.arange(N - 1)), "index shape"),
    ],
)
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_small_loss_objective_hands_the_estimate_to_its_selection_and_checkpoints_it():
    from dsink.baselines import _LASmallLossObjective
    from dsink.params import LASmallLossBaselineParams, NoiseTeacherParams
    from dsink.teachers import _NoiseObjective

    lp = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    makers = [
        lambda: _NoiseObjective(NoiseTeacherParams(method="small_loss"), num_samples=8, num_classes=3),
        lambda: _LASmallLossObjective(LASmallLossBaselineParams(), lp),
    ]
    for make in makers:
        obj = make()
        assert isinstance(obj, losses.SmallLossObjective)
        assert obj.estimates and obj.noise_rate_estimate is None and obj.epoch_metrics() == {}
        obj.set_estimate(0.25)
        assert obj.small_loss.noise_rate_estimate == 0.25 and obj.forget_rate == 0.25
        assert obj.noise_rate_estimate_per_class == (0.25,) * 3
        assert obj.epoch_metrics() == {"noise_rate_estimate": 0.25}
        fresh = make()
        fresh.load_state_dict(obj.state_dict())
        assert fresh.noise_rate_estimate == 0.25 and fresh.noise_rate_estimate_per_class == (0.25,) * 3
    # only the small-loss method of the noise teacher forgets, so only it estimates
    assert not _NoiseObjective(NoiseTeacherParams(method="gce"), 8, 3).estimates
