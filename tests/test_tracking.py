"""dsink.tracking.epoch_tracker: per-epoch test top-1 and label repair in the space evaluate.json uses."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from dsink.data.sources import Split
from dsink.data.views import Normalizer
from dsink.evaluation import balanced_logits, label_repair
from dsink.tracking import epoch_tracker


class _Lookup(torch.nn.Module):
    """Logits read from a table by the image's first pixel (the image id), so they are known exactly."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0, 0, 0].round().long()]


def test_tracker_scores_the_balanced_argmax_like_evaluate():
    rng = np.random.default_rng(0)
    n, C = 40, 3
    ids = np.arange(n)
    images = torch.from_numpy(ids.astype(np.uint8)).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    clean = rng.integers(0, C, n)
    noisy = np.where(rng.random(n) < 0.4, (clean + 1) % C, clean)
    table = torch.from_numpy(rng.normal(size=(n, C)).astype(np.float32))
    split = Split(labels=clean, images=images)
    corpus = SimpleNamespace(
        source=SimpleNamespace(train=split, test=split),
        index=SimpleNamespace(sample_id=ids, clean_label=clean, noisy_label=noisy),
        normalizer=Normalizer(torch.zeros(1), torch.full((1,), 1 / 255)),  # x = pixel value = id
    )
    offset = np.array([0.5, 0.0, -0.5])
    log_prior = np.log(np.array([0.7, 0.2, 0.1]))
    z = table.numpy().astype(np.float64)
    want = balanced_logits(z, offset, log_prior).argmax(1)
    assert not np.array_equal(want, z.argmax(1))  # the space changes the predictions here

    got = epoch_tracker(corpus, torch.device("cpu"), 7, offset, log_prior)(_Lookup(table))
    assert got["test_top1"] == float((want == clean).mean())
    repair = label_repair(want, clean, noisy)
    assert got["train_corrected"] == repair["corrected"] and got["train_memorised"] == repair["memorised"]

    raw = epoch_tracker(corpus, torch.device("cpu"), 7)(_Lookup(table))
    assert raw["test_top1"] == float((z.argmax(1) == clean).mean())
