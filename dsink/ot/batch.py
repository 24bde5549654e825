"""The D-SINK surrogate labels of one batch: :func:`dsink_targets`, optionally spread over several ranks."""

from __future__ import annotations

from typing import Any, Literal, overload

import torch

from dsink.ot.core import (
    NEG_INF,
    SCALING_RANGE,
    AllReduce,
    check_finite,
    check_iter_args,
    check_positive_scalar,
    check_tensor,
    class_step,
    column_sums,
    iterate,
    relative_marginal_error,
    resolve_tol,
    safe_log,
    warn_if_stopped_early,
    zero_mass_potential,
)

_NAMES = ("log_p_noise", "log_p_student", "p_imbalance")


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _check_shapes(log_p_noise: torch.Tensor, log_p_student: torch.Tensor, p_imbalance: torch.Tensor) -> None:
    """Types, shapes, devices and dtypes of :func:`dsink_targets`' tensors (on this rank, no collective)."""
    tensors = (log_p_noise, log_p_student, p_imbalance)
    for x, name in zip(tensors, _NAMES, strict=True):
        check_tensor(x, name)
    if log_p_noise.dim() not in (2, 3):
        raise ValueError(f"log_p_noise must have shape (N, C) or (B, N, C), got {tuple(log_p_noise.shape)}")
    for x, name in zip(tensors[1:], _NAMES[1:], strict=True):
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


def _check_log_probs(x: torch.Tensor, name: str) -> None:
    check_tensor(x, name)
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if torch.isnan(x).any():
        raise ValueError(f"{name} contains NaN")
    if torch.isposinf(x).any():
        raise ValueError(f"{name} contains +inf (expected log-probabilities)")
    if torch.isneginf(x).all(dim=-1).any():
        raise ValueError(f"{name} has a row that is -inf for every class (not a log-distribution)")


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


def _class_totals(
    log_k: torch.Tensor,
    p_imbalance: torch.Tensor,
    log_p: tuple[torch.Tensor, torch.Tensor],
    all_reduce: AllReduce | None,
) -> tuple[torch.Tensor, bool]:
    """Global class totals ``r`` (float64, summing to the global N) and whether ``log_k`` has ``-inf``.

    One collective carries this rank's class totals, its row count and three flags. The flags are cheap on
    the common path: the sum of the row sums (a matrix-vector product) is finite exactly when no input
    holds NaN or +-inf; only then do the checks that name the problem run, on every rank.
    """
    reduce = _identity if all_reduce is None else all_reduce
    n, c, dev = log_k.shape[-2], log_k.shape[-1], log_k.device
    p_l = p_imbalance.detach().to(log_k.dtype)
    r_local = column_sums(p_l, torch.ones(n, dtype=p_l.dtype, device=dev))  # (…, C) float64
    log_k_sum = (log_k @ torch.ones(c, dtype=log_k.dtype, device=dev)).sum()
    flags = torch.stack((~torch.isfinite(log_k_sum), ~torch.isfinite(r_local.sum()), (p_l < 0).any()))
    row_count = torch.tensor([float(n)], dtype=torch.float64, device=dev)
    packed = reduce(torch.cat((r_local.reshape(-1), row_count, flags.double())))
    k = r_local.numel()
    r, n_total = packed[:k].reshape(r_local.shape), packed[k]
    nonfinite_k, nonfinite_p, negative_p = (packed[k + 1 :] > 0).tolist()
    if nonfinite_k or nonfinite_p or negative_p:
        error: ValueError | None = None
        try:
            if nonfinite_k:
                _check_log_probs(log_p[0], "log_p_noise")
                _check_log_probs(log_p[1], "log_p_student")
            if nonfinite_p:
                check_finite(p_imbalance, "p_imbalance")
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
    return r * (n_total / total), nonfinite_k


def _check_reachable(log_k: torch.Tensor, r: torch.Tensor, reduce: AllReduce) -> None:
    """With ``-inf`` in ``log_k`` (probability 0): every row, and every class with mass, can be served."""
    open_ = log_k > NEG_INF
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


