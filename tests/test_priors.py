import numpy as np
import pytest

from dsink.priors import label_log_prior, log_prior


def test_add_one_smoothing_by_hand():
    np.testing.assert_allclose(log_prior(np.array([4, 2, 1, 0])), np.log([5 / 11, 3 / 11, 2 / 11, 1 / 11]))


def test_fractional_counts_and_normalisation():
    lp = log_prior(np.array([0.25, 2.5, 0.0]))
    np.testing.assert_allclose(np.exp(lp).sum(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(lp, np.log(np.array([1.25, 3.5, 1.0]) / 5.75))


def test_label_prior_counts_every_class():
    np.testing.assert_allclose(label_log_prior(np.array([1, 1, 0]), 4), np.log([2 / 7, 3 / 7, 1 / 7, 1 / 7]))


@pytest.mark.parametrize("bad", [np.array([]), np.array([[1.0]]), np.array([1.0, -1.0]), np.array([np.nan])])
def test_bad_counts(bad):
    with pytest.raises(ValueError):
        log_prior(bad)
