"""Classification losses on raw logits ``(N, C)`` and int64 targets ``(N,)``, plus small-loss selection
and early-learning regularisation. Pure functions (``ELRLoss`` aside); ``reduction`` is ``"mean"``
(default) or ``"none"`` (per-sample, shape ``(N,)``). Half / bfloat16 logits (autocast) are upcast to
float32 before the softmax.

Which prior a model's **raw** logits are under after training with each loss (``distill`` needs this
to put every teacher's probabilities in one space):

======================================  ==========================================================
loss                                    ``softmax(raw logits)`` estimates
======================================  ==========================================================
``cross_entropy``                       the *training-prior* posterior p_train(y|x) (head favoured)
``gce`` (any q), small-loss CE, ELR     the *training-prior* posterior (they only fight noise)
``logit_adjusted_ce`` with ``tau = 1``  the *balanced* posterior p_bal(y|x) (uniform class prior)
``balanced_softmax_ce``                 the *balanced* posterior (it is LA with ``tau = 1``)
``logit_adjusted_ce``, general ``tau``  ``raw + tau * log_prior`` is the training-prior logit; for
                                        ``tau = 0`` raw logits are training-prior, for ``tau = 1``
                                        balanced, in between a tempered mix
``soft_cross_entropy``                  whatever space its soft targets are in
======================================  ==========================================================

Conversion: ``raw + log_prior`` (balanced -> training prior), ``raw - log_prior`` (training -> balanced),
up to a per-row constant that the softmax ignores. Small-loss selection (:class:`SmallLossSelection`)
only chooses which samples a loss averages over: on ``logit_adjusted_ce`` (the ``la_small_loss``
baseline) the raw logits are in that loss's space.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import SupportsFloat

import torch
import torch.nn.functional as F

_REDUCTIONS = ("mean", "none")


# --------------------------------------------------------------------------------------------- helpers


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction = {reduction!r}; expected one of {_REDUCTIONS}")


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    return per_sample.mean() if reduction == "mean" else per_sample


def _float_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 (differentiable upcast of half / bfloat16 autocast outputs)."""
    if not logits.is_floating_point():
        raise ValueError(f"logits dtype = {logits.dtype}; expected a floating-point tensor")
    if logits.dtype in (torch.float16, torch.bfloat16):
        return logits.float()
    return logits


