"""Comparison models: trained on the same corrupted set as D-SINK and evaluated beside it.

``train_baseline@ce`` is plain cross-entropy on the noisy long-tailed labels (what a user gets without
any method). ``train_baseline@la_small_loss`` is one model for both problems, as strong as a user would
build it: logit-adjusted CE (tail-aware) on the samples class-aware small-loss selection keeps
(noise-robust),

    L = (1 / |K|) sum_{i in K} CE(z_i + tau * log pi, y_i),

with ``pi`` the add-one smoothed prior of the noisy labels (:mod:`dsink.priors`) and ``K`` the batch's
kept samples: :class:`dsink.losses.SmallLossSelection`, ranking by those same per-sample logit-adjusted
losses. With ``selection: per_class`` each given-label class keeps its own smallest-loss share ``1 - f_c``
(ramped over ``ramp_epochs``), so a tail class is not forgotten wholesale; ``f_c`` is ``forget_rate``
or, when that is null, the noise rate estimated from the noisy data after ``estimate_epochs`` epochs of
all samples (:func:`dsink.selection.estimate_hook`, on the adjusted logits the loss sees), exactly as
the noise teacher does it. Each run writes its state dict and, in the same stage, the contract's logits
Parquet (train + test rows, ``train_offset`` metadata; ``noise_rate_estimate`` and
``noise_rate_estimate_per_class`` when estimated), so ``evaluate`` reads it exactly like a teacher.
"""

from __future__ import annotations

from typing import Any

import torch

from dsink import losses
from dsink.artifacts import CorruptedIndex
from dsink.checkpoints import clear_checkpoint, save_state_dict
from dsink.dump import model_logits, write_model_logits
from dsink.fitting import fit_recipe, run_checkpoint_dir, training_run
from dsink.params import BASELINES, LASmallLossBaselineParams, Params
from dsink.priors import label_log_prior
from dsink.teachers import TeacherRecipe


class _CEObjective:
    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, progress: float
    ) -> torch.Tensor:
        return losses.cross_entropy(logits, labels)


class _LASmallLossObjective(losses.SmallLossObjective):
    """Logit-adjusted CE averaged over the samples small-loss selection keeps (see the module docstring);
    carries the noise-rate estimate (logged, checkpointed) like the noise teacher's objective."""

    def __init__(self, p: LASmallLossBaselineParams, lp: torch.Tensor) -> None:
        self.lp, self.tau = lp, p.tau
        self.small_loss = losses.SmallLossSelection(lp.numel(), p.forget_rate, p.ramp_epochs, p.selection)

    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, progress: float
    ) -> torch.Tensor:
        lp = self.lp.to(logits.device)
        per_sample = losses.logit_adjusted_ce(logits, labels, lp, tau=self.tau, reduction="none")
        return self.small_loss(per_sample, labels, progress)


def baseline_recipe(method: str, params: Params, index: CorruptedIndex) -> TeacherRecipe:
    """The objective of baseline ``method`` and the space its raw logits are in."""
    if method not in BASELINES:
        raise ValueError(f"baseline {method!r}; expected one of {', '.join(BASELINES)}")
    lp = torch.tensor(label_log_prior(index.noisy_label, index.num_classes), dtype=torch.float32)
    if method == "la_small_loss":
        p = params.baselines.la_small_loss
        obj = _LASmallLossObjective(p, lp)
        return TeacherRecipe(obj, obj, p.tau * lp, "balanced" if p.tau > 0 else "train")
    return TeacherRecipe(_CEObjective(), None, torch.zeros_like(lp), "train")


def fit_baseline(
    params: Params, method: str, corrupted: str, model_out: str, logits_out: str, live_dir: str | None
) -> dict[str, Any]:
    """Train baseline ``method`` (resuming an interrupted run), save it, and dump its logits."""
    with training_run(params, corrupted) as (rt, corpus):
        tp = getattr(params.baselines, method)
        recipe = baseline_recipe(method, params, corpus.index)
        obj = recipe.objective
        ckpt = run_checkpoint_dir(params, f"train_baseline-{method}", f"baselines.{method}", corrupted)
        # the loss sees raw + train_offset (training-prior logits): so does the estimate
        desc = f"baseline[{method}]"
        offset = recipe.train_offset
        result = fit_recipe(rt, corpus, recipe, tp, params.seed, ckpt, live_dir, desc, estimate_offset=offset)
        if rt.is_main:
            net = getattr(result.model, "module", result.model)  # unwrap DDP: rank 0 predicts alone
            z = model_logits(net, corpus, params.dump.batch_size, f"dump[{method}]")
            meta = {
                "role": f"baseline_{method}",
                "method": method,
                "model": tp.model,
                "space": recipe.space,
                "train_offset": [float(v) for v in recipe.train_offset.tolist()],
            }
            if getattr(obj, "noise_rate_estimate", None) is not None:  # none: rate set, or never reached
                meta["noise_rate_estimate"] = obj.noise_rate_estimate
                meta["noise_rate_estimate_per_class"] = list(obj.noise_rate_estimate_per_class)
            write_model_logits(logits_out, z, corpus, meta)
            save_state_dict(result.model, model_out)
            clear_checkpoint(ckpt)
        return result.history[-1] if result.history else {}
