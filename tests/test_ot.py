"""Tests for dsink.ot: log-domain Sinkhorn, dataset-scale class scaling and D-SINK surrogate labels.

Oracles: POT's float64 numpy ``ot.bregman.sinkhorn_log`` (converged, or run for exactly k iterations: its
iterate k is ours, it updates columns then rows like :func:`dsink.ot.sinkhorn`), closed forms, brute force,
and marginals measured in float64 from the returned plan.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from dsink.ot import (
    SinkhornConvergenceWarning,
    apply_class_scaling,
    class_scaling,
    default_tol,
    dsink_targets,
    relative_marginal_error,
    sinkhorn,
)

pot = pytest.importorskip("ot")

F64 = torch.float64
F32 = torch.float32
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _simplex(n: int, g: torch.Generator, dtype: torch.dtype = F64) -> torch.Tensor:
    x = torch.rand(n, generator=g, dtype=dtype) + 0.1
    return x / x.sum()


def _problem(n: int, m: int, seed: int, dtype: torch.dtype = F64):
    g = _gen(seed)
    return _simplex(n, g, dtype), _simplex(m, g, dtype), torch.rand(n, m, generator=g, dtype=dtype)


def _teachers(n: int, c: int, seed: int, dtype: torch.dtype = F64):
    """Random log f_N, log f and a long-tailed f_L."""
    g = _gen(seed)
    lpn = torch.log_softmax(3 * torch.randn(n, c, generator=g, dtype=dtype), -1)
    lps = torch.log_softmax(3 * torch.randn(n, c, generator=g, dtype=dtype), -1)
    prior = torch.linspace(0.0, -3.0, c, dtype=dtype)
    pl = torch.softmax(2 * torch.randn(n, c, generator=g, dtype=dtype) + prior, -1)
    return lpn, lps, pl


def _long_tail(n: int, c: int, seed: int, tail: int | None = None, dtype: torch.dtype = F32):
    """Teachers on a long-tailed set with hard class totals (one-hot f_L); ``tail`` samples in the last class,
    which the teachers confuse with class 0."""
    g = _gen(seed)
    prior = torch.linspace(0.0, -4.0, c)
    z = 2 * torch.randn(n, c, generator=g) + prior
    labels = torch.multinomial(torch.softmax(prior, 0), n, replacement=True, generator=g)
    if tail is not None:
        z[:, -1] = z[:, 0] - 3.0 + 0.5 * torch.randn(n, generator=g)
        labels[labels == c - 1] = 0
        labels[:tail] = c - 1
    lpn = torch.log_softmax(z, -1).to(dtype)
    lps = torch.log_softmax(z + torch.randn(n, c, generator=g), -1).to(dtype)
    pl = torch.nn.functional.one_hot(labels, c).to(dtype)
    return lpn, lps, pl


def _rel_err(achieved: torch.Tensor, target: torch.Tensor) -> float:
    """Independent float64 measure of the stopping rule (entries with target 0 must be exactly 0)."""
    achieved, target = achieved.double(), target.double()
    pos = target > 0
    assert (achieved[~pos] == 0).all()
    return ((achieved[pos] - target[pos]).abs() / target[pos]).max().item()


def _pot_log(a, b, M, reg: float, n_iter: int | None = None):
    """POT's float64 numpy ``sinkhorn_log``: converged (``n_iter=None``) or exactly ``n_iter`` iterations.

    Returns ``(plan, log_u, log_v)`` as float64 tensors. Zero marginal entries give ``-inf`` potentials.
    ``b`` is rescaled to ``a``'s mass, as :func:`dsink.ot.sinkhorn` does.
    """
    a, b, M = (np.asarray(x.detach().cpu().double()) for x in (a, b, M))
    b = b * (a.sum() / b.sum())  # float32 marginals cast to float64 differ in mass by ~1e-8
    with np.errstate(divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if n_iter is None:
            plan, info = pot.bregman.sinkhorn_log(a, b, M, reg, numItermax=100_000, stopThr=1e-13, log=True)
            assert info["err"][-1] < 1e-12, "the oracle did not converge"
        else:
            plan, info = pot.bregman.sinkhorn_log(a, b, M, reg, numItermax=n_iter, stopThr=0.0, log=True)
    return tuple(torch.from_numpy(np.asarray(x)) for x in (plan, info["log_u"], info["log_v"]))


def _pot_dsink(lpn: torch.Tensor, lps: torch.Tensor, pl: torch.Tensor, reg: float = 2.0) -> torch.Tensor:
    """D-SINK q from POT: samples x classes, a = 1/n, b = sum_i f_L / n, cost -(log f_N + log f), q = n T."""
    n = lpn.shape[0]
    r = pl.double().sum(0)
    plan, _, _ = _pot_log(
        torch.full((n,), 1.0 / n, dtype=F64), r / r.sum(), -(lpn.double() + lps.double()), reg
    )
    return n * plan


def _marginal_errors(plan: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    return _rel_err(plan.sum(-1), a), _rel_err(plan.sum(-2), b)


# ----------------------------------------------------------------------------------------------------
# the stopping rule
# ----------------------------------------------------------------------------------------------------


def test_relative_marginal_error_is_the_definition() -> None:
    g = _gen(100)
    target = torch.rand(3, 17, generator=g, dtype=F64)
    target[0, 3] = target[2, 0] = 0.0
    achieved = target * (1 + 1e-3 * torch.randn(3, 17, generator=g, dtype=F64))
    brute = max(
        abs(x - t) / t
        for x, t in zip(achieved.flatten().tolist(), target.flatten().tolist(), strict=True)
        if t > 0
    )
    assert relative_marginal_error(achieved, target).item() == pytest.approx(brute, rel=1e-12)
    assert relative_marginal_error(achieved.float(), target.float()).dtype == F64
    # a zero-mass entry that is not exactly zero is an infinite error, not an ignored one
    bad = achieved.clone()
    bad[0, 3] = 1e-30
    assert relative_marginal_error(bad, target).item() == math.inf
    # relative, not absolute: 5 samples off by 1 is 20 %, whatever the other classes hold
    r = torch.tensor([99_995.0, 5.0], dtype=F64)
    assert relative_marginal_error(torch.tensor([99_994.0, 6.0], dtype=F64), r).item() == pytest.approx(0.2)


def test_default_tol_values() -> None:
    assert default_tol(F64) == 1e-9
    assert default_tol(F32) == pytest.approx(100 * 2.0**-23)


@pytest.mark.parametrize("n,c,tail", [(128, 10, None), (2000, 100, None), (100_000, 10, 5)])
def test_default_tol_is_reached_in_float32(n: int, c: int, tail: int | None) -> None:
    """Every entry point meets its default tol on float32 problems (no warning), and the marginal it reports
    is the one measured independently in float64 from the returned plan."""
    lpn, lps, pl = _long_tail(n, c, seed=n + c, tail=tail)
    r = pl.double().sum(0)
    tol = default_tol(F32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SinkhornConvergenceWarning)
        q, info = dsink_targets(lpn, lps, pl, log=True)
        assert _rel_err(q.sum(0), r) <= 1.01 * tol
        assert info["err"] == pytest.approx(_rel_err(q.sum(0), r), rel=0.05, abs=1e-7)

        log_u, info = class_scaling((lpn + lps) / 2, pl.sum(0), log=True)
        assert _rel_err(apply_class_scaling((lpn + lps) / 2, log_u).sum(0), r) <= 1.01 * tol

        a = torch.full((n,), 1.0 / n)
        b = (r / n).float()
        plan, info = sinkhorn(a, b, -(lpn + lps), 2.0, log=True)
        assert _rel_err(plan.sum(0), b) <= 1.01 * tol
        assert _rel_err(plan.sum(1), a) <= 1.01 * tol
    if tail is not None:
        assert r[-1] == tail


def test_class_scaling_tail_of_five_is_met_relatively() -> None:
    """Regression: at dataset scope, a class of 5 samples among 100,000 comes out within tol *relative*.
    The rule it replaces, max_c |s_c - r_c| / N <= tol, lets that class be off by tol * N = 10 samples."""
    n, c, tol = 100_000, 10, 1e-4  # params.yaml's distill.sinkhorn.tol
    lpn, lps, pl = _long_tail(n, c, seed=7, tail=5, dtype=F32)
    log_k, r = (lpn + lps) / 2, pl.sum(0)
    log_u, info = class_scaling(log_k, r, tol=tol, log=True)
    s = apply_class_scaling(log_k, log_u).double().sum(0)
    assert r[-1] == 5
    assert abs(s[-1].item() - 5.0) / 5.0 <= tol
    assert _rel_err(s, r) <= tol
    # the absolute rule stops earlier, with some class (here: which one the measure says) off by more than tol
    stop_old = None
    for k in range(1, info["n_iter"]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SinkhornConvergenceWarning)
            s_k = apply_class_scaling(log_k, class_scaling(log_k, r, max_iter=k, tol=0.0)).double().sum(0)
        if (s_k - r.double()).abs().max().item() / n <= tol:
            stop_old = k
            break
    assert stop_old is not None and _rel_err(s_k, r) > tol


# ----------------------------------------------------------------------------------------------------
# sinkhorn
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,m", [(5, 7), (10, 128), (100, 64)])
@pytest.mark.parametrize("reg", [0.05, 0.5, 2.0])
def test_sinkhorn_matches_pot(n: int, m: int, reg: float) -> None:
    a, b, M = _problem(n, m, seed=n * 1000 + m)
    plan, info = sinkhorn(a, b, M, reg, tol=1e-11, max_iter=5000, log=True)
    ref, _, _ = _pot_log(a, b, M, reg)
    ref2 = torch.as_tensor(pot.sinkhorn(a, b, M, reg, method="sinkhorn_log", stopThr=1e-12, numItermax=20000))
    for r in (ref, ref2):
        diff = (plan - r).abs().max().item()
        assert diff <= 1e-5 * r.max().item()
    err_a, err_b = _marginal_errors(plan, a, b)
    assert err_b <= 1e-11 and err_a <= 1e-13  # columns within tol (relative), rows met by the last half-step
    assert info["err"] == pytest.approx(max(err_a, err_b), rel=1e-3, abs=1e-15)
    assert plan.dtype == F64 and plan.shape == (n, m)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("n,m", [(3, 2000), (2000, 3), (700, 1100)])
def test_sinkhorn_wide_and_tall_match_pot(n: int, m: int, dtype: torch.dtype) -> None:
    """Beyond 512 rows or columns the sums are accumulated over blocks; the plan is still POT's, and a
    well-conditioned problem never leaves the scaling domain."""
    a, b, M = _problem(n, m, seed=n + m)
    plan, info = sinkhorn(a.to(dtype), b.to(dtype), M.to(dtype), 0.5, log=True)
    assert info["n_log_iter"] == 0
    tol = default_tol(dtype)
    err_a, err_b = _marginal_errors(plan, a, b)
    assert err_b <= 1.01 * tol and err_a <= 1.01 * tol
    ref, _, _ = _pot_log(a, b, M, 0.5)
    torch.testing.assert_close(plan.double(), ref, rtol=20 * tol, atol=0)


def test_sinkhorn_scalings_absorbed_when_they_leave_the_range() -> None:
    """Masses spread over 1e-40 .. 1: scalings must be absorbed into the log-plan along the way (the
    scaling domain alone overflows float64's comfortable range), and the result is POT's."""
    g = _gen(90)
    n, m = 30, 8
    a = torch.exp(-torch.linspace(0, 90, n, dtype=F64))
    b = torch.exp(-torch.linspace(0, 60, m, dtype=F64))
    a, b = a / a.sum(), b / b.sum()
    M = torch.rand(n, m, generator=g, dtype=F64) * 20
    plan, info = sinkhorn(a, b, M, 1.0, tol=1e-10, max_iter=5000, log=True)
    assert 0 < info["n_log_iter"] < info["n_iter"]  # log-domain steps first, then scalings again
    assert max(_marginal_errors(plan, a, b)) <= 1e-10
    ref, _, _ = _pot_log(a, b, M, 1.0)
    torch.testing.assert_close(plan, ref, rtol=1e-7, atol=0)


@pytest.mark.parametrize("k", [1, 2, 7, 30])
def test_sinkhorn_iterate_k_is_pots_iterate_k(k: int) -> None:
    """Not converged: after k iterations the plan is POT's sinkhorn_log plan after k iterations."""
    a, b, M = _problem(12, 9, seed=40 + k)
    with pytest.warns(SinkhornConvergenceWarning):
        plan, info = sinkhorn(a, b, M, 0.05, max_iter=k, tol=0.0, log=True)
    ref, log_u, log_v = _pot_log(a, b, M, 0.05, n_iter=k)
    assert info["n_iter"] == k
    torch.testing.assert_close(plan, ref, rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(info["log_v"], log_v, rtol=0, atol=1e-9)
    torch.testing.assert_close(info["log_u"], log_u, rtol=0, atol=1e-9)
    assert info["err"] == pytest.approx(_rel_err(ref.sum(0), b), rel=1e-6)


def test_sinkhorn_potentials_reconstruct_plan() -> None:
    a, b, M = _problem(6, 9, seed=1)
    plan, info = sinkhorn(a, b, M, 0.3, log=True)
    rebuilt = torch.exp(info["log_u"][:, None] - M / 0.3 + info["log_v"][None, :])
    torch.testing.assert_close(rebuilt, plan, rtol=1e-9, atol=1e-14)
    assert isinstance(info["n_iter"], int) and isinstance(info["err"], float)
    assert info["n_iter"] % 10 == 0  # checked every check_every iterations


def test_sinkhorn_batched_equals_loop() -> None:
    g = _gen(2)
    B, n, m = 4, 6, 9
    a = torch.stack([_simplex(n, g) for _ in range(B)])
    b = torch.stack([_simplex(m, g) for _ in range(B)])
    M = torch.rand(B, n, m, generator=g, dtype=F64)
    regs = 0.2
    batched, info = sinkhorn(a, b, M, regs, tol=1e-12, max_iter=5000, log=True)
    assert batched.shape == (B, n, m)
    assert info["log_u"].shape == (B, n) and info["log_v"].shape == (B, m)
    for k in range(B):
        single = sinkhorn(a[k], b[k], M[k], regs, tol=1e-12, max_iter=5000)
        torch.testing.assert_close(batched[k], single, rtol=0, atol=1e-10)
        torch.testing.assert_close(batched[k], _pot_log(a[k], b[k], M[k], regs)[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_sinkhorn_log_domain_large_logits(dtype: torch.dtype) -> None:
    """Costs from log_softmax of logits ~1e4: exp(-M/reg) underflows in both dtypes."""
    g = _gen(3)
    n, m, reg = 20, 6, 0.5
    logits = (1e4 * torch.randn(n, m, generator=g, dtype=F64)).to(dtype)
    M = -torch.log_softmax(logits, dim=-1)
    assert (M / reg).max() > 1000  # a kernel-space Sinkhorn would see exact zeros / 0/0
    a64 = torch.full((n,), 1.0 / n, dtype=F64)
    a = a64.to(dtype)

    # (1) b compatible with the cheap (argmin) entries: converges at the default tol, incl. zero-mass
    # columns, to POT's float64 plan (on the exact marginals: float32's 3/20 and 3 * (1/20) differ by 3e-8,
    # which no plan can fix through entries of cost 1e4).
    b64 = torch.bincount(M.argmin(-1), minlength=m).to(F64) / n
    b = b64.to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = sinkhorn(a, b, M, reg)
    assert plan.dtype == dtype
    assert (plan[:, b == 0] == 0).all()
    assert _marginal_errors(plan, a, b)[1] <= 1.01 * default_tol(dtype)
    torch.testing.assert_close(plan.double(), _pot_log(a64, b64, M, reg)[0], rtol=0, atol=1e-6)

    # (2) uniform b forces transport through entries with cost ~1e4: far from converged after 200
    # iterations, but finite, and the exact iterate (POT's, in float64).
    b = torch.full((m,), 1.0 / m, dtype=dtype)
    with pytest.warns(SinkhornConvergenceWarning):
        plan, info = sinkhorn(a, b, M, reg, max_iter=200, log=True)
    assert torch.isfinite(info["log_u"]).all() and torch.isfinite(info["log_v"]).all()
    assert info["n_log_iter"] > 0  # the kernel underflows: some iterations need the log domain
    ref, _, _ = _pot_log(a, b, M, reg, n_iter=200)
    torch.testing.assert_close(plan.double(), ref, rtol=0, atol=1e-7)
    assert info["err"] == pytest.approx(_rel_err(ref.sum(0), b.double()), rel=1e-5)


def test_sinkhorn_zero_mass_rows_and_columns() -> None:
    """Oracle: POT on the problem without the zero-mass rows and columns."""
    a, b, M = _problem(6, 5, seed=4)
    a[[1, 4]] = 0.0
    b[2] = 0.0
    a, b = a / a.sum(), b / b.sum()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan, info = sinkhorn(a, b, M, 0.1, log=True)
    assert (plan[[1, 4]] == 0).all() and (plan[:, 2] == 0).all()
    rows, cols = a > 0, b > 0
    ref, _, _ = _pot_log(a[rows], b[cols], M[rows][:, cols], 0.1)
    torch.testing.assert_close(plan[rows][:, cols], ref, rtol=0, atol=1e-10)
    assert torch.isneginf(info["log_u"][[1, 4]]).all() and torch.isneginf(info["log_v"][2])
    assert not torch.isnan(info["log_u"]).any() and not torch.isnan(info["log_v"]).any()


def test_sinkhorn_forbidden_entries() -> None:
    a, b, M = _problem(4, 4, seed=5)
    M[0, 1] = math.inf
    plan = sinkhorn(a, b, M, 0.5)
    assert plan[0, 1] == 0
    torch.testing.assert_close(plan, _pot_log(a, b, M, 0.5)[0], rtol=0, atol=1e-10)


def test_sinkhorn_warns_when_not_converged() -> None:
    a, b, M = _problem(8, 9, seed=6)
    for max_iter in (1, 2):
        with pytest.warns(SinkhornConvergenceWarning, match="tol"):
            plan, info = sinkhorn(a, b, M, 0.05, max_iter=max_iter, tol=1e-12, log=True)
        assert info["n_iter"] == max_iter and info["err"] > 1e-12
        assert torch.isfinite(plan).all()


def test_sinkhorn_converged_does_not_warn() -> None:
    a, b, M = _problem(8, 9, seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sinkhorn(a, b, M, 0.5)
        sinkhorn(a.float(), b.float(), M.float(), 0.5)


def test_sinkhorn_output_detached() -> None:
    a, b, M = _problem(3, 4, seed=7)
    M.requires_grad_(True)
    assert not sinkhorn(a, b, M, 1.0).requires_grad


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"a": torch.full((5,), 0.2, dtype=F64)}, "a must have shape"),
        ({"b": torch.full((3, 1), 1 / 3, dtype=F64)}, "b must have shape"),
        ({"a": torch.tensor([0.6, -0.1, 0.3, 0.2], dtype=F64)}, "negative"),
        ({"reg": 0.0}, "reg"),
        ({"reg": -1.0}, "reg"),
        ({"M": torch.tensor([[0.0, math.nan, 1.0]] * 4, dtype=F64)}, "M .*NaN"),
        ({"M": torch.tensor([[0.0, -math.inf, 1.0]] * 4, dtype=F64)}, "-inf"),
        ({"b": torch.tensor([0.5, 0.5, 0.5], dtype=F64)}, "same total mass"),
        ({"M": torch.tensor([[math.inf] * 3] + [[0.0] * 3] * 3, dtype=F64)}, "infeasible"),
    ],
)
def test_sinkhorn_validation(kwargs: dict, match: str) -> None:
    args = {
        "a": torch.full((4,), 0.25, dtype=F64),
        "b": torch.full((3,), 1 / 3, dtype=F64),
        "M": torch.rand(4, 3, generator=_gen(8), dtype=F64),
        "reg": 1.0,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sinkhorn(args["a"], args["b"], args["M"], args["reg"])


@settings(max_examples=30, deadline=None, database=None)
@given(
    n=st.integers(1, 6),
    m=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    reg=st.floats(0.1, 5.0),
    zero_a=st.lists(st.booleans(), min_size=6, max_size=6),
    zero_b=st.lists(st.booleans(), min_size=6, max_size=6),
)
def test_sinkhorn_property(n: int, m: int, seed: int, reg: float, zero_a: list, zero_b: list) -> None:
    a, b, M = _problem(n, m, seed)
    a = torch.where(torch.tensor(zero_a[:n]), 0.0, a)
    b = torch.where(torch.tensor(zero_b[:m]), 0.0, b)
    if a.sum() == 0:
        a[0] = 1.0
    if b.sum() == 0:
        b[-1] = 1.0
    a, b = a / a.sum(), b / b.sum()
    plan, info = sinkhorn(a, b, M, reg, tol=1e-10, max_iter=5000, log=True)
    assert (plan[a == 0] == 0).all() and (plan[:, b == 0] == 0).all()
    assert max(_marginal_errors(plan, a, b)) <= 1e-10
    rows, cols = a > 0, b > 0
    ref, _, _ = _pot_log(a[rows], b[cols], M[rows][:, cols], reg)
    torch.testing.assert_close(plan[rows][:, cols], ref, rtol=0, atol=1e-9)
    assert info["err"] <= 1e-10


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_sinkhorn_device_and_dtype(device: str, dtype: torch.dtype) -> None:
    a, b, M = (x.to(device=device, dtype=dtype) for x in _problem(7, 5, seed=9))
    plan = sinkhorn(a, b, M, 0.3)
    assert plan.device.type == device and plan.dtype == dtype
    assert _marginal_errors(plan.cpu(), a.cpu(), b.cpu())[1] <= 1.01 * default_tol(dtype)
    ref, _, _ = _pot_log(a, b, M, 0.3)
    torch.testing.assert_close(plan.cpu().double(), ref, rtol=0, atol=1e-6 if dtype == F32 else 1e-10)


# ----------------------------------------------------------------------------------------------------
# class_scaling
# ----------------------------------------------------------------------------------------------------


def test_class_scaling_matches_pot_and_dsink_targets() -> None:
    n, c = 1000, 10
    lpn, lps, pl = _teachers(n, c, seed=10)
    r = pl.sum(0)
    log_kernel = (lpn + lps) / 2.0  # -P / reg with reg = 2
    log_u, info = class_scaling(log_kernel, r, chunk_size=97, tol=1e-12, log=True)
    q = apply_class_scaling(log_kernel, log_u, chunk_size=97)
    assert info["err"] <= 1e-12
    assert _rel_err(q.sum(0), r) <= 1e-12
    torch.testing.assert_close(q, _pot_dsink(lpn, lps, pl), rtol=0, atol=1e-10)
    torch.testing.assert_close(q, dsink_targets(lpn, lps, pl, tol=1e-12), rtol=0, atol=1e-10)


@pytest.mark.parametrize("k", [1, 4, 25])
def test_class_scaling_iterate_k_is_pots_iterate_k(k: int) -> None:
    """One update of log_u is one POT iteration on (classes x samples), a = r / N, b = 1 / N, reg 1."""
    n, c = 200, 6
    lpn, lps, pl = _teachers(n, c, seed=60 + k)
    log_k, r = (lpn + lps) / 2, pl.sum(0)
    with pytest.warns(SinkhornConvergenceWarning):
        log_u, info = class_scaling(log_k, r, max_iter=k, tol=0.0, chunk_size=64, log=True)
    _, pot_u, _ = _pot_log(r / n, torch.full((n,), 1.0 / n, dtype=F64), -log_k.T, 1.0, n_iter=k)
    assert info["n_iter"] == k
    torch.testing.assert_close(log_u, pot_u - pot_u.max(), rtol=0, atol=1e-10)
    expected = _rel_err(torch.softmax(log_k + pot_u, -1).sum(0), r)
    assert info["err"] == pytest.approx(expected, rel=1e-6)


def test_class_scaling_warm_start_reaches_the_same_potential_in_fewer_updates() -> None:
    """The fixed point is unique up to a shift: any finite start ends at the cold start's potential, and
    starting from the answer (or near it, as the previous epoch's solve is) takes almost no updates."""
    lpn, lps, pl = _teachers(600, 6, seed=15)
    pl[:, 2] = 0.0
    pl = pl / pl.sum(1, keepdim=True)
    log_kernel, r = 2.0 * (lpn + lps), pl.sum(0)  # reg = 0.5: a sharp kernel, many updates from 0
    cold = class_scaling(log_kernel, r, max_iter=100000, tol=1e-10)
    start = torch.randn(6, generator=_gen(16), dtype=F64) * 3
    start[2] = float("nan")  # a zero-mass class's entry is ignored
    warm, info = class_scaling(log_kernel, r, max_iter=100000, tol=1e-10, log=True, init=start)
    torch.testing.assert_close(warm, cold, rtol=0, atol=1e-8)
    near = cold.clone()
    near[[0, 1, 3, 4, 5]] += torch.tensor([1e-3, -2e-3, 0.0, 1e-3, 0.0], dtype=F64)
    _, cold4 = class_scaling(log_kernel, r, max_iter=100000, tol=1e-4, log=True)
    _, near4 = class_scaling(log_kernel, r, max_iter=100000, tol=1e-4, log=True, init=near)
    assert cold4["n_iter"] > 20 and near4["n_iter"] < cold4["n_iter"] / 2, (cold4, near4)
    _, done = class_scaling(log_kernel, r, max_iter=100000, tol=1e-10, log=True, init=cold)
    assert done["n_iter"] <= 1
    with pytest.raises(ValueError, match="init must have shape"):
        class_scaling(log_kernel, r, init=cold[:3])
    bad = cold.clone()
    bad[0] = float("inf")
    with pytest.raises(ValueError, match="finite on every class"):
        class_scaling(log_kernel, r, init=bad)


def test_class_scaling_chunking_does_not_change_answer() -> None:
    lpn, lps, pl = _teachers(500, 7, seed=11)
    log_kernel, r = lpn + lps, pl.sum(0)
    ref = class_scaling(log_kernel, r, chunk_size=10**6, tol=1e-12)
    for chunk in (1, 97, 499):
        log_u = class_scaling(log_kernel, r, chunk_size=chunk, tol=1e-12)
        torch.testing.assert_close(log_u, ref, rtol=0, atol=1e-10)
        q = apply_class_scaling(log_kernel, log_u, chunk_size=chunk)
        torch.testing.assert_close(q, apply_class_scaling(log_kernel, ref), rtol=0, atol=1e-12)


def test_class_scaling_zero_mass_class() -> None:
    """Oracle: POT on the problem without the zero-mass class."""
    lpn, lps, pl = _teachers(300, 5, seed=12)
    pl[:, 3] = 0.0
    pl = pl / pl.sum(1, keepdim=True)
    log_kernel, r = (lpn + lps) / 2, pl.sum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log_u = class_scaling(log_kernel, r)
    assert torch.isneginf(log_u[3]) and not torch.isnan(log_u).any()
    q = apply_class_scaling(log_kernel, log_u)
    assert (q[:, 3] == 0).all()
    keep = [0, 1, 2, 4]
    torch.testing.assert_close(
        q[:, keep], _pot_dsink(lpn[:, keep], lps[:, keep], pl[:, keep]), rtol=0, atol=1e-8
    )


def test_class_scaling_float32_and_underflow() -> None:
    """Kernel values exp(-1e4): per-class totals underflow, yet the log-domain totals stay finite and the
    iterate is POT's float64 iterate."""
    g = _gen(13)
    n, c, k = 400, 4, 50
    log_kernel = torch.log_softmax(1e4 * torch.randn(n, c, generator=g), -1) / 2
    r = torch.full((c,), n / c)
    with pytest.warns(SinkhornConvergenceWarning):
        log_u, info = class_scaling(log_kernel, r, chunk_size=64, max_iter=k, log=True)
    q = apply_class_scaling(log_kernel, log_u)
    assert torch.isfinite(log_u).all() and q.dtype == F32
    _, pot_u, _ = _pot_log(r / n, torch.full((n,), 1.0 / n), -log_kernel.T, 1.0, n_iter=k)
    torch.testing.assert_close(log_u, pot_u - pot_u.max(), rtol=0, atol=1e-4)
    torch.testing.assert_close(q.double(), torch.softmax(log_kernel.double() + pot_u, -1), rtol=0, atol=1e-6)


def test_class_scaling_warns_and_validates() -> None:
    lpn, lps, pl = _teachers(50, 4, seed=14)
    log_kernel, r = lpn + lps, pl.sum(0)
    with pytest.warns(SinkhornConvergenceWarning):
        class_scaling(log_kernel, r, max_iter=1, tol=1e-14)
    with pytest.raises(ValueError, match="r must sum to N"):
        class_scaling(log_kernel, r * 2)
    with pytest.raises(ValueError, match="r must have shape"):
        class_scaling(log_kernel, r[:3])
    bad = log_kernel.clone()
    bad[7, 1] = math.nan
    with pytest.raises(ValueError, match="log_kernel contains NaN"):
        class_scaling(bad, r, chunk_size=5)
    bad = log_kernel.clone()
    bad[:, 2] = -math.inf
    with pytest.raises(ValueError, match="infeasible"):
        class_scaling(bad, r)


# ----------------------------------------------------------------------------------------------------
# the prior of the cost does nothing
# ----------------------------------------------------------------------------------------------------

_OFFSETS = [
    torch.tensor([30.0, -30.0, 0.0, 12.5, -7.0, 3.0], dtype=F64),
    torch.tensor([-30.0, -30.0, -30.0, -30.0, -30.0, 30.0], dtype=F64),
    torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.04, 0.01], dtype=F64)),  # a training prior
]


