"""Label-noise models: realised rates, where flips go, transition matrices, and user label files."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dsink.data.longtail import class_counts
from dsink.data.noise import (
    cifar100_coarse_of_fine,
    cifar100_superclass_pairs,
    inject,
    pair_map_for,
    random_pairs,
    read_label_file,
    transition_matrix,
)
from dsink.errors import DsinkError

N = 200_000
SIGMAS = 5.0

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Patrini et al. 2017: truck -> automobile, bird -> airplane, deer -> horse, cat <-> dog.
CIFAR10_NAMED_PAIRS = [
    ("truck", "automobile"),
    ("bird", "airplane"),
    ("deer", "horse"),
    ("cat", "dog"),
    ("dog", "cat"),
]
FMNIST_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FMNIST_NAMED_PAIRS = [
    ("T-shirt/top", "Shirt"),
    ("Shirt", "T-shirt/top"),
    ("Pullover", "Coat"),
    ("Coat", "Pullover"),
    ("Sneaker", "Ankle boot"),
    ("Ankle boot", "Sneaker"),
]


def by_name(names, pairs):
    return {names.index(a): names.index(b) for a, b in pairs}


def uniform_clean(C: int, n: int = N, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, C, n)


def long_tailed_clean(C: int, ratio: float, n_max: int, seed: int = 0) -> np.ndarray:
    counts = class_counts("exp", ratio, n_max, C)
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(C), counts))


def within_binomial(observed: float, p: float, n: int, sigmas: float = 4.0) -> bool:
    return abs(observed - p) <= sigmas * math.sqrt(p * (1 - p) / n) + 1e-12


def assert_matches_matrix(clean: np.ndarray, noisy: np.ndarray, T: np.ndarray) -> None:
    """Empirical P(noisy=j | clean=i) within SIGMAS binomial standard errors of T; zero cells exactly zero."""
    C = T.shape[0]
    M = np.zeros((C, C))
    np.add.at(M, (clean, noisy), 1)
    n_i = M.sum(1, keepdims=True)
    emp = M / n_i
    tol = SIGMAS * np.sqrt(T * (1 - T) / n_i) + 1e-12
    bad = np.abs(emp - T) > tol
    assert not bad.any(), f"cells {np.argwhere(bad).tolist()}: empirical {emp[bad]} vs expected {T[bad]}"
    np.testing.assert_array_equal(M[T == 0], 0)


# ---------------------------------------------------------------- symmetric


@pytest.mark.parametrize("C, rate", [(10, 0.4), (10, 0.2), (2, 0.3), (100, 0.5)])
def test_symmetric_flips_exactly_rate_to_other_classes(C, rate):
    clean = uniform_clean(C)
    noisy = inject(clean, "symmetric", rate, C, np.random.default_rng(1))
    flipped = noisy != clean
    assert within_binomial(flipped.mean(), rate, N)
    # each flip lands uniformly on one of the C - 1 other classes: offsets 1..C-1 equally often
    offsets = np.bincount((noisy[flipped] - clean[flipped]) % C, minlength=C)
    assert offsets[0] == 0
    n_flip = int(flipped.sum())
    for k in range(1, C):
        assert within_binomial(offsets[k] / n_flip, 1 / (C - 1), n_flip, SIGMAS), k


@pytest.mark.parametrize("C, rate", [(10, 0.4), (4, 0.6)])
def test_symmetric_include_true_redraws_from_all_classes(C, rate):
    clean = uniform_clean(C)
    noisy = inject(clean, "symmetric", rate, C, np.random.default_rng(2), include_true=True)
    assert within_binomial((noisy != clean).mean(), rate * (1 - 1 / C), N)
    T = (1 - rate) * np.eye(C) + rate / C  # independent statement of TABASCO's "unif"
    np.testing.assert_allclose(transition_matrix("symmetric", rate, C, include_true=True), T, atol=1e-12)
    assert_matches_matrix(clean, noisy, T)


def test_symmetric_matches_its_transition_matrix():
    C, rate = 10, 0.4
    T = (1 - rate) * np.eye(C) + rate / (C - 1) * (1 - np.eye(C))
    np.testing.assert_allclose(transition_matrix("symmetric", rate, C), T, atol=1e-12)
    clean = uniform_clean(C)
    assert_matches_matrix(clean, inject(clean, "symmetric", rate, C, np.random.default_rng(3)), T)


# ---------------------------------------------------------------- asymmetric


@pytest.mark.parametrize(
    "dataset, expected",
    [
        ("cifar10", by_name(CIFAR10_NAMES, CIFAR10_NAMED_PAIRS)),
        ("fashion_mnist", by_name(FMNIST_NAMES, FMNIST_NAMED_PAIRS)),
    ],
)
def test_asymmetric_flips_only_to_the_semantic_partner(dataset, expected):
    C, rate = 10, 0.4
    pair_map = pair_map_for(dataset, C, np.random.default_rng(0))
    assert pair_map == expected
    clean = uniform_clean(C)
    noisy = inject(clean, "asymmetric", rate, C, np.random.default_rng(4), pair_map=pair_map)
    changed = noisy != clean
    target = np.array([expected.get(c, c) for c in range(C)])
    np.testing.assert_array_equal(noisy[changed], target[clean[changed]])
    for c in range(C):
        sel = clean == c
        if c in expected:
            assert within_binomial(changed[sel].mean(), rate, int(sel.sum())), c
        else:
            assert not changed[sel].any(), f"class {c} has no partner but changed"
    T = np.eye(C)
    for src, dst in expected.items():
        T[src, src], T[src, dst] = 1 - rate, rate
    np.testing.assert_allclose(transition_matrix("asymmetric", rate, C, pair_map=pair_map), T, atol=1e-12)
    assert_matches_matrix(clean, noisy, T)


@pytest.mark.parametrize("C", [2, 3, 5, 10, 37, 100])
def test_random_pairs_is_one_cycle_without_fixed_points(C):
    maps = []
    for seed in range(5):
        m = random_pairs(C, np.random.default_rng(seed))
        assert sorted(m) == list(range(C))
        assert sorted(m.values()) == list(range(C))  # a permutation
        assert all(m[c] != c for c in range(C))  # never to itself
        seen, c = set(), 0
        while c not in seen:  # following the map from 0 visits every class: a single cycle
            seen.add(c)
            c = m[c]
        assert len(seen) == C
        assert m == random_pairs(C, np.random.default_rng(seed))
        maps.append(m)
    if C > 3:
        assert len({tuple(sorted(m.items())) for m in maps}) > 1


def test_other_datasets_get_the_seeded_random_map():
    for dataset in ("synthetic", "image_folder"):
        m = pair_map_for(dataset, 6, np.random.default_rng(9))
        assert m == random_pairs(6, np.random.default_rng(9))


def test_cifar100_pairs_stay_within_the_superclass(tmp_path):
    coarse = np.random.default_rng(0).permutation(np.repeat(np.arange(20), 5))
    pairs = cifar100_superclass_pairs(coarse)
    assert sorted(pairs) == list(range(100))
    assert sorted(pairs.values()) == list(range(100))
    for fine, nxt in pairs.items():
        assert nxt != fine and coarse[nxt] == coarse[fine]
        members = np.flatnonzero(coarse == coarse[fine])
        assert nxt == members[(members.tolist().index(fine) + 1) % 5]  # next by index, cyclic
    # read from a (fake) local python archive, as torchvision stores it
    (tmp_path / "cifar-100-python").mkdir()
    fine = np.arange(100).repeat(3)
    with open(tmp_path / "cifar-100-python" / "train", "wb") as fh:
        pickle.dump({"fine_labels": fine.tolist(), "coarse_labels": coarse[fine].tolist()}, fh)
    np.testing.assert_array_equal(cifar100_coarse_of_fine(tmp_path), coarse)
    assert pair_map_for("cifar100", 100, np.random.default_rng(0), tmp_path) == pairs
    with pytest.raises(DsinkError, match="cifar-100-python"):
        cifar100_coarse_of_fine(tmp_path / "missing")


# ---------------------------------------------------------------- imbalanced


def imbalanced_oracle(counts: np.ndarray, rate: float, include_true: bool) -> np.ndarray:
    """RoLT's "imb": a picked sample of class i draws j with probability n_j / sum of the allowed n."""
    C, total = counts.size, counts.sum()
    T = np.zeros((C, C))
    for i in range(C):
        for j in range(C):
            if include_true:
                T[i, j] = rate * counts[j] / total
            elif j != i:
                T[i, j] = rate * counts[j] / (total - counts[i])
        T[i, i] += 1 - rate
    return T


