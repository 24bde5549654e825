"""The log-domain Sinkhorn core shared by every solver of :mod:`dsink.ot`.

Every solver here alternates the two dual half-steps of entropic optimal transport in the log domain
(Peyré & Cuturi 2019, sec. 4.2 and 4.4),

    log v  <-  log v + log b - log(achieved column sums),
    log u  <-  log u + log a - log(achieved row sums),

and differs only in how it represents the plan between half-steps. This module holds what they share:

* the stopping rule (:func:`relative_marginal_error`, :func:`default_tol`): iterate until the marginal
  that the last half-step does not enforce exactly is met to a relative tolerance per entry,

      err = max_{j : t_j > 0} |m_j - t_j| / t_j  <=  tol,

  ``m`` the achieved and ``t`` the target marginal. Entries with ``t_j = 0`` are exact by construction
  (their potential is ``-inf``), and a class of 5 samples among 10^5 is held to the same relative
  accuracy as the largest class;
* the iteration driver :func:`iterate` (when to check, when to stop) and the warning of an early stop;
* the log-domain update :func:`log_ratio` that never forms ``-inf - (-inf)``, and the float64 sums of
  float32 products (:func:`column_sums`, :func:`row_sums`) that let a relative tolerance of ``100 eps``
  be reached on 10^6 rows;
* input checks common to the entry points.

References
----------
.. [1] M. Cuturi, "Sinkhorn distances: lightspeed computation of optimal transport", NeurIPS 2013.
.. [2] G. Peyré and M. Cuturi, "Computational optimal transport", Foundations and Trends in Machine
   Learning 11(5-6), 2019, chapter 4.
.. [3] B. Schmitzer, "Stabilized sparse scaling algorithms for entropy regularized transport problems",
   SIAM J. Sci. Comput. 41(3), 2019.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

NEG_INF = float("-inf")
#: the scalings stay within ``[exp(-30), exp(30)]`` of the absorbed log-plan (the absorption threshold of
#: Schmitzer's stabilised scaling [3]): an entry of the kernel that underflowed in float32 (< 1.4e-45 of
#: its row's largest) then stands for less than 2e-19 of the mass
SCALING_RANGE = 30.0
_TOTALS_BLOCK = 512

#: ``all_reduce(t)`` returns the elementwise sum of ``t`` over all ranks (it may work in place), the same
#: values on every rank; with ``torch.distributed``: ``def all_reduce(t): dist.all_reduce(t); return t``.
AllReduce = Callable[[torch.Tensor], torch.Tensor]


class SinkhornConvergenceWarning(UserWarning):
    """Sinkhorn stopped at ``max_iter`` before the marginals were met within ``tol``.

    The returned plan is still usable (it is the exact Sinkhorn iterate), but its marginals are off by
    the error reported in the message; raise ``max_iter`` or ``reg``, or loosen ``tol``.
    """


# ----------------------------------------------------------------------------------------------------
# the stopping rule
# ----------------------------------------------------------------------------------------------------


def default_tol(dtype: torch.dtype) -> float:
    """Default ``tol`` of every solver here for a computation in ``dtype``: ``max(1e-9, 100 * eps)``.

    Parameters
    ----------
    dtype : torch.dtype
        The floating-point type the solver computes its exponentials in.

    Returns
    -------
    float
        ``1e-9`` for float64, ``1.19e-5`` for float32.

    Notes
    -----
    The achieved marginals are sums of rounded exponentials, so their relative error has a floor of a few
    ``eps`` (more for sums over many entries); ``100 eps`` leaves a margin that float32 problems from
    128 x 10 to 10^6 x 10 meet (tested).
    """
    return max(1e-9, 100.0 * torch.finfo(dtype).eps)


def relative_marginal_error(achieved: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The stopping measure ``max_j |achieved_j - target_j| / target_j`` over entries with ``target_j > 0``.

    Parameters
    ----------
    achieved, target : torch.Tensor
        Marginals of the same shape (any leading batch dimensions; the maximum is over all entries).

    Returns
    -------
    torch.Tensor
        0-dim float64 tensor (no device sync). An entry with ``target_j = 0`` counts as 0 if
        ``achieved_j = 0`` and as ``inf`` otherwise: every solver here makes such entries exactly 0.
    """
    achieved = achieved.to(torch.float64)
    target = target.to(torch.float64)
    pos = target > 0
    rel = (achieved - target).abs() / torch.where(pos, target, 1.0)
    zero_ok = torch.where(achieved == 0, 0.0, math.inf)
    return torch.where(pos, rel, zero_ok).amax()


def resolve_tol(tol: float | None, dtype: torch.dtype) -> float:
    """``tol``, or :func:`default_tol` of ``dtype`` when it is ``None``."""
    return default_tol(dtype) if tol is None else float(tol)


# ----------------------------------------------------------------------------------------------------
# the iteration driver
# ----------------------------------------------------------------------------------------------------


class Iterate(Protocol):
    """A Sinkhorn iterate as :func:`iterate` drives it."""

    def error(self) -> float:
        """Relative error of the marginal the last half-step leaves inexact; may cache sums for ``step``."""
        ...

    def step(self) -> bool:
        """One dual update; ``False`` when it only absorbed the scalings (not an iteration, check again)."""
        ...


