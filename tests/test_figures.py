"""dsink.figures: the per-epoch figures with and without tracked series."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from dsink import figures


def _live(d: Path, metrics: dict[str, list[float]]) -> Path:
    """A dvclive-like directory: ``plots/metrics/<metric>.tsv`` with ``step`` and the metric."""
    m = d / "plots" / "metrics"
    m.mkdir(parents=True)
    for name, values in metrics.items():
        rows = "\n".join(f"{i}\t{v}" for i, v in enumerate(values))
        (m / f"{name}.tsv").write_text(f"step\t{name}\n{rows}\n")
    return d


def _capture_axes(monkeypatch) -> list:
    """Capture the figures' axes before they are saved and closed."""
    seen: list = []
    save = figures._save

    def keep(fig, path):
        seen.extend(fig.axes)
        save(fig, path)

    monkeypatch.setattr(figures, "_save", keep)
    return seen


@pytest.mark.parametrize("draw", [figures.curves_figure, figures.corrected_figure])
def test_no_tracked_series_gives_a_note_not_an_empty_legend(tmp_path, monkeypatch, draw):
    axes = _capture_axes(monkeypatch)
    live = {"dsink": _live(tmp_path / "student", {})}  # a run with track_every 0: no series
    out = tmp_path / "fig.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns on a legend with no labelled artist
        draw(live, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert axes and all(ax.get_legend() is None for ax in axes)
    assert all("track_every" in " ".join(t.get_text() for t in ax.texts) for ax in axes)


@pytest.mark.parametrize("draw", [figures.curves_figure, figures.corrected_figure])
def test_tracked_series_get_a_legend_and_no_note(tmp_path, monkeypatch, draw):
    axes = _capture_axes(monkeypatch)
    series = {
        "test_top1": [0.5, 0.6],
        "train_loss": [2.0, 1.0],
        "train_corrected": [0.3, 0.5],
        "train_memorised": [0.1, 0.2],
    }
    live = {"dsink": _live(tmp_path / "student", series), "ce": _live(tmp_path / "ce", series)}
    draw(live, tmp_path / "fig.png")
    for ax in axes:
        assert ax.get_legend() is not None and not ax.texts
        assert len(ax.get_lines()) >= 2
