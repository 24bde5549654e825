"""Entropic optimal transport for D-SINK: log-domain Sinkhorn and the surrogate labels built from it.

D-SINK distils two teachers into a student through a set of surrogate labels ``Q`` (one distribution
``q_i`` over the C classes per sample). ``f_N`` is the noise-robust teacher, ``f`` the (detached)
student, ``f_L`` the imbalance-robust teacher. The surrogate labels minimise

    L_dsink(Q) = sum_i KL(q_i || f_N(x_i)) + KL(q_i || f(x_i))

subject to every sample carrying mass 1 (``sum_c q_ic = 1``) and the class totals matching the
imbalance-robust teacher (``sum_i q_ic = r_c = sum_i f_L(x_i)_c``). Expanding the two KL terms,

    L_dsink = sum_ic q_ic (log q_ic - log f_N_ic) + q_ic (log q_ic - log f_ic)
            = <Q, P> + 2 sum_ic q_ic log q_ic,          P_ic = -(log f_N(x_i)_c + log f(x_i)_c),

which is exactly an entropic optimal-transport problem with cost ``P`` and entropic weight ``reg = 2``.
Its solution has the Gibbs form ``q_ic = u_c v_i exp(-P_ic / 2) = u_c v_i sqrt(f_N_ic f_ic)``: each
surrogate label is the normalised geometric mean of the two teachers, re-weighted per class by a single
vector ``u`` chosen so that the class totals come out as ``r``.

Everything here runs in the log domain (dual potentials and ``logsumexp`` updates) instead of on the
scaling vectors of textbook Sinkhorn: with confident networks the log-probabilities reach -1e4, and
``exp(-P / reg)`` then underflows to 0 in float32 and float64 alike, which makes the classical
``u = a / (K v)`` iterations divide 0 by 0. Zero-mass classes (``log 0 = -inf``) are handled
explicitly so that no ``-inf - (-inf)`` is ever formed.

Public API:

* :func:`sinkhorn` -- generic entropic OT with POT's argument conventions, optional batch dimension.
* :func:`class_scaling` / :func:`apply_class_scaling` -- the D-SINK problem at dataset scope
  (N up to ~1e6 samples), processed in row chunks so memory stays O(chunk_size * C).
* :func:`dsink_targets` -- the surrogate labels ``Q`` from the three teachers' outputs.

The module is pure math: torch only, no ``torch.nn``, no file I/O. Results are returned detached.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal, overload

import torch

__all__ = [
    "SinkhornConvergenceWarning",
    "apply_class_scaling",
    "class_scaling",
    "dsink_targets",
    "sinkhorn",
]

_NEG_INF = float("-inf")


class SinkhornConvergenceWarning(UserWarning):
    """Sinkhorn stopped at ``max_iter`` before the marginals were met within ``tol``.

    The returned plan is still usable (it is the exact Sinkhorn iterate), but its marginals are off by
    the error reported in the message; raise ``max_iter`` or ``reg``, or loosen ``tol``.
    """


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def _mass_rtol(dtype: torch.dtype) -> float:
    """Relative tolerance on "the two marginals carry the same total mass".

    Totals are sums of many rounded numbers, so the tolerance must scale with the precision of the
    dtype: 1e-6 for float64, ~1.2e-4 for float32 (1000 ulps).
    """
    return max(1e-6, 1000.0 * torch.finfo(dtype).eps)


def _log_ratio(log_mass: torch.Tensor, log_sum: torch.Tensor) -> torch.Tensor:
    """``log_mass - log_sum`` with zero-mass entries pinned to ``-inf``.

    Where the target mass is zero, ``log_sum`` may itself be ``-inf`` (the row or column has already been
    zeroed), and ``-inf - (-inf)`` would be NaN. The input validation guarantees that ``log_sum`` is
    finite wherever the target mass is positive, so the result is never ``+inf`` or NaN.
    """
    return torch.where(torch.isneginf(log_mass), log_mass, log_mass - log_sum)


def _safe_log(x: torch.Tensor) -> torch.Tensor:
    """``log`` that maps exact zeros to ``-inf`` without a divide-by-zero path."""
    return torch.where(x > 0, torch.log(torch.where(x > 0, x, torch.ones_like(x))), _NEG_INF)


def _check_finite(x: torch.Tensor, name: str) -> None:
    if torch.isnan(x).any():
        raise ValueError(f"{name} contains NaN")
    if torch.isinf(x).any():
        raise ValueError(f"{name} contains inf")


def _check_float(x: Any, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _check_positive_scalar(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def _check_iter_args(max_iter: int, tol: float, check_every: int) -> None:
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if int(check_every) < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")


def _warn_not_converged(what: str, n_iter: int, err: float, tol: float) -> None:
    warnings.warn(
        f"{what} did not converge in {n_iter} iterations: marginal error {err:.3e} > tol {tol:.3e}",
        SinkhornConvergenceWarning,
        stacklevel=3,
    )


# ----------------------------------------------------------------------------------------------------
# generic log-domain Sinkhorn
# ----------------------------------------------------------------------------------------------------


def _validate_sinkhorn_inputs(
    a: torch.Tensor, b: torch.Tensor, M: torch.Tensor, reg: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Check shapes/values and return ``(a, b, M, reg)`` detached, in ``M``'s dtype and device.

    ``b`` is rescaled to carry exactly the mass of ``a`` (after checking the totals agree within a
    dtype-dependent relative tolerance): otherwise the rounding gap between the totals would be a floor
    under the marginal error and Sinkhorn could never reach a tight ``tol``.
    """
    for x, name in ((a, "a"), (b, "b"), (M, "M")):
        _check_float(x, name)
    if not M.is_floating_point():
        raise ValueError(f"M must be a floating-point tensor, got dtype {M.dtype}")
    if M.dim() not in (2, 3):
        raise ValueError(f"M must have shape (n, m) or (B, n, m), got {tuple(M.shape)}")
    batch = tuple(M.shape[:-2])
    n, m = M.shape[-2], M.shape[-1]
    if tuple(a.shape) != (*batch, n):
        raise ValueError(f"a must have shape {(*batch, n)} to match M {tuple(M.shape)}, got {tuple(a.shape)}")
    if tuple(b.shape) != (*batch, m):
        raise ValueError(f"b must have shape {(*batch, m)} to match M {tuple(M.shape)}, got {tuple(b.shape)}")
    if n == 0 or m == 0:
        raise ValueError(f"M must be non-empty, got shape {tuple(M.shape)}")
    for x, name in ((a, "a"), (b, "b")):
        if x.device != M.device:
            raise ValueError(f"{name} is on {x.device} but M is on {M.device}")
        if x.is_complex():
            raise ValueError(f"{name} must be real, got dtype {x.dtype}")
    reg = _check_positive_scalar(reg, "reg")

    M = M.detach()
    a = a.detach().to(M.dtype)
    b = b.detach().to(M.dtype)
    _check_finite(a, "a")
    _check_finite(b, "b")
    if (a < 0).any():
        raise ValueError("a (first marginal) has negative entries")
    if (b < 0).any():
        raise ValueError("b (second marginal) has negative entries")
    if torch.isnan(M).any():
        raise ValueError("M (cost matrix) contains NaN")
    if torch.isneginf(M).any():
        raise ValueError("M (cost matrix) contains -inf; +inf (forbidden transport) is allowed, -inf is not")

    sa, sb = a.sum(-1), b.sum(-1)
    if (sa <= 0).any() or (sb <= 0).any():
        raise ValueError("a and b must each carry positive total mass")
    rtol = _mass_rtol(M.dtype)
    gap = ((sa - sb).abs() / torch.maximum(sa, sb)).max().item()
    if gap > rtol:
        raise ValueError(
            f"a and b must have the same total mass: totals {sa.tolist()} vs {sb.tolist()} "
            f"(relative gap {gap:.3e} > {rtol:.1e})"
        )
    b = b * (sa / sb).unsqueeze(-1)

    # Every row/column with mass must be able to send/receive it through a finite-cost entry whose
    # other end has mass too, else its potential would have to be +inf.
    finite = torch.isfinite(M)
    row_ok = (finite & (b > 0).unsqueeze(-2)).any(-1) | (a == 0)
    col_ok = (finite & (a > 0).unsqueeze(-1)).any(-2) | (b == 0)
    if not bool(row_ok.all()):
        raise ValueError(
            "infeasible problem: a row of M with positive mass in a has no finite cost to b's support"
        )
    if not bool(col_ok.all()):
        raise ValueError(
            "infeasible problem: a column of M with positive mass in b has no finite cost to a's support"
        )
    return a, b, M, reg


