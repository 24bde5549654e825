"""Classification losses on raw logits: plain, logit-adjusted, balanced-softmax, GCE, soft-label CE,
small-loss selection and ELR.

Which prior a model's raw logits are under after training (this matters to ``distill``):

- ``cross_entropy`` and ``gce`` on long-tailed labels: *training-prior* posteriors (head classes favoured);
- ``logit_adjusted_ce`` with ``tau = 1`` and ``balanced_softmax_ce``: the raw logits estimate the *balanced*
  posterior; ``raw + tau * log(prior)`` is the training-prior logit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction = {reduction!r}; expected 'mean' or 'none'")


def _check_shapes(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.ndim != 2 or target.shape != logits.shape[:1]:
        raise ValueError(
            f"logits shape {tuple(logits.shape)} and target shape {tuple(target.shape)} do not "
            "match (expected (N, C) and (N,))"
        )


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    _check_shapes(logits, target)
    return _reduce(F.cross_entropy(logits, target, reduction="none"), reduction)


def logit_adjusted_ce(
    logits: torch.Tensor,
    target: torch.Tensor,
    log_prior: torch.Tensor,
    tau: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Menon et al. (ICLR 2021): ``CE(logits + tau * log_prior, target)``; ``tau = 0`` is plain CE."""
    if tau < 0:
        raise ValueError(f"tau = {tau}; expected >= 0")
    if log_prior.shape != logits.shape[1:]:
        raise ValueError(f"log_prior shape {tuple(log_prior.shape)}; expected ({logits.shape[1]},)")
    return cross_entropy(logits + tau * log_prior.to(logits.dtype), target, reduction)


def balanced_softmax_ce(
    logits: torch.Tensor, target: torch.Tensor, log_prior: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Ren et al. (2020): the logit-adjusted loss with ``tau = 1``."""
    return logit_adjusted_ce(logits, target, log_prior, 1.0, reduction)


def gce(logits: torch.Tensor, target: torch.Tensor, q: float = 0.7, reduction: str = "mean") -> torch.Tensor:
    """Generalized cross-entropy (Zhang & Sabuncu 2018): ``(1 - p_y^q) / q``; q -> 0 is CE, q = 1 is MAE.

    ``p_y^q`` is computed as ``exp(q * log p_y)`` from ``log_softmax`` (no underflow to 0/0).
    """
    if not 0 < q <= 1:
        raise ValueError(f"q = {q}; expected 0 < q <= 1")
    _check_shapes(logits, target)
    log_py = F.log_softmax(logits, dim=1).gather(1, target.view(-1, 1)).squeeze(1)
    # -expm1(q * log p) / q == (1 - p^q) / q, accurate for small q (the CE limit)
    return _reduce(-torch.expm1(q * log_py) / q, reduction)


def soft_cross_entropy(
    logits: torch.Tensor, soft_targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """``-sum_c q_c log softmax(logits)_c`` for target distributions ``q`` (rows)."""
    if soft_targets.shape != logits.shape:
        raise ValueError(
            f"soft_targets shape {tuple(soft_targets.shape)} != logits shape {tuple(logits.shape)}"
        )
    return _reduce(-(soft_targets * F.log_softmax(logits, dim=1)).sum(1), reduction)


def small_loss_keep_fraction(epoch: float, forget_rate: float, ramp_epochs: int) -> float:
    """Han et al. (2018) schedule: keep ``1 - forget_rate * min(1, epoch / ramp_epochs)`` of each batch."""
    if not 0 <= forget_rate < 1:
        raise ValueError(f"forget_rate = {forget_rate}; expected 0 <= forget_rate < 1")
    ramp = 1.0 if ramp_epochs <= 0 else min(1.0, epoch / ramp_epochs)
    return 1.0 - forget_rate * ramp


def small_loss_keep_mask(per_sample_loss: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Boolean mask of the ``ceil(keep_fraction * N)`` (>= 1) smallest losses; ties go to the lower index."""
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction = {keep_fraction}; expected 0 < keep_fraction <= 1")
    n = per_sample_loss.numel()
    k = max(1, math.ceil(keep_fraction * n - 1e-9))
    order = torch.sort(per_sample_loss.detach(), stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool, device=per_sample_loss.device)
    mask[order[:k]] = True
    return mask


class ELRLoss:
    """Early-learning regularisation (Liu et al. 2020): ``CE + lam * mean(log(1 - <t_i, p_i>))``.

    ``t_i`` is a running average of the model's own (detached) predictions for sample ``i``: the model is
    pulled towards what it predicted early, before it memorised the wrong labels.
    """

    def __init__(self, num_samples: int, num_classes: int, beta: float = 0.7, lam: float = 3.0) -> None:
        if not 0 <= beta < 1:
            raise ValueError(f"beta = {beta}; expected 0 <= beta < 1")
        if lam < 0:
            raise ValueError(f"lam = {lam}; expected >= 0")
        self.beta, self.lam = beta, lam
        self.target = torch.zeros(num_samples, num_classes)

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        _check_shapes(logits, target)
        p = torch.softmax(logits, dim=1).clamp(1e-4, 1 - 1e-4)
        with torch.no_grad():
            pd = (p / p.sum(1, keepdim=True)).detach().to(self.target.dtype).cpu()
            idx = index.cpu()
            self.target[idx] = self.beta * self.target[idx] + (1 - self.beta) * pd
        t = self.target[index.cpu()].to(logits.device, logits.dtype)
        reg = torch.log(1 - (t * p).sum(1)).mean()
        return F.cross_entropy(logits, target) + self.lam * reg

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"target": self.target.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["target"].shape != self.target.shape:
            raise ValueError(f"ELR state shape {tuple(state['target'].shape)} != {tuple(self.target.shape)}")
        self.target = state["target"].clone()
