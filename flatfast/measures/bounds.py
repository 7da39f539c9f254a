"""Generalization bounds from the prior probability of the training labels."""
from __future__ import annotations

import math

from flatfast._validate import check_float, check_int


def pac_bayes_bound(log_p_train: float, m: int, delta: float = 2.0 ** -10) -> float:
    r"""The marginal-likelihood PAC-Bayes bound of Valle-Pérez et al. on the expected error of a Bayesian learner.

    With :math:`P(U)` the prior probability of the training labelling U of the m training points (for an
    overparameterised network: the NNGP orthant probability, ``flatfast.log_prior`` on the training set alone),
    with probability at least :math:`1 - \delta` over the draw of the training set,

    .. math::
        -\ln(1 - \epsilon) \le \frac{\ln\frac{1}{P(U)} + \ln\frac{2m}{\delta}}{m - 1},
        \qquad\text{so}\qquad \epsilon \le 1 - \exp\Big(-\frac{-\ln P(U) + \ln(2m/\delta)}{m - 1}\Big),

    where :math:`\epsilon` is the expected generalization error of the posterior over functions that fit U
    (the prior conditioned on zero training error). Assumptions: the training points are i.i.d. draws of the
    data distribution; the learner samples functions consistent with U in proportion to their prior probability
    (what the NNGP posterior does, and what SGD-trained networks approximate in Valle-Pérez et al.'s and
    Mingard et al.'s experiments); the prior is fixed before seeing the data. It bounds an *expectation* over
    that posterior, not the error of one trained network; and since it depends on the training labels only, it
    is the same for every network fitted to the same training set.

    Parameters
    ----------
    log_p_train : float
        ln P(U) in nats (<= 0), e.g. ``flatfast.log_prior(X_train, y_train)``.
    m : int
        Number of training points (>= 2).
    delta : float
        Confidence parameter in (0, 1); Valle-Pérez et al. use 2^-10.

    Returns
    -------
    float in [0, 1): the bound on the expected error.

    Examples
    --------
    >>> import flatfast
    >>> round(flatfast.pac_bayes_bound(-100.0, 500), 4)   # 100 nats of prior surprise on 500 points
    0.204
    >>> flatfast.pac_bayes_bound(-400.0, 500) > flatfast.pac_bayes_bound(-100.0, 500)
    True
    """
    log_p_train = check_float(log_p_train, "log_p_train")
    if log_p_train > 0:
        raise ValueError(f"log_p_train: is a log probability and must be <= 0, got {log_p_train}")
    m = check_int(m, "m", minimum=2)
    delta = check_float(delta, "delta", positive=True)
    if delta >= 1:
        raise ValueError(f"delta: must be in (0, 1), got {delta}")
    exponent = (-log_p_train + math.log(2 * m / delta)) / (m - 1)
    return -math.expm1(-exponent)
