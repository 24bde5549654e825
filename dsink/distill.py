"""The D-SINK objective plugged into the training engine.

``L = L_base + alpha * CE(q, f)`` where the surrogate labels ``q`` solve the dual-granularity OT problem
of ``method.md`` (:func:`dsink.ot.dsink_targets`): cost from the noise-robust teacher's and the student's
log-probabilities (per sample), class totals from the imbalance-robust teacher (per class). With
``cost_imbalance_weight = w > 0`` the per-sample teacher term is the geometric mixture ``f_N^(1-w) f_L^w``
(:func:`teacher_log_evidence`); with ``class_totals_imbalance_weight = w_r < 1`` the class totals
are read from the same kind of mixture, ``f_N^(1-w_r) f_L^w_r`` (:func:`class_total_weights`).

The base loss (CE or logit-adjusted CE on the noisy labels, or none) can be kept from memorising the
noisy labels on a long schedule in two ways (the defaults are the original full-weight term):
``base_weight`` ramped down to 0 (``base_ramp``, over ``base_ramp_epochs`` or the whole run), and a
per-sample filter (``base_filter``): from the ``q`` already computed for the batch (``agree`` keeps the
samples whose given label is ``argmax q``, ``soft`` weights each by ``q_i[y_i]``), or from the noise
teacher's own verdict (``noise_teacher``: the samples its losses select as clean within each class,
:func:`noise_teacher_selection`; ``noise_teacher_chance``: the same, forgetting only labels it gives
less than chance probability). Either way the weighted per-sample terms are summed and divided by the
batch size (see :meth:`DsinkObjective.__call__`).

Which prior each probability is under matters in one place only, the **class totals**: ``r`` is a
training-set quantity, so the imbalance teacher's probabilities are read in the training-prior space

- teacher logits are read as ``raw + train_offset`` (from the file's metadata, written by
  ``dump_logits``); a file without it is taken as training-prior unless ``distill.imbalance_space``
  says ``balanced``, in which case the noisy-label prior is added.
- with ``w_r < 1`` the noise teacher enters the totals too, so it is read the same way (its metadata).

The cost does not depend on a prior: ``q_ic = u_c v_i sqrt(f_N(x_i)_c f(x_i)_c)``, so a per-class offset
on ``log f_N`` or ``log f`` only rescales ``u`` (a shifted noise teacher gives the same ``q``; tested).
The student's offset still matters for what its raw logits mean: it is trained on
``raw + tau * log(prior)`` (its training-prior logit), so at test time the raw argmax is the balanced
prediction (logit adjustment built into the student). ``prior`` is the imbalance teacher's class totals
or the noisy-label counts, smoothed by :func:`dsink.priors.log_prior` (the rule every model uses).

Scope ``batch`` solves per (global) mini-batch: under torchrun the class totals are summed over the ranks
inside the solver, so ``q`` does not depend on the world size. Scope ``dataset`` re-solves the class
scaling over all training samples every ``resolve_every`` epochs (chunked, O(N * C) memory): each rank
predicts a contiguous shard of the training set, the shards are all-gathered, rank 0 solves and
broadcasts ``log_u``, and every rank reads ``q`` for its own rows. The solve is checkpointed (``log_u``
and the student's weights at the solve), so a run resumed mid-cycle uses exactly the same ``q``.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dsink import losses, ot
from dsink.artifacts import CorruptedIndex, TeacherLogits, read_logits
from dsink.checkpoints import clear_checkpoint, save_state_dict
from dsink.dump import model_logits, write_model_logits
from dsink.engine import train
from dsink.errors import DsinkError
from dsink.inference import predict_logits
from dsink.models import build_model
from dsink.noise_rate import estimate_noise_rates
from dsink.params import DistillParams
from dsink.priors import label_log_prior, log_prior
from dsink.runs import Corpus, checkpoint_dir, open_corpus, stage_config
from dsink.runtime import Runtime, setup_runtime, teardown_runtime
from dsink.tracking import epoch_tracker


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
        offset = label_log_prior(index.noisy_label, C)
    else:
        offset = np.zeros(C)
    off = offset.astype(np.float32)
    return t.train + off, t.test + off


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``rank``'s contiguous shard: ``ceil(n / world)`` rows, the last shorter."""
    per = -(-n // world_size)
    return min(n, rank * per), min(n, (rank + 1) * per)


def gather_rows(shard: np.ndarray, n: int, rt: Runtime) -> np.ndarray:
    """All ranks' contiguous shards (see :func:`shard_bounds`) concatenated into the full ``(n, C)``.

    Shards are padded to one length for ``all_gather``; the padding sits after the last real row.
    """
    if not rt.distributed:
        return shard
    per = -(-n // rt.world_size)
    buf = torch.zeros((per, shard.shape[1]), dtype=torch.float32, device=rt.device)
    buf[: shard.shape[0]] = torch.from_numpy(np.ascontiguousarray(shard, dtype=np.float32)).to(rt.device)
    parts = [torch.empty_like(buf) for _ in range(rt.world_size)]
    dist.all_gather(parts, buf)
    return torch.cat(parts)[:n].cpu().numpy()


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


def teacher_log_evidence(
    noise_train: np.ndarray, imbalance_train: np.ndarray, weight: float, temperature: float = 1.0
) -> torch.Tensor:
    """The teachers' per-sample log-probabilities that enter the cost: ``(1 - w) log f_N + w log f_L``.

    ``w = 0`` is the paper's cost (``f_N`` alone). With ``w > 0`` the cost reads the geometric mixture
    ``f_N^(1-w) f_L^w``, so ``q_i`` is proportional to ``u (.) (f_N^(1-w) f_L^w f)^(1/2)``: the
    imbalance teacher, out of fold, vouches per sample too, which matters once the noise teacher's
    in-sample logits carry the labels it memorised. Neither term needs a prior: a per-class offset on
    either is absorbed by the class scaling ``u``, a per-sample one by ``v``. Float32, ``(N, C)``.
    """
    log_fn = F.log_softmax(torch.from_numpy(np.asarray(noise_train)).double() / temperature, dim=1)
    if weight > 0:
        log_fl = F.log_softmax(torch.from_numpy(np.asarray(imbalance_train)).double() / temperature, dim=1)
        log_fn = (1.0 - weight) * log_fn + weight * log_fl
    return log_fn.float()


def class_total_weights(noise_train: np.ndarray, imbalance_train: np.ndarray, weight: float) -> torch.Tensor:
    """Each sample's share of the class totals: ``softmax(log f_N^(1-w_r) f_L^w_r)``, ``w_r = weight``.

    ``w_r = 1`` is the paper (``f_L`` alone, trusted per class). Unlike the cost, the totals are a
    training-set histogram, so both teachers must be read in the training-prior space
    (:func:`train_space_logits`). The mixture is renormalised per sample. Float32, ``(N, C)``.
    """
    if weight >= 1.0:
        return torch.softmax(torch.from_numpy(np.asarray(imbalance_train)).float(), dim=1)
    log_mix = teacher_log_evidence(noise_train, imbalance_train, weight)
    return torch.softmax(log_mix.double(), dim=1).float()


def teachers_train_space(
    t_n: TeacherLogits, t_l: TeacherLogits, p: DistillParams, index: CorruptedIndex
) -> tuple[np.ndarray, np.ndarray]:
    """The (noise, imbalance) teachers' training logits as the objective reads them: training-prior space.

    The imbalance teacher's space follows ``distill.imbalance_space``; the noise teacher's follows its
    file's metadata (a per-class offset on it does not change the cost, only the class totals when
    ``class_totals_imbalance_weight < 1``).
    """
    n_train, _ = train_space_logits(t_n, "auto", index, "noise")
    l_train, _ = train_space_logits(t_l, p.imbalance_space, index, "imbalance")
    return n_train, l_train


#: the base filters read from the noise teacher's selection -> its ``above_chance``
NOISE_TEACHER_FILTERS = {"noise_teacher": False, "noise_teacher_chance": True}


def noise_teacher_selection(
    noise_train: np.ndarray, noisy_labels: np.ndarray, above_chance: bool = False
) -> np.ndarray:
    """The training samples whose given label the noise teacher vouches for: boolean ``(N,)``.

    Within each given-label class ``c`` (``n_c`` samples), the ``ceil((1 - f_c) n_c)`` samples with the
    smallest loss ``-log f_N(x_i)[y_i]`` are kept, ``f_c`` the share of the class's labels that a
    two-component mixture on those same losses calls wrong (:func:`dsink.noise_rate.estimate_noise_rates`,
    ``per_class``; capped at :data:`dsink.losses.MAX_FORGET_RATE`), so every class keeps some samples.
    With ``above_chance`` (``base_filter: noise_teacher_chance``) only the labels the teacher also gives
    less than chance probability ``1/C`` count in ``f_c``: a class without wrong labels, whose mixture
    splits its easy from its hard samples, then keeps its hard ones.
    The noise teacher is the model trusted per sample; its losses on the given labels are the per-sample
    evidence the base loss lacks: with this filter a short run still learns from the labels (as the
    ``la_small_loss`` baseline does), and the labels the teacher forgot never reach the student through
    the base loss. Ranking within a class keeps the tail: a tail class's clean samples are compared with
    each other, not with the head's. Computed once from the teacher's training logits (``noise_train``,
    in the space it was trained in) and the given labels: no clean label, the same mask on every rank.
    """
    z = torch.from_numpy(np.ascontiguousarray(noise_train, dtype=np.float32))
    y = torch.from_numpy(np.ascontiguousarray(noisy_labels, dtype=np.int64))
    # the selection the noise teacher and la_small_loss train with, at its full forget rates at once
    selection = losses.SmallLossSelection(z.shape[1], ramp_epochs=0, selection="per_class")
    selection.set_estimate(estimate_noise_rates(z.numpy(), y.numpy(), "per_class", above_chance=above_chance))
    return selection.keep_mask(losses.cross_entropy(z, y, reduction="none"), y, 0.0).numpy()


class DsinkObjective:
    """Callable objective for :func:`dsink.engine.train` (rows index the corrupted set).

    ``noisy_labels`` (the training labels, never the clean ones) give the base loss's prior and, with
    ``prior: noisy_labels``, the student's. ``rt`` says which ranks share the work (default: one process).
    """

    def __init__(
        self,
        p: DistillParams,
        noise_train: np.ndarray,
        imbalance_train: np.ndarray,
        noisy_labels: np.ndarray,
        rt: Runtime | None = None,
    ) -> None:
        self.p = p
        self.rt = rt if rt is not None else Runtime(torch.device("cpu"))
        s = p.sinkhorn
        C = noise_train.shape[1]
        self.log_fn = teacher_log_evidence(
            noise_train, imbalance_train, p.cost_imbalance_weight, s.temperature
        )
        p_l = class_total_weights(noise_train, imbalance_train, p.class_totals_imbalance_weight)
        if p.class_totals == "hard":
            p_l = F.one_hot(p_l.argmax(1), p_l.shape[1]).float()
        self.p_l = p_l
        labels_lp = label_log_prior(noisy_labels, C)
        if p.prior == "imbalance_teacher":
            student_lp = log_prior(p_l.double().sum(0).numpy())
        else:
            student_lp = labels_lp
        #: the log prior the student's training-prior offset refers to (``student_offset = tau * this``)
        self.train_log_prior = student_lp
        self.student_offset = torch.from_numpy(p.tau * student_lp).float()
        # The base loss's targets are the noisy labels, whose class marginal is the noisy-label prior: each
        # term adjusts the raw (balanced) logits by the prior of its own targets, so both agree on what
        # "balanced" means even when q's class totals (e.g. `class_totals: hard`) differ from the labels'.
        self.base_offset = torch.from_numpy(p.tau * labels_lp).float()
        #: base_filter noise_teacher: the samples the noise teacher selects as clean (N,) float32
        self.base_keep: torch.Tensor | None = None
        if p.base_filter in NOISE_TEACHER_FILTERS and p.base_loss != "none":
            chance = NOISE_TEACHER_FILTERS[p.base_filter]
            keep = noise_teacher_selection(noise_train, noisy_labels, above_chance=chance)
            self.base_keep = torch.from_numpy(keep).float()
        # dataset scope: the log kernel of the last solve (N, C) and its class potential (C,)
        self.log_k: torch.Tensor | None = None
        self.log_u: torch.Tensor | None = None
        self.solve: dict[str, float] = {}  # n_iter, err, epoch of the last dataset-scope solve
        self.solve_weights: dict[str, torch.Tensor] | None = None  # the student at that solve
        self._resolved = False  # a dataset-scope solve ran since the last epoch_metrics()
        # dataset scope: this run's solves and the (epoch, err) of those that stopped at max_iter, reported
        # once at the end (convergence_note) instead of one warning per epoch
        self.n_solves = 0
        self.unconverged: list[tuple[int, float]] = []
        self._iters: list[int] = []  # batch scope: this epoch's solves
        self._errs: list[float] = []
        # this epoch's base-loss tallies: sum of the weights applied and steps; samples kept and seen
        self._base = [0.0, 0.0, 0.0, 0.0]

    def alpha(self, progress: float) -> float:
        w = self.p.alpha_warmup_epochs
        return self.p.alpha * (min(1.0, progress / w) if w > 0 else 1.0)

    def base_weight(self, progress: float) -> float:
        """The base loss's weight at ``progress`` (epochs, fractional; 0 at the start of the run).

        ``base_weight`` times 1 (``constant``), ``1 - s`` (``linear_down``) or ``(1 + cos(pi s)) / 2``
        (``cosine_down``), ``s = min(1, progress / span)``, ``span`` = ``base_ramp_epochs`` or, when that
        is 0, ``epochs``: 0 from the end of the ramp on. 0 with ``base_loss: none``.
        """
        p = self.p
        if p.base_loss == "none":
            return 0.0
        if p.base_ramp == "constant":
            return p.base_weight
        span = p.base_ramp_epochs if p.base_ramp_epochs > 0 else p.epochs
        s = min(1.0, max(0.0, progress / span))
        if p.base_ramp == "linear_down":
            return p.base_weight * (1.0 - s)
        if p.base_ramp == "cosine_down":
            return p.base_weight * 0.5 * (1.0 + math.cos(math.pi * s))
        raise ValueError(f"base_ramp = {p.base_ramp!r}")

    def base_sample_weights(
        self, q: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor | None:
        """Per-sample weights of the base loss for the batch ``rows`` (``None``: every sample, weight 1).

        ``agree``: 1 where the given label is ``argmax q`` (the transport plan's verdict), else 0.
        ``soft``: ``q_i[y_i]``, the plan's probability of the given label. Both detached.
        ``noise_teacher``, ``noise_teacher_chance``: 1 for the samples :func:`noise_teacher_selection`
        keeps, else 0 (``q`` unused).
        """
        f = self.p.base_filter
        if f == "all":
            return None
        if f in NOISE_TEACHER_FILTERS:
            if self.base_keep is None:
                raise RuntimeError(f"base_filter {f}: no selection (base_loss is none)")
            return self.base_keep[rows.cpu()].to(q.device)
        q = q.detach()
        y = labels.long().to(q.device)
        if f == "agree":
            return (q.argmax(1) == y).float()
        if f == "soft":
            return q.gather(1, y.unsqueeze(1)).squeeze(1).float()
        raise ValueError(f"base_filter = {f!r}")

    def train_logits(self, raw: torch.Tensor) -> torch.Tensor:
        return raw + self.student_offset.to(raw.device)

    def targets(self, z_train: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """q for the samples ``rows`` given the student's training-prior logits ``z_train``.

        Batch scope: solved on this batch (under torchrun: on the global batch, every rank holding its
        share). Dataset scope: read from the last :meth:`resolve_dataset` (``z_train`` is not used).
        """
        rows_cpu = rows.cpu()
        if self.p.scope == "dataset":
            if self.log_k is None or self.log_u is None:
                raise RuntimeError("dataset scope: resolve_dataset() must run before the first batch")
            return ot.apply_class_scaling(self.log_k[rows_cpu], self.log_u).to(z_train.device)
        s = self.p.sinkhorn
        dev = z_train.device
        log_f = F.log_softmax(z_train.detach().float() / s.temperature, dim=1)
        extra: dict[str, Any] = {"all_reduce": _sum_over_ranks} if self.rt.distributed else {}
        q, info = ot.dsink_targets(
            self.log_fn[rows_cpu].to(dev),
            log_f,
            self.p_l[rows_cpu].to(dev),
            reg=s.reg,
            max_iter=s.max_iter,
            tol=s.tol,
            log=True,
            **extra,
        )
        self._iters.append(int(info["n_iter"]))
        self._errs.append(float(info["err"]))
        return q

    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, progress: float
    ) -> torch.Tensor:
        """``w(progress) * L_base + alpha(progress) * CE(q, f)`` on this batch.

        With a filter the base term is ``sum_i s_i CE_i / B`` (``s_i`` from :meth:`base_sample_weights`,
        ``B`` the batch size), not a mean over the kept samples: a kept sample gets exactly the gradient
        it gets without the filter (the filter only removes the others, it does not up-weight the rest
        as fewer agree), a batch that keeps nothing is not 0 / 0, and no count has to be summed over the
        ranks, so under torchrun the term is the same as the unfiltered one's (a mean over the local batch,
        averaged over the ranks by DDP) whatever the world size.
        """
        z_train = self.train_logits(logits)
        q = self.targets(z_train, rows)
        loss = self.alpha(progress) * losses.soft_cross_entropy(z_train, q)
        w = self.base_weight(progress)
        n = labels.numel()
        kept = 0.0
        if self.p.base_loss != "none":
            z_base = logits
            if self.p.base_loss == "logit_adjusted":
                z_base = logits + self.base_offset.to(logits.device)
            s = self.base_sample_weights(q, labels, rows)
            if s is None:
                base = losses.cross_entropy(z_base, labels)
                kept = float(n)
            else:
                per = losses.cross_entropy(z_base, labels, reduction="none")
                base = (s.to(per.device, per.dtype) * per).sum() / n
                kept = float(s.sum())
            loss = loss + w * base  # w = 1.0 (the default): exactly the unweighted term
        tally = self._base
        tally[0] += w
        tally[1] += 1.0
        tally[2] += kept
        tally[3] += float(n)
        return loss

    # -- dataset scope ----------------------------------------------------------------------------------

    def _log_kernel(self, student_raw: np.ndarray) -> torch.Tensor:
        """``-P / reg`` over all samples from the student's raw logits (chunked: O(chunk * C) temporaries)."""
        s = self.p.sinkhorn
        n, C = student_raw.shape
        if n != self.log_fn.shape[0] or C != self.log_fn.shape[1]:
            raise ValueError(f"student logits have shape {(n, C)}, expected {tuple(self.log_fn.shape)}")
        log_k = torch.empty((n, C), dtype=torch.float32)
        for start in range(0, n, self.p.chunk_size):
            sl = slice(start, start + self.p.chunk_size)
            z = self.train_logits(torch.from_numpy(student_raw[sl]).float())
            log_k[sl] = (self.log_fn[sl] + F.log_softmax(z / s.temperature, dim=1)) / s.reg
        return log_k

    def resolve_dataset(
        self,
        student_raw: np.ndarray,
        epoch: int = 0,
        weights: dict[str, torch.Tensor] | None = None,
        max_iter: int | None = None,
    ) -> dict[str, float]:
        """Dataset scope: solve the class scaling over all samples from the student's raw logits.

        Every rank passes the same full ``(N, C)`` logits (:func:`gather_rows`); rank 0 solves and
        broadcasts ``log_u`` and the solver's statistics. ``weights`` (the student at the solve) are kept
        for :meth:`state_dict`, so a resumed run can rebuild this ``q`` with :meth:`rebuild_dataset`.
        ``max_iter`` overrides ``sinkhorn.max_iter`` for this solve (a one-off solve with no earlier
        solve to warm-start from).
        """
        s = self.p.sinkhorn
        log_k = self._log_kernel(student_raw)
        C = log_k.shape[1]
        if self.rt.is_main:
            r = self.p_l.double().sum(0)
            # warm start from the previous solve: the student moves little between two solves, so a
            # sharp kernel (small reg) that needs thousands of updates from 0 needs a few from there
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ot.SinkhornConvergenceWarning)
                log_u, info = ot.class_scaling(
                    log_k,
                    r.to(log_k.dtype),
                    max_iter=s.max_iter if max_iter is None else max_iter,
                    tol=s.tol,
                    chunk_size=self.p.chunk_size,
                    log=True,
                    init=self.log_u,
                )
            stats = torch.tensor([float(info["n_iter"]), float(info["err"])], dtype=torch.float64)
        else:
            log_u = torch.empty(C, dtype=torch.float64)
            stats = torch.empty(2, dtype=torch.float64)
        if self.rt.distributed:
            both = torch.cat([log_u.double(), stats]).to(self.rt.device)
            dist.broadcast(both, src=0)
            both = both.cpu()
            log_u, stats = both[:C].clone(), both[C:].clone()
        self.log_k = log_k
        self.log_u = log_u.double()
        self.solve = {"n_iter": float(stats[0]), "err": float(stats[1]), "epoch": float(epoch)}
        self.n_solves += 1
        if self.solve["err"] > s.tol:
            self.unconverged.append((epoch, self.solve["err"]))
        self.solve_weights = weights
        self._resolved = True
        return {"n_iter": self.solve["n_iter"], "err": self.solve["err"]}

    def convergence_note(self) -> str | None:
        """One line on the dataset-scope solves that stopped at ``max_iter`` in this run (None: none did)."""
        if not self.unconverged:
            return None
        s = self.p.sinkhorn
        worst = max(err for _, err in self.unconverged)
        last_epoch, last = self.unconverged[-1]
        return (
            f"distill: {len(self.unconverged)} of {self.n_solves} class-total solves stopped at "
            f"sinkhorn.max_iter={s.max_iter} above tol={s.tol:g} (largest relative class-total error "
            f"{worst:.1e}; {last:.1e} at epoch {last_epoch}); raise distill.sinkhorn.max_iter to meet "
            "the class totals more exactly"
        )

    def rebuild_dataset(self, student_raw: np.ndarray) -> None:
        """After :meth:`load_state_dict`: the last solve's ``q`` from the logits of the student at that solve.

        No new solve: ``log_u`` is the checkpointed one, so ``q`` is exactly what the interrupted run used.
        """
        if self.log_u is None:
            raise RuntimeError("rebuild_dataset needs a loaded solve (load_state_dict)")
        self.log_k = self._log_kernel(student_raw)

    def needs_rebuild(self) -> bool:
        """A solve was loaded from a checkpoint but its kernel not rebuilt yet."""
        return self.p.scope == "dataset" and self.log_u is not None and self.log_k is None

    # -- engine hooks -----------------------------------------------------------------------------------

    def epoch_metrics(self) -> dict[str, float]:
        """The epoch's Sinkhorn solves and base loss, the same on every rank; resets the epoch's tallies.

        Batch scope: ``sinkhorn_iter_mean``, ``sinkhorn_iter_max``, ``sinkhorn_err_max`` over the epoch's
        solves (all ranks). Dataset scope: ``sinkhorn_iter`` and ``sinkhorn_err`` of the solve in use (this
        epoch's, or the last one) and ``sinkhorn_resolved`` (1 if it ran this epoch). Once a batch has
        been trained: ``base_weight``, the mean over the epoch's steps of the base loss's weight (0 with
        ``base_loss: none``), and ``base_share``, the share of the epoch's samples the base loss was
        applied to (1 with ``base_filter: all``, the kept share with ``agree`` and ``noise_teacher``, the
        mean ``q_i[y_i]`` with ``soft``, 0 with ``base_loss: none``; it does not include the weight).
        """
        out = self._solver_metrics()
        out.update(self._base_metrics())
        return out

    def _base_metrics(self) -> dict[str, float]:
        t = torch.tensor(self._base, dtype=torch.float64)
        self._base = [0.0, 0.0, 0.0, 0.0]
        if self.rt.distributed:
            t = t.to(self.rt.device)
            dist.all_reduce(t)
            t = t.cpu()
        if t[1] == 0:
            return {}
        return {"base_weight": float(t[0] / t[1]), "base_share": float(t[2] / t[3])}

    def _solver_metrics(self) -> dict[str, float]:
        if self.p.scope == "dataset":
            if not self.solve:
                return {}
            out = {
                "sinkhorn_iter": self.solve["n_iter"],
                "sinkhorn_err": self.solve["err"],
                "sinkhorn_resolved": 1.0 if self._resolved else 0.0,
            }
            self._resolved = False
            return out
        iters, errs = self._iters, self._errs
        self._iters, self._errs = [], []
        total = torch.tensor([float(sum(iters)), float(len(iters))], dtype=torch.float64)
        worst = torch.tensor([float(max(iters, default=0)), max(errs, default=0.0)], dtype=torch.float64)
        if self.rt.distributed:
            total, worst = total.to(self.rt.device), worst.to(self.rt.device)
            dist.all_reduce(total)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            total, worst = total.cpu(), worst.cpu()
        if total[1] == 0:
            return {}
        return {
            "sinkhorn_iter_mean": float(total[0] / total[1]),
            "sinkhorn_iter_max": float(worst[0]),
            "sinkhorn_err_max": float(worst[1]),
        }

    def state_dict(self) -> dict[str, Any]:
        """Dataset scope: the last solve (``log_u``, its statistics, the student's weights at the solve).

        The kernel itself (N x C) is not saved: :meth:`rebuild_dataset` recomputes it from the weights, so
        the checkpoint grows by one copy of the model, whatever N. The weights are only kept when
        ``resolve_every > 1`` (otherwise every epoch re-solves and a resumed run never reads them).
        """
        if self.p.scope != "dataset" or self.log_u is None:
            return {}
        state: dict[str, Any] = {"log_u": self.log_u.clone(), **self.solve}
        if self.solve_weights is not None:
            state["weights"] = self.solve_weights
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.p.scope != "dataset" or not state:
            return
        self.log_u = state["log_u"].double()
        self.solve = {k: float(state[k]) for k in ("n_iter", "err", "epoch")}
        self.solve_weights = state.get("weights")
        self.log_k = None  # rebuilt from solve_weights before the next batch (see fit_student)
        self._resolved = False


def student_train_logits(model: torch.nn.Module, corpus: Corpus, rt: Runtime) -> np.ndarray:
    """The student's raw logits on every training row; under torchrun each rank predicts one shard."""
    ids = corpus.index.sample_id
    start, stop = shard_bounds(ids.size, rt.world_size, rt.rank)
    if stop > start:
        shard = predict_logits(
            model,
            corpus.source.train,
            ids[start:stop],
            corpus.normalizer,
            rt.device,
            512,
            desc="resolve",
            rt=rt,
        )
    else:
        shard = np.zeros((0, corpus.index.num_classes), dtype=np.float32)
    return gather_rows(shard, ids.size, rt)


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
        n_train, l_train = teachers_train_space(t_n, t_l, dp, idx)
        objective = DsinkObjective(dp, n_train, l_train, idx.noisy_label, rt)
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
                if epoch % dp.resolve_every == 0 or objective.log_u is None:
                    weights = None
                    if dp.resolve_every > 1:  # kept for an exact resume mid-cycle
                        weights = {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
                    objective.resolve_dataset(student_train_logits(m, corpus, rt), epoch, weights)
                elif objective.needs_rebuild():  # resumed mid-cycle: the last solve's q, not a new solve
                    if objective.solve_weights is None:
                        raise DsinkError(f"{ckpt}: checkpoint lacks the student at the last solve")
                    at_solve = copy.deepcopy(m)
                    at_solve.load_state_dict(objective.solve_weights)
                    objective.rebuild_dataset(student_train_logits(at_solve, corpus, rt))
                    del at_solve

        tracker = (
            epoch_tracker(
                corpus,
                rt.device,
                512,
                objective.student_offset.cpu().numpy(),
                np.asarray(objective.train_log_prior),
            )
            if dp.track_every
            else None
        )
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
            objective_state=objective,
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
                    "train_log_prior": objective.train_log_prior.tolist(),
                },
            )
            clear_checkpoint(ckpt)
            note = objective.convergence_note()
            if note:
                warnings.warn(note, ot.SinkhornConvergenceWarning, stacklevel=2)
        return result.history[-1] if result.history else {}
    finally:
        teardown_runtime(rt)
