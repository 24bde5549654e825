"""The D-SINK problem at dataset scope: :func:`class_scaling` and :func:`apply_class_scaling`.

N reaches ~1e6 samples, so rows are processed in chunks and nothing of size N x C is materialised beyond
the input: working memory is O(chunk_size * C).
"""

from __future__ import annotations

from typing import Any, Literal, overload

import torch

from dsink.ot.core import (
    NEG_INF,
    check_finite,
    check_iter_args,
    check_tensor,
    class_step,
    iterate,
    mass_rtol,
    relative_marginal_error,
    resolve_tol,
    safe_log,
    warn_if_stopped_early,
    zero_mass_potential,
)


def _row_chunks(n: int, chunk_size: int) -> range:
    return range(0, n, chunk_size)


def _log_class_totals(log_kernel: torch.Tensor, log_u: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``log s_c = log sum_i softmax_c(log_kernel_i + log_u)`` in float64, one row chunk at a time.

    In the log domain (a ``logsumexp`` over the rows of each chunk, merged with ``logaddexp``), so a class
    whose every probability underflows still gets a finite total and its potential a finite update.
    Peak extra memory: the shifted chunk plus ``logsumexp``'s own temporary.
    """
    u = log_u.to(log_kernel.dtype)
    log_s = torch.full_like(log_u, NEG_INF)
    for start in _row_chunks(log_kernel.shape[0], chunk_size):
        z = log_kernel[start : start + chunk_size] + u
        z.sub_(torch.logsumexp(z, dim=1, keepdim=True))  # z = log q, rows normalised
        log_s = torch.logaddexp(log_s, torch.logsumexp(z, dim=0).to(log_s.dtype))
        del z
    return log_s


def _check_shapes(log_kernel: torch.Tensor, r: torch.Tensor, chunk_size: int) -> None:
    """Types, shapes and devices of :func:`class_scaling`'s arguments."""
    check_tensor(log_kernel, "log_kernel")
    check_tensor(r, "r")
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
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _check_values(log_kernel: torch.Tensor, r: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Check the values (chunk by chunk) and return ``r`` as float64 summing to N exactly."""
    n, c = log_kernel.shape
    r64 = r.detach().to(torch.float64)
    check_finite(r64, "r")
    if (r64 < 0).any():
        raise ValueError("r (class totals) has negative entries")
    total = r64.sum().item()
    rtol = mass_rtol(r.dtype if r.is_floating_point() else torch.float64)
    if abs(total - n) > rtol * n:
        raise ValueError(f"r must sum to N = {n} (each sample has mass 1), got {total}")

    positive = r64 > 0
    mask = torch.where(positive, 0.0, NEG_INF).to(log_kernel.dtype)
    class_reached = torch.zeros(c, dtype=torch.bool, device=log_kernel.device)
    for start in _row_chunks(n, chunk_size):
        chunk = log_kernel[start : start + chunk_size]
        if torch.isnan(chunk).any():
            raise ValueError("log_kernel contains NaN")
        if torch.isposinf(chunk).any():
            raise ValueError("log_kernel contains +inf")
        if not bool(((chunk + mask).amax(dim=1) > NEG_INF).all()):
            raise ValueError("infeasible problem: a row of log_kernel is -inf on every class with r > 0")
        class_reached |= (chunk > NEG_INF).any(dim=0)
    if not bool((class_reached | ~positive).all()):
        raise ValueError("infeasible problem: a class with r > 0 has log_kernel = -inf for every sample")
    return r64 * (n / total)


class _ChunkedClassPotential:
    """The iterate of :func:`class_scaling`: the class potential ``log_u`` and its class totals ``log s``."""

    def __init__(
        self, log_kernel: torch.Tensor, r64: torch.Tensor, chunk_size: int, init: torch.Tensor | None = None
    ) -> None:
        self.log_kernel, self.r64, self.chunk_size = log_kernel, r64, chunk_size
        self.log_r = safe_log(r64)
        self.log_u = zero_mass_potential(r64)
        if init is not None:
            start = torch.where(r64 > 0, init.detach().to(self.log_u), self.log_u)
            self.log_u = start - start.amax()
        self.log_s = _log_class_totals(log_kernel, self.log_u, chunk_size)

    def error(self) -> float:
        return relative_marginal_error(self.log_s.exp(), self.r64).item()

    def step(self) -> bool:
        log_u = class_step(self.log_u, self.log_r, self.log_s)
        self.log_u = log_u - log_u.amax()  # softmax is shift-invariant; keep the potential bounded
        self.log_s = _log_class_totals(self.log_kernel, self.log_u, self.chunk_size)
        return True


@overload
def class_scaling(
    log_kernel: torch.Tensor,
    r: torch.Tensor,
    max_iter: int = ...,
    tol: float | None = ...,
    chunk_size: int = ...,
    check_every: int = ...,
    log: Literal[False] = ...,
    init: torch.Tensor | None = ...,
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
    init: torch.Tensor | None = ...,
) -> tuple[torch.Tensor, dict[str, Any]]: ...


def class_scaling(
    log_kernel: torch.Tensor,
    r: torch.Tensor,
    max_iter: int = 1000,
    tol: float | None = None,
    chunk_size: int = 65536,
    check_every: int = 1,
    log: bool = False,
    init: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
    r"""Class potential ``log_u`` solving the D-SINK transport problem at dataset scope.

    The problem of :func:`sinkhorn` with one marginal fixed to "every sample has mass 1", which
    eliminates the sample potential: the plan is :math:`q_i = \mathrm{softmax}_c(\log k_i + \log u)`,
    rows normalised exactly, and only the C-vector ``log_u`` is iterated,

    .. math::
        s_c = \sum_i q_{ic}, \qquad \log u \leftarrow \log u + \log r - \log s.

    This is one iteration of :func:`sinkhorn` on ``M = -log_kernel^T`` (classes x samples) with
    ``a = r / N``, ``b = 1 / N`` and ``reg = 1``: the sample half-step is the row softmax, the class
    half-step the update of ``log_u`` [1]_. Use :func:`apply_class_scaling` to produce ``q``.

    Parameters
    ----------
    log_kernel : torch.Tensor
        Shape ``(N, C)``: per-sample log-scores, i.e. ``-P / reg`` (``-inf`` = forbidden).
    r : torch.Tensor
        Class totals, shape ``(C,)``, non-negative, summing to N (rescaled to N exactly). A class with
        ``r_c = 0`` gets ``log_u_c = -inf`` and ``q[:, c] = 0``.
    max_iter : int, default 1000
        Maximum number of updates (each is one pass over the N rows).
    tol : float or None, default None
        Bound on ``err`` below; ``None`` selects :func:`default_tol` of ``log_kernel``'s dtype (the dtype
        of the exponentials; the totals are accumulated in float64).
    chunk_size : int, default 65536
        Rows per chunk: working memory is O(chunk_size * C) for any N.
    check_every : int, default 1
        Compare the error with ``tol`` every this many updates (each check syncs the device).
    log : bool, default False
        Also return ``{"n_iter": int, "err": float}`` (``err`` as below, after the last update).
    init : torch.Tensor or None, default None
        Shape ``(C,)``: the potential to start from (warm start), e.g. the previous solve's when the
        kernel has moved little since; ``None`` starts from 0. Entries of zero-mass classes are ignored.
        The fixed point is unique up to a shift, so the start changes only how many updates it takes.

    Returns
    -------
    log_u : torch.Tensor
        Float64, shape ``(C,)``, shifted so its largest entry is 0.
    info : dict
        Only if ``log``.

    Warns
    -----
    SinkhornConvergenceWarning
        If ``max_iter`` is reached before ``tol``.

    Notes
    -----
    The class totals are computed in the log domain, chunk by chunk, so a class whose every ``q_ic``
    underflows still gets a finite update [2]_. The iteration stops when

    .. math::
        \mathrm{err} = \max_{c : r_c > 0} |s_c - r_c| / r_c \le \mathrm{tol}

    (:func:`relative_marginal_error`, the rule of every solver here): a tail class of 5 samples among
    10^5 is met to ``tol`` relative, not to ``tol * N`` absolute. Classes with ``r_c = 0`` are exact.

    References
    ----------
    .. [1] D-SINK: Dual-granularity Sinkhorn Distillation, arXiv:2510.08179, 2025.
    .. [2] G. Peyré and M. Cuturi, "Computational optimal transport", 2019, sec. 4.4.
    """
    check_iter_args(max_iter, tol, check_every)
    chunk_size = int(chunk_size)
    _check_shapes(log_kernel, r, chunk_size)
    r64 = _check_values(log_kernel, r, chunk_size)
    log_kernel = log_kernel.detach()
    tol = resolve_tol(tol, log_kernel.dtype)
    if init is not None:
        check_tensor(init, "init")
        if tuple(init.shape) != (r64.shape[0],):
            raise ValueError(f"init must have shape ({r64.shape[0]},), got {tuple(init.shape)}")
        if not torch.isfinite(init.detach()[r64.to(init.device) > 0]).all():
            raise ValueError("init must be finite on every class with positive mass")
    it = _ChunkedClassPotential(log_kernel, r64, chunk_size, init)
    run = iterate(it, max_iter=max_iter, tol=tol, check_every=check_every)
    warn_if_stopped_early("class_scaling", run, tol)
    if log:
        return it.log_u, {"n_iter": run.n_iter, "err": run.err}
    return it.log_u


def apply_class_scaling(
    log_kernel: torch.Tensor, log_u: torch.Tensor, chunk_size: int = 65536
) -> torch.Tensor:
    """Surrogate labels ``q_i = softmax_c(log_kernel_i + log_u)`` from :func:`class_scaling`'s potential.

    Parameters
    ----------
    log_kernel : torch.Tensor
        Shape ``(N, C)``, as passed to :func:`class_scaling`.
    log_u : torch.Tensor
        Shape ``(C,)``; ``-inf`` entries (zero-mass classes) give exact zeros.
    chunk_size : int, default 65536
        Rows per chunk, written into the output: the only extra memory is one chunk.

    Returns
    -------
    torch.Tensor
        ``q``, shape ``(N, C)``, rows summing to 1, in ``log_kernel``'s dtype, detached.
    """
    check_tensor(log_kernel, "log_kernel")
    check_tensor(log_u, "log_u")
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
