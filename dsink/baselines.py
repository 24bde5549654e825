"""Comparison models: trained on the same corrupted set as D-SINK and evaluated beside it.

``train_baseline@ce`` is plain cross-entropy on the noisy long-tailed labels (what a user gets without
any method); ``train_baseline@la_gce`` is the naive single-loss answer to both problems at once, GCE on
logit-adjusted logits. Each run writes its state dict and, in the same stage, the contract's logits
Parquet (train + test rows, ``train_offset`` metadata), so ``evaluate`` reads it exactly like a teacher.
"""

from __future__ import annotations

from typing import Any

import torch

from dsink import losses
from dsink.artifacts import CorruptedIndex
from dsink.dump import model_logits, write_model_logits
from dsink.engine import clear_checkpoint, save_state_dict, setup_runtime, teardown_runtime, train
from dsink.models import build_model
from dsink.params import BASELINES, Params
from dsink.priors import label_log_prior
from dsink.runs import checkpoint_dir, open_corpus, stage_config
from dsink.teachers import TeacherRecipe
from dsink.tracking import epoch_tracker


class _BaselineObjective:
    def __init__(self, method: str, lp: torch.Tensor, tau: float, q: float) -> None:
        self.method, self.lp, self.tau, self.q = method, lp, tau, q

    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, progress: float
    ) -> torch.Tensor:
        if self.method == "la_gce":
            return losses.logit_adjusted_gce(logits, labels, self.lp.to(logits.device), self.tau, self.q)
        return losses.cross_entropy(logits, labels)


def baseline_recipe(method: str, params: Params, index: CorruptedIndex) -> TeacherRecipe:
    """The objective of baseline ``method`` and the space its raw logits are in."""
    if method not in BASELINES:
        raise ValueError(f"baseline {method!r}; expected one of {', '.join(BASELINES)}")
    lp = torch.tensor(label_log_prior(index.noisy_label, index.num_classes), dtype=torch.float32)
    if method == "la_gce":
        p = params.baselines.la_gce
        offset = p.tau * lp
        return TeacherRecipe(
            _BaselineObjective(method, lp, p.tau, p.q), None, offset, "balanced" if p.tau > 0 else "train"
        )
    return TeacherRecipe(_BaselineObjective(method, lp, 0.0, 1.0), None, torch.zeros_like(lp), "train")


def fit_baseline(
    params: Params, method: str, corrupted: str, model_out: str, logits_out: str, live_dir: str | None
) -> dict[str, Any]:
    """Train baseline ``method`` (resuming an interrupted run), save it, and dump its logits."""
    rt = setup_runtime()
    try:
        corpus = open_corpus(params, corrupted)
        tp = getattr(params.baselines, method)
        recipe = baseline_recipe(method, params, corpus.index)
        torch.manual_seed(params.seed)
        model = build_model(tp.model, corpus.index.num_classes, corpus.source.channels)
        config = stage_config(params, "seed", "data", f"baselines.{method}")
        ckpt = checkpoint_dir(f"train_baseline-{method}", config, [corrupted])
        result = train(
            model,
            recipe.objective,
            corpus.training_set(),
            corpus.normalizer,
            tp,
            params.seed,
            rt,
            checkpoint_dir=ckpt,
            live_dir=live_dir,
            objective_state=None,
            evaluate=epoch_tracker(corpus, rt.device, 512) if tp.track_every else None,
            desc=f"baseline[{method}]",
        )
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
            write_model_logits(logits_out, z, corpus, meta)
            save_state_dict(result.model, model_out)
            clear_checkpoint(ckpt)
        return result.history[-1] if result.history else {}
    finally:
        teardown_runtime(rt)
