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
vector ``u`` chosen so that the class totals come out as ``r``. A per-class offset added to ``log f_N`` or
``log f`` (a change of prior) is absorbed by ``u`` and leaves ``Q`` unchanged; only ``r`` depends on a prior.

Nothing here runs textbook Sinkhorn on ``K = exp(-P / reg)``: with confident networks the
log-probabilities reach -1e4, ``K`` then underflows to 0 in float32 and float64 alike, and the classical
``u = a / (K v)`` iterations divide 0 by 0. The D-SINK solvers iterate the class potential in the log
domain; :func:`sinkhorn` iterates scalings on a log-plan into which they are absorbed before they leave a
safe range, and takes log-domain (``logsumexp``) steps where a sum would underflow. Zero-mass classes
(``log 0 = -inf``) are handled explicitly so that no ``-inf - (-inf)`` is ever formed.

Stopping rule, the same in every entry point: iterate until the marginal that the last half-step does not
enforce exactly is met to a relative tolerance per entry,

    err = max_{j : t_j > 0} |m_j - t_j| / t_j  <=  tol,

``m`` the achieved and ``t`` the target marginal. Entries with ``t_j = 0`` are exact by construction (their
potential is ``-inf``). For D-SINK ``t = r``, the class totals: a class of 5 samples among 10^5 is held to
the same relative accuracy as the largest class. ``tol=None`` selects :func:`default_tol` of the dtype the
solver computes in: ``1e-9`` in float64, ``100 eps = 1.19e-5`` in float32, both reachable in that dtype.

Public API:

* :func:`sinkhorn` -- generic entropic OT with POT's argument conventions, optional batch dimension.
* :func:`class_scaling` / :func:`apply_class_scaling` -- the D-SINK problem at dataset scope
  (N up to ~1e6 samples), processed in row chunks so memory stays O(chunk_size * C).
* :func:`dsink_targets` -- the surrogate labels ``Q`` from the three teachers' outputs; with
  ``all_reduce`` the rows of one global batch may be spread over several processes.
* :func:`relative_marginal_error` -- the stopping measure above, for checking any plan.

The module is pure math: torch only, no ``torch.nn``, no file I/O. Results are returned detached.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, Literal, overload

import torch

__all__ = [
    "AllReduce",
    "SinkhornConvergenceWarning",
    "apply_class_scaling",
    "class_scaling",
    "default_tol",
    "dsink_targets",
    "relative_marginal_error",
    "sinkhorn",
]

_NEG_INF = float("-inf")
#: :func:`sinkhorn` keeps its scalings within exp(+-30) of the absorbed log-plan (see there)
_SCALING_RANGE = 30.0

#: ``all_reduce(t)`` returns the elementwise sum of ``t`` over all ranks (it may work in place), the same
#: values on every rank; with ``torch.distributed``: ``def all_reduce(t): dist.all_reduce(t); return t``.
AllReduce = Callable[[torch.Tensor], torch.Tensor]


class SinkhornConvergenceWarning(UserWarning):
    """Sinkhorn stopped at ``max_iter`` before the marginals were met within ``tol``.

    The returned plan is still usable (it is the exact Sinkhorn iterate), but its marginals are off by
    the error reported in the message; raise ``max_iter`` or ``reg``, or loosen ``tol``.
    """


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def default_tol(dtype: torch.dtype) -> float:
    """Default ``tol`` of every solver here for a computation in ``dtype``: ``max(1e-9, 100 * eps)``.

    That is ``1e-9`` for float64 and ``1.19e-5`` for float32. The achieved marginals are sums of rounded
    exponentials, so the relative error has a floor of a few ``eps`` (more for sums over many entries);
    100 ``eps`` leaves a margin that float32 problems from 128 x 10 to 10^6 x 10 meet (tested).
    """
    return max(1e-9, 100.0 * torch.finfo(dtype).eps)