@dataclass(frozen=True)
class Run:
    """Outcome of :func:`iterate`: iterations run, the error at the last check, whether ``err <= tol``."""

    n_iter: int
    err: float
    converged: bool


def iterate(it: Iterate, *, max_iter: int, tol: float, check_every: int = 1, check_first: bool = True) -> Run:
    """Run ``it.step()`` until ``it.error() <= tol`` at a check, or ``max_iter`` iterations.

    The error is checked every ``check_every`` iterations (each check syncs the device), after the last
    one, and before the first if ``check_first``. A step that returns ``False`` changed only the
    representation of the plan; it does not count, and a check due at this iteration count runs again.
    """
    n_iter, err = 0, math.inf
    while True:
        if (n_iter > 0 or check_first) and (n_iter % check_every == 0 or n_iter >= max_iter):
            err = it.error()
            if err <= tol:
                return Run(n_iter, err, True)
        if n_iter >= max_iter:
            return Run(n_iter, err, False)
        if it.step():
            n_iter += 1


def warn_if_stopped_early(what: str, run: Run, tol: float, err: float | None = None) -> None:
    """Warn (:class:`SinkhornConvergenceWarning`) if ``run`` stopped at ``max_iter`` before ``tol``.

    ``err`` is the error to report, ``run.err`` if ``None``. Call it from the public entry point itself:
    the warning points at that function's caller.
    """
    if not run.converged:
        err = run.err if err is None else err
        warnings.warn(
            f"{what} did not converge in {run.n_iter} iterations: "
            f"relative marginal error {err:.3e} > tol {tol:.3e}",
            SinkhornConvergenceWarning,
            stacklevel=3,
        )


# ----------------------------------------------------------------------------------------------------
# log-domain numerics
# ----------------------------------------------------------------------------------------------------


def log_ratio(log_mass: torch.Tensor, log_sum: torch.Tensor) -> torch.Tensor:
    """The log-domain dual increment ``log_mass - log_sum``, pinned to ``-inf`` where the mass is zero.

    Where the target mass is zero, ``log_sum`` may itself be ``-inf`` (the row or column has already been
    zeroed), and ``-inf - (-inf)`` would be NaN. The input checks guarantee that ``log_sum`` is finite
    wherever the target mass is positive, so the result is never ``+inf`` or NaN.
    """
    return torch.where(torch.isneginf(log_mass), log_mass, log_mass - log_sum)


def class_step(log_u: torch.Tensor, log_r: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    """The D-SINK class half-step ``log u + log r - log s``; zero-mass classes stay ``-inf``."""
    return log_u + log_ratio(log_r, log_s)


def zero_mass_potential(target: torch.Tensor) -> torch.Tensor:
    """Initial float64 potential: 0 where ``target > 0``, ``-inf`` on zero-mass entries."""
    return torch.where(target > 0, 0.0, NEG_INF).to(torch.float64)


def safe_log(x: torch.Tensor) -> torch.Tensor:
    """``log`` that maps exact zeros to ``-inf`` without a divide-by-zero path."""
    return torch.where(x > 0, torch.log(torch.where(x > 0, x, torch.ones_like(x))), NEG_INF)


def column_sums(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i x_ic`` in float64, from products in ``x``'s dtype over blocks of 512 rows.

    A float32 matrix-vector product accumulates its rounding along the rows: over 65,536 rows the class
    totals come out ~1e-5 relative off, over 10^6 rows ~1e-4, which stalls a relative tolerance of that
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


def row_sums(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_j x_ij w_j`` in float64, ``x`` ``(…, n, m)``, ``w`` ``(…, m)``: the twin of :func:`column_sums`.

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
# input checks
# ----------------------------------------------------------------------------------------------------


def mass_rtol(dtype: torch.dtype) -> float:
    """Relative tolerance on "the two marginals carry the same total mass".

    Totals are sums of many rounded numbers, so the tolerance scales with the precision of the dtype:
    1e-6 for float64, ~1.2e-4 for float32 (1000 ulps).
    """
    return max(1e-6, 1000.0 * torch.finfo(dtype).eps)


def check_tensor(x: Any, name: str) -> torch.Tensor:
    """``x`` itself if it is a tensor, else ``TypeError`` naming it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_finite(x: torch.Tensor, name: str) -> None:
    """``ValueError`` naming ``x`` if it holds NaN or an infinity."""
    if torch.isnan(x).any():
        raise ValueError(f"{name} contains NaN")
    if torch.isinf(x).any():
        raise ValueError(f"{name} contains inf")


def check_positive_scalar(value: float, name: str) -> float:
    """``value`` as a float, ``ValueError`` unless finite and > 0."""
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_iter_args(max_iter: int, tol: float | None, check_every: int) -> None:
    """``ValueError`` unless ``max_iter >= 1``, ``tol`` is ``None`` or ``>= 0``, ``check_every >= 1``."""
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if tol is not None and not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if int(check_every) < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
