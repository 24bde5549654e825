"""Eval-mode logits of a model on chosen samples of a split (dump, per-epoch tracking, noise-rate
estimates, the student's dataset-scope re-solve, benchmarks)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from dsink.data.sources import Split
from dsink.data.views import Normalizer, eval_batches
from dsink.runtime import Runtime, progress


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    split: Split,
    ids: np.ndarray,
    normalizer: Normalizer,
    device: torch.device,
    batch_size: int = 512,
    channels_last: bool = False,
    bf16: bool = False,
    desc: str = "predict",
    rt: Runtime | None = None,
) -> np.ndarray:
    """Eval-mode logits (float32, (len(ids), C)) in the order of ``ids``, chunked so memory stays bounded."""
    model.eval()
    out: np.ndarray | None = None
    chunks = eval_batches(split, ids, batch_size)
    total = math.ceil(ids.size / batch_size)
    for start, imgs in progress(chunks, rt or Runtime(device), total=total, desc=desc):
        x = normalizer(imgs, device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            z = model(x)
        z = z.float().cpu().numpy()
        if out is None:
            out = np.empty((ids.size, z.shape[1]), dtype=np.float32)
        out[start : start + z.shape[0]] = z
    assert out is not None
    return out