@pytest.mark.parametrize("offset", _OFFSETS, ids=["mixed", "pm30", "log_prior"])
@pytest.mark.parametrize("dtype", [F64, F32])
def test_dsink_targets_per_class_offsets_are_absorbed(offset: torch.Tensor, dtype: torch.dtype) -> None:
    """q_ic = u_c v_i sqrt(f_N f): an offset o_c added to log f_N or log f (raw, or re-normalised as a
    change of prior) is absorbed by log u_c -= o_c / reg; only the class totals depend on a prior."""
    n, c = 200, 6
    lpn, lps, pl = (x.to(dtype) for x in _teachers(n, c, seed=50))
    o = offset.to(dtype)
    # float32: each solve is within tol of the exact class totals, so two solves differ by up to ~2 tol
    tol, atol = (1e-12, 1e-10) if dtype == F64 else (default_tol(F32), 3 * default_tol(F32))
    q, info = dsink_targets(lpn, lps, pl, tol=tol, log=True)
    variants = {
        "noise": (lpn + o, lps),
        "student": (lpn, lps + o),
        "both": (lpn + o, lps - 2 * o),
        "noise_prior": (torch.log_softmax(lpn + o, -1), lps),
        "student_prior": (lpn, torch.log_softmax(lps + o, -1)),
    }
    for name, (a, b) in variants.items():
        q2, info2 = dsink_targets(a, b, pl, tol=tol, log=True)
        torch.testing.assert_close(q2, q, rtol=0, atol=atol, msg=name)
        shift = (a - lpn + b - lps)[0] / 2.0  # the per-class offset that reached the cost, over reg
        du = info2["log_u"].double() + shift.double() - info["log_u"].double()
        assert (du - du.mean()).abs().max().item() <= (1e-8 if dtype == F64 else 1e-3), name
    # the same holds for POT's solution of the offset cost (an independent solver)
    lpn64, lps64, pl64 = (x.double() for x in (lpn, lps, pl))
    torch.testing.assert_close(
        _pot_dsink(lpn64 + offset, lps64, pl64), _pot_dsink(lpn64, lps64, pl64), rtol=0, atol=1e-10
    )
    # ... while moving the class totals by the same prior changes q
    pl_prior = torch.softmax(torch.log(pl) + o, -1)
    assert (dsink_targets(lpn, lps, pl_prior, tol=tol) - q).abs().max().item() > 1e-2