class _ClassPotential:
    """The iterate of :func:`dsink_targets`: the class potential ``log_u`` over a materialised batch.

    The exponentials are taken once per absorption, ``K = exp(z - max_c z)`` with ``z = log_k + log_u0``
    (every row's largest entry exactly 1); until the next one

        w = exp(log_u - log_u0),    q_ic = K_ic w_c / sum_c' K_ic' w_c',

    two matrix-vector products per iteration, the class totals ``s`` summed over the ranks. ``log_u0`` is
    re-absorbed when ``log_u - log_u0`` leaves ``[-30, 30]``. A class whose every ``q_ic`` underflows gets
    its total from a log-domain ``logsumexp`` (:func:`_global_logsumexp`), so no step forms ``log 0``.
    Every decision is taken from reduced quantities or from ``log_u``, which all ranks share.
    """

    def __init__(self, log_k: torch.Tensor, r: torch.Tensor, reduce: AllReduce) -> None:
        self.log_k, self.r, self.reduce, self.dtype = log_k, r, reduce, log_k.dtype
        self.pos = r > 0
        self.log_r = safe_log(r)
        self.log_u = zero_mass_potential(r)
        self.K = torch.empty_like(log_k)
        self.log_u0 = self._absorb()
        self.n_absorb = 0

    def _absorb(self) -> torch.Tensor:
        """``K = exp(log_k + log_u - row max)`` in place; returns the absorbed potential."""
        shifted = (self.log_u - self.log_u.amax(-1, keepdim=True)).to(self.dtype).unsqueeze(-2)
        torch.add(self.log_k, shifted, out=self.K)
        self.K.sub_(self.K.amax(-1, keepdim=True)).exp_()
        return self.log_u.clone()

    def error(self) -> float:
        """Relative error of the class totals (re-absorbing first if the scalings left their range)."""
        pos = self.pos
        while True:
            d = torch.where(pos, self.log_u - self.log_u0, 0.0)
            self.w = torch.where(pos, d.exp(), 0.0)
            self.sums = (self.K @ self.w.to(self.dtype).unsqueeze(-1)).squeeze(-1)  # row sums of K diag(w)
            self.s = self.reduce(column_sums(self.K, self.sums.reciprocal()) * self.w)
            err, self.min_s, d_max, d_min = torch.stack(
                (
                    relative_marginal_error(self.s, self.r),
                    torch.where(pos, self.s, 1.0).amin(),
                    d.amax(),
                    d.amin(),
                )
            ).tolist()
            if -SCALING_RANGE <= d_min and d_max <= SCALING_RANGE:
                return err
            self.log_u0 = self._absorb()
            self.n_absorb += 1

    def step(self) -> bool:
        """``log u <- log u + log r - log s``."""
        log_s = self.s.log()
        if self.min_s <= 0:  # a class whose every q underflowed: its total in the log domain
            z = self.log_k + self.log_u.to(self.dtype).unsqueeze(-2)
            log_q = z - torch.logsumexp(z, -1, keepdim=True)
            log_total = _global_logsumexp(torch.logsumexp(log_q, -2), self.reduce)
            log_s = torch.where(self.pos & (self.s <= 0), log_total, log_s)
        self.log_u = class_step(self.log_u, self.log_r, log_s)
        return True

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``Q`` (in place of ``K``) and ``log_u`` shifted to largest entry 0, at the last check."""
        q = self.K.mul_(self.w.to(self.dtype).unsqueeze(-2)).div_(self.sums.unsqueeze(-1))
        return q, (self.log_u - self.log_u.amax(-1, keepdim=True)).to(self.dtype)


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
    r"""D-SINK surrogate labels ``Q`` of one batch.

    Minimises :math:`\sum_i \mathrm{KL}(q_i \| f_N(x_i)) + \mathrm{KL}(q_i \| f(x_i))` subject to
    :math:`\sum_c q_{ic} = 1` and :math:`\sum_i q_{ic} = r_c = \sum_i f_L(x_i)_c` [1]_: entropic OT with
    cost :math:`P_{ic} = -(\log f_N(x_i)_c + \log f(x_i)_c)` and ``reg = 2`` (see :mod:`dsink.ot`). This
    is :func:`sinkhorn` on ``M = P^T`` with marginals ``r`` (classes) and ``1`` (samples), solved with the
    sample potential eliminated: each row of ``Q`` is a softmax, so rows sum to 1 exactly and only the
    class potential is iterated,

    .. math::
        q_{ic} = \frac{k_{ic} u_c}{\sum_{c'} k_{ic'} u_{c'}}, \quad \log k = -P / \mathrm{reg}, \qquad
        s_c = \sum_i q_{ic}, \quad \log u \leftarrow \log u + \log r - \log s.

    With the default ``reg = 2``, :math:`q_i \propto u \odot \sqrt{f_N(x_i) \odot f(x_i)}`. At dataset
    scope (N ~ 1e6) use :func:`class_scaling`, which never materialises N x C temporaries.

    Parameters
    ----------
    log_p_noise : torch.Tensor
        ``(N, C)`` or ``(B, N, C)`` log-probabilities of the noise-robust teacher ``f_N``.
    log_p_student : torch.Tensor
        Same shape: log-probabilities of the student ``f`` (gradients are not tracked).
    p_imbalance : torch.Tensor
        Same shape: probabilities of the imbalance-robust teacher ``f_L``, non-negative; only their column
        totals matter, rescaled to sum to N.
    reg : float, default 2.0
        Entropic weight (2 for the D-SINK objective).
    temperature : float, default 1.0
        If not 1, each log-probability is re-normalised as ``log_softmax(log_p / T)`` first.
    max_iter : int, default 1000
        Maximum number of iterations.
    tol : float or None, default None
        Bound on ``err``, the largest relative error of a class total; ``None`` selects
        :func:`default_tol` of the inputs' dtype (``1e-9`` float64, ``1.19e-5`` float32).
    all_reduce : callable or None, default None
        Sum over ranks (see Notes); ``None`` for one process.
    log : bool, default False
        Also return the solver info: ``n_iter``, ``n_absorb`` (re-absorptions of the class scalings,
        usually 0), ``err`` (the class-total error that ``tol`` bounds, global), ``log_u`` (class
        potential, ``(…, C)``, largest entry 0), ``log_v`` (sample potential, ``(…, N)``, this rank's
        rows), ``row_err`` = ``max_i |sum_c Q_ic - 1|`` over this rank's rows and ``class_err`` (the same
        as ``err``).

    Returns
    -------
    Q : torch.Tensor
        The shape of the inputs, detached.
    info : dict
        Only if ``log``.

    Warns
    -----
    SinkhornConvergenceWarning
        If ``max_iter`` is reached before ``tol``.

    Raises
    ------
    ValueError
        Shapes differ, NaN/+inf in an input (the message names it), negative ``p_imbalance``, non-positive
        ``reg``/``temperature``, or an infeasible problem (a class with mass that no sample can take
        because one of the teachers gives it probability exactly 0 everywhere).

    Notes
    -----
    The iteration stops when :math:`\max_{c : r_c > 0} |s_c - r_c| / r_c \le \mathrm{tol}`
    (:func:`relative_marginal_error`, the rule of every solver here). The exponentials are taken once,
    after subtracting each row's maximum; the iterations rescale their columns by
    ``exp(log u - log u0)`` and retake them from the log domain when that factor leaves
    ``[exp(-30), exp(30)]`` [2]_ [3]_, or take a class total by ``logsumexp`` when it underflows.

    Distributed use: with ``all_reduce``, each process passes only its own rows of one global batch.
    ``all_reduce(t)`` must return the elementwise sum of ``t`` over all ranks, the same values on every
    rank (it may work in place), e.g. ``torch.distributed.all_reduce(t); return t``. The class totals
    ``r`` (so the rescaling to the global ``N``), the achieved totals ``s`` at every iteration, the input
    checks and the log-domain fallbacks are reduced over the ranks; the error and the stopping decision are
    computed from the reduced totals, so every rank runs the same iterations and returns its rows of the
    single-process solution on the concatenated batch (to rounding). A rank may hold zero rows. A
    data-dependent error (NaN, negative mass, an infeasible class) raises ``ValueError`` on every rank;
    wrong types or shapes raise on the rank that has them, before any collective.

    References
    ----------
    .. [1] D-SINK: Dual-granularity Sinkhorn Distillation, arXiv:2510.08179, 2025.
    .. [2] G. Peyré and M. Cuturi, "Computational optimal transport", 2019, sec. 4.4.
    .. [3] B. Schmitzer, "Stabilized sparse scaling algorithms for entropy regularized transport
       problems", SIAM J. Sci. Comput. 41(3), 2019.
    """
    _check_shapes(log_p_noise, log_p_student, p_imbalance)
    reg = check_positive_scalar(reg, "reg")
    temperature = check_positive_scalar(temperature, "temperature")
    check_iter_args(max_iter, tol, 1)
    reduce = _identity if all_reduce is None else all_reduce
    lp_noise = log_p_noise.detach()
    lp_student = log_p_student.detach().to(lp_noise.dtype)
    if temperature != 1.0:
        lp_noise = torch.log_softmax(lp_noise / temperature, dim=-1)
        lp_student = torch.log_softmax(lp_student / temperature, dim=-1)
    log_k = (lp_noise + lp_student).div_(reg)  # -P / reg, (…, N, C); -inf where a teacher gives 0
    tol = resolve_tol(tol, log_k.dtype)
    r, has_neg_inf = _class_totals(log_k, p_imbalance, (log_p_noise, log_p_student), all_reduce)
    if has_neg_inf:
        _check_reachable(log_k, r, reduce)
    it = _ClassPotential(log_k, r, reduce)
    run = iterate(it, max_iter=int(max_iter), tol=tol)
    warn_if_stopped_early("dsink_targets", run, tol)
    q, log_u = it.result()
    if not log:
        return q
    info: dict[str, Any] = {"n_iter": run.n_iter, "n_absorb": it.n_absorb, "err": run.err, "log_u": log_u}
    info["log_v"] = -torch.logsumexp(log_k + log_u.unsqueeze(-2), -1)
    info["row_err"] = (q.sum(-1) - 1).abs().amax().item() if q.numel() else 0.0
    info["class_err"] = run.err
    return q, info
