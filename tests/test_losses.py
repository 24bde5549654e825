"""Each loss against its closed-form gradient (autograd as the oracle) and its limits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dsink import losses

torch.manual_seed(0)
N, C = 7, 5
Z = torch.randn(N, C, dtype=torch.float64) * 2
Y = torch.tensor([0, 1, 2, 3, 4, 0, 2])
LOG_PRIOR = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64))
ONEHOT = F.one_hot(Y, C).double()


def grad_of(fn) -> torch.Tensor:
    z = Z.clone().requires_grad_(True)
    fn(z).backward()
    return z.grad


def test_cross_entropy_gradient():
    g = grad_of(lambda z: losses.cross_entropy(z, Y))
    assert torch.allclose(g, (torch.softmax(Z, 1) - ONEHOT) / N)


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 2.0])
def test_logit_adjusted_gradient(tau):
    g = grad_of(lambda z: losses.logit_adjusted_ce(z, Y, LOG_PRIOR, tau))
    assert torch.allclose(g, (torch.softmax(Z + tau * LOG_PRIOR, 1) - ONEHOT) / N)


def test_logit_adjusted_limits():
    assert torch.equal(losses.logit_adjusted_ce(Z, Y, LOG_PRIOR, 0.0), losses.cross_entropy(Z, Y))
    assert torch.equal(
        losses.balanced_softmax_ce(Z, Y, LOG_PRIOR), losses.logit_adjusted_ce(Z, Y, LOG_PRIOR, 1.0)
    )
    # raw logits of a balanced model: the adjusted loss favours tail classes' raw logits
    assert losses.logit_adjusted_ce(Z, Y, LOG_PRIOR, 1.0, reduction="none").shape == (N,)


@pytest.mark.parametrize("q", [0.1, 0.7, 1.0])
def test_gce_value_and_gradient(q):
    p = torch.softmax(Z, 1)
    py = p.gather(1, Y.view(-1, 1)).squeeze(1)
    assert torch.allclose(losses.gce(Z, Y, q, reduction="none"), (1 - py**q) / q)
    g = grad_of(lambda z: losses.gce(z, Y, q))
    # d/dz (1 - p_y^q)/q = -p_y^(q-1) dp_y/dz = -p_y^q (onehot - p)
    expected = -(py**q).unsqueeze(1) * (ONEHOT - p) / N
    assert torch.allclose(g, expected)


def test_gce_tends_to_cross_entropy():
    ce = losses.cross_entropy(Z, Y)
    assert math.isclose(losses.gce(Z, Y, 1e-4).item(), ce.item(), rel_tol=1e-3)
    assert losses.gce(Z, Y, 1.0).item() == pytest.approx((1 - torch.softmax(Z, 1)[range(N), Y]).mean().item())


def test_soft_cross_entropy_gradient():
    q = torch.softmax(torch.randn(N, C, dtype=torch.float64), 1)
    g = grad_of(lambda z: losses.soft_cross_entropy(z, q))
    assert torch.allclose(g, (torch.softmax(Z, 1) - q) / N)
    assert torch.allclose(losses.soft_cross_entropy(Z, ONEHOT), losses.cross_entropy(Z, Y))


def test_small_loss_selection():
    loss = torch.tensor([0.5, 0.1, 0.9, 0.1, 0.3])
    assert losses.small_loss_keep_mask(loss, 0.4).tolist() == [False, True, False, True, False]
    # ties broken by index: keep 3 -> 0.1 (1), 0.1 (3), 0.3 (4)
    assert losses.small_loss_keep_mask(loss, 0.6).tolist() == [False, True, False, True, True]
    assert losses.small_loss_keep_mask(loss, 0.01).sum() == 1
    assert losses.small_loss_keep_fraction(0, 0.4, 10) == 1.0
    assert losses.small_loss_keep_fraction(5, 0.4, 10) == pytest.approx(0.8)
    assert losses.small_loss_keep_fraction(50, 0.4, 10) == pytest.approx(0.6)
    assert losses.small_loss_keep_fraction(0, 0.4, 0) == pytest.approx(0.6)


def test_elr_updates_targets_and_round_trips():
    elr = losses.ELRLoss(num_samples=10, num_classes=C, beta=0.7, lam=3.0)
    idx = torch.tensor([1, 4, 5, 6, 7, 8, 9])
    z = Z.float().clone().requires_grad_(True)
    loss = elr(z, Y, idx)
    loss.backward()
    assert torch.isfinite(z.grad).all()
    p = torch.softmax(Z.float(), 1).clamp(1e-4, 1 - 1e-4)
    p = p / p.sum(1, keepdim=True)
    assert torch.allclose(elr.target[idx], 0.3 * p, atol=1e-6)
    assert elr.target[0].abs().sum() == 0
    # value: CE + lam * mean(log(1 - <t, p>))
    t = 0.3 * p
    expected = F.cross_entropy(Z.float(), Y) + 3.0 * torch.log(1 - (t * p).sum(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    other = losses.ELRLoss(10, C)
    other.load_state_dict(elr.state_dict())
    assert torch.equal(other.target, elr.target)


@pytest.mark.parametrize(
    "call",
    [
        lambda: losses.gce(Z, Y, q=0.0),
        lambda: losses.gce(Z, Y, q=1.5),
        lambda: losses.logit_adjusted_ce(Z, Y, LOG_PRIOR, tau=-1.0),
        lambda: losses.small_loss_keep_mask(torch.ones(3), 0.0),
        lambda: losses.small_loss_keep_fraction(1, 1.0, 3),
        lambda: losses.cross_entropy(Z, Y[:3]),
        lambda: losses.soft_cross_entropy(Z, Z[:3]),
        lambda: losses.cross_entropy(Z, Y, reduction="sum"),
    ],
)
def test_bad_arguments_raise(call):
    with pytest.raises(ValueError):
        call()
