"""dsink.data.sources.resident: images move to the GPU only when asked and one is visible."""

from __future__ import annotations

import numpy as np
import torch

from dsink.data.sources import DATA_ON_DEVICE_ENV, Source, Split, resident


def _source() -> Source:
    imgs = torch.zeros((3, 1, 4, 4), dtype=torch.uint8)
    split = Split(labels=np.zeros(3, dtype=np.int64), images=imgs)
    return Source(
        "synthetic", ["a", "b"], split, Split(labels=np.zeros(3, dtype=np.int64), images=imgs), 1, (4, 4)
    )


def test_resident_leaves_the_images_on_the_host_unless_asked(monkeypatch):
    monkeypatch.delenv(DATA_ON_DEVICE_ENV, raising=False)
    src = _source()
    assert resident(src).train.images.device.type == "cpu"


def test_resident_without_a_gpu_is_a_no_op(monkeypatch):
    monkeypatch.setenv(DATA_ON_DEVICE_ENV, "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    src = _source()
    out = resident(src)
    assert out is src and out.test.images.device.type == "cpu"
    assert torch.equal(out.train.load(np.array([2, 0])), torch.zeros((2, 1, 4, 4), dtype=torch.uint8))
