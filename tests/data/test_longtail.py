"""Long-tail profiles against the published formula, and the seeded subsampling by clean label."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsink.data.longtail import class_counts, head_order, long_tail_indices, subsample
from dsink.errors import DsinkError


def exp_oracle(C: int, ratio: float, n_max: int) -> list[int]:
    """``floor(n_max * ratio ** (-c / (C - 1)))``, one Python float expression per class."""
    return [math.floor(n_max * ratio ** (-c / (C - 1))) for c in range(C)]


@pytest.mark.parametrize(
    "C, ratio, n_max",
    [
        (2, 10, 5000),
        (2, 100, 5000),
        (10, 100, 5000),  # CIFAR-10-LT
        (10, 50, 5000),
        (10, 10, 6000),  # Fashion-MNIST sized
        (100, 100, 500),  # CIFAR-100-LT
        (100, 10, 500),
        (7, 3.5, 123),
        (3, 1.5, 10),
    ],
)
def test_exp_profile_is_the_published_formula(C, ratio, n_max):
    got = class_counts("exp", ratio, n_max, C)
    assert got.dtype == np.int64 and got.shape == (C,)
    assert got.tolist() == exp_oracle(C, ratio, n_max)
    assert got[0] == n_max
    assert got[-1] == math.floor(n_max / ratio)  # realised ratio = requested one, up to flooring


def test_known_cifar10_lt_counts():
    # The CIFAR-10-LT (ratio 100) class sizes every long-tail paper reports.
    assert class_counts("exp", 100, 5000, 10).tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


@pytest.mark.parametrize("C", [2, 3, 10, 100])
@pytest.mark.parametrize("n_max", [1, 17, 500, 5000])
def test_ratio_one_keeps_every_class_at_n_max(C, n_max):
    for profile in ("exp", "step", "none"):
        assert class_counts(profile, 1, n_max, C).tolist() == [n_max] * C


@pytest.mark.parametrize("C, ratio, n_max", [(2, 10, 100), (10, 100, 5000), (5, 3, 31), (100, 7.5, 500)])
def test_step_profile(C, ratio, n_max):
    got = class_counts("step", ratio, n_max, C).tolist()
    assert got == [n_max] * (C // 2) + [math.floor(n_max / ratio)] * (C - C // 2)


def test_none_profile_ignores_the_ratio():
    assert class_counts("none", 100, 40, 6).tolist() == [40] * 6


def test_a_class_is_never_emptied():
    # n_max / ratio < 1: the formula would give 0; at least one sample is kept.
    got = class_counts("exp", 1000, 50, 4)
    assert got.tolist() == [max(1, v) for v in exp_oracle(4, 1000, 50)]
    assert got.min() == 1


@pytest.mark.parametrize("ratio", [0.5, 0.999, 0, -3])
def test_ratio_below_one_raises(ratio):
    with pytest.raises(DsinkError, match="ratio"):
        class_counts("exp", ratio, 100, 10)
    labels = np.repeat(np.arange(4), 10)
    with pytest.raises(DsinkError):
        long_tail_indices(labels, 4, "exp", ratio, "natural", np.random.default_rng(0))


def test_unknown_profile_raises():
    with pytest.raises(DsinkError, match="profile"):
        class_counts("linear", 10, 100, 10)


@settings(max_examples=60, deadline=None)
@given(
    C=st.integers(2, 120),
    ratio=st.floats(1.0, 500.0, allow_nan=False),
    n_max=st.integers(1, 10_000),
)
def test_exp_profile_property(C, ratio, n_max):
    got = class_counts("exp", ratio, n_max, C)
    for c in range(C):
        v = n_max * ratio ** (-c / (C - 1))
        # where v sits within float rounding of an integer, either neighbour is the formula
        lo, hi = math.floor(v * (1 - 1e-12)), math.floor(v * (1 + 1e-12))
        assert max(1, lo) <= got[c] <= max(1, hi), (c, v)
    assert np.all(np.diff(got) <= 0)  # non-increasing from head to tail


def balanced(C: int, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(C, dtype=np.int64), n))


@pytest.mark.parametrize(
    "C, n, ratio, profile", [(10, 500, 100, "exp"), (5, 300, 10, "step"), (2, 50, 1, "exp")]
)
def test_natural_head_gives_exact_counts_by_clean_label(C, n, ratio, profile):
    labels = balanced(C, n)
    idx = long_tail_indices(labels, C, profile, ratio, "natural", np.random.default_rng(1))
    assert idx.dtype == np.int64
    assert np.all(np.diff(idx) > 0)  # sorted and unique
    assert idx.min() >= 0 and idx.max() < labels.size
    counts = np.bincount(labels[idx], minlength=C)
    assert counts.tolist() == class_counts(profile, ratio, n, C).tolist()


def test_n_max_is_the_smallest_source_class():
    sizes = [50, 80, 60, 200]
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(4), sizes))
    idx = long_tail_indices(labels, 4, "exp", 10, "natural", np.random.default_rng(0))
    assert np.bincount(labels[idx], minlength=4).tolist() == exp_oracle(4, 10, 50)


def test_permuted_head_is_a_seeded_permutation():
    C, n, ratio = 10, 200, 20
    labels = balanced(C, n)
    target = class_counts("exp", ratio, n, C)
    heads = set()
    for seed in range(6):
        idx = long_tail_indices(labels, C, "exp", ratio, "permuted", np.random.default_rng(seed))
        counts = np.bincount(labels[idx], minlength=C)
        # the counts are the profile's, assigned to classes by a permutation
        assert sorted(counts.tolist(), reverse=True) == target.tolist()
        order = np.argsort(-counts, kind="stable")
        assert sorted(order.tolist()) == list(range(C))
        heads.add(tuple(order.tolist()))
        again = long_tail_indices(labels, C, "exp", ratio, "permuted", np.random.default_rng(seed))
        np.testing.assert_array_equal(idx, again)
    assert len(heads) > 1  # the seed changes which class is the head


def test_head_order():
    np.testing.assert_array_equal(head_order(5, "natural", np.random.default_rng(0)), np.arange(5))
    perm = head_order(50, "permuted", np.random.default_rng(3))
    assert sorted(perm.tolist()) == list(range(50))
    np.testing.assert_array_equal(perm, head_order(50, "permuted", np.random.default_rng(3)))
    assert not np.array_equal(perm, np.arange(50))


def test_subsample_is_seeded_and_picks_random_members():
    labels = balanced(3, 1000)
    per_class = np.array([100, 10, 1000])
    a = subsample(labels, per_class, np.random.default_rng(5))
    b = subsample(labels, per_class, np.random.default_rng(5))
    c = subsample(labels, per_class, np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.bincount(labels[a], minlength=3).tolist() == [100, 10, 1000]
    # not simply the first members of each class: the kept class-0 samples spread over the whole vector
    kept0 = a[labels[a] == 0]
    first0 = np.flatnonzero(labels == 0)[:100]
    assert not np.array_equal(kept0, first0)
    assert kept0.max() > np.flatnonzero(labels == 0)[500]


def test_subsample_caps_at_what_is_available():
    labels = np.array([0, 0, 1, 1, 1, 2])
    idx = subsample(labels, np.array([5, 2, 0]), np.random.default_rng(0))
    assert np.bincount(labels[idx], minlength=3).tolist() == [2, 2, 0]


def test_a_class_with_no_samples_is_an_error():
    labels = np.array([0, 0, 2, 2])
    with pytest.raises(DsinkError, match=r"\[1\]"):
        long_tail_indices(labels, 3, "exp", 2, "natural", np.random.default_rng(0))
