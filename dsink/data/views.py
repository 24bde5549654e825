"""Batches over (source dataset, corrupted index): images by ``sample_id``, labels from the Parquet.

For in-memory sources a batch is one tensor index (no per-sample Python work); lazily loaded folders go
through :meth:`Split.load`. Augmentation (random crop with padding + horizontal flip) is applied per
batch from random numbers drawn for the *whole epoch* from ``(seed, epoch)``, so a sample gets the same
crop whichever rank or batch it lands in: single-process and DDP runs see identical inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from dsink.data.sources import Source, Split

# Padding of the random crop, as a fraction of the image side (4 px at 32, 2 px at 28, as in the papers).
_CROP_PAD_FRACTION = {"fashion_mnist": 2 / 28, "cifar10": 4 / 32, "cifar100": 4 / 32}
_DEFAULT_PAD_FRACTION = 1 / 8


@dataclass
class Normalizer:
    """Per-channel standardisation computed from the source training images (or a safe default)."""

    mean: torch.Tensor  # (C,)
    std: torch.Tensor

    @classmethod
    def for_source(cls, src: Source) -> Normalizer:
        imgs = src.train.images
        if imgs is None:  # lazily loaded folders: a fixed, documented default
            return cls(torch.full((src.channels,), 0.5), torch.full((src.channels,), 0.25))
        x = imgs.to(torch.float64) / 255.0
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
        return cls(mean.float(), std.float())

    def __call__(self, batch_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
        x = batch_uint8.to(device, non_blocking=True).float().div_(255.0)
        mean = self.mean.to(device).view(1, -1, 1, 1)
        std = self.std.to(device).view(1, -1, 1, 1)
        return (x - mean) / std


def crop_pad(dataset: str, image_size: tuple[int, int]) -> int:
    frac = _CROP_PAD_FRACTION.get(dataset, _DEFAULT_PAD_FRACTION)
    return max(1, int(round(frac * min(image_size))))


def augment(
    x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int
) -> torch.Tensor:
    """Random-crop (zero padding ``pad``, offsets ``dy``/``dx`` in [0, 2*pad]) and flip a (B,C,H,W) batch."""
    B, C, H, W = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (torch.arange(H, device=x.device).view(1, H) + dy.view(B, 1)).view(B, 1, H, 1)
    cols = (torch.arange(W, device=x.device).view(1, W) + dx.view(B, 1)).view(B, 1, 1, W)
    bidx = torch.arange(B, device=x.device).view(B, 1, 1, 1)
    cidx = torch.arange(C, device=x.device).view(1, C, 1, 1)
    out = padded[bidx, cidx, rows, cols]
    return torch.where(flip.view(B, 1, 1, 1), out.flip(-1), out)


@dataclass
class TrainingSet:
    """The samples a model trains on: ``ids[k]`` is the source index of sample ``k``, which is row
    ``rows[k]`` of the corrupted index (row ``k`` when ``rows`` is None: every kept sample, in order).

    ``rows`` lets a cross-fitting fold model train on part of the index while its batches still carry
    the corrupted-index rows that objectives key per-sample state by (ELR's targets).
    """

    split: Split
    ids: np.ndarray
    labels: torch.Tensor  # the labels trained on (noisy), int64 (n,)
    dataset: str
    image_size: tuple[int, int]
    rows: np.ndarray | None = None  # int64 (n,): corrupted-index row of each sample; None = identity

    def __len__(self) -> int:
        return int(self.ids.size)


@dataclass
class Batch:
    images: torch.Tensor  # uint8 (B, C, H, W) on CPU
    labels: torch.Tensor  # int64 (B,)
    rows: torch.Tensor  # int64 (B,): corrupted-index rows (for per-sample state and teacher logits)
    order_pos: torch.Tensor  # int64 (B,): positions in the epoch's global order (augmentation lookup)


def epoch_order(n: int, seed: int, epoch: int, world_size: int, rank: int) -> np.ndarray:
    """This rank's sample order for ``epoch``: torch's DistributedSampler (seed + epoch), no drop_last."""
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return np.fromiter(iter(sampler), dtype=np.int64, count=len(sampler))


def epoch_positions(n: int, world_size: int, rank: int) -> np.ndarray:
    """Where this rank's samples sit in the epoch's global (padded) permutation."""
    total = -(-n // world_size) * world_size
    return np.arange(rank, total, world_size, dtype=np.int64)


def augmentation_draws(n_total: int, pad: int, seed: int, epoch: int) -> tuple[torch.Tensor, ...]:
    """Crop offsets and flips for every position of an epoch, from ``(seed, epoch)`` alone."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 7, epoch]).generate_state(1)[0]))
    dy = torch.randint(0, 2 * pad + 1, (n_total,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n_total,), generator=g)
    flip = torch.rand(n_total, generator=g) < 0.5
    return dy, dx, flip


def iterate(ts: TrainingSet, order: np.ndarray, positions: np.ndarray, batch_size: int) -> Iterator[Batch]:
    """Batches of ``ts`` in ``order`` (positions in ``ts``; a batch's ``rows`` are corrupted-index rows)."""
    for start in range(0, order.size, batch_size):
        pos = order[start : start + batch_size]
        yield Batch(
            images=ts.split.load(ts.ids[pos]),
            labels=ts.labels[torch.from_numpy(pos)],
            rows=torch.from_numpy(pos if ts.rows is None else ts.rows[pos]),
            order_pos=torch.from_numpy(positions[start : start + batch_size]),
        )


def eval_batches(split: Split, ids: np.ndarray, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, uint8 images) chunks of ``ids`` in order, for inference."""
    for start in range(0, ids.size, batch_size):
        yield start, split.load(ids[start : start + batch_size])
