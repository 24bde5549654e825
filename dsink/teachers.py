"""Teacher recipes: which loss each role trains with, and which prior its raw logits are under.

The space matters downstream (``method.md``, "which prior each probability is under"): a model trained
with CE or GCE on the long-tailed set outputs *training-prior* posteriors; one trained with the
logit-adjusted loss (``tau``) or balanced softmax outputs *balanced* posteriors from its raw logits. Each
teacher records ``train_offset`` (per class) in its logits metadata: ``raw + train_offset`` is the
training-prior logit, so ``distill`` can put every probability in one space exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from dsink import losses
from dsink.artifacts import CorruptedIndex
from dsink.params import ImbalanceTeacherParams, NoiseTeacherParams
from dsink.priors import label_log_prior

MAX_FORGET_RATE = losses.MAX_FORGET_RATE  # the most small-loss selection forgets of an estimated rate


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


class _NoiseObjective(losses.SmallLossObjective):
    """The noise teacher's loss, plus what it carries across epochs (ELR's targets, the noise-rate estimate).

    ``small_loss``: :class:`dsink.losses.SmallLossSelection` on the per-sample CE (``p.selection``:
    one keep-rate per batch, or each given-label class its own). It forgets ``p.forget_rate`` when that is
    set. With ``forget_rate: null`` it keeps every sample (plain CE) until :meth:`set_estimate` hands it
    the noise rate estimated from the noisy data (``dsink.noise_rate``, overall and per class) after
    ``p.estimate_epochs``; from then on the estimate ramps like a set rate. The estimate's plumbing is
    :class:`dsink.losses.SmallLossObjective`'s.
    """

    def __init__(self, p: NoiseTeacherParams, num_samples: int, num_classes: int) -> None:
        self.p = p
        self.small_loss = losses.SmallLossSelection(num_classes, p.forget_rate, p.ramp_epochs, p.selection)
        self.elr = (
            losses.ELRLoss(num_samples, num_classes, beta=p.elr_beta, lam=p.elr_lambda)
            if p.method == "elr"
            else None
        )

    @property
    def estimates(self) -> bool:
        """Only ``small_loss`` forgets, so only it needs the noise rate estimated."""
        return self.p.method == "small_loss" and self.small_loss.estimates

    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, progress: float
    ) -> torch.Tensor:
        m = self.p.method
        if m == "gce":
            return losses.gce(logits, labels, q=self.p.q)
        if m == "small_loss":
            return self.small_loss(losses.cross_entropy(logits, labels, reduction="none"), labels, progress)
        if m == "elr":
            assert self.elr is not None
            return self.elr(logits, labels, rows)
        return losses.cross_entropy(logits, labels)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The estimate and, for ``elr``, its per-sample targets."""
        state = dict(self.elr.state_dict()) if self.elr is not None else {}
        state.update(self.small_loss.state_dict())
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if self.elr is not None:
            self.elr.load_state_dict(state)
        self.small_loss.load_state_dict(state)


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
