"""Label-noise models and their seeded, vectorised injection.

Conventions (also in the README):

- ``symmetric``: each sample is picked with probability ``rate``; a picked sample gets a label drawn
  uniformly from the *other* ``C - 1`` classes (RoLT's "sym": realised flip rate = ``rate``). With
  ``include_true: true`` the new label is drawn from all ``C`` classes (TABASCO's "unif": the true class can
  be re-drawn, realised flip rate = ``rate * (1 - 1/C)``).
- ``asymmetric``: a picked sample of class ``c`` moves to ``pair_map[c]`` (classes without a partner
  keep their label, so the realised rate is below ``rate``). Pair maps: CIFAR-10's semantic pairs,
  CIFAR-100's next class within the super-class, Fashion-MNIST's look-alike pairs, and a seeded
  cyclic map for any other dataset.
- ``imbalanced``: a picked sample's new label is drawn in proportion to the class frequencies of the
  long-tailed subset (RoLT's "imb"), excluding the true class unless ``include_true``.
- ``file``: per-index human labels (CIFAR-N style) applied to the kept samples.

Everything is a few array operations on the whole label vector (no Python loop over samples).
"""

from __future__ import annotations

import csv
import pickle
import re
from pathlib import Path

import numpy as np

from dsink.errors import DsinkError

# CIFAR-10: truck -> automobile, bird -> airplane, deer -> horse, cat <-> dog (Patrini et al. 2017).
CIFAR10_PAIRS = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
# Fashion-MNIST look-alikes: T-shirt/top <-> Shirt, Pullover <-> Coat, Sneaker <-> Ankle boot.
FASHION_MNIST_PAIRS = {0: 6, 6: 0, 2: 4, 4: 2, 7: 9, 9: 7}


def cifar100_superclass_pairs(coarse_of_fine: np.ndarray) -> dict[int, int]:
    """Next fine class (cyclic, by index) within the same super-class, from the fine->coarse map."""
    pairs: dict[int, int] = {}
    for coarse in np.unique(coarse_of_fine):
        members = np.flatnonzero(coarse_of_fine == coarse)
        for i, fine in enumerate(members):
            pairs[int(fine)] = int(members[(i + 1) % members.size])
    return pairs


