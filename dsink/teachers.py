"""Teacher recipes: which loss each role trains with, and which prior its raw logits are under.

The space matters downstream (``method.md``, "which prior each probability is under"): a model trained
with CE or GCE on the long-tailed set outputs *training-prior* posteriors; one trained with the
logit-adjusted loss (``tau``) or balanced softmax outputs *balanced* posteriors from its raw logits. Each
teacher records ``train_offset`` (per class) in its logits metadata: ``raw + train_offset`` is the
training-prior logit, so ``distill`` can put every probability in one space exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dsink import losses
from dsink.artifacts import CorruptedIndex
from dsink.params import ImbalanceTeacherParams, NoiseTeacherParams
from dsink.priors import label_log_prior


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
    def __init__(self, p: NoiseTeacherParams, forget_rate: float, num_samples: int, num_classes: int) -> None:
        self.p, self.forget_rate = p, forget_rate
        self.elr = (
            losses.ELRLoss(num_samples, num_classes, beta=p.elr_beta, lam=p.elr_lambda)
            if p.method == "elr"
            else None
        )

    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, progress: float
    ) -> torch.Tensor:
        m = self.p.method
        if m == "gce":
            return losses.gce(logits, labels, q=self.p.q)
        if m == "small_loss":
            per_sample = losses.cross_entropy(logits, labels, reduction="none")
            keep = losses.small_loss_keep_fraction(progress, self.forget_rate, self.p.ramp_epochs)
            mask = losses.small_loss_keep_mask(per_sample.detach(), keep)
            return per_sample[mask].mean()
        if m == "elr":
            assert self.elr is not None
            return self.elr(logits, labels, rows)
        return losses.cross_entropy(logits, labels)


def imbalance_recipe(p: ImbalanceTeacherParams, index: CorruptedIndex) -> TeacherRecipe:
    lp = torch.tensor(label_log_prior(index.noisy_label, index.num_classes), dtype=torch.float32)
    if p.method == "logit_adjustment":
        offset, space = p.tau * lp, ("balanced" if p.tau > 0 else "train")
    elif p.method == "balanced_softmax":
        offset, space = lp.clone(), "balanced"
    else:
        offset, space = torch.zeros_like(lp), "train"
    return TeacherRecipe(_ImbalanceObjective(p.method, lp, p.tau), None, offset, space)


def noise_recipe(p: NoiseTeacherParams, index: CorruptedIndex, noise_rate: float) -> TeacherRecipe:
    forget = p.forget_rate if p.forget_rate is not None else noise_rate
    obj = _NoiseObjective(p, forget, index.sample_id.size, index.num_classes)
    zeros = torch.zeros(index.num_classes)
    return TeacherRecipe(obj, obj.elr, zeros, "train")


def recipe_for(
    role: str, p: ImbalanceTeacherParams | NoiseTeacherParams, index: CorruptedIndex, noise_rate: float
) -> TeacherRecipe:
    if role == "imbalance":
        assert isinstance(p, ImbalanceTeacherParams)
        return imbalance_recipe(p, index)
    assert isinstance(p, NoiseTeacherParams)
    return noise_recipe(p, index, noise_rate)
