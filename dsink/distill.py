"""The D-SINK objective plugged into the training engine.

``L = L_base + alpha * CE(q, f)`` where the surrogate labels ``q`` solve the dual-granularity OT problem
of ``method.md`` (:func:`dsink.ot.dsink_targets`): cost from the noise-robust teacher's and the student's
log-probabilities (per sample), class totals from the imbalance-robust teacher (per class).

All three probabilities meet in one space, the **training prior** (where class totals are training-set
class totals, which is what the marginal constraint is about):

- teacher logits are read as ``raw + train_offset`` (from the file's metadata, written by
  ``dump_logits``; a file without it is taken as training-prior unless ``distill.<role>_space`` says
  ``balanced``, in which case the noisy-label prior is added);
- the student's raw logits are balanced-space and ``raw + tau * log(prior)`` is its training-prior
  logit; the loss is taken on the latter, so at test time the raw argmax is the balanced prediction
  (logit adjustment built into the student). ``prior`` is the imbalance teacher's estimate of the class
  frequencies (``sum_i f_L(x_i) / N``) or the noisy-label frequencies.

Scope ``batch`` solves per mini-batch; ``dataset`` re-solves the class scaling over all training samples
every ``resolve_every`` epochs (chunked, O(N * C) memory) and reads ``q`` for each batch from that.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dsink import losses, ot
from dsink.artifacts import CorruptedIndex, TeacherLogits
from dsink.errors import DsinkError
from dsink.params import DistillParams


def train_space_logits(
    t: TeacherLogits, space: str, index: CorruptedIndex, role: str
) -> tuple[np.ndarray, np.ndarray]:
    """A teacher's (train, test) logits in the training-prior space."""
    C = index.num_classes
    if space == "auto":
        offset = t.meta.get("train_offset")
        if offset is None:
            offset = np.zeros(C)
        offset = np.asarray(offset, dtype=np.float64)
        if offset.shape != (C,) or not np.all(np.isfinite(offset)):
            raise DsinkError(f"{role} teacher: metadata train_offset must be {C} finite numbers")
    elif space == "balanced":
        counts = np.maximum(np.bincount(index.noisy_label, minlength=C), 1).astype(np.float64)
        offset = np.log(counts / counts.sum())
    else:
        offset = np.zeros(C)
    off = offset.astype(np.float32)
    return t.train + off, t.test + off


class DsinkObjective:
    """Callable objective for :func:`dsink.engine.train` (rows index the corrupted set)."""

    def __init__(
        self, p: DistillParams, noise_train: np.ndarray, imbalance_train: np.ndarray, noisy_prior: np.ndarray
    ) -> None:
        self.p = p
        s = p.sinkhorn
        self.log_fn = F.log_softmax(torch.from_numpy(noise_train).float() / s.temperature, dim=1)
        p_l = torch.softmax(torch.from_numpy(imbalance_train).float(), dim=1)
        if p.class_totals == "hard":
            p_l = F.one_hot(p_l.argmax(1), p_l.shape[1]).float()
        self.p_l = p_l
        n = p_l.shape[0]
        if p.prior == "imbalance_teacher":
            counts = p_l.double().sum(0)
        else:
            counts = torch.from_numpy(np.asarray(noisy_prior, dtype=np.float64)) * n
        # add-one smoothing: a class the estimate never saw must not get log(0) = -inf (or -27) added,
        # which would make the raw (balanced) argmax predict it everywhere
        prior = (counts + 1.0) / (n + counts.numel())
        self.student_offset = (p.tau * torch.log(prior)).float()
        # The base loss's targets are the noisy labels, whose class marginal is the noisy-label prior: each
        # term adjusts the raw (balanced) logits by the prior of its own targets, so both agree on what
        # "balanced" means even when q's class totals (e.g. `class_totals: hard`) differ from the labels'.
        noisy_counts = torch.from_numpy(np.asarray(noisy_prior, dtype=np.float64)) * n
        self.base_offset = (p.tau * torch.log((noisy_counts + 1.0) / (n + noisy_counts.numel()))).float()
        self.dataset_q: torch.Tensor | None = None  # (N, C) surrogate labels, dataset scope
        self.last_sinkhorn: dict[str, float] = {}

    def alpha(self, progress: float) -> float:
        w = self.p.alpha_warmup_epochs
        return self.p.alpha * (min(1.0, progress / w) if w > 0 else 1.0)

    def train_logits(self, raw: torch.Tensor) -> torch.Tensor:
        return raw + self.student_offset.to(raw.device)

    def targets(self, z_train: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """q for the samples ``rows`` given the student's training-prior logits ``z_train``."""
        if self.dataset_q is not None:
            return self.dataset_q[rows.cpu()].to(z_train.device)
        s = self.p.sinkhorn
        dev = z_train.device
        log_f = F.log_softmax(z_train.detach().float() / s.temperature, dim=1)
        q, info = ot.dsink_targets(
            self.log_fn[rows.cpu()].to(dev),
            log_f,
            self.p_l[rows.cpu()].to(dev),
            reg=s.reg,
            max_iter=s.max_iter,
            tol=s.tol,
            log=True,
        )
        self.last_sinkhorn = {"n_iter": float(info["n_iter"]), "err": float(info["err"])}
        return q

    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, progress: float
    ) -> torch.Tensor:
        z_train = self.train_logits(logits)
        q = self.targets(z_train, rows)
        loss = self.alpha(progress) * losses.soft_cross_entropy(z_train, q)
        if self.p.base_loss == "logit_adjusted":
            loss = loss + losses.cross_entropy(logits + self.base_offset.to(logits.device), labels)
        elif self.p.base_loss == "ce":
            loss = loss + losses.cross_entropy(logits, labels)
        return loss

    def resolve_dataset(self, student_raw: np.ndarray) -> dict[str, float]:
        """Dataset scope: solve the class scaling over all samples from the student's current logits."""
        s = self.p.sinkhorn
        n, C = student_raw.shape
        log_k = torch.empty((n, C), dtype=torch.float32)
        for start in range(0, n, self.p.chunk_size):  # chunked: temporaries stay O(chunk * C)
            sl = slice(start, start + self.p.chunk_size)
            z = self.train_logits(torch.from_numpy(student_raw[sl]).float())
            log_k[sl] = (self.log_fn[sl] + F.log_softmax(z / s.temperature, dim=1)) / s.reg
        r = self.p_l.double().sum(0)
        log_u, info = ot.class_scaling(
            log_k, r.to(log_k.dtype), max_iter=s.max_iter, tol=s.tol, chunk_size=self.p.chunk_size, log=True
        )
        self.dataset_q = ot.apply_class_scaling(log_k, log_u)
        del log_k
        return {"n_iter": float(info["n_iter"]), "err": float(info["err"])}


