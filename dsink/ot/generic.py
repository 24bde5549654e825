"""Generic entropic optimal transport: :func:`sinkhorn`, log-stabilised, with POT's argument conventions."""

from __future__ import annotations

import math
from typing import Any, Literal, overload

import torch

from dsink.ot.core import (
    SCALING_RANGE,
    check_finite,
    check_iter_args,
    check_positive_scalar,
    check_tensor,
    column_sums,
    iterate,
    log_ratio,
    mass_rtol,
    relative_marginal_error,
    resolve_tol,
    row_sums,
    safe_log,
    warn_if_stopped_early,
)


def _check_shapes(a: torch.Tensor, b: torch.Tensor, M: torch.Tensor) -> None:
    """Types, shapes and devices of :func:`sinkhorn`'s arguments."""
    for x, name in ((a, "a"), (b, "b"), (M, "M")):
        check_tensor(x, name)
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


def _check_values(
    a: torch.Tensor, b: torch.Tensor, M: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(a, b, M)`` detached in ``M``'s dtype, checked, with ``b`` rescaled to carry ``a``'s mass exactly.

    The totals must agree within :func:`~dsink.ot.core.mass_rtol`; without the rescaling their rounding gap
    would be a floor under the marginal error and a tight ``tol`` could never be reached.
    """
    M = M.detach()
    a = a.detach().to(M.dtype)
    b = b.detach().to(M.dtype)
    check_finite(a, "a")
    check_finite(b, "b")
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
    rtol = mass_rtol(M.dtype)
    gap = ((sa - sb).abs() / torch.maximum(sa, sb)).max().item()
    if gap > rtol:
        raise ValueError(
            f"a and b must have the same total mass: totals {sa.tolist()} vs {sb.tolist()} "
            f"(relative gap {gap:.3e} > {rtol:.1e})"
        )
    return a, b * (sa / sb).unsqueeze(-1), M


def _check_feasible(a: torch.Tensor, b: torch.Tensor, M: torch.Tensor) -> None:
    """Every row/column with mass reaches the other side's support through a finite cost.

    Otherwise its potential would have to be ``+inf``.
    """
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


def _in_scaling_range(u: torch.Tensor, has_a: torch.Tensor, v: torch.Tensor, has_b: torch.Tensor) -> bool:
    """Every scaling with mass is finite and within ``[exp(-30), exp(30)]`` (one device sync)."""
    lo, hi = math.exp(-SCALING_RANGE), math.exp(SCALING_RANGE)
    v_lo, v_hi, u_lo, u_hi = torch.stack(
        (
            torch.where(has_b, v, hi).amin(),
            torch.where(has_b, v, lo).amax(),
            torch.where(has_a, u, hi).amin(),
            torch.where(has_a, u, lo).amax(),
        )
    ).tolist()
    return lo <= v_lo and v_hi <= hi and lo <= u_lo and u_hi <= hi


class _Plan:
    """The iterate ``T = diag(u) exp(L) diag(v)`` of :func:`sinkhorn`.

    ``L`` is the log-plan at the last absorption, ``log_u``/``log_v`` the potentials absorbed into it.
    In the scaling domain ``K = exp(L)`` is kept and a step costs two matrix-vector products; after an
    absorption ``K`` is ``None`` and steps are ``logsumexp`` half-steps on ``L`` until the next check
    retries the scaling domain. ``sums`` caches the column sums that :meth:`error` computed for
    :meth:`step` (``K^T u`` in the scaling domain, ``logsumexp_i L`` in the log domain).
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, M: torch.Tensor, reg: float) -> None:
        self.a, self.b, self.dtype = a, b, M.dtype
        self.log_a, self.log_b = safe_log(a), safe_log(b)
        self.a64, self.b64 = a.to(torch.float64), b.to(torch.float64)
        self.has_a, self.has_b = a > 0, b > 0
        self.L = M / (-reg)  # a fresh tensor, updated in place
        self.log_u, self.log_v = torch.zeros_like(a), torch.zeros_like(b)
        self.K: torch.Tensor | None = self.L.exp()
        self.u, self.v = torch.ones_like(a), torch.ones_like(b)
        self.sums: torch.Tensor | None = None
        self.absorbed = False  # an absorption since the last step: the next check measures the log-plan
        self.n_log_iter = 0

    def error(self) -> float:
        """Relative error of the column sums; a check in the log domain first retries the scaling domain."""
        if self.K is None and not self.absorbed:
            self.K = self.L.exp()
            self.u, self.v = torch.ones_like(self.a), torch.ones_like(self.b)
        if self.K is not None:
            self.sums = column_sums(self.K, self.u)
            return relative_marginal_error(self.v * self.sums, self.b).item()
        self.sums = torch.logsumexp(self.L, dim=-2)
        return relative_marginal_error(self.sums.exp(), self.b).item()

    def step(self) -> bool:
        """``v <- b / K^T u`` then ``u <- a / K v``; in the log domain if a scaling would leave its range."""
        sums, self.sums = self.sums, None
        if self.K is not None:
            ktu = column_sums(self.K, self.u) if sums is None else sums
            v = torch.where(self.has_b, self.b64 / ktu, 0.0)
            u = torch.where(self.has_a, self.a64 / row_sums(self.K, v.to(self.dtype)), 0.0)
            if _in_scaling_range(u, self.has_a, v, self.has_b):
                self.u, self.v = u.to(self.dtype), v.to(self.dtype)
                return True
            self._absorb()
            return False
        lse_col = torch.logsumexp(self.L, dim=-2) if sums is None else sums
        dv = log_ratio(self.log_b, lse_col)
        self.L.add_(dv.unsqueeze(-2))
        self.log_v.add_(dv)
        du = log_ratio(self.log_a, torch.logsumexp(self.L, dim=-1))
        self.L.add_(du.unsqueeze(-1))
        self.log_u.add_(du)
        self.absorbed = False
        self.n_log_iter += 1
        return True

    def _absorb(self) -> None:
        """``L += log u + log v``, ``u = v = 1``, and leave the scaling domain."""
        du, dv = safe_log(self.u), safe_log(self.v)
        self.L.add_(du.unsqueeze(-1)).add_(dv.unsqueeze(-2))
        self.log_u.add_(du)
        self.log_v.add_(dv)
        self.K = None
        self.absorbed = True

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The plan and its potentials ``log_u``, ``log_v`` (the plan reuses ``K`` or ``L`` in place)."""
        if self.K is None:
            return self.L.exp_(), self.log_u, self.log_v
        plan = self.K.mul_(self.u.unsqueeze(-1)).mul_(self.v.unsqueeze(-2))
        return plan, self.log_u + safe_log(self.u), self.log_v + safe_log(self.v)


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
    r"""Entropic optimal transport plan by Sinkhorn iterations, stabilised in the log domain.

    Solves, with POT's argument conventions (``ot.sinkhorn(a, b, M, reg)``),

    .. math::
        T^\star = \arg\min_{T \ge 0} \langle T, M \rangle + \mathrm{reg} \sum_{ij} T_{ij} \log T_{ij}
        \quad \text{s.t.} \quad T \mathbf{1} = a, \quad T^\top \mathbf{1} = b,

    whose solution is ``T = diag(u) K diag(v)`` with ``K = exp(-M / reg)`` [1]_. One iteration is a
    column update followed by a row update, POT's order,

    .. math::
        v \leftarrow b \oslash K^\top u, \qquad u \leftarrow a \oslash K v,

    so after ``k`` iterations the plan is POT's ``sinkhorn`` / ``sinkhorn_log`` iterate ``k`` (tested).

    Parameters
    ----------
    a : torch.Tensor
        First marginal, shape ``(n,)`` or ``(B, n)``, non-negative. A zero entry gets an exactly zero
        row (its potential is ``-inf``).
    b : torch.Tensor
        Second marginal, shape ``(m,)`` or ``(B, m)``, non-negative, with the total mass of ``a`` up to a
        dtype-dependent relative tolerance (``b`` is rescaled to ``a``'s mass).
    M : torch.Tensor
        Cost matrix, shape ``(n, m)`` or ``(B, n, m)``; sets the dtype and device of the computation.
        ``+inf`` marks a forbidden transport; NaN and ``-inf`` are rejected.
    reg : float
        Entropic weight, ``> 0``.
    max_iter : int, default 1000
        Maximum number of iterations (one column plus one row update each).
    tol : float or None, default None
        Bound on ``err_b`` below; ``None`` selects :func:`default_tol` of ``M``'s dtype (``1e-9``
        float64, ``1.19e-5`` float32).
    check_every : int, default 10
        Check the error every this many iterations (each check costs a device sync).
    log : bool, default False
        Also return a dict with ``n_iter`` (iterations run), ``n_log_iter`` (how many of them ran in the
        log domain), ``err`` (the larger relative error of the returned plan's row and column sums, over
        all batch problems), and ``log_u``, ``log_v``, the dual potentials divided by ``reg``:
        ``plan = exp(log_u[..., :, None] - M / reg + log_v[..., None, :])``.

    Returns
    -------
    plan : torch.Tensor
        Shape of ``M``, detached. With a batch dimension all problems are iterated together until the
        worst one converges.
    info : dict
        Only if ``log``.

    Warns
    -----
    SinkhornConvergenceWarning
        If ``max_iter`` is reached before ``tol``.

    Raises
    ------
    ValueError
        Inconsistent shapes, negative or non-finite marginals, totals that differ, ``reg <= 0``, NaN or
        ``-inf`` in ``M``, or a mass-carrying row or column with no finite cost.

    Notes
    -----
    ``K`` underflows to exactly 0 once ``M / reg`` exceeds ~87 (float32) or ~745 (float64), routine for
    costs built from log-probabilities of confident networks, and the textbook update then divides 0 by
    0. The solver therefore keeps the log-plan ``L`` of the last absorption and iterates the scalings on
    ``K = exp(L)`` (two matrix-vector products per iteration, no exponential). When an update would leave
    ``[exp(-30), exp(30)]`` or meets a zero or non-finite sum, the scalings are absorbed
    (``L += log u + log v``, ``u = v = 1``) and iterations run in the log domain [2]_ [3]_,

    .. math::
        \log v \leftarrow \log v + \log b - \operatorname{logsumexp}_i L_{ij}, \qquad
        \log u \leftarrow \log u + \log a - \operatorname{logsumexp}_j L_{ij},

    which neither under- nor overflow, until the next check retries ``K = exp(L)``. ``L`` is updated in
    place, not recomputed as ``-M / reg`` plus potentials (which would add numbers of magnitude
    ``M / reg`` and cancel them), so entries that carry mass stay at full relative precision; row and
    column sums are accumulated in float64 over blocks of 512.

    Right after the row update ``T 1 = a`` up to rounding, so the iteration stops at the first check with

    .. math::
        \mathrm{err}_b = \max_{j : b_j > 0} |\textstyle\sum_i T_{ij} - b_j| / b_j \le \mathrm{tol}

    (:func:`relative_marginal_error`, the rule of every solver here).

    References
    ----------
    .. [1] M. Cuturi, "Sinkhorn distances: lightspeed computation of optimal transport", NeurIPS 2013.
    .. [2] G. Peyré and M. Cuturi, "Computational optimal transport", 2019, sec. 4.2 and 4.4.
    .. [3] B. Schmitzer, "Stabilized sparse scaling algorithms for entropy regularized transport
       problems", SIAM J. Sci. Comput. 41(3), 2019.
    """
    check_iter_args(max_iter, tol, check_every)
    _check_shapes(a, b, M)
    reg = check_positive_scalar(reg, "reg")
    a, b, M = _check_values(a, b, M)
    _check_feasible(a, b, M)
    tol = resolve_tol(tol, M.dtype)
    it = _Plan(a, b, M, reg)
    run = iterate(it, max_iter=max_iter, tol=tol, check_every=check_every, check_first=False)
    plan, log_u, log_v = it.result()
    err = max(relative_marginal_error(plan.sum(-1), a).item(), run.err)
    warn_if_stopped_early("sinkhorn", run, tol, err)
    if log:
        info = {"n_iter": run.n_iter, "n_log_iter": it.n_log_iter, "err": err, "log_u": log_u, "log_v": log_v}
        return plan, info
    return plan