@pytest.mark.parametrize("include_true", [False, True])
def test_imbalanced_wrong_labels_follow_class_sizes(include_true):
    C, rate = 6, 0.4
    clean = long_tailed_clean(C, ratio=20, n_max=60_000)
    counts = np.bincount(clean, minlength=C)
    noisy = inject(clean, "imbalanced", rate, C, np.random.default_rng(5), include_true=include_true)
    T = imbalanced_oracle(counts, rate, include_true)
    got = transition_matrix("imbalanced", rate, C, include_true=include_true, class_counts=counts)
    np.testing.assert_allclose(got, T, atol=1e-12)
    assert_matches_matrix(clean, noisy, T)
    flip_rate = (noisy != clean).mean()
    expected = rate if not include_true else rate * (1 - ((counts / counts.sum()) ** 2).sum())
    assert within_binomial(flip_rate, expected, clean.size)
    # the head class receives most of the wrong labels
    wrong = noisy[noisy != clean]
    assert np.argmax(np.bincount(wrong, minlength=C)) == 0


# ---------------------------------------------------------------- every model


PAIRS10 = by_name(CIFAR10_NAMES, CIFAR10_NAMED_PAIRS)


@pytest.mark.parametrize(
    "noise_type, kwargs",
    [
        ("none", {}),
        ("symmetric", {}),
        ("symmetric", {"include_true": True}),
        ("asymmetric", {"pair_map": PAIRS10}),
        ("asymmetric", {"pair_map": random_pairs(10, np.random.default_rng(0))}),
        ("imbalanced", {}),
        ("imbalanced", {"include_true": True}),
    ],
)
def test_transition_matrix_rows_sum_to_one_and_match_inject(noise_type, kwargs):
    C, rate = 10, 0.35
    clean = long_tailed_clean(C, ratio=5, n_max=40_000, seed=1)
    counts = np.bincount(clean, minlength=C)
    T = transition_matrix(noise_type, rate, C, class_counts=counts, **kwargs)
    assert T.shape == (C, C)
    assert np.all(T >= 0)
    np.testing.assert_allclose(T.sum(1), 1.0, atol=1e-12)
    noisy = inject(clean, noise_type, rate, C, np.random.default_rng(6), **kwargs)
    assert_matches_matrix(clean, noisy, T)


