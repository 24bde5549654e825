"""Tests for dsink.ot: log-domain Sinkhorn, dataset-scale class scaling and D-SINK surrogate labels."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsink.ot import (
    SinkhornConvergenceWarning,
    apply_class_scaling,
    class_scaling,
    dsink_targets,
    sinkhorn,
)

F64 = torch.float64
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


def _marginal_errors(plan: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    return (plan.sum(-1) - a).abs().max().item(), (plan.sum(-2) - b).abs().max().item()


# ----------------------------------------------------------------------------------------------------
# sinkhorn
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,m", [(5, 7), (10, 128), (100, 64)])
@pytest.mark.parametrize("reg", [0.05, 0.5, 2.0])
def test_sinkhorn_matches_pot(n: int, m: int, reg: float) -> None:
    ot = pytest.importorskip("ot")
    a, b, M = _problem(n, m, seed=n * 1000 + m)
    plan, info = sinkhorn(a, b, M, reg, tol=1e-11, max_iter=5000, log=True)
    ref = ot.sinkhorn(a, b, M, reg, method="sinkhorn_log", stopThr=1e-12, numItermax=20000)
    ref2 = ot.bregman.sinkhorn_log(a, b, M, reg, stopThr=1e-12, numItermax=20000)
    for r in (ref, ref2):
        r = torch.as_tensor(r, dtype=F64)
        diff = (plan - r).abs().max().item()
        assert diff <= 1e-5
        assert diff <= 1e-5 * r.max().item()
    err_a, err_b = _marginal_errors(plan, a, b)
    assert max(err_a, err_b) <= 1e-11
    assert info["err"] <= 1e-11
    assert plan.dtype == F64 and plan.shape == (n, m)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sinkhorn_log_domain_large_logits(dtype: torch.dtype) -> None:
    """Costs from log_softmax of logits ~1e4: exp(-M/reg) underflows in both dtypes."""
    g = _gen(3)
    n, m, reg = 20, 6, 0.5
    logits = (1e4 * torch.randn(n, m, generator=g, dtype=F64)).to(dtype)
    M = -torch.log_softmax(logits, dim=-1)
    assert (M / reg).max() > 1000  # a kernel-space Sinkhorn would see exact zeros / 0/0
    a = torch.full((n,), 1.0 / n, dtype=dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-10

    # (1) b compatible with the cheap (argmin) entries: converges, incl. zero-mass columns.
    b = torch.bincount(M.argmin(-1), minlength=m).to(dtype) / n
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = sinkhorn(a, b, M, reg, tol=tol)
    assert plan.dtype == dtype
    assert torch.isfinite(plan).all() and (plan >= 0).all()
    assert max(_marginal_errors(plan, a, b)) <= 10 * tol
    assert (plan[:, b == 0] == 0).all()

    # (2) uniform b forces transport through entries with cost ~1e4: slow, but never NaN/inf.
    b = torch.full((m,), 1.0 / m, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SinkhornConvergenceWarning)
        plan, info = sinkhorn(a, b, M, reg, max_iter=200, tol=tol, log=True)
    assert torch.isfinite(plan).all() and (plan >= 0).all()
    assert math.isfinite(info["err"])
    assert torch.isfinite(info["log_u"]).all() and torch.isfinite(info["log_v"]).all()
    err_a, _ = _marginal_errors(plan, a, b)
    assert err_a <= 1e-6  # rows are met right after the row update, whatever the convergence state
    assert abs(plan.sum().item() - 1.0) <= 1e-5


def test_sinkhorn_zero_mass_rows_and_columns() -> None:
    a, b, M = _problem(6, 5, seed=4)
    a[[1, 4]] = 0.0
    b[2] = 0.0
    a, b = a / a.sum(), b / b.sum()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan, info = sinkhorn(a, b, M, 0.1, log=True)
    assert not torch.isnan(plan).any()
    assert (plan[[1, 4]] == 0).all() and (plan[:, 2] == 0).all()
    assert max(_marginal_errors(plan, a, b)) <= 1e-9
    assert torch.isneginf(info["log_u"][[1, 4]]).all() and torch.isneginf(info["log_v"][2])
    assert not torch.isnan(info["log_u"]).any() and not torch.isnan(info["log_v"]).any()


def test_sinkhorn_forbidden_entries() -> None:
    a, b, M = _problem(4, 4, seed=5)
    M[0, 1] = math.inf
    plan = sinkhorn(a, b, M, 0.5)
    assert plan[0, 1] == 0 and max(_marginal_errors(plan, a, b)) <= 1e-9


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
        sinkhorn(a.float(), b.float(), M.float(), 0.5, tol=1e-6)


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
    assert not torch.isnan(plan).any() and (plan >= 0).all()
    assert max(_marginal_errors(plan, a, b)) <= 1e-9
    assert (plan[a == 0] == 0).all() and (plan[:, b == 0] == 0).all()
    assert info["err"] <= 1e-9


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sinkhorn_device_and_dtype(device: str, dtype: torch.dtype) -> None:
    a, b, M = (x.to(device=device, dtype=dtype) for x in _problem(7, 5, seed=9))
    tol = 1e-6 if dtype == torch.float32 else 1e-10
    plan = sinkhorn(a, b, M, 0.3, tol=tol)
    assert plan.device.type == device and plan.dtype == dtype
    assert max(_marginal_errors(plan, a, b)) <= 10 * tol
    ref = sinkhorn(*(x.cpu().double() for x in (a, b, M)), 0.3, tol=1e-12)
    torch.testing.assert_close(plan.cpu().double(), ref, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# class_scaling
# ----------------------------------------------------------------------------------------------------


def test_class_scaling_matches_sinkhorn_and_dsink_targets() -> None:
    n, c = 1000, 10
    lpn, lps, pl = _teachers(n, c, seed=10)
    r = pl.sum(0)
    log_kernel = (lpn + lps) / 2.0  # -P / reg with reg = 2
    log_u, info = class_scaling(log_kernel, r, chunk_size=97, tol=1e-12, log=True)
    q = apply_class_scaling(log_kernel, log_u, chunk_size=97)
    assert info["err"] <= 1e-12
    torch.testing.assert_close(q.sum(1), torch.ones(n, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(q.sum(0), r, rtol=0, atol=1e-12 * n)

    q_dsink = dsink_targets(lpn, lps, pl, tol=1e-12)
    torch.testing.assert_close(q, q_dsink, rtol=0, atol=1e-9)

    plan = sinkhorn(r / n, torch.full((n,), 1.0 / n, dtype=F64), -(lpn + lps).T, 2.0, tol=1e-14)
    torch.testing.assert_close(q, n * plan.T, rtol=0, atol=1e-9)


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
    lpn, lps, pl = _teachers(300, 5, seed=12)
    pl[:, 3] = 0.0
    pl = pl / pl.sum(1, keepdim=True)
    log_kernel, r = (lpn + lps) / 2, pl.sum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log_u = class_scaling(log_kernel, r)
    assert torch.isneginf(log_u[3]) and not torch.isnan(log_u).any()
    q = apply_class_scaling(log_kernel, log_u)
    assert (q[:, 3] == 0).all() and not torch.isnan(q).any()
    assert ((q.sum(0) - r).abs().max() / 300).item() <= 1e-6


def test_class_scaling_float32_and_underflow() -> None:
    """Kernel values exp(-1e4): per-class totals underflow, yet the log-domain totals stay finite."""
    g = _gen(13)
    n, c = 400, 4
    log_kernel = torch.log_softmax(1e4 * torch.randn(n, c, generator=g), -1) / 2
    r = torch.full((c,), n / c)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SinkhornConvergenceWarning)
        log_u, info = class_scaling(log_kernel, r, chunk_size=64, max_iter=50, log=True)
    q = apply_class_scaling(log_kernel, log_u)
    assert torch.isfinite(log_u).all() and torch.isfinite(q).all()
    assert q.dtype == torch.float32
    assert (q.sum(1) - 1).abs().max() <= 1e-6


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
    torch.testing.assert_close(q.sum(1), torch.ones(n, dtype=F64), rtol=0, atol=1e-12)


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


def test_dsink_targets_zero_mass_class_and_marginals() -> None:
    n, c = 80, 6
    lpn, lps, pl = _teachers(n, c, seed=21)
    pl[:, 2] = 0.0
    pl = pl / pl.sum(1, keepdim=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q, info = dsink_targets(lpn, lps, pl, log=True)
    assert not torch.isnan(q).any() and (q[:, 2] == 0).all()
    assert info["row_err"] <= 1e-12 and info["class_err"] <= 1e-6  # rows exact, class totals within tol
    torch.testing.assert_close(q.sum(0), pl.sum(0), rtol=1e-6, atol=1e-6)


def test_dsink_targets_batched_and_detached() -> None:
    B, n, c = 3, 25, 4
    parts = [_teachers(n, c, seed=22 + k) for k in range(B)]
    lpn, lps, pl = (torch.stack([p[i] for p in parts]) for i in range(3))
    lps.requires_grad_(True)
    q = dsink_targets(lpn, lps, pl, tol=1e-12)
    assert q.shape == (B, n, c) and not q.requires_grad
    for k in range(B):
        torch.testing.assert_close(q[k], dsink_targets(*parts[k], tol=1e-12), rtol=0, atol=1e-9)


def test_dsink_targets_float32() -> None:
    lpn, lps, pl = _teachers(500, 10, seed=25, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q, info = dsink_targets(lpn, lps, pl, log=True)
    assert q.dtype == torch.float32
    assert info["row_err"] <= 1e-6 and info["class_err"] <= 1e-6
    ref = dsink_targets(lpn.double(), lps.double(), pl.double(), tol=1e-12)
    torch.testing.assert_close(q.double(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_dsink_targets_device(device: str) -> None:
    lpn, lps, pl = (x.to(device) for x in _teachers(64, 5, seed=26, dtype=torch.float32))
    q = dsink_targets(lpn, lps, pl)
    assert q.device.type == device
    assert (q.sum(1) - 1).abs().max().item() <= 1e-6


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
    with pytest.raises(ValueError, match="temperature"):
        dsink_targets(lpn, lps, pl, temperature=0.0)
    with pytest.raises(ValueError, match="reg"):
        dsink_targets(lpn, lps, pl, reg=-2.0)


def test_dsink_targets_extreme_confidence_matches_generic_sinkhorn() -> None:
    """Confident teachers (log-probabilities down to -5000) and a class no sample wants but f_L gives mass:
    the class potential spreads over thousands of nats, which exercises the exact-row and log-domain
    class-total fallbacks. Oracle: the generic two-potential log-domain :func:`sinkhorn` on M = P^T."""
    n, c = 40, 5
    g = torch.Generator().manual_seed(3)
    lpn = torch.log_softmax(torch.randn(n, c, generator=g, dtype=torch.float64) * 30, -1)
    lps = torch.log_softmax(torch.randn(n, c, generator=g, dtype=torch.float64) * 30, -1)
    lpn[:, 4] = -5000.0
    lps[:, 4] = -4000.0
    pl = torch.full((n, c), 0.2, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q, info = dsink_targets(lpn, lps, pl, tol=1e-10, max_iter=5000, log=True)
    plan = sinkhorn(
        pl.sum(0), torch.ones(n, dtype=torch.float64), -(lpn + lps).T, 2.0, max_iter=5000, tol=1e-10
    )
    torch.testing.assert_close(q, plan.T, rtol=0, atol=1e-8)
    torch.testing.assert_close(q.sum(0), pl.sum(0), rtol=1e-9, atol=1e-9)
    assert torch.isfinite(info["log_v"]).all() and torch.isfinite(info["log_u"]).all()
    rebuilt = torch.exp(lpn / 2 + lps / 2 + info["log_u"] + info["log_v"][:, None])
    torch.testing.assert_close(rebuilt, q, rtol=0, atol=1e-8)


def test_dsink_targets_invariant_to_row_shifts_of_unnormalised_inputs() -> None:
    """Adding a per-sample constant to either input cancels in every row's softmax: scores far above 0
    (not normalised) or far below (confident teachers that disagree) give the same Q, without overflow."""
    lpn, lps, pl = _teachers(60, 5, seed=31)
    q = dsink_targets(lpn, lps, pl, tol=1e-12)
    shift = torch.linspace(-300.0, 300.0, 60, dtype=torch.float64)[:, None]
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
