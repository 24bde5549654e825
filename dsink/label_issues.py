"""Which training labels are wrong, read off D-SINK's transport plan.

The surrogate labels ``q`` that the student is distilled on weigh, for every training sample, the
teachers and the trained student (per sample: ``(f_N^(1-w) f_L^w f)^(1/reg)``, ``w`` =
``distill.cost_imbalance_weight``) against class totals from the imbalance-robust teacher (per class:
``u``). That is the evidence a label check needs on long-tailed data:
a rare-class sample keeps its label when the per-sample evidence supports it, because the class scaling
``u`` gives its class the mass ``f_L`` says the class holds, instead of being flagged for being rare.

After training, ``q`` is solved once more over the whole training set from the final student (the same
dataset-scope solve as ``distill``, :class:`dsink.distill.DsinkObjective`). For sample ``i`` with given
(possibly noisy) label ``y_i``:

- ``suggested_label = argmax_c q_ic`` (the given label when it ties for the maximum);
- ``issue_score = 1 - q_i[y_i]``: the share of the sample's unit mass the plan moves away from its label;
- ``is_issue``: ``q_i[y_i] < max_c q_ic``, the plan prefers another class.

The rule has no threshold to tune and uses no noise rate: the number of flags follows from the plan.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from dsink import ot
from dsink.artifacts import TeacherLogits, with_meta, write_parquet
from dsink.distill import DsinkObjective
from dsink.params import DistillParams

CSV_COLUMNS = (
    "rank",
    "sample_id",
    "source",
    "given_label",
    "given_class",
    "suggested_label",
    "suggested_class",
    "issue_score",
)
RULE = "is_issue: q_i[given] < max_c q_ic; issue_score = 1 - q_i[given]; suggested = argmax_c q_ic"


@dataclass
class LabelIssues:
    """One row per training sample, in corrupted-index order."""

    sample_id: np.ndarray  # int64
    given_label: np.ndarray  # int64, the (noisy) training label
    suggested_label: np.ndarray  # int64
    issue_score: np.ndarray  # float64, 1 - q_i[given]
    is_issue: np.ndarray  # bool
    suggested_mass: np.ndarray  # float64, q_i[suggested]


#: the report's solve may take this many times ``distill.sinkhorn.max_iter`` updates to converge
SOLVE_ROUNDS = 50


def surrogate_labels(
    dp: DistillParams,
    noise_train: np.ndarray,
    imbalance_train: np.ndarray,
    student: TeacherLogits,
    noisy_labels: np.ndarray,
) -> np.ndarray:
    """``q`` over the whole training set from the final student, as ``distill``'s dataset scope solves it.

    ``imbalance_train`` is the imbalance teacher's training logits in the space ``distill`` reads them in
    (:func:`dsink.distill.train_space_logits`); ``student`` the student's logits file (raw logits).
    """
    objective = DsinkObjective(dp, noise_train, imbalance_train, noisy_labels)
    # One solve, from a cold start: unlike training, no earlier solve carries updates over, so it gets
    # SOLVE_ROUNDS times the training budget to meet the class totals.
    budget = SOLVE_ROUNDS * dp.sinkhorn.max_iter
    objective.resolve_dataset(student.train, max_iter=budget)
    if objective.solve["err"] > dp.sinkhorn.tol:
        sk = dp.sinkhorn
        warnings.warn(
            f"label_issues: the class totals were met only to a relative error of "
            f"{objective.solve['err']:.1e} after {SOLVE_ROUNDS} x distill.sinkhorn.max_iter="
            f"{sk.max_iter} updates (tol {sk.tol:g})",
            ot.SinkhornConvergenceWarning,
            stacklevel=2,
        )
    assert objective.log_k is not None and objective.log_u is not None
    return ot.apply_class_scaling(objective.log_k, objective.log_u, dp.chunk_size).double().numpy()


def find_issues(q: np.ndarray, given_label: np.ndarray, sample_id: np.ndarray) -> LabelIssues:
    """The decision rule of the module docstring applied to surrogate labels ``q`` (N, C)."""
    q = np.asarray(q, dtype=np.float64)
    given = np.asarray(given_label, dtype=np.int64)
    rows = np.arange(given.size)
    q_given = q[rows, given]
    best = q.max(axis=1)
    is_issue = q_given < best
    suggested = np.where(is_issue, q.argmax(axis=1), given)
    return LabelIssues(
        np.asarray(sample_id, dtype=np.int64),
        given,
        suggested.astype(np.int64),
        1.0 - q_given,
        is_issue,
        q[rows, suggested],
    )


def issues_table(issues: LabelIssues, meta: dict[str, Any]) -> pa.Table:
    table = pa.table(
        {
            "sample_id": pa.array(issues.sample_id, pa.int64()),
            "given_label": pa.array(issues.given_label, pa.int64()),
            "suggested_label": pa.array(issues.suggested_label, pa.int64()),
            "issue_score": pa.array(issues.issue_score, pa.float64()),
            "is_issue": pa.array(issues.is_issue, pa.bool_()),
            "suggested_mass": pa.array(issues.suggested_mass, pa.float64()),
        }
    )
    return with_meta(table, meta)


def write_issues(path: str, issues: LabelIssues, meta: dict[str, Any]) -> None:
    write_parquet(path, issues_table(issues, meta))


def flagged_rows(
    issues: LabelIssues, class_names: list[str], paths: list[str] | None
) -> list[dict[str, Any]]:
    """The flagged samples, highest score first (ties by sample id), with names and source references.

    ``source`` is the image file for an ImageFolder dataset and ``train[<index>]`` (the index into the
    source training set) otherwise.
    """
    sel = np.flatnonzero(issues.is_issue)
    order = sel[np.lexsort((issues.sample_id[sel], -issues.issue_score[sel]))]
    rows = []
    for rank, i in enumerate(order, start=1):
        sid = int(issues.sample_id[i])
        g, s = int(issues.given_label[i]), int(issues.suggested_label[i])
        source = paths[sid] if paths is not None else f"train[{sid}]"
        score = round(float(issues.issue_score[i]), 6)
        values = (rank, sid, source, g, class_names[g], s, class_names[s], score)
        rows.append(dict(zip(CSV_COLUMNS, values, strict=True)))
    return rows
