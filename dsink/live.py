"""dvclive curves of a training: one step per epoch, every key of the epoch's record but ``epoch``."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any


def open_live(live_dir: str | Path, history: list[dict[str, float]]) -> Any:
    """A fresh dvclive run; on resume the saved epochs are re-logged so the curves stay whole."""
    from dvclive import Live

    shutil.rmtree(live_dir, ignore_errors=True)
    live = Live(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None)
    for record in history:
        log_epoch(live, record)
    return live


def log_epoch(live: Any, record: dict[str, float]) -> None:
    """One epoch's record as the next step of every curve."""
    for key, value in record.items():
        if key != "epoch":
            live.log_metric(key, value, plot=True)
    live.next_step()


def write_curves(live_dir: str | Path, history: list[dict[str, float]]) -> None:
    """Records already complete (e.g. merged over cross-fitted folds) as a fresh dvclive run."""
    open_live(live_dir, history).end()
