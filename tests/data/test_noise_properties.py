"""Property tests (hypothesis) for label-noise injection and the whole corruption step."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dsink.corrupt import corrupt_labels
from dsink.data.noise import inject, random_pairs
from dsink.params import DataParams, ImbalanceParams, NoiseParams

CASES = st.fixed_dictionaries(
    {
        "C": st.integers(2, 40),
        "n": st.integers(1, 3000),
        "rate": st.floats(0.0, 0.99),
        "kind": st.sampled_from(["none", "symmetric", "asymmetric", "imbalanced"]),
        "include_true": st.booleans(),
        "seed": st.integers(0, 2**31 - 1),
    }
)


@settings(max_examples=150, deadline=None)
@given(CASES)
def test_injected_labels_are_valid_and_follow_their_model(case):
    C, n = case["C"], case["n"]
    g = np.random.default_rng(case["seed"])
    clean = g.integers(0, C, n)
    pairs = random_pairs(C, np.random.default_rng(case["seed"] + 1))
    kw = dict(include_true=case["include_true"], pair_map=pairs)
    noisy = inject(clean, case["kind"], case["rate"], C, np.random.default_rng(case["seed"]), **kw)
    again = inject(clean, case["kind"], case["rate"], C, np.random.default_rng(case["seed"]), **kw)
    assert np.array_equal(noisy, again)  # seeded
    assert noisy.shape == clean.shape and noisy.dtype == np.int64
    assert noisy.min() >= 0 and noisy.max() < C
    changed = noisy != clean
    if case["kind"] == "none" or case["rate"] == 0:
        assert not changed.any()
    if case["kind"] == "asymmetric":
        target = np.array([pairs[c] for c in range(C)])
        assert np.array_equal(noisy[changed], target[clean[changed]])
    if case["kind"] == "imbalanced":
        present = np.bincount(clean, minlength=C) > 0
        assert present[
            noisy
        ].all()  # the wrong label is drawn in proportion to class sizes: never an empty class


@settings(max_examples=40, deadline=None)
@given(
    C=st.integers(2, 12),
    per_class=st.integers(5, 80),
    ratio=st.floats(1.0, 50.0),
    profile=st.sampled_from(["exp", "step", "none"]),
    kind=st.sampled_from(["none", "symmetric", "asymmetric", "imbalanced"]),
    rate=st.floats(0.0, 0.9),
    seed=st.integers(0, 10_000),
)
def test_corruption_keeps_clean_labels_and_reports_the_realised_rate(
    C, per_class, ratio, profile, kind, rate, seed
):
    labels = np.repeat(np.arange(C), per_class)
    data = DataParams(
        dataset="synthetic",
        imbalance=ImbalanceParams(profile=profile, ratio=ratio),
        noise=NoiseParams(type=kind, rate=rate),
    )
    idx = corrupt_labels(labels, C, [str(c) for c in range(C)], data, seed)
    assert np.all(np.diff(idx.sample_id) > 0)  # sorted, unique
    assert np.array_equal(idx.clean_label, labels[idx.sample_id])  # clean labels are the source's
    assert np.array_equal(idx.is_noisy, idx.clean_label != idx.noisy_label)
    assert idx.meta["noise_rate"] == idx.is_noisy.mean()
    assert idx.meta["class_counts"] == np.bincount(idx.clean_label, minlength=C).tolist()
    assert max(idx.meta["class_counts"]) == per_class  # the head keeps n_max
