r"""Entropic optimal transport for D-SINK: log-domain Sinkhorn and the surrogate labels built from it.

D-SINK [4]_ distils two teachers into a student through surrogate labels ``Q`` (one distribution ``q_i``
over the C classes per sample). ``f_N`` is the noise-robust teacher, ``f`` the (detached) student,
``f_L`` the imbalance-robust teacher. The surrogate labels minimise

.. math::
    L(Q) = \sum_i \mathrm{KL}(q_i \| f_N(x_i)) + \mathrm{KL}(q_i \| f(x_i))

subject to every sample carrying mass 1 (:math:`\sum_c q_{ic} = 1`) and the class totals matching the
imbalance-robust teacher (:math:`\sum_i q_{ic} = r_c = \sum_i f_L(x_i)_c`). Expanding the two KL terms,

.. math::
    L(Q) = \langle Q, P \rangle + 2 \sum_{ic} q_{ic} \log q_{ic}, \qquad
    P_{ic} = -(\log f_N(x_i)_c + \log f(x_i)_c),

an entropic optimal-transport problem [1]_ with cost ``P`` and entropic weight ``reg = 2``. Its solution
has the Gibbs form :math:`q_{ic} = u_c v_i \exp(-P_{ic} / 2) = u_c v_i \sqrt{f_N(x_i)_c f(x_i)_c}`: each
surrogate label is the normalised geometric mean of the two teachers, re-weighted per class by one vector
``u`` chosen so that the class totals come out as ``r``. A per-class offset added to ``log f_N`` or
``log f`` (a change of prior) is absorbed by ``u`` and leaves ``Q`` unchanged; only ``r`` depends on a
prior.

No solver here runs textbook Sinkhorn on ``K = exp(-P / reg)``: with confident networks the
log-probabilities reach -1e4, ``K`` underflows to 0 in float32 and float64 alike, and the classical
``u = a / (K v)`` divides 0 by 0. Every solver iterates its potentials in the log domain [2]_, absorbing
scalings into a log-plan before they leave a safe range [3]_; zero-mass entries (``log 0 = -inf``) are
handled explicitly so that no ``-inf - (-inf)`` is ever formed. They share one stopping rule
(:func:`relative_marginal_error`): the marginal that the last half-step leaves inexact is met to a
relative ``tol`` per entry, ``tol=None`` selecting :func:`default_tol` of the dtype (``1e-9`` float64,
``100 eps = 1.19e-5`` float32).

Modules:

* :mod:`dsink.ot.core` -- the stopping rule, the iteration driver, the log-domain update and float64 sums.
* :mod:`dsink.ot.generic` -- :func:`sinkhorn`, generic entropic OT with POT's argument conventions,
  optional batch dimension.
* :mod:`dsink.ot.dataset` -- :func:`class_scaling` / :func:`apply_class_scaling`, the D-SINK problem at
  dataset scope (N up to ~1e6), in row chunks so memory stays O(chunk_size * C).
* :mod:`dsink.ot.batch` -- :func:`dsink_targets`, the surrogate labels of one batch from the three
  teachers' outputs; with ``all_reduce`` its rows may be spread over several processes.

The package is pure math: torch only, no ``torch.nn``, no file I/O. Results are returned detached.

References
----------
.. [1] M. Cuturi, "Sinkhorn distances: lightspeed computation of optimal transport", NeurIPS 2013.
.. [2] G. Peyré and M. Cuturi, "Computational optimal transport", Foundations and Trends in Machine
   Learning 11(5-6), 2019, chapter 4.
.. [3] B. Schmitzer, "Stabilized sparse scaling algorithms for entropy regularized transport problems",
   SIAM J. Sci. Comput. 41(3), 2019.
.. [4] D-SINK: Dual-granularity Sinkhorn Distillation, arXiv:2510.08179, 2025.
"""

from dsink.ot.batch import dsink_targets
from dsink.ot.core import AllReduce, SinkhornConvergenceWarning, default_tol, relative_marginal_error
from dsink.ot.dataset import apply_class_scaling, class_scaling
from dsink.ot.generic import sinkhorn

__all__ = [
    "AllReduce",
    "SinkhornConvergenceWarning",
    "apply_class_scaling",
    "class_scaling",
    "default_tol",
    "dsink_targets",
    "relative_marginal_error",
    "sinkhorn",
]