@pytest.mark.parametrize("offset", _OFFSETS, ids=["mixed", "pm30", "log_prior"])
def test_class_scaling_per_class_offsets_are_absorbed(offset: torch.Tensor) -> None:
    n, c, reg = 300, 6, 2.0
    lpn, lps, pl = _teachers(n, c, seed=51)
    r = pl.sum(0)
    log_k = (lpn + lps) / reg
    log_u = class_scaling(log_k, r, tol=1e-12)
    q = apply_class_scaling(log_k, log_u)
    for log_k2 in ((lpn + offset + lps) / reg, (torch.log_softmax(lpn + offset, -1) + lps) / reg):
        log_u2 = class_scaling(log_k2, r, tol=1e-12)
        torch.testing.assert_close(apply_class_scaling(log_k2, log_u2), q, rtol=0, atol=1e-10)
        du = log_u2 + offset / reg - log_u
        assert (du - du.mean()).abs().max().item() <= 1e-8
    assert (apply_class_scaling(log_k, log_u + offset / reg) - q).abs().max().item() > 1e-2


# ----------------------------------------------------------------------------------------------------
# dsink_targets
# ----------------------------------------------------------------------------------------------------


def _bisect_log_u(log_g1: list[float], log_g2: list[float], r1: float) -> float:
    """Independent scalar root find: t = log u with sum_i sigmoid(t + log g_i1 - log g_i2) = r1."""

    def total(t: float) -> float:
        return sum(1.0 / (1.0 + math.exp(-(t + x - y))) for x, y in zip(log_g1, log_g2, strict=True))

    lo, hi = -60.0, 60.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if total(mid) < r1:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def test_dsink_targets_two_class_closed_form() -> None:
    n = 40
    lpn, lps, pl = _teachers(n, 2, seed=15)
    q = dsink_targets(lpn, lps, pl, tol=1e-12)
    g = torch.exp((lpn + lps) / 2)  # geometric mean sqrt(f_N f), unnormalised
    log_g1 = [math.log(v) for v in g[:, 0].tolist()]
    log_g2 = [math.log(v) for v in g[:, 1].tolist()]
    t = _bisect_log_u(log_g1, log_g2, pl[:, 0].sum().item())
    expected = [math.exp(t) * g1 / (math.exp(t) * g1 + g2) for g1, g2 in zip(*g.T.tolist(), strict=True)]
    torch.testing.assert_close(q[:, 0], torch.tensor(expected, dtype=F64), rtol=0, atol=1e-9)
    torch.testing.assert_close(q[:, 1], 1.0 - torch.tensor(expected, dtype=F64), rtol=0, atol=1e-9)