def cifar100_coarse_of_fine(root: str | Path) -> np.ndarray:
    """Read the fine->coarse label map from the CIFAR-100 python archive's training pickle.

    That archive *is* a pickle (torchvision reads it the same way); only the user's local copy is read.
    """
    path = Path(root) / "cifar-100-python" / "train"
    try:
        with open(path, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
    except OSError as exc:
        raise DsinkError(f"cannot read CIFAR-100 super-classes from {path}: {exc.strerror}") from exc
    fine = np.asarray(entry["fine_labels"], dtype=np.int64)
    coarse = np.asarray(entry["coarse_labels"], dtype=np.int64)
    out = np.full(100, -1, dtype=np.int64)
    out[fine] = coarse
    return out


def random_pairs(num_classes: int, rng: np.random.Generator) -> dict[int, int]:
    """A seeded map sending each class to the next one along a random cycle (never to itself)."""
    cycle = rng.permutation(num_classes)
    return {int(cycle[i]): int(cycle[(i + 1) % num_classes]) for i in range(num_classes)}


def pair_map_for(
    dataset: str, num_classes: int, rng: np.random.Generator, root: str | Path = ""
) -> dict[int, int]:
    """The asymmetric pair map of ``dataset`` (documented above)."""
    if dataset == "cifar10":
        return dict(CIFAR10_PAIRS)
    if dataset == "fashion_mnist":
        return dict(FASHION_MNIST_PAIRS)
    if dataset == "cifar100":
        return cifar100_superclass_pairs(cifar100_coarse_of_fine(root))
    return random_pairs(num_classes, rng)


def transition_matrix(
    noise_type: str,
    rate: float,
    num_classes: int,
    *,
    include_true: bool = False,
    pair_map: dict[int, int] | None = None,
    class_counts: np.ndarray | None = None,
) -> np.ndarray:
    """``T[i, j] = P(noisy = j | clean = i)`` of a synthetic noise model (rows sum to one)."""
    C = num_classes
    T = np.eye(C) * (1 - rate)
    if noise_type == "none" or rate == 0:
        return np.eye(C)
    if noise_type == "symmetric":
        if include_true:
            return (1 - rate) * np.eye(C) + rate / C
        return T + (rate / (C - 1)) * (1 - np.eye(C))
    if noise_type == "asymmetric":
        assert pair_map is not None
        T = np.eye(C)
        for src, dst in pair_map.items():
            T[src, src] -= rate
            T[src, dst] += rate
        return T
    if noise_type == "imbalanced":
        assert class_counts is not None
        freq = np.asarray(class_counts, dtype=np.float64)
        W = np.tile(freq, (C, 1))
        if not include_true:
            np.fill_diagonal(W, 0.0)
        sums = W.sum(1, keepdims=True)
        W = np.divide(W, sums, out=np.eye(C), where=sums > 0)
        return T + rate * W
    raise ValueError(f"no transition matrix for noise type {noise_type!r}")


def _draw_from_rows(probs: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw one class per entry of ``rows`` from ``probs[row]``: one inverse-CDF search per distinct row."""
    out = np.empty(rows.size, dtype=np.int64)
    u = rng.random(rows.size)
    cdf = np.cumsum(probs, axis=1)
    cdf[:, -1] = 1.0
    for r in np.unique(rows):  # a loop over classes, not samples
        sel = rows == r
        out[sel] = np.searchsorted(cdf[r], u[sel], side="right")
    return np.minimum(out, probs.shape[1] - 1)


def inject(
    clean: np.ndarray,
    noise_type: str,
    rate: float,
    num_classes: int,
    rng: np.random.Generator,
    *,
    include_true: bool = False,
    pair_map: dict[int, int] | None = None,
) -> np.ndarray:
    """Noisy labels for clean labels ``clean`` under a synthetic noise model (seeded by ``rng``)."""
    clean = np.asarray(clean, dtype=np.int64)
    C = num_classes
    if noise_type == "none" or rate == 0.0:
        return clean.copy()
    picked = rng.random(clean.size) < rate
    noisy = clean.copy()
    if noise_type == "symmetric":
        if include_true:
            noisy[picked] = rng.integers(0, C, size=int(picked.sum()))
        else:
            noisy[picked] = (clean[picked] + rng.integers(1, C, size=int(picked.sum()))) % C
    elif noise_type == "asymmetric":
        assert pair_map is not None
        target = np.arange(C, dtype=np.int64)
        for src, dst in pair_map.items():
            target[src] = dst
        noisy[picked] = target[clean[picked]]
    elif noise_type == "imbalanced":
        counts = np.bincount(clean, minlength=C).astype(np.float64)
        W = np.tile(counts, (C, 1))
        if not include_true:
            np.fill_diagonal(W, 0.0)
        sums = W.sum(1, keepdims=True)
        # a class whose only possible wrong labels are empty classes keeps its label (nothing to draw from)
        W = np.divide(W, sums, out=np.eye(C), where=sums > 0)
        noisy[picked] = _draw_from_rows(W, clean[picked], rng)
    else:
        raise DsinkError(f"params.yaml: data.noise.type = {noise_type!r} is invalid for synthetic injection")
    return noisy


def _load_pt(path: Path) -> object:
    """``torch.load(weights_only=True)`` that also accepts plain numeric numpy arrays.

    CIFAR-N's ``.pt`` files hold numpy int arrays, which the weights-only unpickler refuses by default;
    allowing ndarray reconstruction of numeric dtypes (under both numpy 1 and 2 module names) keeps
    every object that would run code refused.
    """
    import torch

    reconstruct = np.zeros(0).__reduce__()[0]
    allowed = [reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype]
    allowed += [type(np.dtype(t)) for t in "?bBhHiIlLqQefdg"]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def _one_line(exc: BaseException) -> str:
    """A one-line summary of a library error (torch's weights-only refusal spans many lines)."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if ln.strip()]
    refused = [ln for ln in lines if "Unsupported global" in ln or "Can only build" in ln]
    if refused:
        detail = refused[0].split(" Please use")[0].removeprefix("WeightsUnpickler error: ")
        return f"refused by torch.load(weights_only=True), it may run code ({detail})"
    return lines[0] if lines else "no details"


def read_label_file(path: str | Path, key: str | None, expected_length: int, num_classes: int) -> np.ndarray:
    """Per-index noisy labels from ``.npy``, ``.csv``, ``.parquet`` or a CIFAR-N ``.pt`` dict (``key``).

    One label per index of the *source* training set. ``.pt`` files are loaded with
    ``weights_only=True``, so a file that would run code when unpickled is refused.
    """
    path = Path(path)
    where = f"data.noise.file {str(path)!r}"
    if not path.is_file():
        raise DsinkError(f"{where} not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            labels = np.load(path, allow_pickle=False)
        elif suffix == ".csv":
            with open(path, newline="") as fh:
                rows = [r for r in csv.reader(fh) if r]
            if rows and not rows[0][-1].strip().lstrip("-").isdigit():
                header = [h.strip() for h in rows[0]]
                col = header.index(key) if key in header else len(header) - 1
                rows = rows[1:]
            else:
                col = -1
            labels = np.asarray([int(r[col]) for r in rows])
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            names = table.column_names
            col = (
                key
                if key in names
                else (
                    "noisy_label" if "noisy_label" in names else ("label" if "label" in names else names[-1])
                )
            )
            labels = table.column(col).to_numpy()
        elif suffix == ".pt":
            obj = _load_pt(path)
            if not isinstance(obj, dict):
                raise DsinkError(f"{where}: expected a dict of label arrays, got {type(obj).__name__}")
            if key is None or key not in obj:
                raise DsinkError(
                    f"{where}: data.noise.key = {key!r} is not in the file; available keys: {sorted(obj)}"
                )
            labels = np.asarray(obj[key])
        else:
            raise DsinkError(
                f"{where}: unsupported extension {suffix!r}; expected .npy, .csv, .parquet or .pt"
            )
    except DsinkError:
        raise
    except Exception as exc:  # any parse failure of a user file becomes one clear line
        raise DsinkError(f"{where} could not be read: {type(exc).__name__}: {_one_line(exc)}") from exc
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DsinkError(f"{where}: expected a 1-d label vector, got shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        if labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
            labels = labels.astype(np.int64)
        else:
            raise DsinkError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    if labels.size != expected_length:
        raise DsinkError(
            f"{where} has {labels.size} labels; expected {expected_length} (one per source training sample)"
        )
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DsinkError(
            f"{where}: label {int(labels[first])} at index {first} is outside 0..{num_classes - 1}"
        )
    return labels.astype(np.int64)
