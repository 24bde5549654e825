"""Dataset registry: where the source images and labels come from.

Every stage reads images from the *source* dataset by ``sample_id`` (the index into the source training
set); the corrupted index only says which ids are kept and which label each one carries. A
:class:`Source` gives both splits as uint8 ``(N, C, H, W)`` tensors (or, for ``image_folder``, loads
images lazily) plus clean labels and class names.

Nothing is fetched from the network unless the user sets ``data.download: true``. A missing dataset is a
:class:`~dsink.errors.DsinkError` naming the path and how to get it.
"""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dsink.errors import DsinkError
from dsink.params import DataParams

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
FASHION_MNIST_HELP = (
    "install the Debian package with `apt-get install -y dataset-fashion-mnist` then run `make data` "
    "(or `python -m dsink.data.fetch`), or set data.download: true to let torchvision download it"
)


@dataclass
class Split:
    """One split of a source dataset.

    ``images`` is a uint8 tensor (N, C, H, W) for in-memory datasets; for lazily loaded ones it is None
    and ``load(indices)`` returns the images of those indices.
    """

    labels: np.ndarray  # int64 (N,)
    images: torch.Tensor | None = None
    loader: Callable[[Sequence[int]], torch.Tensor] | None = None
    paths: list[str] | None = None  # image_folder: the file of each index (for reports a user acts on)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def load(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Images of ``indices`` as uint8 (n, C, H, W)."""
        if self.images is not None:
            return self.images[torch.as_tensor(np.asarray(indices, dtype=np.int64))]
        assert self.loader is not None
        return self.loader(indices)


@dataclass
class Source:
    """A dataset with a train and a test split, its class names and image geometry."""

    name: str
    class_names: list[str]
    train: Split
    test: Split
    channels: int
    image_size: tuple[int, int]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


#: set to 1 to keep in-memory images on the GPU (``bench/gpu_grid.sh``); batches are then cut there
DATA_ON_DEVICE_ENV = "DSINK_DATA_ON_DEVICE"


def resident(source: Source) -> Source:
    """``source`` with its in-memory images moved to the current CUDA device when the environment asks
    for it (``DSINK_DATA_ON_DEVICE=1``) and one is visible; otherwise ``source`` itself.

    A whole uint8 image set is small next to a GPU's memory (Fashion-MNIST: 47 MB), and batches cut
    on the device skip a host-to-device copy per step. Lazily loaded folders stay on the host.
    """
    import os

    if os.environ.get(DATA_ON_DEVICE_ENV) != "1" or not torch.cuda.is_available():
        return source
    device = torch.device("cuda", torch.cuda.current_device())
    for split in (source.train, source.test):
        if split.images is not None:
            split.images = split.images.to(device)
    return source


def _as_chw_uint8(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(array))
    if t.dtype != torch.uint8:
        raise DsinkError(f"dataset images have dtype {t.dtype}, expected uint8")
    if t.ndim == 3:  # (N, H, W) greyscale
        t = t.unsqueeze(1)
    elif t.ndim == 4 and t.shape[-1] in (1, 3, 4) and t.shape[1] not in (1, 3, 4):  # NHWC
        t = t.permute(0, 3, 1, 2)
    return t.contiguous()


def install_fashion_mnist(root: str | Path, source: Path = DEBIAN_FASHION_MNIST) -> Path:
    """Unpack the Debian package's gzip IDX files into ``<root>/FashionMNIST/raw`` (torchvision's layout).

    Local files only; returns the raw folder. Raises :class:`DsinkError` when the package is missing.
    """
    raw = Path(root) / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in FASHION_MNIST_FILES:
        dst = raw / name
        if dst.exists():
            continue
        src = source / f"{name}.gz"
        if not src.exists():
            raise DsinkError(f"Fashion-MNIST file {src} not found: {FASHION_MNIST_HELP}")
        tmp = dst.with_suffix(".tmp")
        with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        tmp.replace(dst)
    return raw


def _fashion_mnist(p: DataParams) -> Source:
    from torchvision.datasets import FashionMNIST

    raw = Path(p.root) / "FashionMNIST" / "raw"
    if not p.download and not all((raw / f).exists() for f in FASHION_MNIST_FILES):
        raise DsinkError(f"dataset fashion_mnist not found under {raw}: {FASHION_MNIST_HELP}")
    try:
        tr = FashionMNIST(p.root, train=True, download=p.download)
        te = FashionMNIST(p.root, train=False, download=p.download)
    except (RuntimeError, OSError, ValueError, IndexError) as exc:
        raise DsinkError(
            f"dataset fashion_mnist under {raw} could not be read ({exc}): {FASHION_MNIST_HELP}"
        ) from exc
    return Source(
        name="fashion_mnist",
        class_names=list(tr.classes),
        train=Split(tr.targets.numpy().astype(np.int64), _as_chw_uint8(tr.data)),
        test=Split(te.targets.numpy().astype(np.int64), _as_chw_uint8(te.data)),
        channels=1,
        image_size=(28, 28),
    )