def test_rate_zero_and_none_are_clean():
    clean = uniform_clean(5, 1000)
    for noise_type in ("none", "symmetric", "imbalanced"):
        for rate in (0.0,) if noise_type != "none" else (0.0, 0.4):
            out = inject(clean, noise_type, rate, 5, np.random.default_rng(0))
            np.testing.assert_array_equal(out, clean)
            assert out is not clean
        np.testing.assert_array_equal(
            transition_matrix(noise_type, 0.0, 5, class_counts=np.ones(5)), np.eye(5)
        )


def test_unknown_noise_type_is_an_error():
    with pytest.raises(DsinkError, match="gaussian"):
        inject(uniform_clean(3, 10), "gaussian", 0.2, 3, np.random.default_rng(0))


@pytest.mark.parametrize(
    "noise_type, kwargs",
    [
        ("symmetric", {}),
        ("symmetric", {"include_true": True}),
        ("asymmetric", {"pair_map": PAIRS10}),
        ("imbalanced", {}),
    ],
)
def test_same_seed_same_labels(noise_type, kwargs):
    clean = long_tailed_clean(10, ratio=10, n_max=2000)
    a = inject(clean, noise_type, 0.4, 10, np.random.default_rng(11), **kwargs)
    b = inject(clean, noise_type, 0.4, 10, np.random.default_rng(11), **kwargs)
    c = inject(clean, noise_type, 0.4, 10, np.random.default_rng(12), **kwargs)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.int64


