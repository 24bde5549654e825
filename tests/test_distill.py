"""The D-SINK objective: spaces, targets, the loss gradient, solver metrics, checkpointed solves, torchrun."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import ot as pot
import pytest
import torch
import torch.nn.functional as F
import yaml

from dsink import losses, ot
from dsink.artifacts import (
    CorruptedIndex,
    TeacherLogits,
    logits_table,
    read_corrupted,
    read_logits,
    write_logits,
)
from dsink.distill import (
    DsinkObjective,
    gather_rows,
    noise_teacher_selection,
    shard_bounds,
    teachers_train_space,
    train_space_logits,
)
from dsink.errors import DsinkError
from dsink.noise_rate import estimate_noise_rates
from dsink.params import DistillParams, SinkhornParams, load_params
from dsink.priors import label_log_prior
from dsink.runtime import Runtime

ROOT = Path(__file__).resolve().parents[1]

# the noisy labels of the small objectives below: counts 4, 2, 1, 1 of 8, add-one smoothed 5, 3, 2, 2 of 12
NOISY8 = np.array([0, 0, 0, 0, 1, 1, 2, 3])
LOG_PRIOR8 = np.log(np.array([5.0, 3.0, 2.0, 2.0]) / 12.0)


def make_index(noisy: np.ndarray, C: int) -> CorruptedIndex:
    n = noisy.size
    return CorruptedIndex(
        np.arange(n),
        noisy.copy(),
        noisy.copy(),
        np.zeros(n, bool),
        {"dataset": "synthetic", "num_classes": C},
    )


def test_train_space_offsets():
    C = 3
    idx = make_index(np.array([0, 0, 0, 1, 2, 0]), C)  # noisy counts 4, 1, 1: add-one smoothed 5/9, 2/9, 2/9
    raw = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    t = TeacherLogits(raw, raw, {"train_offset": [0.5, -1.0, 0.0]})
    tr, te = train_space_logits(t, "auto", idx, "imbalance")
    assert np.allclose(tr, raw + np.array([0.5, -1.0, 0.0])) and np.allclose(te, tr)
    tr, _ = train_space_logits(TeacherLogits(raw, raw, {}), "auto", idx, "imbalance")
    assert np.array_equal(tr, raw)  # no metadata: a plain model's logits are training-prior
    tr, _ = train_space_logits(t, "balanced", idx, "imbalance")
    assert np.allclose(tr, raw + np.log([5 / 9, 2 / 9, 2 / 9]))
    tr, _ = train_space_logits(t, "train", idx, "imbalance")
    assert np.array_equal(tr, raw)
    with pytest.raises(DsinkError, match="train_offset"):
        train_space_logits(TeacherLogits(raw, raw, {"train_offset": [1.0]}), "auto", idx, "imbalance")


def objective(
    N=8, C=4, seed=0, noise_shift=None, imbalance_shift=None, **kw
) -> tuple[DsinkObjective, np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    noise = g.normal(size=(N, C)).astype(np.float32) * 2
    imb = g.normal(size=(N, C)).astype(np.float32) * 2
    if noise_shift is not None:
        noise = noise + np.asarray(noise_shift, dtype=np.float32)
    if imbalance_shift is not None:
        imb = imb + np.asarray(imbalance_shift, dtype=np.float32)
    labels = NOISY8 if N == 8 else g.integers(0, C, N)
    kw = {"scope": "batch", "class_totals": "soft", "sinkhorn": SinkhornParams(max_iter=2000, tol=1e-6), **kw}
    p = DistillParams(**kw)
    return DsinkObjective(p, noise, imb, labels), noise, imb


def test_targets_meet_both_marginals():
    obj, noise, imb = objective(prior="noisy_labels")
    z = torch.randn(8, 4)
    rows = torch.arange(8)
    q = obj.targets(obj.train_logits(z), rows)
    assert torch.allclose(q.sum(1), torch.ones(8), atol=1e-5)
    r = torch.softmax(torch.from_numpy(imb), 1).sum(0)
    assert torch.allclose(q.sum(0), r, atol=1e-4)


@pytest.mark.parametrize("reg", [2.0, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("w", [0.0, 0.4])
def test_targets_equal_pot_sinkhorn_in_float64(reg, temperature, w):
    """Independent oracle: POT's entropic OT on the cost and marginals of method.md, in float64.

    Cost ``P_ci = -((1 - w) log f_N(x_i)_c + w log f_L(x_i)_c + log f(x_i)_c)`` (temperature-scaled
    log-softmaxes; ``w = cost_imbalance_weight``, 0 is the paper's cost), class marginal
    ``a = sum_i f_L(x_i) / N``, sample marginal ``b = 1 / N``, entropic weight ``reg``; ``q = N * plan^T``.
    """
    N, C = 12, 4
    sk = SinkhornParams(reg=reg, temperature=temperature, max_iter=5000, tol=1e-6)
    obj, noise, imb = objective(N=N, C=C, seed=5, prior="noisy_labels", sinkhorn=sk, cost_imbalance_weight=w)
    z = torch.from_numpy(np.random.default_rng(6).normal(size=(N, C)) * 2).float()
    zt = obj.train_logits(z)
    q = obj.targets(zt, torch.arange(N)).double().numpy()

    log_fn = F.log_softmax(torch.from_numpy(noise).double() / temperature, 1).numpy()
    log_fl = F.log_softmax(torch.from_numpy(imb).double() / temperature, 1).numpy()
    log_f = F.log_softmax(zt.double() / temperature, 1).numpy()
    cost = -((1 - w) * log_fn + w * log_fl + log_f)  # (N, C)
    r = torch.softmax(torch.from_numpy(imb).double(), 1).sum(0).numpy()
    plan = pot.sinkhorn(r / N, np.full(N, 1.0 / N), cost.T, reg, numItermax=100000, stopThr=1e-13)
    oracle = N * plan.T
    assert np.abs(q - oracle).max() < 1e-5, np.abs(q - oracle).max()


@pytest.mark.parametrize("scope", ["batch", "dataset"])
def test_a_per_class_offset_on_the_noise_teacher_changes_nothing(scope):
    """``q_ic = u_c v_i sqrt(f_N f)``: shifting f_N's logits per class (by up to 15 nats) is absorbed by u.

    The same shift on the imbalance teacher moves the class totals and so does change q (which is why
    ``imbalance_space`` exists and ``noise_space`` does not).
    """
    N, C = 40, 4
    shift = [0.0, 15.0, -15.0, 6.0]
    kw = dict(N=N, C=C, seed=2, prior="noisy_labels", scope=scope, chunk_size=9)
    plain, _, _ = objective(**kw)
    noise_shifted, _, _ = objective(noise_shift=shift, **kw)
    imb_shifted, _, _ = objective(imbalance_shift=shift, **kw)
    raw = np.random.default_rng(3).normal(size=(N, C)).astype(np.float32)
    rows = torch.arange(N)
    qs = []
    for obj in (plain, noise_shifted, imb_shifted):
        if scope == "dataset":
            obj.resolve_dataset(raw)
        qs.append(obj.targets(obj.train_logits(torch.from_numpy(raw)), rows))
    assert (qs[0] - qs[1]).abs().max() < 1e-4
    assert (qs[0] - qs[2]).abs().max() > 0.1


def test_cost_imbalance_weight_mixes_the_teachers_per_sample():
    """``w = 1``: the noise teacher leaves the cost, so two different noise teachers give the same q;
    ``w = 0``: they do not. A per-class offset on f_L's *cost* term is absorbed like f_N's (here the
    class totals are held fixed by counting argmaxes, which a per-class offset of 0.01 does not move)."""
    N, C = 30, 4
    rows = torch.arange(N)
    raw = torch.from_numpy(np.random.default_rng(4).normal(size=(N, C))).float()

    def q_of(w, seed, imbalance_shift=None):
        imb = np.random.default_rng(11).normal(size=(N, C)).astype(np.float32) * 2
        if imbalance_shift is not None:
            imb = imb + np.asarray(imbalance_shift, dtype=np.float32)
        noise = np.random.default_rng(seed).normal(size=(N, C)).astype(np.float32) * 2
        p = DistillParams(
            scope="batch",
            class_totals="hard",
            prior="noisy_labels",
            cost_imbalance_weight=w,
            sinkhorn=SinkhornParams(max_iter=2000, tol=1e-6),
        )
        o = DsinkObjective(p, noise, imb, np.arange(N) % C)
        return o.targets(o.train_logits(raw), rows)

    assert (q_of(1.0, 1) - q_of(1.0, 2)).abs().max() < 1e-5
    assert (q_of(0.0, 1) - q_of(0.0, 2)).abs().max() > 0.1
    shifted = q_of(0.5, 1, imbalance_shift=[0.0, 0.01, -0.01, 0.005])
    assert (q_of(0.5, 1) - shifted).abs().max() < 1e-4
    assert (q_of(0.5, 1) - q_of(0.0, 1)).abs().max() > 0.05


@pytest.mark.parametrize("base", ["logit_adjusted", "ce", "none"])
def test_loss_gradient_matches_closed_form(base):
    obj, _, _ = objective(prior="noisy_labels", alpha=0.7, base_loss=base, tau=1.0)
    N, C = 8, 4
    z = torch.randn(N, C, dtype=torch.float32, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    rows = torch.arange(N)
    loss = obj(z, labels, rows, progress=5.0)
    loss.backward()
    with torch.no_grad():
        lp = torch.from_numpy(LOG_PRIOR8).float()  # the noisy-label prior, add-one smoothed
        zt = z + lp  # prior: noisy_labels, tau = 1
        q = obj.targets(zt, rows)
        onehot = F.one_hot(labels, C).float()
        expected = 0.7 * (torch.softmax(zt, 1) - q) / N
        if base == "logit_adjusted":
            expected += (torch.softmax(z + lp, 1) - onehot) / N
        elif base == "ce":
            expected += (torch.softmax(z, 1) - onehot) / N
    assert torch.allclose(z.grad, expected, atol=1e-6)


def test_alpha_warmup_is_linear():
    obj, _, _ = objective(alpha=2.0, alpha_warmup_epochs=4)
    assert obj.alpha(0.0) == 0.0 and obj.alpha(1.0) == pytest.approx(0.5) and obj.alpha(10.0) == 2.0


# -- the base loss: weight schedule, sample filter -------------------------------------------------------

R2 = 2**-0.5  # cos(pi / 4)


@pytest.mark.parametrize(
    "ramp, ramp_epochs, expected",
    [
        # base_weight 2, epochs 10: (progress, weight)
        ("constant", 0, [(0.0, 2.0), (2.5, 2.0), (9.9, 2.0), (30.0, 2.0)]),
        ("linear_down", 0, [(0.0, 2.0), (2.5, 1.5), (5.0, 1.0), (7.5, 0.5), (10.0, 0.0), (12.0, 0.0)]),
        ("linear_down", 4, [(0.0, 2.0), (1.0, 1.5), (3.0, 0.5), (4.0, 0.0), (8.0, 0.0)]),
        ("cosine_down", 0, [(0.0, 2.0), (2.5, 1 + R2), (5.0, 1.0), (7.5, 1 - R2), (10.0, 0.0), (11.0, 0.0)]),
        ("cosine_down", 4, [(0.0, 2.0), (1.0, 1 + R2), (2.0, 1.0), (3.0, 1 - R2), (4.0, 0.0)]),
    ],
)
def test_base_weight_schedule_in_closed_form(ramp, ramp_epochs, expected):
    obj, _, _ = objective(base_weight=2.0, base_ramp=ramp, base_ramp_epochs=ramp_epochs, epochs=10)
    for progress, w in expected:
        assert obj.base_weight(progress) == pytest.approx(w, abs=1e-12), (progress, w)
    none, _, _ = objective(base_loss="none", base_weight=2.0, base_ramp=ramp, epochs=10)
    assert none.base_weight(0.0) == 0.0


def base_batch(filter: str, alpha: float = 0.7, **kw):
    """An objective, logits, its q and labels = argmax q except at rows 1, 4 and 6 (moved one class on)."""
    obj, _, _ = objective(prior="noisy_labels", alpha=alpha, base_filter=filter, **kw)
    N, C = 8, 4
    z = torch.from_numpy(np.random.default_rng(11).normal(size=(N, C)) * 2).float()
    rows = torch.arange(N)
    if obj.p.scope == "dataset":  # q from a whole-set solve on these logits, read per batch
        obj.resolve_dataset(z.numpy())
    q = obj.targets(obj.train_logits(z), rows)
    labels = q.argmax(1).clone()
    flipped = torch.tensor([1, 4, 6])
    labels[flipped] = (labels[flipped] + 1) % C
    obj.epoch_metrics()  # forget the solve above
    return obj, z, rows, q, labels, flipped


def _hand_base_terms(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample logit-adjusted CE with the noisy-label prior of NOISY8 (tau = 1), by hand."""
    zb = z.double() + torch.from_numpy(LOG_PRIOR8)
    return -(zb - torch.logsumexp(zb, 1, keepdim=True)).gather(1, labels.unsqueeze(1)).squeeze(1)


def _hand_distill_term(obj: DsinkObjective, z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    zt = obj.train_logits(z).double()
    return -(q.double() * (zt - torch.logsumexp(zt, 1, keepdim=True))).sum(1).mean()


def test_agree_masks_exactly_the_samples_whose_label_is_not_argmax_q():
    obj, z, rows, q, labels, flipped = base_batch("agree")
    keep = obj.base_sample_weights(q, labels, rows)
    expected_keep = torch.ones(8)
    expected_keep[flipped] = 0.0
    assert torch.equal(keep, expected_keep)
    loss = obj(z, labels, rows, progress=3.0)
    per = _hand_base_terms(z, labels)
    hand = 0.7 * _hand_distill_term(obj, z, q) + per[expected_keep.bool()].sum() / 8  # / batch size
    assert float(loss) == pytest.approx(float(hand), abs=1e-5)
    # normalised by the batch, not by the 5 kept samples (and not the unfiltered loss)
    assert abs(float(loss) - float(0.7 * _hand_distill_term(obj, z, q) + per[keep.bool()].mean())) > 1e-3
    assert abs(float(loss) - float(0.7 * _hand_distill_term(obj, z, q) + per.mean())) > 1e-3
    m = obj.epoch_metrics()
    assert m["base_share"] == pytest.approx(5 / 8) and m["base_weight"] == 1.0


def test_soft_filter_weights_each_sample_by_q_of_its_label():
    obj, z, rows, q, labels, _ = base_batch("soft", base_weight=0.5)
    loss = obj(z, labels, rows, progress=3.0)
    s = q.double().gather(1, labels.unsqueeze(1)).squeeze(1)
    hand = 0.7 * _hand_distill_term(obj, z, q) + 0.5 * (s * _hand_base_terms(z, labels)).sum() / 8
    assert float(loss) == pytest.approx(float(hand), abs=1e-5)
    assert obj.epoch_metrics()["base_share"] == pytest.approx(float(s.mean()), abs=1e-6)


def _bimodal_noise_teacher(seed: int = 3):
    """A noise teacher over 3 classes (300, 120 and 30 given labels) that fits most labels (given-label
    logit +6) and not a known share of each class (given-label logit -3): 30 %, 25 % and 20 %."""
    g = np.random.default_rng(seed)
    counts, wrong = (300, 120, 30), (90, 30, 6)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    z = g.normal(scale=0.3, size=(labels.size, 3)).astype(np.float32)
    unfit = np.zeros(labels.size, dtype=bool)
    start = 0
    for n, k in zip(counts, wrong, strict=True):
        unfit[g.choice(np.arange(start, start + n), size=k, replace=False)] = True
        start += n
    z[np.arange(labels.size), labels] += np.where(unfit, -3.0, 6.0).astype(np.float32)
    perm = g.permutation(labels.size)  # classes interleaved, as in a real index
    return z[perm], labels[perm], unfit[perm]


def test_noise_teacher_selection_keeps_what_the_teacher_fits_per_class():
    """Oracle: the estimated per-class rates recover the planted shares, and the mask is each class's
    ``ceil((1 - f_c) n_c)`` smallest losses (numpy argsort by hand) = exactly the fitted samples."""
    z, labels, unfit = _bimodal_noise_teacher()
    rates = estimate_noise_rates(z, labels, "per_class").per_class
    assert np.allclose(rates, (0.3, 0.25, 0.2), atol=1e-9), rates
    keep = noise_teacher_selection(z, labels)
    assert keep.dtype == bool and keep.shape == labels.shape
    zz = z.astype(np.float64)
    top = zz.max(1)
    loss = np.log(np.exp(zz - top[:, None]).sum(1)) + top - zz[np.arange(z.shape[0]), labels]
    hand = np.zeros_like(keep)
    for c, f in enumerate(rates):
        members = np.flatnonzero(labels == c)
        k = int(np.ceil((1 - f) * members.size - 1e-9))
        hand[members[np.argsort(loss[members], kind="stable")[:k]]] = True
    assert np.array_equal(keep, hand)
    assert np.array_equal(keep, ~unfit)


def test_noise_teacher_selection_keeps_every_class_whatever_the_estimate():
    """A class the mixture calls all wrong still keeps its smallest-loss 5 % (the forget-rate cap)."""
    g = np.random.default_rng(0)
    labels = np.repeat([0, 1], [200, 40])
    z = g.normal(size=(240, 2)).astype(np.float32) * 3
    keep = noise_teacher_selection(z, labels)
    for c in (0, 1):
        assert keep[labels == c].sum() >= np.ceil(0.05 * (labels == c).sum() - 1e-9)


def test_noise_teacher_filter_applies_the_base_loss_to_the_selected_rows_only():
    """The objective reads the selection by row (a batch of rows in any order), sums the kept terms over
    the batch size, and reports the kept share; the mask is computed from the noise teacher alone."""
    z_n, labels, unfit = _bimodal_noise_teacher()
    N, C = labels.size, 3
    imb = np.random.default_rng(5).normal(size=(N, C)).astype(np.float32)
    p = DistillParams(
        scope="batch", class_totals="soft", base_filter="noise_teacher", prior="noisy_labels", alpha=0.0
    )
    obj = DsinkObjective(p, z_n, imb, labels)
    keep = noise_teacher_selection(z_n, labels)
    assert torch.equal(obj.base_keep, torch.from_numpy(keep).float())
    rows = torch.from_numpy(np.random.default_rng(6).permutation(N)[:64])
    zs = torch.from_numpy(np.random.default_rng(7).normal(size=(64, C))).float()
    y = torch.from_numpy(labels[rows.numpy()])
    loss = obj(zs, y, rows, progress=0.0)
    zb = zs.double() + torch.from_numpy(label_log_prior(labels, C))
    per = -(zb - torch.logsumexp(zb, 1, keepdim=True)).gather(1, y.long().unsqueeze(1)).squeeze(1)
    kept = torch.from_numpy(keep[rows.numpy()])
    assert 0 < int(kept.sum()) < 64
    assert float(loss) == pytest.approx(float(per[kept].sum() / 64), abs=1e-5)
    assert obj.epoch_metrics()["base_share"] == pytest.approx(float(kept.float().mean()))
    # no base loss: no selection is made
    none_p = DistillParams(scope="batch", base_loss="none", base_filter="noise_teacher")
    none = DsinkObjective(none_p, z_n, imb, labels)
    assert none.base_keep is None


def test_noise_teacher_chance_keeps_the_hard_samples_of_a_class_without_wrong_labels():
    """``noise_teacher_chance``: where the unfitted labels lie far above chance (the planted teacher) the
    mask is the plain one; a class whose "high" losses are hard but above chance probability (given-label
    logit +1 of 3 classes: p = 0.58 > 1/3) keeps them, which the plain mixture forgets."""
    z, labels, unfit = _bimodal_noise_teacher()
    assert np.array_equal(noise_teacher_selection(z, labels, above_chance=True), ~unfit)
    hard = unfit & (labels == 0)  # class 0's unfitted third becomes hard but plausible
    z2 = z.copy()
    z2[hard, 0] += 4.0  # given-label logit -3 -> +1
    plain = noise_teacher_selection(z2, labels)
    gated = noise_teacher_selection(z2, labels, above_chance=True)
    assert not plain[hard].any() and gated[hard].all()
    assert np.array_equal(gated[labels != 0], plain[labels != 0]) and np.array_equal(gated, ~(unfit & ~hard))
    imb = np.random.default_rng(5).normal(size=z2.shape).astype(np.float32)
    p = DistillParams(scope="batch", class_totals="soft", base_filter="noise_teacher_chance", alpha=0.0)
    obj = DsinkObjective(p, z2, imb, labels)
    assert torch.equal(obj.base_keep, torch.from_numpy(gated).float())
    rows = torch.arange(8)
    w = obj.base_sample_weights(torch.full((8, 3), 1 / 3), torch.from_numpy(labels[:8]), rows)
    assert torch.equal(w, torch.from_numpy(gated[:8]).float())


@pytest.mark.parametrize("filter", ["agree", "soft"])
@pytest.mark.parametrize("scope", ["batch", "dataset"])
def test_masked_samples_get_no_base_loss_gradient(filter, scope):
    """alpha = 0 isolates the base term: its gradient is ``s_i (softmax(z_i + lp) - onehot_i) / B``."""
    obj, z, rows, q, labels, flipped = base_batch(filter, alpha=0.0, scope=scope)
    z = z.clone().requires_grad_(True)
    obj(z, labels, rows, progress=1.0).backward()
    with torch.no_grad():
        if filter == "agree":
            s = torch.ones(8)
            s[flipped] = 0.0
        else:
            s = q.float().gather(1, labels[:, None]).squeeze(1)
        lp = torch.from_numpy(LOG_PRIOR8).float()
        expected = s[:, None] * (torch.softmax(z + lp, 1) - F.one_hot(labels, 4).float()) / 8
    assert torch.allclose(z.grad, expected, atol=1e-6)
    if filter == "agree":
        assert torch.equal(z.grad[flipped], torch.zeros(3, 4))  # exactly zero, not just small
        kept = torch.tensor([0, 2, 3, 5, 7])
        assert (z.grad[kept].abs().sum(1) > 1e-4).all()


@pytest.mark.parametrize("base", ["logit_adjusted", "ce"])
def test_defaults_reproduce_the_original_loss_exactly(base):
    """Default base_* keys: ``alpha * CE(q, f) + mean_i CE_base_i``: full weight, every sample, all epochs."""
    p = DistillParams()
    assert (p.base_weight, p.base_ramp, p.base_ramp_epochs, p.base_filter) == (1.0, "constant", 0, "all")
    # labels that disagree with argmax q at rows 1, 4, 6; late in a run that a ramp would have shrunk
    obj, z, rows, q, labels, _ = base_batch("all", base_loss=base, epochs=10)
    progress = 7.5
    loss = obj(z, labels, rows, progress)
    zb = z + torch.from_numpy(LOG_PRIOR8).float() if base == "logit_adjusted" else z
    # the original formula, with the library's losses as the first implementation wrote it: bit for bit ...
    original = 0.7 * losses.soft_cross_entropy(obj.train_logits(z), q) + losses.cross_entropy(zb, labels)
    assert torch.equal(loss, original)
    # ... and by hand in float64
    nll = -(zb.double() - torch.logsumexp(zb.double(), 1, keepdim=True)).gather(1, labels[:, None]).mean()
    assert float(loss) == pytest.approx(float(0.7 * _hand_distill_term(obj, z, q) + nll), abs=1e-5)
    m = obj.epoch_metrics()
    assert m == {**{k: m[k] for k in m if k.startswith("sinkhorn")}, "base_weight": 1.0, "base_share": 1.0}


def test_base_metrics_average_the_epochs_steps_and_reset():
    # dataset scope: each row's q (so its verdict) is the same in a batch of 8 and of 4
    obj, z, rows, q, labels, _ = base_batch("agree", base_ramp="linear_down", epochs=4, scope="dataset")
    for progress in (0.0, 0.5, 1.0):  # weights 1, 0.875, 0.75
        obj(z, labels, rows, progress)
    obj(z[:4], labels[:4], rows[:4], 1.5)  # weight 0.625; rows 0..3 keep 0, 2, 3 (1 flipped)
    m = obj.epoch_metrics()
    assert m["base_weight"] == pytest.approx((1 + 0.875 + 0.75 + 0.625) / 4)
    assert m["base_share"] == pytest.approx((3 * 5 + 3) / (3 * 8 + 4))
    assert not any(k.startswith("base") for k in obj.epoch_metrics())  # reset: no batch since
    none, _, _ = objective(base_loss="none", base_filter="agree")
    none(z, labels, rows, 0.0)
    m = none.epoch_metrics()
    assert m["base_weight"] == 0.0 and m["base_share"] == 0.0


def test_hard_class_totals_count_argmax():
    obj, _, imb = objective(class_totals="hard", prior="noisy_labels")
    q = obj.targets(torch.zeros(8, 4), torch.arange(8))
    counts = torch.bincount(torch.from_numpy(imb).argmax(1), minlength=4).float()
    assert torch.allclose(q.sum(0), counts, atol=1e-4)


@pytest.mark.parametrize("totals", ["soft", "hard"])
@pytest.mark.parametrize("v", [0.0, 0.35, 1.0])
def test_class_totals_from_the_teachers_geometric_mixture(totals, v):
    """Oracle in numpy: a sample's share of the totals is ``f_N^(1-w_r) f_L^w_r`` renormalised."""
    obj, noise, imb = objective(
        N=40, seed=7, class_totals=totals, prior="imbalance_teacher", class_totals_imbalance_weight=v
    )

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    mix = softmax(noise.astype(np.float64)) ** (1 - v) * softmax(imb.astype(np.float64)) ** v
    mix /= mix.sum(1, keepdims=True)
    want = np.eye(4)[mix.argmax(1)] if totals == "hard" else mix
    assert np.allclose(obj.p_l.numpy(), want, atol=1e-5)
    q = obj.targets(torch.zeros(40, 4), torch.arange(40))
    assert np.allclose(q.sum(0).numpy(), want.sum(0), atol=1e-3)
    # the student's prior is the same totals, smoothed by the one prior rule
    assert np.allclose(obj.train_log_prior, np.log((want.sum(0) + 1) / (40 + 4)))


def test_class_totals_below_one_read_the_noise_teacher_in_its_training_space():
    """A per-class offset on f_N leaves the cost alone, but with w_r < 1 it enters the totals, so the
    noise teacher is read as raw + its file's train_offset (not raw)."""
    idx = CorruptedIndex(
        sample_id=np.arange(6, dtype=np.int64), clean_label=np.zeros(6, np.int64),
        noisy_label=np.array([0, 0, 0, 1, 1, 2]), is_noisy=np.zeros(6, bool), meta={"num_classes": 3},
    )  # fmt: skip
    raw = np.zeros((6, 3), np.float32)
    off = [0.0, 1.0, -1.0]
    t_n = TeacherLogits(raw, raw[:2], {"train_offset": off})
    t_l = TeacherLogits(raw + 5, raw[:2], {})
    n_tr, l_tr = teachers_train_space(t_n, t_l, DistillParams(), idx)
    assert np.allclose(n_tr, raw + np.float32(off)) and np.array_equal(l_tr, raw + 5)
    shifted, _, _ = objective(N=40, seed=2, class_totals_imbalance_weight=0.0, noise_shift=[0, 3, 0, 0])
    plain, _, _ = objective(N=40, seed=2, class_totals_imbalance_weight=0.0)
    assert shifted.p_l.sum(0)[1] > plain.p_l.sum(0)[1] + 1
    paper_s, _, _ = objective(N=40, seed=2, noise_shift=[0, 3, 0, 0])
    paper, _, _ = objective(N=40, seed=2)
    assert torch.equal(paper_s.p_l, paper.p_l)  # w_r = 1: f_N does not enter the totals


def test_dataset_scope_equals_batch_scope_on_the_whole_set():
    obj_b, _, _ = objective(N=50, seed=3, prior="noisy_labels")
    obj_d, _, _ = objective(N=50, seed=3, prior="noisy_labels", scope="dataset", chunk_size=7)
    raw = np.random.default_rng(1).normal(size=(50, 4)).astype(np.float32)
    obj_d.resolve_dataset(raw)
    rows = torch.arange(50)
    q_b = obj_b.targets(obj_b.train_logits(torch.from_numpy(raw)), rows)
    q_d = obj_d.targets(torch.zeros(50, 4), rows)  # dataset scope ignores the batch logits
    assert torch.allclose(q_b, q_d, atol=1e-4)
    sub = torch.tensor([7, 3, 41])
    assert torch.equal(obj_d.targets(torch.zeros(3, 4), sub), q_d[sub])


def test_dataset_scope_refuses_a_batch_before_its_first_solve():
    obj, _, _ = objective(scope="dataset")
    with pytest.raises(RuntimeError, match="resolve_dataset"):
        obj.targets(torch.zeros(2, 4), torch.arange(2))


def test_base_loss_uses_the_noisy_label_prior():
    obj, _, _ = objective(prior="imbalance_teacher", tau=1.5)
    assert np.allclose(obj.base_offset.double().numpy(), 1.5 * LOG_PRIOR8, atol=1e-6)


def test_student_prior_from_imbalance_teacher_counts_add_one():
    """Hard class totals: f_L's argmax counts (3, 3, 2, 0) of 8 give the prior (4, 4, 3, 1) / 12."""
    C = 4
    imb = np.full((8, C), -3.0, dtype=np.float32)
    imb[np.arange(8), [0, 0, 0, 1, 1, 1, 2, 2]] = 3.0
    noise = np.zeros((8, C), dtype=np.float32)
    p = DistillParams(prior="imbalance_teacher", class_totals="hard", tau=2.0, scope="batch")
    obj = DsinkObjective(p, noise, imb, NOISY8)
    expected = np.log(np.array([4.0, 4.0, 3.0, 1.0]) / 12.0)
    assert np.allclose(obj.train_log_prior, expected, atol=1e-12)
    assert np.allclose(obj.student_offset.double().numpy(), 2.0 * expected, atol=1e-6)
    # noisy_labels: the label histogram (4, 2, 1, 1), smoothed
    p = DistillParams(prior="noisy_labels", tau=2.0, scope="batch")
    obj = DsinkObjective(p, noise, imb, NOISY8)
    assert np.allclose(obj.train_log_prior, LOG_PRIOR8, atol=1e-12)


def test_surrogate_labels_beat_both_teachers_on_a_long_tailed_noisy_set():
    """The dual-granularity mechanism on constructed teachers (no training, fully deterministic).

    f_N knows each sample's class well but is head-biased (it under-predicts tail classes: the usual
    failure of noise-robust losses on long-tailed data); f_L has the right class totals but is vague per
    sample. Surrogate labels take per-sample evidence from f_N and class totals from f_L, and must agree
    with the clean labels more often than either teacher's own argmax.
    """
    g = np.random.default_rng(0)
    C = 5
    counts = np.array([400, 200, 100, 50, 25])
    log_prior = np.log(counts / counts.sum())
    y = np.repeat(np.arange(C), counts)
    n = y.size
    onehot = np.eye(C)[y]
    # Evidence e ~ N(2 * onehot, s^2): the Bayes posterior is softmax(2 e / s^2 + log prior).
    e_n = 2.0 * onehot + g.normal(0.0, 1.0, size=(n, C))  # f_N sees a strong signal ...
    noise_logits = (2.0 * e_n + 3.0 * log_prior).astype(np.float32)  # ... under a far too head-heavy prior
    e_l = 2.0 * onehot + g.normal(0.0, 1.5, size=(n, C))  # f_L: calibrated, but a weaker signal
    imb_logits = (2.0 * e_l / 1.5**2 + log_prior).astype(np.float32)
    p = DistillParams(
        sinkhorn=SinkhornParams(max_iter=3000, tol=1e-6),
        prior="imbalance_teacher",
        scope="batch",
        class_totals="soft",
    )
    obj = DsinkObjective(p, noise_logits, imb_logits, y)
    rows = torch.arange(n)
    student = torch.zeros(n, C)  # an untrained student: uniform
    q = obj.targets(obj.train_logits(student), rows)
    acc_q = float((q.argmax(1).numpy() == y).mean())
    acc_n = float((noise_logits.argmax(1) == y).mean())
    acc_l = float((imb_logits.argmax(1) == y).mean())
    assert acc_q > max(acc_n, acc_l) + 0.02, (acc_q, acc_n, acc_l)
    # and the tail is recovered: q's class totals follow f_L, not f_N's head bias
    assert (
        abs(float(q[:, 4].sum()) - float(torch.softmax(torch.from_numpy(imb_logits), 1)[:, 4].sum())) < 1e-2
    )


# -- solver metrics --------------------------------------------------------------------------------------


def test_batch_scope_epoch_metrics_summarise_the_epochs_solves_and_reset(monkeypatch):
    """The epoch's log is the mean and max of the solves the objective ran, then it is reset.

    The solves' own reports are recorded by wrapping :func:`ot.dsink_targets` (re-solving outside the
    objective would compare iteration counts that one rounding step apart can move by one near ``tol``).
    """
    obj, _, _ = objective(N=30, seed=4, prior="noisy_labels")
    seen: list[dict] = []
    solve = ot.dsink_targets

    def recording(*args, **kwargs):
        q, info = solve(*args, **kwargs)
        seen.append(dict(info))
        return q, info

    monkeypatch.setattr(ot, "dsink_targets", recording)
    g = np.random.default_rng(0)
    for size in (10, 20, 30):  # three batches of this "epoch"
        rows = torch.from_numpy(g.permutation(30)[:size])
        z = obj.train_logits(torch.from_numpy(g.normal(size=(size, 4)) * 3).float())
        obj.targets(z, rows)
    assert len(seen) == 3
    iters = [int(i["n_iter"]) for i in seen]
    errs = [float(i["err"]) for i in seen]
    m = obj.epoch_metrics()
    assert m["sinkhorn_iter_mean"] == pytest.approx(np.mean(iters))
    assert m["sinkhorn_iter_max"] == max(iters) and m["sinkhorn_err_max"] == pytest.approx(max(errs))
    assert min(iters) < max(iters)  # the mean and the max are different numbers here
    assert obj.epoch_metrics() == {}  # reset: no solve since


def _load_stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tiny_distill_dir(d: Path, write_params, overrides: dict) -> Path:
    """A synthetic corrupted set (3 classes, 8x8) and two made-up teacher logits files in ``d``."""
    C = 3
    if "validation" in yaml.safe_load((ROOT / "params.yaml").read_text())["data"]:
        overrides = {"data.validation.per_class": 0, **overrides}  # no held-out split: 40 images a class
    write_params(
        d,
        {
            "data.dataset": "synthetic",
            "data.root": str(d / "raw"),
            "data.imbalance.ratio": 4,
            "data.synthetic.num_classes": C,
            "data.synthetic.image_size": 8,
            "data.synthetic.train_per_class": 40,
            "data.synthetic.test_per_class": 10,
            "data.validation.per_class": 4,
            "distill.batch_size": 16,
            "distill.track_every": 0,
            **overrides,
        },
    )
    cwd = os.getcwd()
    os.chdir(d)
    try:
        _load_stage("corrupt").cli([])
    finally:
        os.chdir(cwd)
    idx = read_corrupted(d / "data/corrupted/train.parquet")
    n_te = 10 * C
    for k, role in enumerate(("imbalance", "noise")):
        z = np.random.default_rng(k).normal(size=(idx.sample_id.size + n_te, C)).astype(np.float32)
        z[: idx.sample_id.size] += 3 * np.eye(C, dtype=np.float32)[idx.noisy_label]
        split = np.array(["train"] * idx.sample_id.size + ["test"] * n_te, dtype=object)
        ids = np.concatenate([idx.sample_id, np.arange(n_te)])
        write_logits(d / f"data/logits/{role}.parquet", logits_table(split, ids, z, {"role": role}))
    return d


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "scope, overrides, keys",
    [
        ("batch", {}, ("sinkhorn_iter_mean", "sinkhorn_iter_max", "sinkhorn_err_max")),
        ("dataset", {"distill.resolve_every": 2}, ("sinkhorn_iter", "sinkhorn_err", "sinkhorn_resolved")),
    ],
)
def test_distill_logs_every_solve_to_dvclive(scope, overrides, keys, tmp_path, monkeypatch, write_params):
    d = _tiny_distill_dir(
        tmp_path, write_params, {"distill.scope": scope, "distill.epochs": 3, "distill.tau": 0.5, **overrides}
    )
    monkeypatch.chdir(d)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    _load_stage("distill").cli([])
    live = d / "dvclive/student"
    last = json.loads((live / "metrics.json").read_text())
    curves = {}
    for key in keys:
        assert key in last, (key, sorted(last))
        rows = (live / "plots/metrics" / f"{key}.tsv").read_text().strip().splitlines()[1:]
        curves[key] = [float(r.split("\t")[-1]) for r in rows]
        assert len(curves[key]) == 3, (key, rows)  # one value per epoch
    if scope == "batch":
        pairs = zip(curves["sinkhorn_iter_mean"], curves["sinkhorn_iter_max"], strict=True)
        assert all(0 <= a <= b for a, b in pairs) and max(curves["sinkhorn_iter_max"]) >= 1
        assert all(0 <= e < 1 for e in curves["sinkhorn_err_max"])
    else:
        assert curves["sinkhorn_resolved"] == [1.0, 0.0, 1.0]  # epochs 0 and 2 re-solve
        assert curves["sinkhorn_iter"][0] == curves["sinkhorn_iter"][1]  # epoch 1 reports the last solve
        assert curves["sinkhorn_iter"][0] >= 1
    # the student's logits say which log prior its train_offset refers to
    idx = read_corrupted("data/corrupted/train.parquet")
    meta = read_logits("data/student/logits.parquet", idx, 30).meta
    lp, off = np.array(meta["train_log_prior"]), np.array(meta["train_offset"])
    assert lp.shape == (3,) and np.allclose(np.exp(lp).sum(), 1.0) and np.allclose(off, 0.5 * lp, atol=1e-6)


def _curve(live: Path, key: str) -> list[float]:
    rows = (live / "plots/metrics" / f"{key}.tsv").read_text().strip().splitlines()[1:]
    return [float(r.split("\t")[-1]) for r in rows]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "overrides",
    [
        {},  # whatever params.yaml says
        {"distill.base_loss": "logit_adjusted"},  # full weight, every sample
        {
            "distill.base_loss": "logit_adjusted",
            "distill.base_ramp": "linear_down",
            "distill.base_filter": "agree",
            "distill.base_weight": 0.5,
        },
        {
            "distill.base_ramp": "cosine_down",
            "distill.base_ramp_epochs": 2,
            "distill.base_filter": "soft",
            "distill.scope": "dataset",
            "distill.base_loss": "ce",
        },
        {"distill.base_loss": "none", "distill.base_filter": "agree"},
        {"distill.base_filter": "noise_teacher", "distill.scope": "dataset"},
        {"distill.base_filter": "noise_teacher_chance"},
    ],
    ids=["defaults", "full", "linear_agree", "cosine_soft_dataset", "none", "noise_teacher", "nt_chance"],
)
def test_distill_logs_the_base_loss_weight_and_share(overrides, tmp_path, monkeypatch, write_params):
    """A tiny run with each base-loss option finishes; dvclive has the weight and the share per epoch."""
    epochs = 3
    kw = {"distill.scope": "batch", "distill.epochs": epochs, **overrides}
    d = _tiny_distill_dir(tmp_path, write_params, kw)
    monkeypatch.chdir(d)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    _load_stage("distill").cli([])
    live = d / "dvclive/student"
    last = json.loads((live / "metrics.json").read_text())
    assert "base_weight" in last and "base_share" in last, sorted(last)
    weight, share = _curve(live, "base_weight"), _curve(live, "base_share")
    assert len(weight) == epochs and len(share) == epochs
    # the weight: the mean of the closed-form schedule over each epoch's steps (batch 16, one process)
    n = read_corrupted("data/corrupted/train.parquet").sample_id.size
    steps = -(-n // 16)
    p = load_params(d / "params.yaml").distill
    w0 = p.base_weight if p.base_loss != "none" else 0.0
    span = p.base_ramp_epochs or epochs

    def w(t: float) -> float:
        s = min(1.0, t / span)
        return {"constant": w0, "linear_down": w0 * (1 - s), "cosine_down": w0 * (1 + np.cos(np.pi * s)) / 2}[
            p.base_ramp
        ]

    expected = [np.mean([w(e + k / steps) for k in range(steps)]) for e in range(epochs)]
    assert np.allclose(weight, expected, atol=1e-6), (weight, expected)
    if p.base_loss == "none":
        assert share == [0.0] * epochs
    elif p.base_filter == "all":
        assert share == [1.0] * epochs
    else:  # the teachers point at the given labels: q agrees with most of them, not necessarily all
        assert all(0.3 < x <= 1.0 for x in share), share
        if p.base_filter == "soft":
            assert all(x < 1.0 for x in share), share


# -- checkpointed dataset-scope solves ------------------------------------------------------------------


def test_a_loaded_solve_rebuilds_exactly_the_same_targets(tmp_path):
    N, C = 40, 4
    kw = dict(N=N, C=C, seed=7, prior="noisy_labels", scope="dataset", resolve_every=3, chunk_size=6)
    a, _, _ = objective(**kw)
    g = np.random.default_rng(8)
    at_solve = g.normal(size=(N, C)).astype(np.float32) * 2
    later = g.normal(size=(N, C)).astype(np.float32) * 2
    weights = {"w": torch.arange(6.0)}
    a.resolve_dataset(at_solve, epoch=3, weights=weights)
    torch.save(a.state_dict(), tmp_path / "objective.pt")
    state = torch.load(tmp_path / "objective.pt", weights_only=True)  # how the engine reads checkpoints
    assert state["log_u"].dtype == torch.float64 and torch.equal(state["weights"]["w"], weights["w"])

    b, _, _ = objective(**kw)
    b.load_state_dict(state)
    assert b.needs_rebuild() and torch.equal(b.solve_weights["w"], weights["w"])
    b.rebuild_dataset(at_solve)  # the logits of the model at the solve, not a new solve
    rows = torch.arange(N)
    assert torch.equal(b.targets(torch.zeros(N, C), rows), a.targets(torch.zeros(N, C), rows))
    assert b.epoch_metrics() == {
        "sinkhorn_iter": a.solve["n_iter"],
        "sinkhorn_err": a.solve["err"],
        "sinkhorn_resolved": 0.0,
    }
    # what a resumed run did before: a fresh solve from the resumed model gives other labels
    c, _, _ = objective(**kw)
    c.resolve_dataset(later)
    assert (c.targets(torch.zeros(N, C), rows) - a.targets(torch.zeros(N, C), rows)).abs().max() > 0.05


def test_batch_scope_has_no_state():
    obj, _, _ = objective()
    obj.targets(torch.zeros(8, 4), torch.arange(8))
    assert obj.state_dict() == {}


# -- torchrun ---------------------------------------------------------------------------------------------


def test_shards_partition_the_rows():
    for n in (1, 5, 10, 64):
        for world in (1, 2, 3, 4):
            bounds = [shard_bounds(n, world, r) for r in range(world)]
            covered = np.concatenate([np.arange(a, b) for a, b in bounds])
            assert np.array_equal(covered, np.arange(n)), (n, world, bounds)
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    assert gather_rows(x, 6, Runtime(torch.device("cpu"))) is x


DDP_SCRIPT = """
import sys, numpy as np, torch, torch.distributed as dist
from dsink.distill import DsinkObjective, gather_rows, shard_bounds
from dsink.runtime import setup_runtime, teardown_runtime
from dsink.params import DistillParams, SinkhornParams

rt = setup_runtime()
g = np.random.default_rng(0)
N, C, B = 64, 5, 24
noise = (g.normal(size=(N, C)) * 2).astype(np.float32)
imb = (g.normal(size=(N, C)) * 2).astype(np.float32)
labels = g.integers(0, C, N)
student = (g.normal(size=(N, C)) * 2).astype(np.float32)


def assemble(local, pos, total):
    # every rank's rows put back at their positions in the global batch
    full = torch.zeros(total, local.shape[1], dtype=torch.float64)
    full[pos] = local.double()
    if rt.distributed:
        dist.all_reduce(full)
    return full


out = {}
for scope in ("batch", "dataset"):
    for totals in ("soft", "hard"):
        p = DistillParams(scope=scope, class_totals=totals, chunk_size=7,
                          sinkhorn=SinkhornParams(max_iter=5000, tol=1e-6))
        obj = DsinkObjective(p, noise, imb, labels, rt)
        if scope == "dataset":
            a, b = shard_bounds(N, rt.world_size, rt.rank)
            obj.resolve_dataset(gather_rows(student[a:b], N, rt), epoch=0)
            out[f"{scope}_{totals}_log_u"] = obj.log_u
        qs = []
        for step in range(3):
            batch = np.random.default_rng(10 + step).permutation(N)[:B]
            pos = np.arange(rt.rank, B, rt.world_size)  # this rank's share, interleaved like the engine's
            rows = torch.from_numpy(batch[pos])
            q = obj.targets(obj.train_logits(torch.from_numpy(student[batch[pos]])), rows)
            qs.append(assemble(q, torch.from_numpy(pos), B))
        out[f"{scope}_{totals}_q"] = torch.stack(qs)
        m = obj.epoch_metrics()
        vec = torch.tensor([m[k] for k in sorted(m)], dtype=torch.float64)
        per_rank = [torch.empty_like(vec) for _ in range(rt.world_size)]
        if rt.distributed:
            dist.all_gather(per_rank, vec)
        else:
            per_rank = [vec]
        out[f"{scope}_{totals}_metrics"] = torch.stack(per_rank)
    # the filtered, ramped base loss: DDP averages the ranks' gradients, so each rank's logit gradient
    # over the world size is its share of the one-process gradient
    p = DistillParams(scope=scope, class_totals="soft", chunk_size=7, base_filter="agree",
                      base_ramp="linear_down", epochs=3, sinkhorn=SinkhornParams(max_iter=5000, tol=1e-6))
    obj = DsinkObjective(p, noise, imb, labels, rt)
    if scope == "dataset":
        a, b = shard_bounds(N, rt.world_size, rt.rank)
        obj.resolve_dataset(gather_rows(student[a:b], N, rt), epoch=0)
    grads = []
    for step in range(3):
        batch = np.random.default_rng(10 + step).permutation(N)[:B]
        pos = np.arange(rt.rank, B, rt.world_size)
        z = torch.from_numpy(student[batch[pos]]).requires_grad_(True)
        obj(z, torch.from_numpy(labels[batch[pos]]), torch.from_numpy(batch[pos]), 0.5 * step).backward()
        grads.append(assemble(z.grad / rt.world_size, torch.from_numpy(pos), B))
    out[f"{scope}_base_grad"] = torch.stack(grads)
    m = obj.epoch_metrics()
    vec = torch.tensor([m["base_weight"], m["base_share"]], dtype=torch.float64)
    per_rank = [torch.empty_like(vec) for _ in range(rt.world_size)]
    if rt.distributed:
        dist.all_gather(per_rank, vec)
    else:
        per_rank = [vec]
    out[f"{scope}_base_metrics"] = torch.stack(per_rank)
if rt.is_main:
    torch.save(out, sys.argv[1])
teardown_runtime(rt)
"""


@pytest.mark.timeout(300)
def test_torchrun_surrogate_labels_do_not_depend_on_the_world_size(tmp_path):
    """2 CPU processes (gloo) give the surrogate labels of one process on the same global batches.

    The same holds for the loss gradient with the base loss filtered by ``agree`` and ramped down, and
    for its epoch metrics (weight and kept share, summed over the ranks).

    Batch scope: each rank holds half of every batch and the class totals are summed over the ranks
    inside the solver. Dataset scope: each rank contributes one shard of the student's logits, rank 0
    solves and broadcasts the class scaling. The same student logits go in (no BatchNorm involved).
    """
    script = tmp_path / "ddp_distill.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    single, double = tmp_path / "single.pt", tmp_path / "ddp.pt"
    subprocess.run([sys.executable, str(script), str(single)], check=True, env=env, cwd=ROOT, timeout=240)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            str(double),
        ],
        check=True,
        env=env,
        cwd=ROOT,
        timeout=240,
    )
    a = torch.load(single, weights_only=True)
    b = torch.load(double, weights_only=True)
    for scope in ("batch", "dataset"):
        for totals in ("soft", "hard"):
            key = f"{scope}_{totals}"
            assert (a[f"{key}_q"] - b[f"{key}_q"]).abs().max() < 1e-5, key
            m1, m2 = a[f"{key}_metrics"], b[f"{key}_metrics"]
            assert m2.shape[0] == 2 and torch.equal(m2[0], m2[1]), (key, m2)  # the same on every rank
            # sorted keys: the error first (within tol in both runs), then iteration counts (within one)
            assert m1[0, 0] <= 1e-6 and m2[0, 0] <= 1e-6, (key, m1, m2)
            assert (m1[0, 1:] - m2[0, 1:]).abs().max() <= 1, (key, m1, m2)
        if scope == "dataset":  # the same gathered logits, solved once on rank 0: bit for bit
            assert torch.equal(a[f"{key}_log_u"], b[f"{key}_log_u"])
        # the agree-filtered base loss (normalised by the batch): the same gradient and epoch metrics
        assert (a[f"{scope}_base_grad"] - b[f"{scope}_base_grad"]).abs().max() < 1e-6, scope
        m1, m2 = a[f"{scope}_base_metrics"], b[f"{scope}_base_metrics"]
        assert torch.equal(m2[0], m2[1]) and torch.allclose(m1[0], m2[0], atol=1e-12), (scope, m1, m2)
        assert 0 < m1[0, 1] < 1, (scope, m1)  # the filter dropped some samples and kept some
    # the check has teeth: one rank's half of a batch solved alone gives other labels
    batch = np.random.default_rng(10).permutation(64)[:24]
    g = np.random.default_rng(0)
    noise, imb = (
        (g.normal(size=(64, 5)) * 2).astype(np.float32),
        (g.normal(size=(64, 5)) * 2).astype(np.float32),
    )
    labels, student = g.integers(0, 5, 64), (g.normal(size=(64, 5)) * 2).astype(np.float32)
    p = DistillParams(scope="batch", class_totals="soft", sinkhorn=SinkhornParams(max_iter=5000, tol=1e-6))
    obj = DsinkObjective(p, noise, imb, labels)
    half = batch[0::2]
    q_half = obj.targets(obj.train_logits(torch.from_numpy(student[half])), torch.from_numpy(half))
    assert (q_half.double() - a["batch_soft_q"][0, 0::2]).abs().max() > 1e-3


def test_dataset_solves_that_stop_early_are_summarised_once_not_warned_each_epoch():
    N, C = 40, 4
    raw = np.random.default_rng(8).normal(size=(N, C)).astype(np.float32) * 3

    def dataset_objective(max_iter: int, tol: float) -> DsinkObjective:
        sk = SinkhornParams(max_iter=max_iter, tol=tol)
        return objective(N=N, C=C, seed=3, prior="noisy_labels", scope="dataset", sinkhorn=sk)[0]

    short = dataset_objective(1, 1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        short.resolve_dataset(raw, epoch=0)
        short.resolve_dataset(raw, epoch=1)
    note = short.convergence_note()
    assert note is not None and "2 of 2" in note and "max_iter=1" in note and "epoch 1" in note
    ample = dataset_objective(5000, 1e-6)
    ample.resolve_dataset(raw, epoch=0)
    first = ample.solve["n_iter"]
    ample.resolve_dataset(raw, epoch=1)  # warm start from the same kernel's answer: nothing left to do
    assert ample.convergence_note() is None and first > 1 and ample.solve["n_iter"] <= 1
