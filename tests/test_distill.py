"""The D-SINK objective: spaces, targets and the loss gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dsink.artifacts import CorruptedIndex, TeacherLogits
from dsink.distill import DsinkObjective, train_space_logits
from dsink.errors import DsinkError
from dsink.params import DistillParams, SinkhornParams


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
    idx = make_index(np.array([0, 0, 0, 1, 2, 0]), C)  # noisy prior 4/6, 1/6, 1/6
    raw = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    t = TeacherLogits(raw, raw, {"train_offset": [0.5, -1.0, 0.0]})
    tr, te = train_space_logits(t, "auto", idx, "imbalance")
    assert np.allclose(tr, raw + np.array([0.5, -1.0, 0.0])) and np.allclose(te, tr)
    tr, _ = train_space_logits(TeacherLogits(raw, raw, {}), "auto", idx, "noise")
    assert np.array_equal(tr, raw)  # no metadata: a plain model's logits are training-prior
    tr, _ = train_space_logits(t, "balanced", idx, "noise")
    assert np.allclose(tr, raw + np.log([4 / 6, 1 / 6, 1 / 6]))
    tr, _ = train_space_logits(t, "train", idx, "noise")
    assert np.array_equal(tr, raw)
    with pytest.raises(DsinkError, match="train_offset"):
        train_space_logits(TeacherLogits(raw, raw, {"train_offset": [1.0]}), "auto", idx, "imbalance")


def objective(N=8, C=4, seed=0, **kw) -> tuple[DsinkObjective, np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    noise = g.normal(size=(N, C)).astype(np.float32) * 2
    imb = g.normal(size=(N, C)).astype(np.float32) * 2
    prior = np.array([0.5, 0.25, 0.15, 0.10])[:C]
    p = DistillParams(sinkhorn=SinkhornParams(max_iter=2000, tol=1e-6), **kw)
    return DsinkObjective(p, noise, imb, prior), noise, imb


def test_targets_meet_both_marginals():
    obj, noise, imb = objective(prior="noisy_labels")
    z = torch.randn(8, 4)
    rows = torch.arange(8)
    q = obj.targets(obj.train_logits(z), rows)
    assert torch.allclose(q.sum(1), torch.ones(8), atol=1e-5)
    r = torch.softmax(torch.from_numpy(imb), 1).sum(0)
    assert torch.allclose(q.sum(0), r, atol=1e-4)


def test_targets_are_geometric_mean_reweighted_per_class():
    obj, noise, imb = objective(prior="noisy_labels")
    z = torch.randn(8, 4)
    zt = obj.train_logits(z)
    q = obj.targets(zt, torch.arange(8)).double()
    geo = 0.5 * (F.log_softmax(torch.from_numpy(noise).double(), 1) + F.log_softmax(zt.double(), 1))
    # log q - geo = log u_c - log(row normaliser): rank one in (row, class), so double differences vanish
    d = torch.log(q) - geo
    dd = d - d[:, :1] - d[:1, :] + d[:1, :1]
    assert dd.abs().max() < 1e-4


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
        zt = obj.train_logits(z)
        q = obj.targets(zt, rows)
        onehot = F.one_hot(labels, C).float()
        expected = 0.7 * (torch.softmax(zt, 1) - q) / N
        if base == "logit_adjusted":
            expected += (torch.softmax(z + obj.base_offset, 1) - onehot) / N
        elif base == "ce":
            expected += (torch.softmax(z, 1) - onehot) / N
    assert torch.allclose(z.grad, expected, atol=1e-6)


def test_alpha_warmup_is_linear():
    obj, _, _ = objective(alpha=2.0, alpha_warmup_epochs=4)
    assert obj.alpha(0.0) == 0.0 and obj.alpha(1.0) == pytest.approx(0.5) and obj.alpha(10.0) == 2.0


def test_hard_class_totals_count_argmax():
    obj, _, imb = objective(class_totals="hard", prior="noisy_labels")
    q = obj.targets(torch.zeros(8, 4), torch.arange(8))
    counts = torch.bincount(torch.from_numpy(imb).argmax(1), minlength=4).float()
    assert torch.allclose(q.sum(0), counts, atol=1e-4)


def test_dataset_scope_equals_batch_scope_on_the_whole_set():
    obj_b, _, _ = objective(N=50, seed=3, prior="noisy_labels")
    obj_d, _, _ = objective(N=50, seed=3, prior="noisy_labels", scope="dataset", chunk_size=7)
    raw = np.random.default_rng(1).normal(size=(50, 4)).astype(np.float32)
    obj_d.resolve_dataset(raw)
    rows = torch.arange(50)
    q_b = obj_b.targets(obj_b.train_logits(torch.from_numpy(raw)), rows)
    q_d = obj_d.targets(torch.zeros(50, 4), rows)  # dataset scope ignores the batch logits
    assert torch.allclose(q_b, q_d, atol=1e-4)


def test_base_loss_uses_the_noisy_label_prior():
    obj, _, _ = objective(prior="imbalance_teacher", tau=1.0)
    counts = torch.tensor([0.5, 0.25, 0.15, 0.10], dtype=torch.float64) * 8
    assert torch.allclose(obj.base_offset.double(), torch.log((counts + 1) / (8 + 4)), atol=1e-6)


def test_student_prior_from_imbalance_teacher():
    obj, _, imb = objective(prior="imbalance_teacher", tau=1.0)
    counts = torch.softmax(torch.from_numpy(imb).double(), 1).sum(0)
    pi = (counts + 1) / (counts.sum() + 4)  # add-one smoothed
    assert torch.allclose(obj.student_offset.double(), torch.log(pi), atol=1e-6)


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
    p = DistillParams(sinkhorn=SinkhornParams(max_iter=3000, tol=1e-6), prior="imbalance_teacher")
    obj = DsinkObjective(p, noise_logits, imb_logits, counts / counts.sum())
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
