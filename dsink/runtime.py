"""Where a process runs: device, rank and world size, and the DDP calls the training loop makes.

Outside ``torchrun`` (``WORLD_SIZE`` unset or 1) there is one process on CUDA when available, else the
CPU. Under ``torchrun`` every rank joins one process group (nccl on GPU, gloo on CPU); only rank 0
writes files and shows progress.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Runtime:
    """Where this process runs: device, rank and world size (1 outside torchrun)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime() -> Runtime:
    """Detect torchrun (``WORLD_SIZE`` > 1) and initialise the process group; else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
            backend = "nccl"
        else:
            device = torch.device("cpu")
            backend = "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        return Runtime(device, dist.get_rank(), dist.get_world_size())
    return Runtime(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def teardown_runtime(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def progress(iterable: Any, rt: Runtime, **kwargs: Any) -> Any:
    """tqdm on rank 0 when stderr is a terminal (``disable=None``), silent otherwise or with TQDM_DISABLE."""
    from tqdm.auto import tqdm

    quiet = not rt.is_main or os.environ.get("TQDM_DISABLE", "") not in ("", "0")
    return tqdm(iterable, disable=True if quiet else None, leave=False, dynamic_ncols=True, **kwargs)


def data_parallel(model: nn.Module, rt: Runtime) -> nn.Module:
    """``model`` wrapped in DDP under torchrun (gradients averaged over the ranks); itself otherwise."""
    if not rt.distributed:
        return model
    kwargs = {"device_ids": [rt.device.index]} if rt.device.type == "cuda" else {}
    return nn.parallel.DistributedDataParallel(model, **kwargs)


def sum_over_ranks(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """``t`` summed over every rank (in place under torchrun; ``t`` itself otherwise)."""
    if rt.distributed:
        dist.all_reduce(t)
    return t


def barrier(rt: Runtime) -> None:
    """Wait for every rank (no-op in one process)."""
    if rt.distributed:
        dist.barrier()