def test_dsink_targets_matches_pot() -> None:
    lpn, lps, pl = _teachers(150, 8, seed=29)
    q, info = dsink_targets(lpn, lps, pl, log=True)  # float64 default tol 1e-9
    assert info["err"] <= 1e-9 and _rel_err(q.sum(0), pl.sum(0)) <= 1e-9
    assert info["n_absorb"] == 0  # one exponential pass for the whole solve
    torch.testing.assert_close(q, _pot_dsink(lpn, lps, pl), rtol=0, atol=1e-8)
    q3 = dsink_targets(lpn, lps, pl, reg=3.0, tol=1e-12)
    torch.testing.assert_close(q3, _pot_dsink(lpn, lps, pl, reg=3.0), rtol=0, atol=1e-10)


@pytest.mark.parametrize("k", [1, 3, 12])
def test_dsink_targets_iterate_k_is_pots_iterate_k(k: int) -> None:
    n, c = 90, 5
    lpn, lps, pl = _teachers(n, c, seed=70 + k)
    with pytest.warns(SinkhornConvergenceWarning):
        q, info = dsink_targets(lpn, lps, pl, max_iter=k, tol=0.0, log=True)
    r = pl.sum(0)
    _, pot_u, _ = _pot_log(r / n, torch.full((n,), 1.0 / n, dtype=F64), -(lpn + lps).T, 2.0, n_iter=k)
    assert info["n_iter"] == k
    torch.testing.assert_close(info["log_u"], pot_u - pot_u.max(), rtol=0, atol=1e-10)
    q_pot = torch.softmax((lpn + lps) / 2 + pot_u, -1)
    torch.testing.assert_close(q, q_pot, rtol=0, atol=1e-12)
    assert info["err"] == pytest.approx(_rel_err(q_pot.sum(0), r), rel=1e-6)