def test_a_million_labels():
    C, n = 10, 1_000_000
    clean = long_tailed_clean(C, ratio=10, n_max=n // 4)[:n]
    for noise_type, kwargs, expected_rate in (
        ("symmetric", {}, 0.4),
        ("asymmetric", {"pair_map": random_pairs(C, np.random.default_rng(0))}, 0.4),
        ("imbalanced", {}, 0.4),
    ):
        noisy = inject(clean, noise_type, 0.4, C, np.random.default_rng(0), **kwargs)
        assert noisy.shape == clean.shape and noisy.dtype == np.int64
        assert noisy.min() >= 0 and noisy.max() < C
        assert within_binomial((noisy != clean).mean(), expected_rate, clean.size), noise_type


# ---------------------------------------------------------------- label files

C_FILE, N_FILE = 10, 500


@pytest.fixture()
def labels():
    return np.random.default_rng(0).integers(0, C_FILE, N_FILE)


def read(path, key=None, n=N_FILE, C=C_FILE):
    return read_label_file(path, key, n, C)


def file_error(path, key=None, n=N_FILE, C=C_FILE) -> str:
    with pytest.raises(DsinkError) as exc:
        read_label_file(path, key, n, C)
    msg = str(exc.value)
    assert str(path) in msg, msg
    assert "\n" not in msg, f"error spans several lines: {msg!r}"
    return msg


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.float64])
def test_npy(tmp_path, labels, dtype):
    np.save(tmp_path / "l.npy", labels.astype(dtype))
    got = read(tmp_path / "l.npy")
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, labels)


def test_csv_without_header(tmp_path, labels):
    (tmp_path / "l.csv").write_text("".join(f"{v}\n" for v in labels))
    np.testing.assert_array_equal(read(tmp_path / "l.csv"), labels)


def test_csv_with_header(tmp_path, labels):
    (tmp_path / "one.csv").write_text("label\n" + "".join(f"{v}\n" for v in labels))
    np.testing.assert_array_equal(read(tmp_path / "one.csv"), labels)
    other = (labels + 1) % C_FILE
    rows = "".join(f"{i},{a},{b}\n" for i, (a, b) in enumerate(zip(labels, other, strict=True)))
    (tmp_path / "three.csv").write_text("index,worse_label,aggre_label\n" + rows)
    np.testing.assert_array_equal(read(tmp_path / "three.csv", key="worse_label"), labels)
    np.testing.assert_array_equal(read(tmp_path / "three.csv"), other)  # default: the last column


def test_parquet(tmp_path, labels):
    pq.write_table(pa.table({"index": np.arange(N_FILE), "label": labels}), tmp_path / "a.parquet")
    np.testing.assert_array_equal(read(tmp_path / "a.parquet"), labels)
    other = (labels + 3) % C_FILE
    pq.write_table(pa.table({"worse": labels, "aggre": other}), tmp_path / "b.parquet")
    np.testing.assert_array_equal(read(tmp_path / "b.parquet", key="worse"), labels)
    np.testing.assert_array_equal(read(tmp_path / "b.parquet", key="aggre"), other)


