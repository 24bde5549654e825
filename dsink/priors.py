"""The class prior: one function, one smoothing rule, for every model that needs ``log pi``.

A prior enters three places: the imbalance teacher's and the baselines' logit adjustment (``+ tau log pi``
of the noisy labels), the student's training-prior offset (``pi`` from the imbalance teacher's class
totals, or from the noisy labels), and evaluation, which reads every model in one balanced space
(``raw + train_offset - log pi``). All of them call :func:`log_prior`.

Rule: add-one (Laplace) smoothing, ``pi_c = (n_c + 1) / (sum_k n_k + C)``. Why smoothing at all: a class
with no label (or that a teacher never predicts) would get ``log 0 = -inf``, and a logit adjustment by
``-inf`` makes the balanced argmax pick that class for every sample. Why add-one rather than clipping at
one: it also applies to fractional counts (soft class totals ``sum_i f_L(x_i)``), and it moves a class
of ``n_c`` samples by a relative ``1 / n_c``, far less than the noise in any estimate of ``n_c``.
"""

from __future__ import annotations

import numpy as np


def log_prior(counts: np.ndarray) -> np.ndarray:
    """``log((n_c + 1) / (sum n + C))`` in float64 for non-negative (possibly fractional) counts ``n``."""
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or c.size < 1:
        raise ValueError(f"counts must be a non-empty 1-D array, got shape {c.shape}")
    if not np.all(np.isfinite(c)) or (c < 0).any():
        raise ValueError("counts must be finite and non-negative")
    return np.log((c + 1.0) / (c.sum() + c.size))


def label_log_prior(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """:func:`log_prior` of the label histogram: the prior a model trained on ``labels`` learns."""
    return log_prior(np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes))