def relative_marginal_error(achieved: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The stopping measure: ``max_j |achieved_j - target_j| / target_j`` over entries with ``target_j > 0``.

    Both tensors have the same shape (any leading batch dimensions; the maximum is over all entries). An
    entry with ``target_j = 0`` counts as 0 if ``achieved_j = 0`` and as ``inf`` otherwise: every solver
    here makes such entries exactly 0. Computed in float64; returned as a 0-dim tensor (no device sync).
    """
    achieved = achieved.to(torch.float64)
    target = target.to(torch.float64)
    pos = target > 0
    rel = (achieved - target).abs() / torch.where(pos, target, 1.0)
    zero_ok = torch.where(achieved == 0, 0.0, math.inf)
    return torch.where(pos, rel, zero_ok).amax()


def _resolve_tol(tol: float | None, dtype: torch.dtype) -> float:
    return default_tol(dtype) if tol is None else float(tol)


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


def _check_iter_args(max_iter: int, tol: float | None, check_every: int) -> None:
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if tol is not None and not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if int(check_every) < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")


def _warn_not_converged(what: str, n_iter: int, err: float, tol: float) -> None:
    warnings.warn(
        f"{what} did not converge in {n_iter} iterations: relative marginal error {err:.3e} > tol {tol:.3e}",
        SinkhornConvergenceWarning,
        stacklevel=3,
    )


_TOTALS_BLOCK = 512


def _column_sums(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i x_ic`` in float64, from products in ``x``'s dtype over blocks of 512 rows.

    A float32 matrix-vector product accumulates its rounding along the rows: over 65,536 rows the class
    totals came out ~1e-5 relative off, over 10^6 rows ~1e-4, which stalls a relative tolerance of that
    order. One batched product over blocks of 512 rows (one call) keeps each partial sum near 1e-7, and the
    partials add up in float64: 2e-8 relative at 10^6 x 10, no slower than one long product.
    ``x`` is ``(…, n, C)``, ``w`` is ``(…, n)``.
    """
    n = x.shape[-2]
    m = n - n % _TOTALS_BLOCK
    lead = x.shape[:-2]
    total = torch.zeros(lead + x.shape[-1:], dtype=torch.float64, device=x.device)
    if m:
        xb = x[..., :m, :].reshape(*lead, m // _TOTALS_BLOCK, _TOTALS_BLOCK, x.shape[-1])
        wb = w[..., :m].reshape(*lead, m // _TOTALS_BLOCK, 1, _TOTALS_BLOCK)
        total += torch.matmul(wb, xb).sum((-3, -2), dtype=torch.float64)
    if m < n:
        total += (w[..., m:].unsqueeze(-2) @ x[..., m:, :]).squeeze(-2).to(torch.float64)
    return total


def _row_sums(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_j x_ij w_j`` in float64, ``x`` ``(…, n, m)``, ``w`` ``(…, m)``: the twin of :func:`_column_sums`.

    Up to 512 columns, one matrix-vector product in ``x``'s dtype; beyond, products summed within blocks of
    512 columns (one pass with a temporary of ``x``'s size) and the block partials in float64.
    """
    m = x.shape[-1]
    if m <= _TOTALS_BLOCK:
        return (x @ w.unsqueeze(-1)).squeeze(-1).to(torch.float64)
    mm = m - m % _TOTALS_BLOCK
    xb = x[..., :mm].reshape(*x.shape[:-1], mm // _TOTALS_BLOCK, _TOTALS_BLOCK)
    wb = w[..., :mm].reshape(*w.shape[:-1], 1, mm // _TOTALS_BLOCK, _TOTALS_BLOCK)
    total = (xb * wb).sum(-1).sum(-1, dtype=torch.float64)
    if mm < m:
        total += (x[..., mm:] @ w[..., mm:].unsqueeze(-1)).squeeze(-1).to(torch.float64)
    return total


# ----------------------------------------------------------------------------------------------------
# generic Sinkhorn
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
    tol: float | None = ...,
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
    tol: float | None = ...,
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
    tol: float | None = None,
    check_every: int = 10,
    log: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
    """Entropic optimal transport plan by Sinkhorn iterations, stabilised in the log domain.

    Solves ``min_T <T, M> + reg * sum T log T`` over plans ``T >= 0`` with ``T 1 = a`` and
    ``T^T 1 = b``, with POT's argument conventions (``ot.sinkhorn(a, b, M, reg)``): the solution is
    ``T = diag(u) K diag(v)``, ``K = exp(-M / reg)``. One iteration is a column update followed by a row
    update, POT's order,

        v <- b / (K^T u),        u <- a / (K v),

    so after ``k`` iterations the plan is POT's ``sinkhorn`` / ``sinkhorn_log`` iterate ``k`` (tested).

    Numerics. ``K`` underflows to exactly 0 as soon as ``M / reg`` exceeds ~87 (float32) or ~745
    (float64) -- routine for costs built from log-probabilities of confident networks -- and the textbook
    update then divides 0 by 0. So the solver keeps the log-plan ``L`` of the last *absorption* and iterates
    the scalings on ``K = exp(L)``: two matrix-vector products per iteration and no exponential. When an
    update would leave ``[exp(-30), exp(30)]``, or meets a zero or non-finite sum, the last scalings are
    absorbed (``L += log u + log v``, ``u = v = 1``) and that iteration runs in the log domain,
    ``log v += log b - logsumexp_i L`` then ``log u += log a - logsumexp_j L``, which neither under- nor
    overflows; ``K`` is recomputed from ``L`` (one exponential pass) at the next check. Within the range
    ``u_i v_j <= exp(60)``, so an entry of ``K`` that underflowed (< 1.4e-45 in float32) stands for less
    than 2e-19 of mass. ``L`` is updated in place rather than recomputed as ``-M / reg`` plus potentials
    (which adds numbers of magnitude ``M / reg`` and cancels them), so entries that carry mass stay at full
    relative precision; row and column sums are accumulated in float64 over blocks of 512.

    Stopping: right after the row update ``T 1 = a`` up to rounding, so the convergence measure is the
    columns' relative error (:func:`relative_marginal_error`, the rule of every solver here)

        err_b = max_{j : b_j > 0} |sum_i T_ij - b_j| / b_j,

    and the iteration stops at the first check with ``err_b <= tol``.

    Args:
        a: first marginal, shape ``(n,)`` or ``(B, n)``; non-negative. Zero entries are allowed: their
            row of the plan is exactly 0 (their potential is ``-inf``).
        b: second marginal, shape ``(m,)`` or ``(B, m)``; non-negative, same total mass as ``a`` (up to a
            dtype-dependent relative tolerance; ``b`` is rescaled to ``a``'s mass).
        M: cost matrix, shape ``(n, m)`` or ``(B, n, m)``. Sets dtype and device of the computation.
            ``+inf`` marks forbidden transports; NaN and ``-inf`` are rejected.
        reg: entropic weight ``> 0``.
        max_iter: maximum number of Sinkhorn iterations (one column plus one row update each).
        tol: bound on ``err_b``, the relative error of the column sums; ``None`` selects
            :func:`default_tol` of ``M``'s dtype (``1e-9`` float64, ``1.19e-5`` float32).
        check_every: check the error every this many iterations (each check costs a device sync).
        log: also return a dict with ``n_iter`` (iterations run), ``n_log_iter`` (how many of them ran in
            the log domain), ``err`` (the larger of the relative errors of the returned plan's row and
            column sums, over all batch problems), ``log_u`` and
            ``log_v`` (dual potentials divided by ``reg``, such that
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
    tol = _resolve_tol(tol, M.dtype)
    dtype = M.dtype
    log_a, log_b = _safe_log(a), _safe_log(b)
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    has_a, has_b = a > 0, b > 0
    lo, hi = math.exp(-_SCALING_RANGE), math.exp(_SCALING_RANGE)

    L = M / (-reg)  # fresh tensor: the log-plan at the last absorption, updated in place
    log_u = torch.zeros_like(a)  # potentials absorbed into L
    log_v = torch.zeros_like(b)
    K: torch.Tensor | None = L.exp()  # None while in the log domain
    u, v = torch.ones_like(a), torch.ones_like(b)  # plan = diag(u) exp(L) diag(v)
    n_iter = n_log_iter = 0
    err_b = math.inf
    converged = False
    while True:
        check = n_iter > 0 and (n_iter % check_every == 0 or n_iter >= max_iter)
        if K is None and check:
            K = L.exp()  # retry the scaling domain from the absorbed log-plan
            u, v = torch.ones_like(a), torch.ones_like(b)
        if K is not None:
            ktu = _column_sums(K, u)  # column sums of diag(u) K, float64
            if check:
                err_b = relative_marginal_error(v * ktu, b).item()
                if err_b <= tol:
                    converged = True
                    break
            if n_iter >= max_iter:
                break
            v_new = torch.where(has_b, b64 / ktu, 0.0)
            kv = _row_sums(K, v_new.to(dtype))
            u_new = torch.where(has_a, a64 / kv, 0.0)
            # all scalings with mass finite, positive and in range, else this iteration is a log-domain one
            bounds = torch.stack(
                (
                    torch.where(has_b, v_new, hi).amin(),
                    torch.where(has_b, v_new, lo).amax(),
                    torch.where(has_a, u_new, hi).amin(),
                    torch.where(has_a, u_new, lo).amax(),
                )
            ).tolist()
            if lo <= bounds[0] and bounds[1] <= hi and lo <= bounds[2] and bounds[3] <= hi:
                u, v = u_new.to(dtype), v_new.to(dtype)
                n_iter += 1
                continue
            # absorb the last good scalings into the log-plan and take this iteration in the log domain
            du, dv = _safe_log(u), _safe_log(v)
            L.add_(du.unsqueeze(-1)).add_(dv.unsqueeze(-2))
            log_u.add_(du)
            log_v.add_(dv)
            K = None
        lse_col = torch.logsumexp(L, dim=-2)  # log column sums of the current plan
        if check:
            err_b = relative_marginal_error(lse_col.exp(), b).item()
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
        n_log_iter += 1

    if K is not None:
        plan = K.mul_(u.unsqueeze(-1)).mul_(v.unsqueeze(-2))
        log_u = log_u + _safe_log(u)
        log_v = log_v + _safe_log(v)
    else:
        plan = L.exp_()
    err = max(relative_marginal_error(plan.sum(-1), a).item(), err_b)
    if not converged:
        _warn_not_converged("sinkhorn", n_iter, err, tol)
    if log:
        return plan, {"n_iter": n_iter, "n_log_iter": n_log_iter, "err": err, "log_u": log_u, "log_v": log_v}
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
    tol: float | None = ...,
    chunk_size: int = ...,
    check_every: int = ...,
    log: Literal[False] = ...,
) -> torch.Tensor: ...


@overload
def class_scaling(
    log_kernel: torch.Tensor,
    r: torch.Tensor,
    max_iter: int = ...,
    tol: float | None = ...,
    chunk_size: int = ...,
    check_every: int = ...,
    *,
    log: Literal[True],
) -> tuple[torch.Tensor, dict[str, Any]]: ...


def class_scaling(
    log_kernel: torch.Tensor,
    r: torch.Tensor,
    max_iter: int = 1000,
    tol: float | None = None,
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

    One update is one iteration of :func:`sinkhorn` on ``M = -log_kernel^T`` (classes x samples) with
    ``a = r / N`` and ``b = 1 / N``, ``reg = 1``: the sample half-step is the row softmax, the class half-step
    the update of ``log_u``. Convergence is the relative error of the class totals,

        err = max_{c : r_c > 0} |s_c - r_c| / r_c  <=  tol,

    the rule of every solver here (:func:`relative_marginal_error`): a tail class of 5 samples among 10^5
    is met to ``tol`` relative, not to ``tol * N`` absolute. Classes with ``r_c = 0`` are exact.

    Args:
        log_kernel: shape ``(N, C)``, per-sample log-scores, i.e. ``-P / reg`` (``-inf`` = forbidden).
        r: class totals, shape ``(C,)``, non-negative, summing to N (rescaled to N exactly). Classes with
            ``r_c = 0`` get ``log_u_c = -inf`` and ``q[:, c] = 0``.
        max_iter: maximum number of scaling updates (each is one pass over the N rows).
        tol: bound on ``err``; ``None`` selects :func:`default_tol` of ``log_kernel``'s dtype (the dtype
            of the exponentials; the totals are accumulated in float64).
        chunk_size: rows per chunk.
        check_every: compare the error with ``tol`` every this many updates (each check syncs the device).
        log: also return ``{"n_iter": int, "err": float}`` (``err`` as above, after the last update).

    Returns:
        ``log_u`` (float64, shape ``(C,)``, shifted so its largest entry is 0), or ``(log_u, info)``.

    Warns:
        SinkhornConvergenceWarning: if ``max_iter`` is reached before ``tol``.
    """
    _check_iter_args(max_iter, tol, check_every)
    r64 = _validate_class_problem(log_kernel, r, int(chunk_size))
    log_kernel = log_kernel.detach()
    tol = _resolve_tol(tol, log_kernel.dtype)
    chunk_size = int(chunk_size)
    log_r = _safe_log(r64)
    log_u = torch.where(r64 > 0, 0.0, _NEG_INF).to(torch.float64)

    log_s = _log_class_totals(log_kernel, log_u, chunk_size)
    n_iter = 0
    err = math.inf
    converged = False
    while True:
        if n_iter % check_every == 0 or n_iter >= max_iter:
            err = relative_marginal_error(log_s.exp(), r64).item()
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


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _raise_everywhere(error: ValueError | None, all_reduce: AllReduce | None, device: torch.device) -> None:
    """Raise ``error`` on this rank; with ``all_reduce``, raise on every rank when any rank has one.

    A data-dependent error found on one rank must stop all of them, else the others would wait forever in
    the next collective. One collective, only on the (rare) paths where some rank may have found an error.
    """
    if all_reduce is not None:
        flag = torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64, device=device)
        if error is None and all_reduce(flag).item() > 0:
            raise ValueError(
                "dsink_targets: an input on another rank is invalid (that rank's error names it)"
            )
        if error is not None:
            all_reduce(flag)
    if error is not None:
        raise error


def _global_logsumexp(log_x: torch.Tensor, reduce: AllReduce) -> torch.Tensor:
    """``log sum_ranks exp(log_x)`` (float64) with a collective that can only sum.

    Each rank's values are shifted by a common reference ``m`` before ``exp``: first the mean of the finite
    values over the ranks (which is at most their maximum, so the largest term is >= 1 and the sum cannot
    underflow), raised by 700 nats wherever the sum overflows. Every rank sees the same sums, so they take
    the same branches. With one process (``reduce`` the identity) this returns ``log_x`` (up to rounding).
    """
    k = log_x.numel()
    flat = log_x.reshape(-1).to(torch.float64)
    finite = torch.isfinite(flat)
    packed = reduce(torch.cat((torch.where(finite, flat, 0.0), finite.to(torch.float64))))
    m = packed[:k] / packed[k:].clamp(min=1.0)
    while True:
        total = reduce(torch.exp(flat - m))
        overflow = torch.isinf(total)
        if not bool(overflow.any()):
            return (m + torch.log(total)).reshape(log_x.shape)
        m = torch.where(overflow, m + 700.0, m)


@overload
def dsink_targets(
    log_p_noise: torch.Tensor,
    log_p_student: torch.Tensor,
    p_imbalance: torch.Tensor,
    *,
    reg: float = ...,
    temperature: float = ...,
    max_iter: int = ...,
    tol: float | None = ...,
    all_reduce: AllReduce | None = ...,
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
    tol: float | None = ...,
    all_reduce: AllReduce | None = ...,
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
    tol: float | None = None,
    all_reduce: AllReduce | None = None,
    log: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
    """D-SINK surrogate labels ``Q`` (see the module docstring for the objective).

    The cost is ``P_ic = -(log f_N(x_i)_c + log f(x_i)_c)``, the class totals ``r = sum_i f_L(x_i)``,
    and every sample carries mass 1. With the default ``reg = 2`` the solution is
    ``q_i ∝ u ⊙ sqrt(f_N(x_i) ⊙ f(x_i))``. This is :func:`sinkhorn` on ``M = P^T`` with marginals
    ``r`` (classes) and ``1`` (samples), solved with the sample potential eliminated: each row of ``Q``
    is a softmax, so rows sum to 1 exactly and only the class potential ``log u`` is iterated,

        q_ic = exp(log k_ic + log u_c) / sum_c' exp(log k_ic' + log u_c'),   log k = -P / reg,
        s_c  = sum_i q_ic,        log u  <-  log u + log r - log s,

    It stops when the class totals meet ``err = max_{c : r_c > 0} |s_c - r_c| / r_c <= tol``
    (:func:`relative_marginal_error`), the rule of every solver here. The exponentials are taken once, after
    subtracting each row's maximum; the iterations rescale their columns by ``exp(log u - log u0)`` (two
    matrix-vector products each), and the exponentials are retaken from the log domain when that factor
    leaves ``[exp(-30), exp(30)]`` or a class's total underflows (see ``_dsink_scaling``).

    At dataset scope (N ~ 1e6) use :func:`class_scaling`, which never materialises N x C temporaries.

    Distributed use: with ``all_reduce``, each process passes only its own rows of one global batch.
    ``all_reduce(t)`` must return the elementwise sum of ``t`` over all ranks, the same values on every
    rank (it may work in place), e.g. ``torch.distributed.all_reduce(t); return t``. The class totals
    ``r`` (so the rescaling to the global ``N``), the achieved totals ``s`` at every iteration, the input
    checks and the log-domain fallbacks are reduced over the ranks; the error and the stopping decision are
    computed from the reduced totals, so every rank runs the same iterations and returns its rows of the
    single-process solution on the concatenated batch (to rounding). A rank may hold zero rows. A
    data-dependent error (NaN, negative mass, an infeasible class) raises ``ValueError`` on every rank;
    wrong types or shapes raise on the rank that has them, before any collective.

    Args:
        log_p_noise: ``(N, C)`` or ``(B, N, C)`` log-probabilities of the noise-robust teacher ``f_N``.
        log_p_student: same shape, log-probabilities of the student ``f`` (gradients are not tracked).
        p_imbalance: same shape, probabilities of the imbalance-robust teacher ``f_L`` (non-negative; only
            their column totals matter, rescaled to sum to N).
        reg: entropic weight (2 for the D-SINK objective).
        temperature: if not 1, each log-probability is re-normalised as ``log_softmax(log_p / T)`` first.
        max_iter: maximum Sinkhorn iterations.
        tol: bound on ``err``, the largest relative error of a class total; ``None`` selects
            :func:`default_tol` of the inputs' dtype (``1e-9`` float64, ``1.19e-5`` float32).
        all_reduce: sum over ranks (see above); ``None`` for one process.
        log: also return the solver info: ``n_iter``, ``n_absorb`` (re-absorptions of the class scalings,
            usually 0), ``err`` (the class-total error that ``tol`` bounds, global), ``log_u`` (class
            potential, ``(…, C)``, largest entry 0), ``log_v`` (sample potential, ``(…, N)``, this rank's
            rows), ``row_err`` = ``max_i |sum_c Q_ic - 1|`` over this rank's rows and ``class_err`` (the
            same as ``err``).

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
    if log_p_noise.shape[-1] == 0:
        raise ValueError(f"log_p_noise must have at least one class, got shape {tuple(log_p_noise.shape)}")
    reg = _check_positive_scalar(reg, "reg")
    temperature = _check_positive_scalar(temperature, "temperature")
    _check_iter_args(max_iter, tol, 1)
    reduce = _identity if all_reduce is None else all_reduce

    lp_noise = log_p_noise.detach()
    lp_student = log_p_student.detach().to(lp_noise.dtype)
    if temperature != 1.0:
        lp_noise = torch.log_softmax(lp_noise / temperature, dim=-1)
        lp_student = torch.log_softmax(lp_student / temperature, dim=-1)
    # log kernel -P / reg, (…, N, C); -inf where a teacher gives probability 0
    log_k = (lp_noise + lp_student).div_(reg)
    tol = _resolve_tol(tol, log_k.dtype)
    n, c = log_k.shape[-2], log_k.shape[-1]
    dev = log_k.device
    p_l = p_imbalance.detach().to(log_k.dtype)
    # One collective carries this rank's class totals, its row count and three flags. The flags are cheap on
    # the common path: the sum of the row sums (a matrix-vector product) is finite exactly when no input
    # holds NaN or +-inf; only then do the checks that name the problem run.
    r_local = _column_sums(p_l, torch.ones(n, dtype=p_l.dtype, device=dev))  # (…, C) float64
    log_k_sum = (log_k @ torch.ones(c, dtype=log_k.dtype, device=dev)).sum()
    flags = torch.stack((~torch.isfinite(log_k_sum), ~torch.isfinite(r_local.sum()), (p_l < 0).any()))
    packed = reduce(
        torch.cat(
            (r_local.reshape(-1), torch.tensor([float(n)], dtype=torch.float64, device=dev), flags.double())
        )
    )
    k = r_local.numel()
    r = packed[:k].reshape(r_local.shape)
    n_total = packed[k]
    nonfinite_k, nonfinite_p, negative_p = (packed[k + 1 :] > 0).tolist()
    if nonfinite_k or nonfinite_p or negative_p:
        error: ValueError | None = None
        try:
            if nonfinite_k:
                _check_log_probs(log_p_noise, "log_p_noise")
                _check_log_probs(log_p_student, "log_p_student")
            if nonfinite_p:
                _check_finite(p_imbalance, "p_imbalance")
            if negative_p and bool((p_l < 0).any()):
                raise ValueError(
                    "p_imbalance has negative entries (expected probabilities, not log-probabilities)"
                )
        except ValueError as e:
            error = e
        _raise_everywhere(error, all_reduce, dev)
    total = r.sum(-1, keepdim=True)
    if bool((total <= 0).any()):
        raise ValueError("p_imbalance has zero total mass")
    r = r * (n_total / total)
    if nonfinite_k:  # -inf log-probabilities (probability 0): is every mass-carrying row and class reachable?
        open_ = log_k > _NEG_INF
        row_stuck = ~(open_ & (r > 0).unsqueeze(-2)).any(-1)
        reached = open_.any(-2)
        packed = reduce(torch.cat((row_stuck.any().double().reshape(1), reached.double().reshape(-1))))
        if packed[0].item() > 0:
            raise ValueError(
                "infeasible problem: a sample has probability 0 under a teacher for every class with r > 0"
            )
        if not bool(((packed[1:].reshape(r.shape) > 0) | (r <= 0)).all()):
            raise ValueError(
                "infeasible problem: a class with r > 0 has probability 0 under a teacher for every sample"
            )
    q, info = _dsink_scaling(log_k, r, int(max_iter), tol, reduce, want_log_v=log)
    if info["err"] > tol:
        _warn_not_converged("dsink_targets", info["n_iter"], info["err"], tol)
    if log:
        info["row_err"] = (q.sum(-1) - 1).abs().amax().item() if q.numel() else 0.0
        info["class_err"] = info["err"]
        return q, info
    return q


def _dsink_scaling(
    log_k: torch.Tensor,
    r: torch.Tensor,
    max_iter: int,
    tol: float,
    reduce: AllReduce,
    want_log_v: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Sinkhorn on the D-SINK problem with the sample potential eliminated, stabilised in the log domain.

    Every sample carries mass 1, so for a class potential ``log_u`` the sample potential is exact:
    ``q_i = softmax_c(log_k_i + log_u)``. One iteration is ``log_u += log r - log s`` with
    ``s_c = sum_i q_ic`` (``reduce``-summed over the ranks): the row and column half-steps of
    :func:`sinkhorn` in one. The exponentials are taken once per *absorption*: ``K = exp(z - max_c z)``
    with ``z = log_k + log_u0`` (every row's largest entry exactly 1), and until the next one

        w = exp(log_u - log_u0),    q_ic = K_ic w_c / sum_c' K_ic' w_c',

    two matrix-vector products per iteration. ``log_u0`` is re-absorbed when ``log_u - log_u0`` leaves
    ``[-30, 30]``: within it an entry of ``K`` that underflowed (< 1.4e-45 of its row's largest in
    float32) stands for less than 2e-19 of the row's mass. A class whose every ``q_ic`` underflows gets its
    total from a log-domain ``logsumexp`` (reduced over the ranks by :func:`_global_logsumexp`), so no step
    forms ``log 0`` or loses a class, and is then re-absorbed. Every decision is taken from reduced
    quantities or from ``log_u``, which all ranks share, so all ranks take the same branches.
    """
    dtype = log_k.dtype
    pos = r > 0
    log_r = torch.where(pos, r, 1.0).log()  # float64, finite; only read where pos
    neg_inf = torch.full(r.shape, _NEG_INF, dtype=torch.float64, device=r.device)
    log_u = torch.where(pos, 0.0, neg_inf)
    K = torch.empty_like(log_k)

    def absorb(log_u: torch.Tensor) -> torch.Tensor:
        """K = exp(log_k + log_u - row max) in place; returns the absorbed potential."""
        shifted = (log_u - log_u.amax(-1, keepdim=True)).to(dtype).unsqueeze(-2)
        torch.add(log_k, shifted, out=K)
        K.sub_(K.amax(-1, keepdim=True)).exp_()
        return log_u.clone()

    log_u0 = absorb(log_u)
    n_iter = n_absorb = 0
    while True:
        d = torch.where(pos, log_u - log_u0, 0.0)
        w = torch.where(pos, d.exp(), 0.0)
        sums = (K @ w.to(dtype).unsqueeze(-1)).squeeze(-1)  # row sums of K diag(w)
        s = reduce(_column_sums(K, sums.reciprocal()) * w)
        err, min_s, d_max, d_min = torch.stack(
            (relative_marginal_error(s, r), torch.where(pos, s, 1.0).amin(), d.amax(), d.amin())
        ).tolist()
        if not (-_SCALING_RANGE <= d_min and d_max <= _SCALING_RANGE):
            log_u0 = absorb(log_u)  # the scalings left their range: this iteration again, from a new K
            n_absorb += 1
            continue
        if err <= tol or n_iter >= max_iter:
            break
        log_s = s.log()
        if min_s <= 0:  # a class whose every q underflowed: its total in the log domain
            z = log_k + log_u.to(dtype).unsqueeze(-2)
            log_q = z - torch.logsumexp(z, -1, keepdim=True)
            log_total = _global_logsumexp(torch.logsumexp(log_q, -2), reduce)
            log_s = torch.where(pos & (s <= 0), log_total, log_s)
        log_u = torch.where(pos, log_u + (log_r - log_s), neg_inf)
        n_iter += 1
    q = K.mul_(w.to(dtype).unsqueeze(-2)).div_(sums.unsqueeze(-1))
    log_u = log_u - log_u.amax(-1, keepdim=True)
    info: dict[str, Any] = {"n_iter": n_iter, "n_absorb": n_absorb, "err": err, "log_u": log_u.to(dtype)}
    if want_log_v:
        info["log_v"] = -torch.logsumexp(log_k + info["log_u"].unsqueeze(-2), -1)
    return q, info
