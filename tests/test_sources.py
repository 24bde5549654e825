"""dsink.data.sources: images move to the GPU only when asked; image folders load without warnings."""

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


def test_image_folder_loads_without_a_non_writable_array_warning(tmp_path):
    """PIL hands out a read-only buffer; loading copies it, so torch has nothing to warn about (a user
    reads PyTorch's 'NumPy array is not writable' UserWarning as a fault)."""
    import warnings

    from PIL import Image

    from dsink.data.sources import load_source
    from dsink.params import DataParams

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                img = Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8))
                img.save(tmp_path / split / c / f"{i}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        src = load_source(DataParams(dataset="image_folder", root=str(tmp_path), image_size=6))
        x = src.train.load([0, 3])
    assert x.shape == (2, 3, 6, 6) and x.dtype == torch.uint8