def test_dsink_targets_is_geometric_mean_when_totals_agree() -> None:
    n, c = 60, 5
    lpn, lps, _ = _teachers(n, c, seed=16)
    gbar = torch.softmax((lpn + lps) / 2, dim=-1)  # normalised sqrt(f_N f)
    # f_L enters only through its column totals: any row permutation of gbar has the same totals.
    perm = torch.randperm(n, generator=_gen(17))
    q, info = dsink_targets(lpn, lps, gbar[perm], tol=1e-12, log=True)
    torch.testing.assert_close(q, gbar, rtol=0, atol=1e-10)
    spread = info["log_u"] - info["log_u"].mean()
    assert spread.abs().max() <= 1e-8  # u uniform


def test_dsink_targets_single_sample_returns_imbalance_teacher() -> None:
    lpn, lps, pl = _teachers(1, 6, seed=18)
    q = dsink_targets(lpn, lps, pl, tol=1e-13)
    torch.testing.assert_close(q, pl, rtol=0, atol=1e-10)


def test_dsink_targets_high_temperature_gives_prior_rows() -> None:
    n, c = 30, 4
    lpn, lps, pl = _teachers(n, c, seed=19)
    q = dsink_targets(lpn, lps, pl, temperature=1e6)
    expected = (pl.sum(0) / n).expand(n, c)
    torch.testing.assert_close(q, expected, rtol=0, atol=1e-4)