def _check_logits_target(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits shape = {tuple(logits.shape)}; expected (N, C)")
    if target.shape != logits.shape[:1]:
        raise ValueError(
            f"target shape = {tuple(target.shape)}; expected ({logits.shape[0]},) to match logits "
            f"shape {tuple(logits.shape)}"
        )
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise ValueError(f"target dtype = {target.dtype}; expected integer class indices (int64)")


def _log_softmax_at(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[i, target_i]`` per row, shape (N,)."""
    return F.log_softmax(logits, dim=1).gather(1, target.long().unsqueeze(1)).squeeze(1)


# ----------------------------------------------------------------------------------------------- losses


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Plain softmax cross-entropy ``-log softmax(logits)_y``; gradient ``softmax - onehot``."""
    _check_reduction(reduction)
    _check_logits_target(logits, target)
    z = _float_logits(logits)
    return F.cross_entropy(z, target.long(), reduction="none" if reduction == "none" else "mean")


def _adjusted(
    logits: torch.Tensor, target: torch.Tensor, log_prior: torch.Tensor, tau: float
) -> torch.Tensor:
    """``logits + tau * log_prior`` after checking both."""
    if not (math.isfinite(tau) and tau >= 0):
        raise ValueError(f"tau = {tau!r}; expected a finite number >= 0")
    _check_logits_target(logits, target)
    if log_prior.shape != logits.shape[1:]:
        raise ValueError(
            f"log_prior shape = {tuple(log_prior.shape)}; expected ({logits.shape[1]},) to match logits"
        )
    z = _float_logits(logits)
    if tau == 0:
        return z
    if not torch.isfinite(log_prior).all():
        raise ValueError("log_prior has non-finite entries (a class with zero count?); smooth the counts")
    return z + tau * log_prior.to(device=z.device, dtype=z.dtype)


def logit_adjusted_ce(
    logits: torch.Tensor,
    target: torch.Tensor,
    log_prior: torch.Tensor,
    tau: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Logit-adjusted loss (Menon et al., ICLR 2021): ``CE(logits + tau * log_prior, target)``.

    ``log_prior`` (C,) is the log of the training class frequencies (finite: smooth zero counts).
    With ``tau = 1`` the raw logits estimate the balanced posterior; ``tau = 0`` is exactly plain CE.
    """
    _check_reduction(reduction)
    return cross_entropy(_adjusted(logits, target, log_prior, tau), target, reduction)


def balanced_softmax_ce(
    logits: torch.Tensor, target: torch.Tensor, log_prior: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Balanced softmax (Ren et al., NeurIPS 2020): the logit-adjusted loss with ``tau = 1``."""
    return logit_adjusted_ce(logits, target, log_prior, tau=1.0, reduction=reduction)


def gce(logits: torch.Tensor, target: torch.Tensor, q: float = 0.7, reduction: str = "mean") -> torch.Tensor:
    """Generalized cross-entropy (Zhang & Sabuncu, NeurIPS 2018): ``(1 - p_y^q) / q`` with ``0 < q <= 1``.

    ``q -> 0`` tends to CE, ``q = 1`` is the MAE-like ``1 - p_y``. Computed from ``log_softmax`` as
    ``-expm1(q * log p_y) / q`` so it neither underflows for tiny ``p_y`` nor cancels for tiny ``q``.
    Gradient w.r.t. the logits: ``-p_y^q (onehot - softmax)``, i.e. CE's gradient weighted by ``p_y^q``.
    """
    if not 0 < q <= 1:
        raise ValueError(f"q = {q!r}; expected 0 < q <= 1")
    _check_reduction(reduction)
    _check_logits_target(logits, target)
    log_py = _log_softmax_at(_float_logits(logits), target)
    return _reduce(-torch.expm1(q * log_py) / q, reduction)


def soft_cross_entropy(
    logits: torch.Tensor, soft_targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """``-sum_c t_c log softmax(logits)_c`` for target distributions ``t`` (rows of ``soft_targets``).

    Gradient w.r.t. the logits: ``softmax - t`` (for rows summing to 1). Targets are not detached.
    """
    _check_reduction(reduction)
    if logits.ndim != 2:
        raise ValueError(f"logits shape = {tuple(logits.shape)}; expected (N, C)")
    if soft_targets.shape != logits.shape:
        raise ValueError(
            f"soft_targets shape = {tuple(soft_targets.shape)}; expected {tuple(logits.shape)} like logits"
        )
    logp = F.log_softmax(_float_logits(logits), dim=1)
    return _reduce(-(soft_targets.to(logp.dtype) * logp).sum(dim=1), reduction)


# ---------------------------------------------------------------------------------- small-loss selection

# small-loss selection forgets at most this share when the rate is estimated (it must keep some samples)
MAX_FORGET_RATE = 0.95
SELECTIONS = ("global", "per_class")  # = dsink.params.SELECTIONS


def small_loss_keep_fraction(epoch: float, forget_rate: float, ramp_epochs: float) -> float:
    """Co-teaching schedule (Han et al., NeurIPS 2018): ``1 - forget_rate * min(1, epoch / ramp_epochs)``.

    ``epoch`` is 0-based (fractional progress allowed); ``ramp_epochs = 0`` forgets the full rate at once.
    """
    if not 0 <= forget_rate < 1:
        raise ValueError(f"forget_rate = {forget_rate!r}; expected 0 <= forget_rate < 1")
    if not epoch >= 0:
        raise ValueError(f"epoch = {epoch!r}; expected >= 0")
    if not ramp_epochs >= 0:
        raise ValueError(f"ramp_epochs = {ramp_epochs!r}; expected >= 0")
    ramp = 1.0 if ramp_epochs == 0 else min(1.0, epoch / ramp_epochs)
    return 1.0 - forget_rate * ramp


def small_loss_keep_mask(per_sample_loss: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Boolean (N,) mask keeping the ``ceil(keep_fraction * N)`` (at least 1) smallest losses.

    Deterministic: equal losses are ranked by index (lower index kept first); NaN losses rank last.
    """
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction = {keep_fraction!r}; expected 0 < keep_fraction <= 1")
    if per_sample_loss.ndim != 1:
        raise ValueError(f"per_sample_loss shape = {tuple(per_sample_loss.shape)}; expected (N,)")
    n = per_sample_loss.numel()
    # the epsilon keeps e.g. 0.6 * 5 = 3.0000000000000004 at 3
    k = min(n, max(1, math.ceil(keep_fraction * n - 1e-9)))
    order = torch.sort(per_sample_loss.detach(), stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool, device=per_sample_loss.device)
    mask[order[:k]] = True
    return mask


def small_loss_keep_mask_per_class(
    per_sample_loss: torch.Tensor, labels: torch.Tensor, keep_fractions: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """Boolean (N,) mask: each given-label class ``c`` keeps the ``ceil(keep_fractions[c] * n_c)`` smallest
    losses among its ``n_c`` samples in the batch.

    Rounding is up, as in :func:`small_loss_keep_mask` (with one class the two masks are equal), so a
    class present in the batch is never dropped wholesale: one sample is always kept, two are both kept
    while the keep share exceeds 1/2 and the smaller loss after. A class never keeps less than its share;
    the excess is under one sample per class and batch. Deterministic: equal losses are ranked by index
    (lower index kept first), NaN losses rank last.
    """
    if per_sample_loss.ndim != 1:
        raise ValueError(f"per_sample_loss shape = {tuple(per_sample_loss.shape)}; expected (N,)")
    if labels.shape != per_sample_loss.shape or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            f"labels shape = {tuple(labels.shape)}, dtype = {labels.dtype}; expected integer "
            f"({per_sample_loss.numel()},)"
        )
    device = per_sample_loss.device
    keep = torch.as_tensor(keep_fractions, dtype=torch.float64).reshape(-1)
    if keep.numel() < 1 or not bool(((keep > 0) & (keep <= 1)).all()):
        raise ValueError(f"keep_fractions = {keep.tolist()}; expected one share in (0, 1] per class")
    n, C = per_sample_loss.numel(), keep.numel()
    y = labels.long().to(device)
    if n:
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(y)).tolist())
        if lo < 0 or hi >= C:
            raise ValueError(f"labels span {lo}..{hi}; expected within [0, {C})")
    by_loss = torch.sort(per_sample_loss.detach(), stable=True).indices
    order = by_loss[torch.sort(y[by_loss], stable=True).indices]  # by class, then loss, then index
    counts = torch.bincount(y, minlength=C)
    starts = torch.cumsum(counts, 0) - counts
    # the epsilon keeps e.g. 0.6 * 5 = 3.0000000000000004 at 3 (float64, as math.ceil in the global mask)
    k = torch.ceil(keep.to(device) * counts.double() - 1e-9).long().clamp(min=1).minimum(counts)
    ys = y[order]
    rank = torch.arange(n, device=device) - starts[ys]
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[order[rank < k[ys]]] = True
    return mask


class SmallLossSelection:
    """Small-loss selection, the one implementation the noise teacher (``teachers.noise.method:
    small_loss``) and the ``la_small_loss`` baseline share: of every batch keep the samples whose
    per-sample loss ``l_i`` (the objective's own: CE, or logit-adjusted CE) is smallest, and train on
    their mean, ``sum_{i kept} l_i / #kept``. Wrong labels are fitted late, so early on they carry the
    large losses.

    The kept share follows co-teaching's ramp (Han et al., NeurIPS 2018) to a forget rate ``f``: at epoch
    progress ``t``, ``k(t) = 1 - f * min(1, t / ramp_epochs)``.

    - ``selection: "global"``: one ``k(t)`` over the batch, ``ceil(k(t) * N)`` smallest losses kept.
    - ``selection: "per_class"``: each given-label class ``c`` ramps to its own ``f_c``,
      ``k_c(t) = 1 - f_c * min(1, t / ramp_epochs)``, and keeps the ``ceil(k_c(t) * n_c)`` smallest of
      its ``n_c`` samples in the batch (:func:`small_loss_keep_mask_per_class`: at least one).

    Why per class: losses are not comparable across classes on long-tailed data. A tail class is fitted
    last (few samples; with plain CE also a prior against it), so its clean samples can have larger losses
    than the head's noisy ones for much of training, and one global keep-rate forgets the tail first,
    often all of it in a batch. Ranking within each class only compares a sample with others of its
    given label; and each class forgets its own share, since noise is not spread evenly (symmetric
    flips out of the head make up a large share of a tail class's given labels).

    ``f``: ``forget_rate`` for every class when it is set. With ``forget_rate=None`` every sample is kept
    (the plain mean) until :meth:`set_estimate` hands over the rate estimated from the noisy data
    (``dsink.noise_rate``): the overall estimate for ``global``, each class's own for ``per_class``,
    capped at :data:`MAX_FORGET_RATE`. The estimate is kept across a resume (:meth:`state_dict`).
    """

    def __init__(
        self,
        num_classes: int,
        forget_rate: float | None = None,
        ramp_epochs: float = 10,
        selection: str = "per_class",
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes = {num_classes!r}; expected >= 1")
        if forget_rate is not None and not 0 <= forget_rate < 1:
            raise ValueError(f"forget_rate = {forget_rate!r}; expected 0 <= forget_rate < 1 or None")
        if not ramp_epochs >= 0:
            raise ValueError(f"ramp_epochs = {ramp_epochs!r}; expected >= 0")
        if selection not in SELECTIONS:
            raise ValueError(f"selection = {selection!r}; expected one of {', '.join(SELECTIONS)}")
        self.num_classes, self.selection = int(num_classes), selection
        self.set_rate, self.ramp_epochs = forget_rate, ramp_epochs
        self.noise_rate_estimate: float | None = None  # overall share (logged, checkpointed)
        self.noise_rate_estimate_per_class: tuple[float, ...] | None = None  # (C,)

    @property
    def estimates(self) -> bool:
        """Does the forget rate come from an estimate (``forget_rate=None``)?"""
        return self.set_rate is None

    @property
    def forget_rate(self) -> float | None:
        """The overall rate: the set one, or the capped overall estimate; None while there is none."""
        if self.set_rate is not None:
            return self.set_rate
        if self.noise_rate_estimate is None:
            return None
        return min(self.noise_rate_estimate, MAX_FORGET_RATE)

    @property
    def forget_rates(self) -> tuple[float, ...] | None:
        """The rate each class ramps to (C,): all :attr:`forget_rate` for ``global`` or a set rate."""
        if self.set_rate is not None or self.selection == "global":
            f = self.forget_rate
            return None if f is None else (f,) * self.num_classes
        if self.noise_rate_estimate_per_class is None:
            return None
        return tuple(min(r, MAX_FORGET_RATE) for r in self.noise_rate_estimate_per_class)

    def set_estimate(self, value: float | SupportsFloat) -> None:
        """Hand over the noise-rate estimate: a ``dsink.noise_rate.NoiseRateEstimate`` (``overall`` and
        ``per_class``) or a bare share (then every class gets it)."""
        per_class = getattr(value, "per_class", None)
        overall = float(getattr(value, "overall", value))
        self._set(overall, (overall,) * self.num_classes if per_class is None else per_class)

    def _set(self, overall: float, per_class: Sequence[float]) -> None:
        rates = tuple(float(r) for r in per_class)
        if len(rates) != self.num_classes:
            raise ValueError(f"noise rate estimate has {len(rates)} classes; expected {self.num_classes}")
        if not all(0.0 <= r <= 1.0 for r in (overall, *rates)):
            raise ValueError(
                f"noise rate estimate = {overall!r}, per class {list(rates)}; expected a share in [0, 1]"
            )
        self.noise_rate_estimate, self.noise_rate_estimate_per_class = overall, rates

    def keep_mask(self, per_sample_loss: torch.Tensor, labels: torch.Tensor, progress: float) -> torch.Tensor:
        """The samples kept at epoch progress ``progress`` (0-based, fractional)."""
        rates = self.forget_rates
        if rates is None:
            return torch.ones(per_sample_loss.shape, dtype=torch.bool, device=per_sample_loss.device)
        if self.selection == "global":
            keep = small_loss_keep_fraction(progress, rates[0], self.ramp_epochs)
            return small_loss_keep_mask(per_sample_loss, keep)
        keeps = [small_loss_keep_fraction(progress, f, self.ramp_epochs) for f in rates]
        return small_loss_keep_mask_per_class(per_sample_loss, labels, keeps)

    def __call__(self, per_sample_loss: torch.Tensor, labels: torch.Tensor, progress: float) -> torch.Tensor:
        """The mean loss over the kept samples (over all of them before there is a rate)."""
        if self.forget_rates is None:  # no rate yet: every sample
            return per_sample_loss.mean()
        return per_sample_loss[self.keep_mask(per_sample_loss, labels, progress)].mean()

    def epoch_metrics(self) -> dict[str, float]:
        """``noise_rate_estimate`` once it exists (the engine logs it after every epoch)."""
        return {} if self.noise_rate_estimate is None else {"noise_rate_estimate": self.noise_rate_estimate}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The estimate as float64 tensors (NaN: none yet), loadable with ``weights_only=True``."""
        nan = float("nan")
        est, per = self.noise_rate_estimate, self.noise_rate_estimate_per_class
        return {
            "noise_rate_estimate": torch.tensor(nan if est is None else est, dtype=torch.float64),
            "noise_rate_estimate_per_class": torch.tensor(
                (nan,) * self.num_classes if per is None else per, dtype=torch.float64
            ),
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the estimate; a state without it (none yet, or another objective's) leaves none, one
        without the per-class rates (an older checkpoint) gives every class the overall one."""
        est = state.get("noise_rate_estimate")
        if est is None or math.isnan(float(est)):
            self.noise_rate_estimate = self.noise_rate_estimate_per_class = None
            return
        per = state.get("noise_rate_estimate_per_class")
        if per is None or bool(torch.isnan(per).any()):
            self._set(float(est), (float(est),) * self.num_classes)
        else:
            self._set(float(est), per.reshape(-1).tolist())


class SmallLossObjective:
    """Base of the objectives that train with a :class:`SmallLossSelection` (``self.small_loss``): the
    noise teacher's and the ``la_small_loss`` baseline's. The training loop talks to the objective, not
    to its selection: it asks whether a noise rate must be estimated (:attr:`estimates`), hands the
    estimate over (:meth:`set_estimate`), logs :meth:`epoch_metrics` and checkpoints :meth:`state_dict`;
    here those go to the selection once, for both.
    """

    small_loss: SmallLossSelection

    @property
    def estimates(self) -> bool:
        """Does this objective need the noise rate estimated from the noisy data?"""
        return self.small_loss.estimates

    @property
    def noise_rate_estimate(self) -> float | None:
        """The overall estimate (logged, checkpointed, written to the logits metadata); None before it."""
        return self.small_loss.noise_rate_estimate

    @property
    def noise_rate_estimate_per_class(self) -> tuple[float, ...] | None:
        """The estimate per given-label class (C,); None before it exists."""
        return self.small_loss.noise_rate_estimate_per_class

    @property
    def forget_rate(self) -> float | None:
        """The overall rate the selection ramps to; None while the estimate does not exist yet."""
        return self.small_loss.forget_rate

    def set_estimate(self, value: float | SupportsFloat) -> None:
        """A ``dsink.noise_rate.NoiseRateEstimate`` (overall and per class) or a bare share in [0, 1]."""
        self.small_loss.set_estimate(value)

    def epoch_metrics(self) -> dict[str, float]:
        """Logged by the engine after every epoch (dvclive): the estimate once it exists."""
        return self.small_loss.epoch_metrics()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Checkpointed by the engine, so a resumed run keeps the estimate."""
        return self.small_loss.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.small_loss.load_state_dict(state)


# ------------------------------------------------------------------------------------------------- ELR


class ELRLoss:
    """Early-learning regularisation (Liu et al., NeurIPS 2020): ``CE + lam * mean_i log(1 - <t_i, p_i>)``.

    ``t_i`` is a per-sample running average of the model's own detached predictions,
    ``t_i <- beta * t_i + (1 - beta) * p_i`` with ``p`` clamped to ``[1e-4, 1 - 1e-4]`` and renormalised;
    it is updated *before* the loss is computed, as in the reference code. Minimising ``log(1 - <t, p>)``
    keeps the model close to what it predicted early, before it memorised wrong labels. The raw logits
    stay in the training-prior space.

    The buffer (``num_samples, num_classes``, float32) follows the logits' device on first use;
    :meth:`state_dict` / :meth:`load_state_dict` let a training loop checkpoint it.
    """

    CLAMP = 1e-4

    def __init__(self, num_samples: int, num_classes: int, beta: float = 0.7, lam: float = 3.0) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples = {num_samples!r}; expected >= 1")
        if num_classes < 2:
            raise ValueError(f"num_classes = {num_classes!r}; expected >= 2")
        if not 0 <= beta < 1:
            raise ValueError(f"beta = {beta!r}; expected 0 <= beta < 1")
        if not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lam = {lam!r}; expected a finite number >= 0")
        self.beta, self.lam = float(beta), float(lam)
        self.target = torch.zeros(num_samples, num_classes, dtype=torch.float32)

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        _check_logits_target(logits, target)
        if logits.shape[1] != self.target.shape[1]:
            c = self.target.shape[1]
            raise ValueError(f"logits have {logits.shape[1]} classes; ELR was built for num_classes = {c}")
        if index.shape != target.shape or index.dtype.is_floating_point:
            raise ValueError(
                f"index shape = {tuple(index.shape)}, dtype = {index.dtype}; expected integer (N,)"
            )
        n_samples = self.target.shape[0]
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n_samples):
            lo, hi = int(index.min()), int(index.max())
            raise ValueError(f"index values span {lo}..{hi}; expected within [0, {n_samples})")
        if self.target.device != logits.device:
            self.target = self.target.to(logits.device)
        idx = index.long().to(logits.device)

        z = _float_logits(logits)
        p = torch.softmax(z, dim=1).clamp(self.CLAMP, 1 - self.CLAMP)
        with torch.no_grad():
            p_d = p.detach().to(self.target.dtype)
            p_d = p_d / p_d.sum(dim=1, keepdim=True)
            self.target[idx] = self.beta * self.target[idx] + (1 - self.beta) * p_d
        t = self.target[idx].to(p.dtype)
        reg = torch.log1p(-(t * p).sum(dim=1)).mean()
        return F.cross_entropy(z, target.long()) + self.lam * reg

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"target": self.target.detach().cpu().clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if "target" not in state:
            raise ValueError(f"ELR state keys = {sorted(state)}; expected 'target'")
        t = state["target"]
        if tuple(t.shape) != tuple(self.target.shape):
            want = tuple(self.target.shape)
            raise ValueError(f"ELR state target shape = {tuple(t.shape)}; expected {want}")
        self.target = t.detach().to(device=self.target.device, dtype=torch.float32).clone()
