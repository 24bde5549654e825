"""Model files and training checkpoints: written atomically, read with ``weights_only=True``.

A model file is a state dict of CPU tensors. A training checkpoint (``<dir>/last.pt``, rewritten after
every epoch by :func:`dsink.engine.train`) holds the model, optimizer and scheduler states, the epochs'
records, the last finished epoch, the precision decision and the objective's state, so a killed stage
resumes where it stopped. Checkpoint directories live outside DVC's outs (:func:`dsink.runs.checkpoint_dir`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsink.errors import DsinkError

LAST = "last.pt"  # the checkpoint file inside a run's checkpoint directory


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # Through a file handle: torch.save(obj, path) names the zip records after the (temporary) file name,
    # which would make identical weights hash differently from run to run.
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
    os.replace(tmp, path)


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as detached CPU tensors."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_state_dict(model: nn.Module, path: str | Path) -> None:
    """Atomically save a model's state dict (CPU tensors) for ``torch.load(weights_only=True)``."""
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    atomic_torch_save(cpu_state_dict(module), Path(path))


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict refusing anything but tensors and plain containers (never unpickles code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise DsinkError(f"{path}: model file not found") from exc
    except Exception as exc:  # weights_only refusal, truncation, garbage
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DsinkError(f"{path}: refused to load as a plain state dict ({first[:200]})") from exc


def checkpoint_file(checkpoint_dir: str | Path | None) -> Path | None:
    """Where a run keyed by ``checkpoint_dir`` keeps its checkpoint (None: the run keeps none)."""
    return Path(checkpoint_dir) / LAST if checkpoint_dir is not None else None


def load_checkpoint(path: Path | None) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (``weights_only``), or None when there is none to resume."""
    if path is None or not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    history: list[dict[str, float]],
    epoch: int,
    precision: dict[str, bool],
    objective_state: Any = None,
) -> None:
    """Atomically write the state after 0-based ``epoch`` (``objective_state``: anything with
    ``state_dict``, or None)."""
    state = {
        "model": cpu_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "history": history,
        "epoch": epoch,
        "precision": precision,
    }
    if objective_state is not None:
        state["objective"] = objective_state.state_dict()
    atomic_torch_save(state, path)


def restore_checkpoint(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    objective_state: Any = None,
) -> tuple[list[dict[str, float]], int]:
    """Load ``state`` (from :func:`load_checkpoint`) into the run's objects; returns the records so far
    and the first epoch still to train."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if objective_state is not None and "objective" in state:
        objective_state.load_state_dict(state["objective"])
    return list(state["history"]), int(state["epoch"]) + 1


def clear_checkpoint(checkpoint_dir: str | Path | None) -> None:
    """Remove a finished run's checkpoint (its outputs are in DVC's cache from now on)."""
    if checkpoint_dir is not None and Path(checkpoint_dir).exists():
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