@overload
def sinkhorn(
    a: torch.Tensor,
    b: torch.Tensor,
    M: torch.Tensor,
    reg: float,
    max_iter: int = ...,
    tol: float = ...,
    check_every: int = ...,
    log: Literal[False] = ...,
) -> torch.Tensor: ...


@overload
def sinkhorn(
    a: torch.Tensor,
    b: torch.Tensor,
    M: torch.Tensor,
    reg: float,
    max_iter: int = ...,
    tol: float = ...,
    check_every: int = ...,
    *,
    log: Literal[True],
) -> tuple[torch.Tensor, dict[str, Any]]: ...


def sinkhorn(
    a: torch.Tensor,
    b: torch.Tensor,
    M: torch.Tensor,
    reg: float,
    max_iter: int = 1000,
    tol: float = 1e-9,
    check_every: int = 10,
    log: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
    """Entropic optimal transport plan, solved by Sinkhorn iterations in the log domain.

    Solves ``min_T <T, M> + reg * sum T log T`` over plans ``T >= 0`` with ``T 1 = a`` and
    ``T^T 1 = b``, with POT's argument conventions (``ot.sinkhorn(a, b, M, reg)``): the solution is
    ``T = diag(u) exp(-M / reg) diag(v)``.

    Why the log domain: the kernel ``exp(-M / reg)`` underflows to exactly 0 as soon as ``M / reg``
    exceeds ~87 (float32) or ~745 (float64) -- routine for costs built from log-probabilities of
    confident networks -- and the classical ``u = a / (K v)`` update then yields 0/0. Here the
    iterate is kept as the log-plan ``L = log_u - M / reg + log_v`` and each half-step subtracts a
    ``logsumexp`` so that rows (then columns) of ``exp(L)`` sum to the target marginal. Updating
    ``L`` in place (rather than recomputing ``-M/reg + log_u + log_v``, which adds numbers of
    magnitude ``M/reg`` and cancels them) keeps the entries that carry mass -- those near
    ``log(a_i b_j)`` -- at full relative precision, which matters in float32.

    Args:
        a: first marginal, shape ``(n,)`` or ``(B, n)``; non-negative. Zero entries are allowed: their
            row of the plan is exactly 0 (their potential is ``-inf``).
        b: second marginal, shape ``(m,)`` or ``(B, m)``; non-negative, same total mass as ``a`` (up to a
            dtype-dependent relative tolerance; ``b`` is rescaled to ``a``'s mass).
        M: cost matrix, shape ``(n, m)`` or ``(B, n, m)``. Sets dtype and device of the computation.
            ``+inf`` marks forbidden transports; NaN and ``-inf`` are rejected.
        reg: entropic weight ``> 0``.
        max_iter: maximum number of Sinkhorn iterations (one column plus one row update each).
        tol: stop when the largest absolute deviation of the plan's column sums from ``b`` is
            ``<= tol``. Right after the row update the row sums equal ``a`` up to rounding, so the
            column error is the convergence measure; the reported ``err`` is the max of both. In
            float32 a ``tol`` below ~1e-7 * max(b) is not reachable.
        check_every: check the error every this many iterations (each check costs a device sync).
        log: also return a dict with ``n_iter`` (iterations run), ``err`` (max marginal error of the
            returned plan), ``log_u`` and ``log_v`` (dual potentials divided by ``reg``, such that
            ``plan = exp(log_u[..., :, None] - M / reg + log_v[..., None, :])``).

    Returns:
        The plan (shape of ``M``, detached), or ``(plan, info)`` if ``log``. With a batch dimension all
        problems are iterated together until the worst one converges.

    Warns:
        SinkhornConvergenceWarning: if ``max_iter`` is reached before ``tol``.

    Raises:
        ValueError: inconsistent shapes, negative or non-finite marginals, totals that differ,
            ``reg <= 0``, NaN or ``-inf`` in ``M``, or a mass-carrying row/column with no finite cost.
    """
    _check_iter_args(max_iter, tol, check_every)
    a, b, M, reg = _validate_sinkhorn_inputs(a, b, M, reg)
    log_a, log_b = _safe_log(a), _safe_log(b)

    L = M / (-reg)  # fresh tensor: the log-plan, updated in place
    log_u = torch.zeros_like(a)
    log_v = torch.zeros_like(b)
    n_iter = 0
    err_b = math.inf
    converged = False
    while True:
        lse_col = torch.logsumexp(L, dim=-2)  # log column sums of the current plan
        if n_iter > 0 and (n_iter % check_every == 0 or n_iter >= max_iter):
            err_b = (lse_col.exp() - b).abs().max().item()
            if err_b <= tol:
                converged = True
                break
        if n_iter >= max_iter:
            break
        dv = _log_ratio(log_b, lse_col)
        L.add_(dv.unsqueeze(-2))
        log_v.add_(dv)
        du = _log_ratio(log_a, torch.logsumexp(L, dim=-1))
        L.add_(du.unsqueeze(-1))
        log_u.add_(du)
        n_iter += 1

    plan = L.exp_()
    err_a = (plan.sum(-1) - a).abs().max().item()
    err = max(err_a, err_b)
    if not converged:
        _warn_not_converged("sinkhorn", n_iter, err, tol)
    if log:
        return plan, {"n_iter": n_iter, "err": err, "log_u": log_u, "log_v": log_v}
    return plan


# ----------------------------------------------------------------------------------------------------
# dataset-scale class scaling
# ----------------------------------------------------------------------------------------------------


def _row_chunks(n: int, chunk_size: int) -> range:
    return range(0, n, chunk_size)


def _log_class_totals(log_kernel: torch.Tensor, log_u: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``log s_c = log sum_i softmax_c(log_kernel_i + log_u)`` in float64, one row chunk at a time.

    Done in the log domain (a ``logsumexp`` over the rows of each chunk, merged with ``logaddexp``) so that
    a class whose every probability underflows still gets a finite total, and its potential a finite
    update. Peak extra memory: the shifted chunk plus ``logsumexp``'s own temporary.
    """
    u = log_u.to(log_kernel.dtype)
    log_s = torch.full_like(log_u, _NEG_INF)
    for start in _row_chunks(log_kernel.shape[0], chunk_size):
        z = log_kernel[start : start + chunk_size] + u
        z.sub_(torch.logsumexp(z, dim=1, keepdim=True))  # z = log q, rows normalised
        log_s = torch.logaddexp(log_s, torch.logsumexp(z, dim=0).to(log_s.dtype))
        del z
    return log_s


def _validate_class_problem(log_kernel: torch.Tensor, r: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Validate ``class_scaling`` inputs (chunk-wise) and return ``r`` as float64 summing to N exactly."""
    _check_float(log_kernel, "log_kernel")
    _check_float(r, "r")
    if not log_kernel.is_floating_point():
        raise ValueError(f"log_kernel must be a floating-point tensor, got dtype {log_kernel.dtype}")
    if log_kernel.dim() != 2:
        raise ValueError(f"log_kernel must have shape (N, C), got {tuple(log_kernel.shape)}")
    n, c = log_kernel.shape
    if n == 0 or c == 0:
        raise ValueError(f"log_kernel must be non-empty, got shape {tuple(log_kernel.shape)}")
    if tuple(r.shape) != (c,):
        raise ValueError(
            f"r must have shape ({c},) to match log_kernel {tuple(log_kernel.shape)}, got {tuple(r.shape)}"
        )
    if r.device != log_kernel.device:
        raise ValueError(f"r is on {r.device} but log_kernel is on {log_kernel.device}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    r64 = r.detach().to(torch.float64)
    _check_finite(r64, "r")
    if (r64 < 0).any():
        raise ValueError("r (class totals) has negative entries")
    total = r64.sum().item()
    rtol = _mass_rtol(r.dtype if r.is_floating_point() else torch.float64)
    if abs(total - n) > rtol * n:
        raise ValueError(f"r must sum to N = {n} (each sample has mass 1), got {total}")

    positive = r64 > 0
    mask = torch.where(positive, 0.0, _NEG_INF).to(log_kernel.dtype)
    class_reached = torch.zeros(c, dtype=torch.bool, device=log_kernel.device)
    for start in _row_chunks(n, chunk_size):
        chunk = log_kernel[start : start + chunk_size]
        if torch.isnan(chunk).any():
            raise ValueError("log_kernel contains NaN")
        if torch.isposinf(chunk).any():
            raise ValueError("log_kernel contains +inf")
        if not bool(((chunk + mask).amax(dim=1) > _NEG_INF).all()):
            raise ValueError("infeasible problem: a row of log_kernel is -inf on every class with r > 0")
        class_reached |= (chunk > _NEG_INF).any(dim=0)
    if not bool((class_reached | ~positive).all()):
        raise ValueError("infeasible problem: a class with r > 0 has log_kernel = -inf for every sample")
    return r64 * (n / total)


@overload
def class_scaling(
    log_kernel: torch.Tensor,
    r: torch.Tensor,
    max_iter: int = ...,
    tol: float = ...,
    chunk_size: int = ...,
    check_every: int = ...,
    log: Literal[False] = ...,
) -> torch.Tensor: ...


@overload
def class_scaling(
    log_kernel: torch.Tensor,
    r: torch.Tensor,
    max_iter: int = ...,
    tol: float = ...,
    chunk_size: int = ...,
    check_every: int = ...,
    *,
    log: Literal[True],
) -> tuple[torch.Tensor, dict[str, Any]]: ...


def class_scaling(
    log_kernel: torch.Tensor,
    r: torch.Tensor,
    max_iter: int = 1000,
    tol: float = 1e-6,
    chunk_size: int = 65536,
    check_every: int = 1,
    log: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
    """Class potential ``log_u`` solving the D-SINK transport problem at dataset scope.

    Same problem as :func:`sinkhorn` with one marginal fixed to "every sample has mass 1", which lets the
    sample-side potential be eliminated: the plan is ``q_i = softmax_c(log_kernel_i + log_u)`` (rows
    normalised exactly), and only the C-vector ``log_u`` is iterated,
    ``log_u += log r - log s`` with ``s_c = sum_i q_ic``. Nothing of size N x C is ever materialised
    beyond the input: rows are processed ``chunk_size`` at a time, so with N = 1e6 samples and C = 100
    classes the working memory is O(chunk_size * C). Use :func:`apply_class_scaling` to produce ``q``.

    Convergence is measured as ``max_c |s_c - r_c| / N <= tol``: the error on the class totals relative
    to the total mass N. This is the same quantity as :func:`sinkhorn`'s marginal error with POT's
    normalisation (``a = r / N``), it does not depend on N, and unlike a per-class relative error
    ``|s_c - r_c| / r_c`` it is not dominated by near-empty tail classes of a long-tailed dataset.

    Args:
        log_kernel: shape ``(N, C)``, per-sample log-scores, i.e. ``-P / reg`` (``-inf`` = forbidden).
        r: class totals, shape ``(C,)``, non-negative, summing to N (rescaled to N exactly). Classes with
            ``r_c = 0`` get ``log_u_c = -inf`` and ``q[:, c] = 0``.
        max_iter: maximum number of scaling updates (each is one pass over the N rows).
        tol: tolerance on ``max_c |s_c - r_c| / N``.
        chunk_size: rows per chunk.
        check_every: compare the error with ``tol`` every this many updates (each check syncs the device).
        log: also return ``{"n_iter": int, "err": float}``.

    Returns:
        ``log_u`` (float64, shape ``(C,)``, shifted so its largest entry is 0), or ``(log_u, info)``.

    Warns:
        SinkhornConvergenceWarning: if ``max_iter`` is reached before ``tol``.
    """
    _check_iter_args(max_iter, tol, check_every)
    r64 = _validate_class_problem(log_kernel, r, int(chunk_size))
    log_kernel = log_kernel.detach()
    n = log_kernel.shape[0]
    chunk_size = int(chunk_size)
    log_r = _safe_log(r64)
    log_u = torch.where(r64 > 0, 0.0, _NEG_INF).to(torch.float64)

    log_s = _log_class_totals(log_kernel, log_u, chunk_size)
    n_iter = 0
    err = math.inf
    converged = False
    while True:
        if n_iter % check_every == 0 or n_iter >= max_iter:
            err = ((log_s.exp() - r64).abs().max() / n).item()
            if err <= tol:
                converged = True
                break
        if n_iter >= max_iter:
            break
        log_u = log_u + _log_ratio(log_r, log_s)
        log_u = log_u - log_u.amax()  # softmax is shift-invariant; keep the potential bounded
        n_iter += 1
        log_s = _log_class_totals(log_kernel, log_u, chunk_size)

    if not converged:
        _warn_not_converged("class_scaling", n_iter, err, tol)
    if log:
        return log_u, {"n_iter": n_iter, "err": err}
    return log_u


def apply_class_scaling(
    log_kernel: torch.Tensor, log_u: torch.Tensor, chunk_size: int = 65536
) -> torch.Tensor:
    """Surrogate labels ``q_i = softmax_c(log_kernel_i + log_u)``, shape ``(N, C)``, rows summing to 1.

    ``-inf`` entries of ``log_u`` (zero-mass classes) give exact zeros. Computed chunk by chunk into the
    output so the only extra memory is one chunk. Output dtype is ``log_kernel``'s; result detached.
    """
    _check_float(log_kernel, "log_kernel")
    _check_float(log_u, "log_u")
    if log_kernel.dim() != 2 or tuple(log_u.shape) != (log_kernel.shape[1],):
        raise ValueError(
            f"log_kernel must be (N, C) and log_u (C,), "
            f"got {tuple(log_kernel.shape)} and {tuple(log_u.shape)}"
        )
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    log_kernel = log_kernel.detach()
    u = log_u.detach().to(device=log_kernel.device, dtype=log_kernel.dtype)
    out = torch.empty_like(log_kernel)
    for start in _row_chunks(log_kernel.shape[0], int(chunk_size)):
        sl = slice(start, start + int(chunk_size))
        out[sl] = torch.softmax(log_kernel[sl] + u, dim=1)
    if torch.isnan(out).any():
        raise ValueError(
            "a row of log_kernel + log_u is -inf everywhere (or NaN): no class can take its mass"
        )
    return out


# ----------------------------------------------------------------------------------------------------
# D-SINK surrogate labels
# ----------------------------------------------------------------------------------------------------


def _check_log_probs(x: torch.Tensor, name: str) -> None:
    _check_float(x, name)
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if torch.isnan(x).any():
        raise ValueError(f"{name} contains NaN")
    if torch.isposinf(x).any():
        raise ValueError(f"{name} contains +inf (expected log-probabilities)")
    if torch.isneginf(x).all(dim=-1).any():
        raise ValueError(f"{name} has a row that is -inf for every class (not a log-distribution)")


@overload
def dsink_targets(
    log_p_noise: torch.Tensor,
    log_p_student: torch.Tensor,
    p_imbalance: torch.Tensor,
    *,
    reg: float = ...,
    temperature: float = ...,
    max_iter: int = ...,
    tol: float = ...,
    log: Literal[False] = ...,
) -> torch.Tensor: ...


@overload
def dsink_targets(
    log_p_noise: torch.Tensor,
    log_p_student: torch.Tensor,
    p_imbalance: torch.Tensor,
    *,
    reg: float = ...,
    temperature: float = ...,
    max_iter: int = ...,
    tol: float = ...,
    log: Literal[True],
) -> tuple[torch.Tensor, dict[str, Any]]: ...


def dsink_targets(
    log_p_noise: torch.Tensor,
    log_p_student: torch.Tensor,
    p_imbalance: torch.Tensor,
    *,
    reg: float = 2.0,
    temperature: float = 1.0,
    max_iter: int = 1000,
    tol: float = 1e-6,
    log: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
    """D-SINK surrogate labels ``Q`` (see the module docstring for the objective).

    The cost is ``P_ic = -(log f_N(x_i)_c + log f(x_i)_c)``, the class totals ``r = sum_i f_L(x_i)``,
    and every sample carries mass 1. With the default ``reg = 2`` the solution is
    ``q_i ∝ u ⊙ sqrt(f_N(x_i) ⊙ f(x_i))``. This is :func:`sinkhorn` on ``M = P^T`` with marginals
    ``r`` (classes) and ``1`` (samples), solved with the sample potential eliminated: each row of ``Q``
    is a softmax, so rows sum to 1 exactly and only the class potential ``log u`` is iterated (one
    exponential pass over N x C per iteration instead of two; see ``_dsink_scaling``). Everything stays
    in the log domain: rows are exponentiated after subtracting (a bound on) their maximum, and the rare
    rows or classes that would underflow are recomputed exactly.

    At dataset scope (N ~ 1e6) use :func:`class_scaling`, which never materialises N x C temporaries.

    Args:
        log_p_noise: ``(N, C)`` or ``(B, N, C)`` log-probabilities of the noise-robust teacher ``f_N``.
        log_p_student: same shape, log-probabilities of the student ``f`` (gradients are not tracked).
        p_imbalance: same shape, probabilities of the imbalance-robust teacher ``f_L`` (non-negative; only
            their column totals matter, rescaled to sum to N).
        reg: entropic weight (2 for the D-SINK objective).
        temperature: if not 1, each log-probability is re-normalised as ``log_softmax(log_p / T)`` first.
        max_iter: maximum Sinkhorn iterations.
        tol: class totals within ``tol`` relative (``|sum_i Q_ic - r_c| <= tol * max(r_c, 1)``); rows of
            ``Q`` sum to 1 up to rounding.
        log: also return the solver info: ``n_iter``, ``err`` (the class-total error that ``tol`` bounds),
            ``log_u`` (class potential, ``(…, C)``), ``log_v`` (sample potential, ``(…, N)``),
            ``row_err`` = ``max_i |sum_c Q_ic - 1|`` and ``class_err`` (the same as ``err``).

    Returns:
        ``Q`` with the shape of the inputs, detached; or ``(Q, info)`` if ``log``.

    Raises:
        ValueError: shapes differ, NaN/+inf in an input (the message names it), negative ``p_imbalance``,
            non-positive ``reg``/``temperature``, or an infeasible problem (a class with mass that no sample
            can take because one of the teachers gives it probability exactly 0 everywhere).
    """
    names = ("log_p_noise", "log_p_student", "p_imbalance")
    tensors = (log_p_noise, log_p_student, p_imbalance)
    for x, name in zip(tensors, names, strict=True):
        _check_float(x, name)
    if log_p_noise.dim() not in (2, 3):
        raise ValueError(f"log_p_noise must have shape (N, C) or (B, N, C), got {tuple(log_p_noise.shape)}")
    for x, name in zip(tensors[1:], names[1:], strict=True):
        if x.shape != log_p_noise.shape:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)} but log_p_noise has {tuple(log_p_noise.shape)}"
            )
        if x.device != log_p_noise.device:
            raise ValueError(f"{name} is on {x.device} but log_p_noise is on {log_p_noise.device}")
    if not p_imbalance.is_floating_point():
        raise ValueError(f"p_imbalance must be a floating-point tensor, got dtype {p_imbalance.dtype}")
    for x, name in ((log_p_noise, "log_p_noise"), (log_p_student, "log_p_student")):
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    reg = _check_positive_scalar(reg, "reg")
    temperature = _check_positive_scalar(temperature, "temperature")
    _check_iter_args(max_iter, tol, 1)

    lp_noise = log_p_noise.detach()
    lp_student = log_p_student.detach().to(lp_noise.dtype)
    if temperature != 1.0:
        lp_noise = torch.log_softmax(lp_noise / temperature, dim=-1)
        lp_student = torch.log_softmax(lp_student / temperature, dim=-1)
    # log kernel -P / reg, (…, N, C); -inf where a teacher gives probability 0
    log_k = (lp_noise + lp_student).div_(reg)
    n, c = log_k.shape[-2], log_k.shape[-1]
    p_l = p_imbalance.detach().to(log_k.dtype)
    # Validation in one cheap pass on the common path: the sum of the row sums (a matrix-vector product)
    # is finite exactly when no input holds NaN or +-inf; only then do the checks that name the problem run.
    r = p_l.transpose(-1, -2) @ torch.ones(n, dtype=p_l.dtype, device=p_l.device)  # (…, C)
    all_finite = math.isfinite((log_k @ torch.ones(c, dtype=log_k.dtype, device=log_k.device)).sum().item())
    if not all_finite:
        _check_log_probs(log_p_noise, "log_p_noise")
        _check_log_probs(log_p_student, "log_p_student")
    if not math.isfinite(r.sum().item()):
        _check_finite(p_imbalance, "p_imbalance")
    if p_l.amin().item() < 0:
        raise ValueError("p_imbalance has negative entries (expected probabilities, not log-probabilities)")
    total = r.sum(-1, keepdim=True)
    if bool((total <= 0).any()):
        raise ValueError("p_imbalance has zero total mass")
    r = r * (n / total)
    if not all_finite:  # -inf log-probabilities: the generic checks of a feasible transport problem
        _validate_sinkhorn_inputs(
            r, torch.ones(r.shape[:-1] + (n,), dtype=r.dtype, device=r.device), -log_k.mT, 1.0
        )
    q, info = _dsink_scaling(log_k, r, int(max_iter), float(tol), want_log_v=log)
    if info["err"] > tol:
        _warn_not_converged("dsink_targets", info["n_iter"], info["err"], tol)
    if log:
        info["row_err"] = (q.sum(-1) - 1).abs().max().item()
        info["class_err"] = info["err"]
        return q, info
    return q


_TOTALS_CHUNK = 65536


def _class_totals(work: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """``s_c = sum_i work_ic / sums_i`` in float64, from float32 matrix-vector products over row chunks.

    One product over 10^6 float32 rows accumulates enough rounding (~1e-4 relative) to stall a
    tolerance of 1e-4 on the class totals; chunks of 65,536 rows keep each product's error near 1e-6
    and the chunk partials add up in float64. Problems of one chunk cost a single product, as before.
    """
    inv = sums.reciprocal().unsqueeze(-2)
    n = work.shape[-2]
    if n <= _TOTALS_CHUNK:
        return (inv @ work).squeeze(-2).to(torch.float64)
    total = torch.zeros(work.shape[:-2] + work.shape[-1:], dtype=torch.float64, device=work.device)
    for start in range(0, n, _TOTALS_CHUNK):
        sl = slice(start, start + _TOTALS_CHUNK)
        total += (inv[..., sl] @ work[..., sl, :]).squeeze(-2).to(torch.float64)
    return total


def _dsink_scaling(
    log_k: torch.Tensor, r: torch.Tensor, max_iter: int, tol: float, want_log_v: bool = False
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Sinkhorn on the D-SINK problem with the sample potential eliminated, in the log domain.

    Every sample carries mass 1, so for a class potential ``log_u`` the sample potential is exact:
    ``q_i = softmax_c(log_k_i + log_u)``. One iteration is then ``log_u += log r - log s`` with
    ``s_c = sum_i q_ic``, the same update as the row/column half-steps of :func:`sinkhorn` but with one
    exponential pass over N x C instead of two: ``log_k + log_u - max(log_u)`` is <= 0 for
    log-probabilities, so it is exponentiated in place without a per-row maximum, rows are normalised by
    their sum, and ``s`` is a matrix-vector product. Rows whose sum leaves the normal range (teachers
    that confidently disagree, ``log_u`` spread over more than ~80 nats, or unnormalised inputs) are
    recomputed with their exact maximum, and a class whose every ``q_ic`` underflows gets its total
    from a log-domain ``logsumexp``, so no step forms ``log 0`` or loses a class.
    """
    low_sum = torch.finfo(log_k.dtype).tiny * 1e6
    pos = r > 0
    log_r = torch.where(pos, r, 1.0).log().to(log_k.dtype)  # finite; only read where pos
    r = r.to(torch.float64)  # class totals are compared in float64 (see _class_totals)
    inv_r = 1.0 / r.clamp(min=1.0)  # err = max_c |s_c - r_c| / max(r_c, 1)
    # log-probabilities are <= 0, so log_k is a safe shift already; rows whose sum leaves the normal range
    # (strongly disagreeing confident teachers, or inputs that are not normalised) are redone exactly
    ones = torch.ones(log_k.shape[-1], dtype=log_k.dtype, device=log_k.device)
    high_sum = torch.finfo(log_k.dtype).max / (4 * log_k.shape[-1])
    neg_inf = torch.full_like(r, _NEG_INF, dtype=log_k.dtype)
    log_u = torch.where(pos, 0.0, neg_inf)
    work = torch.empty_like(log_k)
    n_iter = 0

    def measure(sums: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """Class totals, and in one device sync: the error, the row-sum range, the least total with mass."""
        s = _class_totals(work, sums)
        err = ((s - r).abs() * inv_r).amax()
        stats = torch.stack((err, sums.amin(), sums.amax(), torch.where(pos, s, 1.0).amin())).tolist()
        return s, stats

    while True:
        # exp of the log-plan rows shifted by a bound on their maximum (log_u <= 0 after the shift)
        shifted_u = (log_u - log_u.amax(-1, keepdim=True)).unsqueeze(-2)
        torch.add(log_k, shifted_u, out=work).exp_()
        sums = work @ ones
        s, (err, min_sum, max_sum, min_s) = measure(sums)
        if not (low_sum <= min_sum and max_sum <= high_sum):  # rare: rows redone with their exact maximum
            z = log_k + shifted_u
            redo = (sums < low_sum) | (sums > high_sum) | ~torch.isfinite(sums)
            shift = torch.where(redo, z.amax(-1), 0.0)
            torch.exp(z - shift.unsqueeze(-1), out=work)
            sums = work @ ones
            s, (err, _, _, min_s) = measure(sums)
        if err <= tol or n_iter >= max_iter:
            break
        log_s = s.log().to(log_u.dtype)
        if min_s <= 0:  # a class whose every q underflowed: its total in the log domain
            z = log_k + log_u.unsqueeze(-2)
            log_q = z - torch.logsumexp(z, -1, keepdim=True)
            log_s = torch.where(pos & (s <= 0), torch.logsumexp(log_q, -2), log_s)
        log_u = torch.where(pos, log_u + (log_r - log_s), neg_inf)
        n_iter += 1
    q = work.div_(sums.unsqueeze(-1))
    log_u = log_u - log_u.amax(-1, keepdim=True)
    info: dict[str, Any] = {"n_iter": n_iter, "err": err, "log_u": log_u}
    if want_log_v:
        info["log_v"] = -torch.logsumexp(log_k + log_u.unsqueeze(-2), -1)
    return q, info
