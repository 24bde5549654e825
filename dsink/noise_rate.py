"""Estimate the share of wrong labels in a training set from the noisy data alone.

Small-loss selection (the noise teacher, ``teachers.noise.method: small_loss``) must know how many samples
to forget. The corruption's realised rate is ground truth a user never has, so with
``teachers.noise.forget_rate: null`` the teacher estimates it:

1. warm up: the teacher's own first ``estimate_epochs`` (default 2) epochs keep every sample (plain CE);
2. predict every training sample in eval mode and take its loss on the given (noisy) label, on a log
   scale, ``log CE`` (CE losses span orders of magnitude; their logarithm is what separates into two
   roughly Gaussian bumps, the fitted and the not-yet-fitted labels);
3. fit a two-component 1-D Gaussian mixture (scikit-learn's ``GaussianMixture``) and count the samples
   whose posterior for the higher-mean component exceeds one half; the estimate is that count over N.

:func:`estimate_noise_rates` returns the overall share and one share per given-label class
(:class:`NoiseRateEstimate`): class-aware small-loss selection (``selection: per_class``) forgets each
class's own share. The overall value is the count-weighted mean of the per-class ones.

``mixture`` chooses where step 3 is fitted:

- ``per_class`` (default): one mixture per given-label class (classes with fewer than
  :data:`MIN_GROUP` samples are pooled into one group), counts summed over classes. A class's own loss
  level no longer decides: an easy head class and a hard tail class each split into their own fitted
  and unfitted samples. Per-class rates: each class its own mixture's share; the pooled small classes
  all get the pooled group's share; a class with no sample gets 0.
- ``global``: one mixture over all samples. Close on symmetric noise (see README), but when classes
  differ a lot in difficulty it splits easy classes from hard ones instead of clean from noisy
  (asymmetric noise on Fashion-MNIST-LT: 0.67 for a realised 0.26). Per-class rates: the global share
  for every class present (the mixture's split within one class is exactly the failure above, easy
  classes near 0 and hard ones near 1), 0 for a class with no sample.

``above_chance=True`` counts, of the samples the mixture calls wrong, only those whose given label the
model gives less than chance probability ``1/C`` (loss above ``log C``). A two-component mixture always
splits a class in two, also a class without wrong labels, whose "high" component is then its hard but
plausible samples; a wrong label the model has not fitted lies well above chance. On a short schedule
(6 epochs, Fashion-MNIST-LT ratio 100, symmetric 0.2) the plain mixture calls 35 % of the head class
wrong for a realised 4 %; above chance it is 12 % (BENCHMARKS.md, step 6).

Everything here is a pure function of logits and given labels: no clean label is read.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from dsink.params import NOISE_RATE_MIXTURES as MIXTURES

MIN_GROUP = 20  # per_class: smaller classes are fitted together


def log_losses(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``log(-log softmax(logits)_label)`` per row (float64), exact also where the loss underflows.

    With ``t = logsumexp_{c != y} z_c - z_y`` the loss is ``softplus(t)``; for ``t << 0`` that is
    ``exp(t)``, so its log is ``t`` itself, no ``log 0`` for confident predictions.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"logits shape = {z.shape}; expected (N, C) with C >= 2")
    if y.shape != (z.shape[0],):
        raise ValueError(f"labels shape = {y.shape}; expected ({z.shape[0]},)")
    if y.size and (y.min() < 0 or y.max() >= z.shape[1]):
        raise ValueError(f"labels outside 0..{z.shape[1] - 1}")
    if not np.isfinite(z).all():
        raise ValueError("logits have non-finite entries")
    rows = np.arange(y.size)
    z_y = z[rows, y]
    others = z.copy()
    others[rows, y] = -np.inf
    m = others.max(axis=1)
    lse = m + np.log(np.exp(others - m[:, None]).sum(axis=1))
    t = lse - z_y
    with np.errstate(divide="ignore"):
        out = np.log(np.logaddexp(0.0, t))
    return np.where(t < -30.0, t, out)  # softplus(t) = exp(t) (1 + O(e^t)) there


def high_component(x: np.ndarray) -> np.ndarray:
    """Which values of ``x`` a 2-Gaussian mixture assigns (posterior > 1/2) to its higher-mean component:
    boolean, the shape of ``x`` flattened.

    Deterministic: the means start at the 10th and 90th percentiles, ``random_state`` is fixed. Fewer
    than 4 values, or values that do not vary, are one component: none is high.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    x = np.asarray(x, dtype=np.float64).reshape(-1)
    none = np.zeros(x.size, dtype=bool)
    if x.size < 4 or not np.isfinite(x).all() or np.ptp(x) <= 1e-9 * max(1.0, float(np.abs(x).max())):
        return none
    lo, hi = np.quantile(x, [0.1, 0.9])
    if hi <= lo:  # at least 80 % of the values are equal: one component with a few outliers
        return none
    gmm = GaussianMixture(
        n_components=2,
        means_init=[[lo], [hi]],
        random_state=0,
        reg_covar=1e-6 * float(np.var(x)) + 1e-12,
        max_iter=500,
        tol=1e-6,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm.fit(x[:, None])
        post = gmm.predict_proba(x[:, None])[:, int(np.argmax(gmm.means_.ravel()))]
    return post > 0.5


def high_component_share(x: np.ndarray) -> float:
    """Share of ``x`` that :func:`high_component` assigns to the higher-mean component (0 for no value)."""
    high = high_component(x)
    return float(np.count_nonzero(high)) / high.size if high.size else 0.0


@dataclass(frozen=True)
class NoiseRateEstimate:
    """The estimated share of wrong labels: ``overall`` (over all N samples) and ``per_class`` (C,), the
    share among the samples of each given label. ``float(estimate)`` is the overall value."""

    overall: float
    per_class: tuple[float, ...]

    def __post_init__(self) -> None:
        rates = (self.overall, *self.per_class)
        if not self.per_class or not all(0.0 <= r <= 1.0 for r in rates):
            raise ValueError(f"noise rate estimate = {self!r}; expected shares in [0, 1], at least one class")

    def __float__(self) -> float:
        return float(self.overall)


def estimate_noise_rates(
    logits: np.ndarray,
    labels: np.ndarray,
    mixture: str = "per_class",
    min_group: int = MIN_GROUP,
    above_chance: bool = False,
) -> NoiseRateEstimate:
    """The share of wrong labels, overall and per given-label class, estimated from a warmed-up model's
    logits on its training samples.

    ``labels`` are the given (noisy) labels, in the row order of ``logits``. With ``above_chance`` only
    the samples whose loss exceeds ``log C`` count as wrong. See the module docstring.
    """
    if mixture not in MIXTURES:
        raise ValueError(f"mixture = {mixture!r}; expected one of {', '.join(MIXTURES)}")
    x = log_losses(logits, labels)
    n = x.size
    if n == 0:
        raise ValueError("no samples to estimate the noise rate from")
    y = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(y, minlength=np.asarray(logits).shape[1])
    # log(log C): the log loss of a label given chance probability 1/C
    above = x > np.log(np.log(counts.size)) if above_chance else np.ones(n, dtype=bool)

    def share(members: np.ndarray) -> float:
        return float(np.count_nonzero(high_component(x[members]) & above[members])) / int(members.sum())

    rates = np.zeros(counts.size)
    if mixture == "global":
        overall = share(np.ones(n, dtype=bool))
        rates[counts > 0] = overall
        return NoiseRateEstimate(overall, tuple(float(r) for r in rates))
    noisy = 0.0
    small = np.zeros(n, dtype=bool)
    small_classes = []
    for c in np.flatnonzero(counts):
        members = y == c
        if counts[c] < min_group:
            small |= members
            small_classes.append(c)
            continue
        rates[c] = share(members)
        noisy += rates[c] * counts[c]
    if small.any():
        pooled = share(small)
        rates[small_classes] = pooled
        noisy += pooled * int(small.sum())
    overall = float(min(1.0, max(0.0, noisy / n)))
    return NoiseRateEstimate(overall, tuple(float(r) for r in rates))


def class_noise_rates(
    logits: np.ndarray, labels: np.ndarray, mixture: str = "per_class", min_group: int = MIN_GROUP
) -> np.ndarray:
    """The estimated share of wrong labels among each given-label class, shape (C,) float64."""
    return np.asarray(estimate_noise_rates(logits, labels, mixture, min_group).per_class, dtype=np.float64)


def estimate_noise_rate(
    logits: np.ndarray, labels: np.ndarray, mixture: str = "per_class", min_group: int = MIN_GROUP
) -> float:
    """The share of wrong labels estimated from a warmed-up model's logits on its training samples.

    ``labels`` are the given (noisy) labels, in the row order of ``logits``. See the module docstring.
    The count-weighted mean of :func:`class_noise_rates`.
    """
    return estimate_noise_rates(logits, labels, mixture, min_group).overall
