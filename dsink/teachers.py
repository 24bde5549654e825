"""Teacher recipes: which loss each role trains with, and which prior its raw logits are under.

The space matters downstream (``method.md``, "which prior each probability is under"): a model trained
with CE or GCE on the long-tailed set outputs *training-prior* posteriors; one trained with the
logit-adjusted loss (``tau``) or balanced softmax outputs *balanced* posteriors from its raw logits. Each
teacher records ``train_offset`` (per class) in its logits metadata: ``raw + train_offset`` is the
training-prior logit, so ``distill`` can put every probability in one space exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from dsink import losses
from dsink.artifacts import CorruptedIndex
from dsink.params import ImbalanceTeacherParams, NoiseTeacherParams
from dsink.priors import label_log_prior

# small-loss selection forgets at most this share when the rate is estimated (it must keep some samples)
MAX_FORGET_RATE = 0.95


@dataclass
class TeacherRecipe:
    objective: Any  # callable(logits, labels, rows, epoch_progress) -> loss
    state: Any  # object with state_dict/load_state_dict, or None
    train_offset: torch.Tensor  # (C,) raw + offset = training-prior logits
    space: str  # "balanced" or "train": what the raw logits estimate


class _ImbalanceObjective:
    def __init__(self, method: str, lp: torch.Tensor, tau: float) -> None:
        self.method, self.lp, self.tau = method, lp, tau

    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, progress: float
    ) -> torch.Tensor:
        lp = self.lp.to(logits.device)
        if self.method == "logit_adjustment":
            return losses.logit_adjusted_ce(logits, labels, lp, tau=self.tau)
        if self.method == "balanced_softmax":
            return losses.balanced_softmax_ce(logits, labels, lp)
        return losses.cross_entropy(logits, labels)


class _NoiseObjective:
    """The noise teacher's loss, plus what it carries across epochs (ELR's targets, the noise-rate estimate).

    Small-loss selection forgets ``p.forget_rate`` when it is set. With ``forget_rate: null`` it keeps every
    sample (plain CE) until :meth:`set_estimate` hands it the noise rate estimated from the noisy data
    (``dsink.noise_rate``) after ``p.estimate_epochs``; from then on the estimate ramps like a set rate.
    """

    def __init__(self, p: NoiseTeacherParams, num_samples: int, num_classes: int) -> None:
        self.p = p
        self.noise_rate_estimate: float | None = None
        self.elr = (
            losses.ELRLoss(num_samples, num_classes, beta=p.elr_beta, lam=p.elr_lambda)
            if p.method == "elr"
            else None
        )

    @property
    def estimates(self) -> bool:
        """Does this objective need the noise rate estimated from the data?"""
        return self.p.method == "small_loss" and self.p.forget_rate is None

    @property
    def forget_rate(self) -> float | None:
        """The rate small-loss selection ramps to; None while the estimate does not exist yet."""
        if self.p.forget_rate is not None:
            return self.p.forget_rate
        if self.noise_rate_estimate is None:
            return None
        return min(self.noise_rate_estimate, MAX_FORGET_RATE)

    def set_estimate(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"noise rate estimate = {value!r}; expected a share in [0, 1]")
        self.noise_rate_estimate = float(value)

    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, progress: float
    ) -> torch.Tensor:
        m = self.p.method
        if m == "gce":
            return losses.gce(logits, labels, q=self.p.q)
        if m == "small_loss":
            per_sample = losses.cross_entropy(logits, labels, reduction="none")
            forget = self.forget_rate
            keep = (
                1.0
                if forget is None
                else losses.small_loss_keep_fraction(progress, forget, self.p.ramp_epochs)
            )
            mask = losses.small_loss_keep_mask(per_sample.detach(), keep)
            return per_sample[mask].mean()
        if m == "elr":
            assert self.elr is not None
            return self.elr(logits, labels, rows)
        return losses.cross_entropy(logits, labels)

    def epoch_metrics(self) -> dict[str, float]:
        """Logged by the engine after every epoch (dvclive): the estimate once it exists."""
        if self.noise_rate_estimate is None:
            return {}
        return {"noise_rate_estimate": self.noise_rate_estimate}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Checkpointed by the engine, so a resumed run keeps the estimate (and ELR's targets)."""
        state = dict(self.elr.state_dict()) if self.elr is not None else {}
        est = self.noise_rate_estimate
        state["noise_rate_estimate"] = torch.tensor(float("nan") if est is None else est, dtype=torch.float64)
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if self.elr is not None:
            self.elr.load_state_dict(state)
        est = state.get("noise_rate_estimate")
        self.noise_rate_estimate = None if est is None or math.isnan(float(est)) else float(est)


def imbalance_recipe(p: ImbalanceTeacherParams, index: CorruptedIndex) -> TeacherRecipe:
    lp = torch.tensor(label_log_prior(index.noisy_label, index.num_classes), dtype=torch.float32)
    if p.method == "logit_adjustment":
        offset, space = p.tau * lp, ("balanced" if p.tau > 0 else "train")
    elif p.method == "balanced_softmax":
        offset, space = lp.clone(), "balanced"
    else:
        offset, space = torch.zeros_like(lp), "train"
    return TeacherRecipe(_ImbalanceObjective(p.method, lp, p.tau), None, offset, space)


def noise_recipe(p: NoiseTeacherParams, index: CorruptedIndex) -> TeacherRecipe:
    """The noise teacher. Reads only the noisy labels' shape: no ground truth reaches any weight."""
    obj = _NoiseObjective(p, index.sample_id.size, index.num_classes)
    zeros = torch.zeros(index.num_classes)
    return TeacherRecipe(obj, obj, zeros, "train")


def recipe_for(
    role: str, p: ImbalanceTeacherParams | NoiseTeacherParams, index: CorruptedIndex
) -> TeacherRecipe:
    if role == "imbalance":
        assert isinstance(p, ImbalanceTeacherParams)
        return imbalance_recipe(p, index)
    assert isinstance(p, NoiseTeacherParams)
    return noise_recipe(p, index)