def fit_student(
    params: Any,
    corrupted: str,
    imbalance_logits: str,
    noise_logits: str,
    model_out: str,
    logits_out: str,
    live_dir: str | None,
) -> dict[str, Any]:
    """Train the D-SINK student end to end; write its state dict and its logits (contract schema)."""
    from dsink.artifacts import read_logits
    from dsink.dump import model_logits, write_model_logits
    from dsink.engine import (
        clear_checkpoint,
        predict_logits,
        save_state_dict,
        setup_runtime,
        teardown_runtime,
        train,
    )
    from dsink.models import build_model
    from dsink.runs import checkpoint_dir, open_corpus, stage_config
    from dsink.tracking import epoch_tracker

    dp: DistillParams = params.distill
    rt = setup_runtime()
    try:
        corpus = open_corpus(params, corrupted)
        idx = corpus.index
        n_test = len(corpus.source.test)
        t_l = read_logits(imbalance_logits, idx, n_test)
        t_n = read_logits(noise_logits, idx, n_test)
        for a, b in (("dataset", "dataset"), ("num_classes", "num_classes")):
            if a in t_l.meta and b in t_n.meta and t_l.meta[a] != t_n.meta[b]:
                raise DsinkError(
                    f"teachers disagree on {a}: {imbalance_logits} has {t_l.meta[a]!r}, "
                    f"{noise_logits} has {t_n.meta[b]!r}"
                )
        l_train, _ = train_space_logits(t_l, dp.imbalance_space, idx, "imbalance")
        n_train, _ = train_space_logits(t_n, dp.noise_space, idx, "noise")
        objective = DsinkObjective(dp, n_train, l_train, idx.noisy_prior())
        torch.manual_seed(params.seed)
        model = build_model(dp.model, idx.num_classes, corpus.source.channels)
        ckpt = checkpoint_dir(
            "distill",
            stage_config(params, "seed", "data", "distill"),
            [corrupted, imbalance_logits, noise_logits],
        )

        on_epoch_start = None
        if dp.scope == "dataset":

            def on_epoch_start(m: torch.nn.Module, epoch: int) -> None:
                if epoch % dp.resolve_every == 0 or objective.dataset_q is None:
                    raw = predict_logits(
                        m,
                        corpus.source.train,
                        idx.sample_id,
                        corpus.normalizer,
                        rt.device,
                        512,
                        desc="resolve",
                        rt=rt,
                    )
                    objective.resolve_dataset(raw)

        tracker = epoch_tracker(corpus, rt.device, 512) if dp.track_every else None
        result = train(
            model,
            objective,
            corpus.training_set(),
            corpus.normalizer,
            dp,
            params.seed,
            rt,
            checkpoint_dir=ckpt,
            live_dir=live_dir,
            evaluate=tracker,
            on_epoch_start=on_epoch_start,
            desc="distill",
        )
        if rt.is_main:
            z = model_logits(result.model, corpus, 512, "student")
            save_state_dict(result.model, model_out)
            write_model_logits(
                logits_out,
                z,
                corpus,
                {
                    "role": "student",
                    "method": "dsink",
                    "model": dp.model,
                    "space": "balanced",
                    "train_offset": objective.student_offset.tolist(),
                },
            )
            clear_checkpoint(ckpt)
        return result.history[-1] if result.history else {}
    finally:
        teardown_runtime(rt)
