"""PNG figures people look at (matplotlib, no display needed).

- ``per_class.png``: per-class test accuracy against training class size, the three models;
- ``confusion.png``: the student's confusion matrix on the test set (row-normalised);
- ``curves.png``: test top-1 and training loss per epoch of the three trainings (from dvclive);
- ``corrected.png``: share of noisy training labels corrected / memorised per epoch.
- :func:`precision_recall_png`: a label-issue score against the injected noise (for ``make report``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dsink.artifacts import atomic_path

LABELS = {
    "dsink": "D-SINK student",
    "imbalance_teacher": "imbalance teacher (f_L)",
    "noise_teacher": "noise teacher (f_N)",
    "teacher_average": "average of the two teachers",
    "ce": "plain cross-entropy",
    "la_small_loss": "LA + small-loss (one model)",
}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    _plt().close(fig)


def per_class_figure(rows: list[dict[str, Any]], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    sizes = np.array([r["class_size"] for r in rows])
    names = [n for n in LABELS if rows and n in rows[0]]
    for name, marker in zip(names, "os^vDx", strict=False):
        acc = np.array([np.nan if r[name] is None else r[name] for r in rows], dtype=float)
        ax.scatter(sizes, acc, label=LABELS[name], marker=marker, alpha=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training samples in class (clean label, log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Per-class accuracy vs class size")
    _save(fig, path)


def confusion_figure(confusion: np.ndarray, class_names: list[str], path: Path) -> None:
    plt = _plt()
    C = confusion.shape[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = confusion / confusion.sum(1, keepdims=True)
    side = min(12.0, 3 + 0.35 * C)
    fig, ax = plt.subplots(figsize=(side, side * 0.85))
    im = ax.imshow(np.nan_to_num(norm), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046)
    if C <= 30:
        ax.set_xticks(range(C), class_names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(C), class_names, fontsize=7)
        if C <= 15:
            for i in range(C):
                for j in range(C):
                    if confusion[i, j]:
                        ax.text(
                            j,
                            i,
                            f"{norm[i, j]:.2f}",
                            ha="center",
                            va="center",
                            fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black",
                        )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("D-SINK student: confusion (row-normalised)")
    _save(fig, path)


def read_live_metric(live_dir: Path, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, values) of a dvclive metric TSV, or None when it was not logged."""
    import pandas as pd

    tsv = live_dir / "plots" / "metrics" / f"{metric}.tsv"
    if not tsv.is_file():
        return None
    df = pd.read_csv(tsv, sep="\t")
    if metric not in df.columns or "step" not in df.columns:
        return None
    return df["step"].to_numpy() + 1, df[metric].to_numpy(dtype=float)


def _legend_or_note(ax, fontsize: int) -> None:
    """A legend of the plotted series, or, where no model tracked one, a note saying how to get them
    (an empty panel with an empty legend would look like a bug)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize)
    else:
        ax.text(
            0.5,
            0.5,
            "no per-epoch series tracked\n(set train.track_every > 0)",
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=fontsize + 1,
            color="0.4",
        )


def curves_figure(live_dirs: dict[str, Path], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, d in live_dirs.items():
        for ax, metric in zip(axes, ("test_top1", "train_loss"), strict=True):
            series = read_live_metric(d, metric)
            if series is not None:
                ax.plot(*series, label=LABELS.get(name, name), marker=".")
    axes[0].set_title("test top-1 per epoch")
    axes[1].set_title("training loss per epoch")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        _legend_or_note(ax, 8)
    _save(fig, path)


def corrected_figure(live_dirs: dict[str, Path], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k, (name, d) in enumerate(live_dirs.items()):
        color = f"C{k}"  # one colour per model: solid = corrected, dashed = memorised
        for metric, style in (("train_corrected", "-"), ("train_memorised", "--")):
            series = read_live_metric(d, metric)
            if series is not None:
                label = f"{LABELS.get(name, name)}: {metric.split('_')[1]}"
                ax.plot(*series, style, color=color, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("share of noisy training labels")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    _legend_or_note(ax, 7)
    ax.set_title("Noisy labels corrected (solid) and memorised (dashed)")
    _save(fig, path)


def precision_recall_png(
    precision: np.ndarray,
    recall: np.ndarray,
    operating_point: tuple[float, float] | None,
    base_rate: float,
    average_precision: float,
) -> bytes:
    """The precision-recall curve of a label-issue score against the injected noise, as PNG bytes.

    ``precision`` / ``recall`` are the curve's points in order of decreasing threshold (recall rising);
    each precision holds from the previous recall up to its own (the step average precision sums).
    ``operating_point`` is the (precision, recall) of the stage's own rule, marked on top; ``base_rate``
    (the share of wrong labels) is the precision of a random ranking, drawn dashed.
    """
    import io

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    p = np.asarray(precision, dtype=float)
    r = np.r_[0.0, np.asarray(recall, dtype=float)]
    p = np.r_[p[0] if p.size else 1.0, p]
    ax.step(r, p, where="pre", label=f"issue_score (average precision {average_precision:.3f})")
    ax.axhline(base_rate, color="grey", ls="--", lw=1, label=f"random ranking ({100 * base_rate:.1f}% wrong)")
    if operating_point is not None:
        op_p, op_r = operating_point
        ax.plot(
            [op_r], [op_p], "o", color="C3", ms=9,
            label=f"stage rule is_issue (precision {op_p:.3f}, recall {op_r:.3f})",
        )  # fmt: skip
    ax.set_xlabel("recall (share of the wrong labels flagged)")
    ax.set_ylabel("precision (share of flags that are wrong)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("Label issues vs the injected noise")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