def test_dsink_targets_temperature_renormalises() -> None:
    lpn, lps, pl = _teachers(20, 3, seed=20)
    q_t = dsink_targets(lpn, lps, pl, temperature=2.0, tol=1e-12)
    q_ref = dsink_targets(torch.log_softmax(lpn / 2.0, -1), torch.log_softmax(lps / 2.0, -1), pl, tol=1e-12)
    torch.testing.assert_close(q_t, q_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(q_t, _pot_dsink(lpn / 2.0, lps / 2.0, pl), rtol=0, atol=1e-9)


def test_dsink_targets_zero_mass_class() -> None:
    """Oracle: POT on the problem without the zero-mass class."""
    n, c = 80, 6
    lpn, lps, pl = _teachers(n, c, seed=21)
    pl[:, 2] = 0.0
    pl = pl / pl.sum(1, keepdim=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q, info = dsink_targets(lpn, lps, pl, log=True)
    assert (q[:, 2] == 0).all() and info["class_err"] <= 1e-9
    keep = [0, 1, 3, 4, 5]
    torch.testing.assert_close(
        q[:, keep], _pot_dsink(lpn[:, keep], lps[:, keep], pl[:, keep]), rtol=0, atol=1e-8
    )


def test_dsink_targets_batched_and_detached() -> None:
    B, n, c = 3, 25, 4
    parts = [_teachers(n, c, seed=22 + k) for k in range(B)]
    lpn, lps, pl = (torch.stack([p[i] for p in parts]) for i in range(3))
    lps.requires_grad_(True)
    q = dsink_targets(lpn, lps, pl, tol=1e-12)
    assert q.shape == (B, n, c) and not q.requires_grad
    for k in range(B):
        torch.testing.assert_close(q[k], _pot_dsink(*parts[k]), rtol=0, atol=1e-9)


def test_dsink_targets_float32() -> None:
    lpn, lps, pl = _teachers(500, 10, seed=25, dtype=F32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q, info = dsink_targets(lpn, lps, pl, log=True)
    assert q.dtype == F32
    assert info["class_err"] <= default_tol(F32)
    assert _rel_err(q.sum(0), pl.double().sum(0)) <= 1.01 * default_tol(F32)
    torch.testing.assert_close(q.double(), _pot_dsink(lpn, lps, pl), rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_dsink_targets_device(device: str) -> None:
    lpn, lps, pl = (x.to(device) for x in _teachers(64, 5, seed=26, dtype=F32))
    q = dsink_targets(lpn, lps, pl)
    assert q.device.type == device
    torch.testing.assert_close(q.cpu().double(), _pot_dsink(lpn, lps, pl), rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad_arg", ["log_p_noise", "log_p_student", "p_imbalance"])
def test_dsink_targets_nan_names_argument(bad_arg: str) -> None:
    args = dict(zip(["log_p_noise", "log_p_student", "p_imbalance"], _teachers(10, 3, seed=27), strict=True))
    args[bad_arg] = args[bad_arg].clone()
    args[bad_arg][4, 1] = math.nan
    with pytest.raises(ValueError, match=f"{bad_arg} contains NaN"):
        dsink_targets(args["log_p_noise"], args["log_p_student"], args["p_imbalance"])


def test_dsink_targets_validation() -> None:
    lpn, lps, pl = _teachers(10, 3, seed=28)
    with pytest.raises(ValueError, match="p_imbalance has shape"):
        dsink_targets(lpn, lps, pl[:, :2])
    with pytest.raises(ValueError, match="log_p_student has shape"):
        dsink_targets(lpn, lps[:5], pl)
    with pytest.raises(ValueError, match="p_imbalance has negative"):
        dsink_targets(lpn, lps, torch.log(pl))
    with pytest.raises(ValueError, match="zero total mass"):
        dsink_targets(lpn, lps, torch.zeros_like(pl))
    with pytest.raises(ValueError, match="temperature"):
        dsink_targets(lpn, lps, pl, temperature=0.0)
    with pytest.raises(ValueError, match="reg"):
        dsink_targets(lpn, lps, pl, reg=-2.0)


def _extreme_teachers(n: int = 40, c: int = 5):
    """Confident teachers (log-probabilities down to -5000) and a class no sample wants but f_L gives mass."""
    g = _gen(3)
    lpn = torch.log_softmax(torch.randn(n, c, generator=g, dtype=F64) * 30, -1)
    lps = torch.log_softmax(torch.randn(n, c, generator=g, dtype=F64) * 30, -1)
    lpn[:, 4] = -5000.0
    lps[:, 4] = -4000.0
    pl = torch.full((n, c), 0.2, dtype=F64)
    return lpn, lps, pl


def test_dsink_targets_extreme_confidence_matches_pot() -> None:
    """The class potential spreads over thousands of nats, which exercises the exact-row and log-domain
    class-total fallbacks. Oracles: POT's float64 log-domain solver and the generic :func:`sinkhorn`."""
    lpn, lps, pl = _extreme_teachers()
    n = lpn.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q, info = dsink_targets(lpn, lps, pl, tol=1e-10, max_iter=5000, log=True)
    assert info["n_absorb"] > 0  # class 4's potential climbs thousands of nats: K is recomputed
    torch.testing.assert_close(q, _pot_dsink(lpn, lps, pl), rtol=0, atol=1e-8)
    plan = sinkhorn(pl.sum(0), torch.ones(n, dtype=F64), -(lpn + lps).T, 2.0, max_iter=5000, tol=1e-10)
    torch.testing.assert_close(q, plan.T, rtol=0, atol=1e-8)
    assert _rel_err(q.sum(0), pl.sum(0)) <= 1e-10
    assert torch.isfinite(info["log_v"]).all() and torch.isfinite(info["log_u"]).all()
    rebuilt = torch.exp(lpn / 2 + lps / 2 + info["log_u"] + info["log_v"][:, None])
    torch.testing.assert_close(rebuilt, q, rtol=0, atol=1e-8)


def test_dsink_targets_invariant_to_row_shifts_of_unnormalised_inputs() -> None:
    """Adding a per-sample constant to either input cancels in every row's softmax: scores far above 0
    (not normalised) or far below (confident teachers that disagree) give the same Q, without overflow."""
    lpn, lps, pl = _teachers(60, 5, seed=31)
    q = dsink_targets(lpn, lps, pl, tol=1e-12)
    shift = torch.linspace(-300.0, 300.0, 60, dtype=F64)[:, None]
    torch.testing.assert_close(
        dsink_targets(lpn + shift, lps + 2 * shift, pl, tol=1e-12), q, rtol=0, atol=1e-9
    )


def test_dsink_targets_infeasible_problems_are_refused() -> None:
    lpn, lps, pl = _teachers(30, 4, seed=41)
    bad = lpn.clone()
    bad[:, 3] = -math.inf  # f_L gives class 3 mass, f_N gives it probability 0 for every sample
    with pytest.raises(ValueError, match="infeasible"):
        dsink_targets(bad, lps, pl)
    pl0 = pl.clone()
    pl0[:, 0] = 0.0  # class 0 has no mass; sample 5 can only go to class 0
    bad = lps.clone()
    bad[5, 1:] = -math.inf
    with pytest.raises(ValueError, match="infeasible"):
        dsink_targets(lpn, bad, pl0)
    ok = lpn.clone()
    ok[:20, 3] = -math.inf  # class 3 reachable through the last 10 samples only: feasible
    q = dsink_targets(ok, lps, pl, tol=1e-12)
    assert (q[:20, 3] == 0).all()
    torch.testing.assert_close(q, _pot_dsink(ok, lps, pl), rtol=0, atol=1e-8)


# ----------------------------------------------------------------------------------------------------
# dsink_targets over several processes (all_reduce)
# ----------------------------------------------------------------------------------------------------


def _dist_cases() -> dict[str, tuple[tuple[torch.Tensor, ...], tuple[int, int], dict]]:
    """name -> (full inputs, rows of rank 0 and rank 1, kwargs). The rows are split along dim -2."""
    cases = {}
    cases["f64_uneven"] = (_teachers(101, 7, seed=80), (37, 64), {"tol": 1e-12})
    cases["f32_uneven"] = (_long_tail(300, 10, seed=81, dtype=F32), (250, 50), {})
    cases["f64_empty_rank"] = (_teachers(40, 4, seed=82), (0, 40), {"tol": 1e-12})
    parts = [_teachers(30, 4, seed=83 + k) for k in range(2)]
    cases["f64_batched"] = (
        tuple(torch.stack([p[i] for p in parts]) for i in range(3)),
        (13, 17),
        {"tol": 1e-12},
    )
    cases["f64_extreme"] = (_extreme_teachers(), (15, 25), {"tol": 1e-10, "max_iter": 5000})
    lpn, lps, pl = _teachers(30, 4, seed=84)
    one_sided = lpn.clone()
    one_sided[:12, 3] = -math.inf  # class 3 reachable only through rank 1's rows: feasible
    cases["f64_feasible_split"] = ((one_sided, lps, pl), (12, 18), {"tol": 1e-12})
    nan = lpn.clone()
    nan[20, 1] = math.nan  # on rank 1
    cases["err_nan"] = ((nan, lps, pl), (12, 18), {})
    neg = pl.clone()
    neg[3, 0] = -0.5  # on rank 0
    cases["err_negative"] = ((lpn, lps, neg), (12, 18), {})
    dead = lpn.clone()
    dead[:, 2] = -math.inf  # class 2 has mass but no sample on any rank can take it
    cases["err_infeasible"] = ((dead, lps, pl), (12, 18), {})
    return cases


def _rank_rows(x: torch.Tensor, rank: int, split: tuple[int, int]) -> torch.Tensor:
    start = 0 if rank == 0 else split[0]
    return x[..., start : start + split[rank], :]


def _dist_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    calls = [0]

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        dist.all_reduce(t)
        return t

    try:
        for name, (inputs, split, kwargs) in _dist_cases().items():
            calls[0] = 0
            mine = [_rank_rows(x, rank, split) for x in inputs]
            out: dict = {"error": None}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", SinkhornConvergenceWarning)
                    q, info = dsink_targets(*mine, all_reduce=all_reduce, log=True, **kwargs)
                out.update(q=q, n_iter=info["n_iter"], err=info["err"], log_u=info["log_u"])
            except ValueError as e:
                out["error"] = str(e)
            out["calls"] = calls[0]
            torch.save(out, os.path.join(out_dir, f"{name}.{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_dsink_targets_all_reduce_two_processes_equal_one(tmp_path) -> None:
    """2 CPU processes (gloo), each with its own rows of the batch: every rank runs the same iterations and
    returns its rows of the single-process solution; data errors on one rank raise on both."""
    mp.spawn(_dist_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for name, (inputs, split, kwargs) in _dist_cases().items():
        r0, r1 = (torch.load(tmp_path / f"{name}.{k}.pt", weights_only=False) for k in (0, 1))
        assert r0["calls"] == r1["calls"], name  # the same collectives on both ranks
        if name.startswith("err_"):
            single = None
            with pytest.raises(ValueError) as excinfo:
                dsink_targets(*inputs, **kwargs)
            single = str(excinfo.value)
            assert r0["error"] and r1["error"], name
            assert single in (r0["error"], r1["error"]), name  # the rank holding the bad row names it
            continue
        assert r0["error"] is None and r1["error"] is None, (name, r0["error"], r1["error"])
        q, info = dsink_targets(*inputs, log=True, **kwargs)
        assert r0["n_iter"] == r1["n_iter"] and r0["err"] == r1["err"], name
        torch.testing.assert_close(r0["log_u"], r1["log_u"], rtol=0, atol=0)
        atol = 1e-5 if inputs[0].dtype == F32 else (1e-8 if name == "f64_extreme" else 1e-10)
        torch.testing.assert_close(torch.cat((r0["q"], r1["q"]), dim=-2), q, rtol=0, atol=atol, msg=name)
        assert abs(r0["n_iter"] - info["n_iter"]) <= (1 if inputs[0].dtype == F32 else 0), name
        assert r0["q"].shape[-2] == split[0] and r1["q"].shape[-2] == split[1]