def test_cifar_n_pt_dict(tmp_path, labels):
    torch.save(
        {"clean_label": torch.zeros(N_FILE, dtype=torch.long), "worse_label": torch.as_tensor(labels)},
        tmp_path / "t.pt",
    )
    np.testing.assert_array_equal(read(tmp_path / "t.pt", key="worse_label"), labels)
    # CIFAR-N's own files hold numpy arrays
    torch.save({"worse_label": labels, "aggre_label": labels.astype(np.int32)}, tmp_path / "n.pt")
    np.testing.assert_array_equal(read(tmp_path / "n.pt", key="worse_label"), labels)
    np.testing.assert_array_equal(read(tmp_path / "n.pt", key="aggre_label"), labels)


def test_pt_key_errors(tmp_path, labels):
    torch.save({"worse_label": torch.as_tensor(labels)}, tmp_path / "t.pt")
    msg = file_error(tmp_path / "t.pt", key="aggre_label")
    assert "'aggre_label'" in msg and "worse_label" in msg
    assert "None" in file_error(tmp_path / "t.pt", key=None)
    torch.save(torch.as_tensor(labels), tmp_path / "bare.pt")
    assert "dict" in file_error(tmp_path / "bare.pt", key="worse_label")


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pt_is_refused_without_running_code(tmp_path, labels):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"worse_label": _Payload(marker)}, path)
    msg = file_error(path, key="worse_label")
    assert "weights_only" in msg
    assert not marker.exists()
    # the payload is real: an unsafe load does run it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_object_npy_is_refused(tmp_path):
    np.save(tmp_path / "o.npy", np.array([1, "a"], dtype=object), allow_pickle=True)
    file_error(tmp_path / "o.npy")


@pytest.mark.parametrize("n_written", [N_FILE - 1, N_FILE + 1, 0])
def test_wrong_length(tmp_path, n_written):
    np.save(tmp_path / "l.npy", np.zeros(n_written, dtype=np.int64))
    msg = file_error(tmp_path / "l.npy")
    assert str(n_written) in msg and str(N_FILE) in msg


@pytest.mark.parametrize("bad", [C_FILE, -1, 255])
@pytest.mark.parametrize("ext", ["npy", "csv", "parquet", "pt"])
def test_out_of_range_label(tmp_path, labels, bad, ext):
    labels = labels.copy()
    labels[123] = bad
    path = tmp_path / f"l.{ext}"
    if ext == "npy":
        np.save(path, labels)
    elif ext == "csv":
        path.write_text("".join(f"{v}\n" for v in labels))
    elif ext == "parquet":
        pq.write_table(pa.table({"label": labels}), path)
    else:
        torch.save({"k": torch.as_tensor(labels)}, path)
    msg = file_error(path, key="k")
    assert str(bad) in msg and "123" in msg and f"0..{C_FILE - 1}" in msg


def test_float_labels_that_are_not_integers(tmp_path, labels):
    values = labels.astype(np.float64)
    values[7] = 2.5
    np.save(tmp_path / "f.npy", values)
    assert "integer" in file_error(tmp_path / "f.npy")
    values[7] = np.nan
    np.save(tmp_path / "nan.npy", values)
    file_error(tmp_path / "nan.npy")
    (tmp_path / "f.csv").write_text("".join(f"{v}\n" for v in values[:-1].tolist() + [0.5]))
    file_error(tmp_path / "f.csv")


def test_two_dimensional_labels(tmp_path):
    np.save(tmp_path / "m.npy", np.zeros((N_FILE, 2), dtype=np.int64))
    assert "1-d" in file_error(tmp_path / "m.npy")


def test_unsupported_extension_and_missing_file(tmp_path, labels):
    (tmp_path / "l.txt").write_text("".join(f"{v}\n" for v in labels))
    msg = file_error(tmp_path / "l.txt")
    assert "'.txt'" in msg and ".npy" in msg
    assert "not found" in file_error(tmp_path / "missing.npy")


@pytest.mark.parametrize(
    "ext, content",
    [("npy", b"not numpy"), ("parquet", b"PAR1junk"), ("pt", b"\x00\x01"), ("csv", b"a,b\n1\n")],
)
def test_corrupt_files(tmp_path, ext, content):
    path = tmp_path / f"junk.{ext}"
    path.write_bytes(content)
    file_error(path)