def _cifar(p: DataParams, which: str) -> Source:
    from torchvision import datasets

    cls = datasets.CIFAR10 if which == "cifar10" else datasets.CIFAR100
    folder = Path(p.root) / cls.base_folder
    if not p.download and not folder.exists():
        raise DsinkError(
            f"dataset {which} not found: expected the python-pickle archive unpacked at {folder} "
            f"(from {cls.url}); put it there or set data.download: true"
        )
    try:
        tr = cls(p.root, train=True, download=p.download)
        te = cls(p.root, train=False, download=p.download)
    except (RuntimeError, OSError, ValueError, EOFError) as exc:
        raise DsinkError(
            f"dataset {which} under {folder} could not be read ({exc}); re-extract the archive"
        ) from exc
    return Source(
        name=which,
        class_names=list(tr.classes),
        train=Split(np.asarray(tr.targets, dtype=np.int64), _as_chw_uint8(tr.data)),
        test=Split(np.asarray(te.targets, dtype=np.int64), _as_chw_uint8(te.data)),
        channels=3,
        image_size=(32, 32),
    )


def _image_folder(p: DataParams) -> Source:
    from PIL import Image
    from torchvision.datasets import ImageFolder

    splits = {}
    for split in ("train", "test"):
        folder = Path(p.root) / split
        if not folder.is_dir():
            raise DsinkError(
                f"dataset image_folder: {folder} not found; expected {p.root}/train/<class>/<image> "
                f"and {p.root}/test/<class>/<image>"
            )
        try:
            splits[split] = ImageFolder(str(folder))
        except (FileNotFoundError, RuntimeError) as exc:
            raise DsinkError(f"dataset image_folder: {folder} has no images ({exc})") from exc
    if splits["train"].classes != splits["test"].classes:
        raise DsinkError(
            f"dataset image_folder: class folders differ between {p.root}/train and {p.root}/test"
        )
    size = p.image_size
    # All images are converted to the mode of the first training image, so the channel count is fixed.
    with Image.open(splits["train"].samples[0][0]) as first:
        mode = "L" if first.mode in ("1", "L", "I;16", "I") else "RGB"
    channels = 1 if mode == "L" else 3

    def make_loader(ds: ImageFolder) -> Callable[[Sequence[int]], torch.Tensor]:
        def load(indices: Sequence[int]) -> torch.Tensor:
            out = torch.empty((len(indices), channels, size, size), dtype=torch.uint8)
            for k, i in enumerate(np.asarray(indices).tolist()):
                path = ds.samples[i][0]
                try:
                    with Image.open(path) as img:
                        img = img.convert(mode).resize((size, size), Image.BILINEAR)
                        # np.array copies: PIL's buffer view is read-only, and torch warns on
                        # (and may not write through) a non-writable array
                        arr = np.array(img, dtype=np.uint8)
                except OSError as exc:
                    raise DsinkError(f"image {path} could not be read: {exc}") from exc
                out[k] = torch.from_numpy(arr.reshape(size, size, channels)).permute(2, 0, 1)
            return out

        return load

    return Source(
        name="image_folder",
        class_names=list(splits["train"].classes),
        train=Split(
            np.asarray(splits["train"].targets, dtype=np.int64),
            loader=make_loader(splits["train"]),
            paths=[path for path, _ in splits["train"].samples],
        ),
        test=Split(
            np.asarray(splits["test"].targets, dtype=np.int64),
            loader=make_loader(splits["test"]),
            paths=[path for path, _ in splits["test"].samples],
        ),
        channels=channels,
        image_size=(size, size),
    )


def synthetic(
    num_classes: int,
    image_size: int,
    channels: int,
    train_per_class: int,
    test_per_class: int,
    seed: int = 12345,
) -> Source:
    """A seeded, learnable toy image set: each class is a smooth random prototype plus pixel noise.

    Used by tests only. The seed is fixed by default (not the pipeline seed) so the *data* stays the same
    while the corruption seed varies, like a real dataset.
    """
    g = np.random.default_rng(seed)
    protos = g.uniform(40, 215, size=(num_classes, channels, image_size, image_size))

    def make(n_per: int, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
        labels = np.repeat(np.arange(num_classes, dtype=np.int64), n_per)
        noise = rng.normal(0.0, 35.0, size=(labels.size, channels, image_size, image_size))
        imgs = np.clip(protos[labels] + noise, 0, 255).astype(np.uint8)
        order = rng.permutation(labels.size)
        return torch.from_numpy(imgs[order]).contiguous(), labels[order]

    tr_x, tr_y = make(train_per_class, np.random.default_rng(seed + 1))
    te_x, te_y = make(test_per_class, np.random.default_rng(seed + 2))
    return Source(
        name="synthetic",
        class_names=[f"class_{c}" for c in range(num_classes)],
        train=Split(tr_y, tr_x),
        test=Split(te_y, te_x),
        channels=channels,
        image_size=(image_size, image_size),
    )


def load_source(p: DataParams) -> Source:
    """Open the dataset named by ``data.dataset`` (validated by :mod:`dsink.params`)."""
    if p.dataset == "fashion_mnist":
        src = _fashion_mnist(p)
    elif p.dataset in ("cifar10", "cifar100"):
        src = _cifar(p, p.dataset)
    elif p.dataset == "image_folder":
        src = _image_folder(p)
    elif p.dataset == "synthetic":
        s = p.synthetic
        src = synthetic(s.num_classes, s.image_size, s.channels, s.train_per_class, s.test_per_class)
    else:
        raise DsinkError(f"params.yaml: data.dataset = {p.dataset!r} is not a known dataset")
    for split_name, split in (("train", src.train), ("test", src.test)):
        labels = split.labels
        if labels.size == 0:
            raise DsinkError(f"dataset {src.name}: the {split_name} split is empty")
        if labels.min() < 0 or labels.max() >= src.num_classes:
            raise DsinkError(f"dataset {src.name}: {split_name} labels outside 0..{src.num_classes - 1}")
    return src
