"""How well a measure ranks networks by their error, beyond one Kendall tau: Jiang et al.'s granulated Kendall
coefficient and conditional mutual information, and Dziugaite et al.'s robust sign error, each with a bootstrap
interval over the networks.

Every function takes one value of the measure and one error (a test error or a generalization gap) per network,
and the hyperparameters that made each network (a mapping of axis name to one value per network), so that networks
can be compared along one axis at a time. ``direction`` says which way the measure should point: +1 when larger
values should mean larger error (a flatness measure), -1 when they should mean smaller error (log P(f), an
evidence)."""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections import defaultdict
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from flatfast._validate import check_int


@dataclasses.dataclass
class RankingResult:
    """A ranking metric's value, its bootstrap interval and what it was computed over.

    Attributes
    ----------
    value : float
        The metric on all the networks.
    interval : (float, float)
        A 95 % bootstrap interval: the 2.5 % and 97.5 % percentiles over resamples of the networks (the draws
        resampled within each setting), shifted by the bootstrap's estimate of the metric's bias; for the robust
        sign error, from the environments' own intervals.
    metric : str
        Which metric.
    info : dict
        Its parts (each axis's coefficient, each conditioning set's score, each environment's error).

    Examples
    --------
    >>> import numpy as np, flatfast
    >>> error = np.array([0.1, 0.2, 0.3, 0.4])
    >>> result = flatfast.granulated_kendall(error * 2, error, {"size": [0, 1, 2, 3], "seed": [0, 0, 0, 0]})
    >>> round(result.value, 6), result.metric
    (1.0, 'granulated Kendall')
    """

    value: float
    interval: Tuple[float, float]
    metric: str
    info: dict = dataclasses.field(default_factory=dict, repr=False)

    def __float__(self):
        return float(self.value)

    def __repr__(self):
        return f"RankingResult({self.metric}: {self.value:.4g} [{self.interval[0]:.3g}, {self.interval[1]:.3g}])"


def _columns(measure, error, hyperparameters, direction):
    measure = np.asarray(measure, dtype=np.float64).reshape(-1) * float(direction)
    error = np.asarray(error, dtype=np.float64).reshape(-1)
    if direction not in (1, -1):
        raise ValueError(f"direction: expected +1 or -1, got {direction!r}")
    if measure.shape != error.shape:
        raise ValueError(f"measure, error: one value per network each, got {measure.shape} and {error.shape}")
    if not isinstance(hyperparameters, Mapping) or not hyperparameters:
        raise TypeError("hyperparameters: expected a mapping of axis name to one value per network")
    axes = {}
    for name, values in hyperparameters.items():
        values = list(values)
        if len(values) != len(measure):
            raise ValueError(f"hyperparameters: axis {name!r} has {len(values)} values for {len(measure)} networks")
        axes[str(name)] = values
    if not np.all(np.isfinite(measure)) or not np.all(np.isfinite(error)):
        raise ValueError("measure, error: contain NaN or infinite values")
    return measure, error, axes


def _bootstrap(statistic, value, strata, n_resamples, seed, bounds=(-1.0, 1.0)):
    """The 95 % interval of ``statistic`` around its ``value`` on all the networks, from resamples that draw, with
    replacement, as many networks from each stratum (index array) as it holds (the settings stay, the draws within
    them vary): the 2.5 % and 97.5 % percentiles of the resampled values, shifted by the bootstrap's estimate of
    the statistic's bias (their mean minus ``value``) and clipped to ``bounds``. The shift matters for the mutual
    information: a plug-in estimate is biased upward, more so on a resample whose repeated networks leave fewer
    distinct pairs, so the unshifted percentiles can lie wholly above the value (on the digits grid, the Hessian
    trace's criterion is 0.059 and its resamples' mean 0.12). ``n_resamples=0`` gives (value, value)."""
    if not n_resamples:
        return (value, value)
    values = [v for v in map(statistic, _resampled_rows(strata, n_resamples, seed)) if np.isfinite(v)]
    if not values or not np.isfinite(value):
        return (float("nan"), float("nan"))
    shifted = np.asarray(values) - (np.mean(values) - value)
    low, high = np.percentile(shifted, [2.5, 97.5])
    return (float(np.clip(low, *bounds)), float(np.clip(high, *bounds)))


def _resampled_rows(strata, n_resamples, seed):
    """Each bootstrap resample's networks: as many drawn, with replacement, from each stratum (index array) as it
    holds."""
    rng = np.random.default_rng(seed)
    for _ in range(n_resamples):
        yield np.concatenate([stratum[rng.integers(0, len(stratum), len(stratum))] for stratum in strata])


def _strata(axes, repeat_axis):
    """Groups of networks that share every axis but ``repeat_axis`` (the draw, e.g. the seed); one group of all
    networks when there is no such axis."""
    n = len(next(iter(axes.values())))
    if repeat_axis is None or repeat_axis not in axes:
        return [np.arange(n)]
    groups = defaultdict(list)
    for r in range(n):
        groups[tuple(str(axes[a][r]) for a in axes if a != repeat_axis)].append(r)
    return [np.asarray(g) for g in groups.values()]


def _kendall(a, b):
    from scipy.stats import kendalltau

    if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(kendalltau(a, b)[0])


def granulated_kendall(measure: Sequence[float], error: Sequence[float], hyperparameters: Mapping[str, Sequence],
                       *, direction: int = 1, repeat_axis: Optional[str] = "seed", n_resamples: int = 1000,
                       seed: int = 0) -> RankingResult:
    r"""Jiang et al.'s (2020) granulated Kendall coefficient :math:`\Psi`: for each hyperparameter axis i, the mean
    Kendall :math:`\tau` between measure and error among networks that differ along axis i alone (every setting of
    the other axes a group), :math:`\psi_i`; then :math:`\Psi = \frac1n \sum_i \psi_i`. Unlike one Kendall tau over
    all networks, it cannot be carried by one axis that moves both the measure and the error.

    Parameters
    ----------
    measure, error : sequences of floats, one per network
    hyperparameters : mapping of axis name to one value per network (e.g. optimizer, attack-set size, seed)
    direction : +1 or -1
        +1 when a larger measure should mean a larger error; -1 otherwise (the value is then tau of -measure).
    repeat_axis : str or None
        The axis whose values are draws rather than settings (the seed): the bootstrap resamples networks within
        each setting of the other axes, so that every group and environment stays.
    n_resamples, seed : int
        The bootstrap's resamples and seed.

    Returns
    -------
    RankingResult: ``value`` = Psi in [-1, 1], ``info["per_axis"]`` = each psi_i.

    Examples
    --------
    >>> import flatfast
    >>> error = [0.1, 0.3, 0.2, 0.4]
    >>> measure = [1.0, 3.0, 2.0, 0.5]                    # right along "size", wrong along "optimizer" at size 1
    >>> hp = {"optimizer": ["sgd", "sgd", "adam", "adam"], "size": [0, 1, 0, 1]}
    >>> flatfast.granulated_kendall(measure, error, hp, n_resamples=0).info["per_axis"]
    {'optimizer': 0.0, 'size': 0.0}
    """
    measure, error, axes = _columns(measure, error, hyperparameters, direction)
    n_resamples = check_int(n_resamples, "n_resamples", minimum=0)

    def per_axis(rows):
        result = {}
        for axis in axes:
            others = [a for a in axes if a != axis]
            groups = defaultdict(list)
            for r in rows:
                groups[tuple(axes[a][r] for a in others)].append(r)
            taus = [_kendall(measure[g], error[g]) for g in map(np.asarray, groups.values()) if len(g) > 1]
            taus = [t for t in taus if np.isfinite(t)]
            result[axis] = float(np.mean(taus)) if taus else float("nan")
        return result

    def psi_of(parts):
        values = [v for v in parts.values() if np.isfinite(v)]
        return float(np.mean(values)) if values else float("nan")

    parts = per_axis(np.arange(len(measure)))
    value = psi_of(parts)
    interval = _bootstrap(lambda rows: psi_of(per_axis(rows)), value, _strata(axes, repeat_axis), n_resamples, seed)
    return RankingResult(value, interval, "granulated Kendall", dict(per_axis=parts))


def _entropies(counts):
    """The entropy (nats) of each row of ``counts`` (groups x outcomes)."""
    totals = counts.sum(-1, keepdims=True)
    p = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1)


def _mutual_informations(tables):
    """I(rows; columns) in nats of each 2 x 2 table of counts (groups x 2 x 2)."""
    totals = tables.sum((1, 2), keepdims=True)
    joint = np.divide(tables, totals, out=np.zeros_like(tables), where=totals > 0)
    independent = joint.sum(2, keepdims=True) * joint.sum(1, keepdims=True)
    ratio = np.divide(joint, independent, out=np.ones_like(joint), where=joint > 0)
    return (joint * np.log(ratio)).sum((1, 2))


def conditional_mutual_information(measure: Sequence[float], error: Sequence[float],
                                   hyperparameters: Mapping[str, Sequence], *, direction: int = 1,
                                   max_conditioning: int = 2, repeat_axis: Optional[str] = "seed",
                                   n_resamples: int = 200, seed: int = 0) -> RankingResult:
    r"""The conditional mutual information criterion of Jiang et al. (2020, section 5), by which the NeurIPS 2020
    "Predicting Generalization in Deep Learning" competition was scored. Over every ordered pair of networks,
    :math:`V_\mu = \mathrm{sign}(\mu_i - \mu_j)` and :math:`V_g = \mathrm{sign}(g_i - g_j)`; for each set U of at
    most ``max_conditioning`` hyperparameter axes (the empty set included), the pairs are grouped by the two
    networks' values of U and

    .. math::
        \hat{I}_U = \frac{I(V_\mu; V_g \mid U)}{H(V_g \mid U)}
        = \frac{\sum_u p(u)\, I(V_\mu; V_g \mid u)}{\sum_u p(u)\, H(V_g \mid u)};

    the criterion is the minimum over U, in [0, 1]: how much a measure tells about the error that no small set of
    hyperparameters already tells. Pairs with equal errors are left out. (The competition's scorer averaged the
    groups without their weights p(u) and took two-axis sets only; this is the paper's definition.)

    Parameters
    ----------
    measure, error, hyperparameters, direction : as for :func:`granulated_kendall` (the direction does not change
        the information, only the recorded sign of the agreement).
    max_conditioning : int
        The largest conditioning set.
    repeat_axis, n_resamples, seed
        As for :func:`granulated_kendall`.

    Returns
    -------
    RankingResult: ``value`` the minimum, ``info["per_set"]`` each conditioning set's score.

    Examples
    --------
    >>> import flatfast
    >>> error = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    >>> hp = {"size": [0, 0, 1, 1, 2, 2], "seed": [0, 1, 0, 1, 0, 1]}
    >>> round(flatfast.conditional_mutual_information(error, error, hp, n_resamples=0).value, 6)   # the error itself
    1.0
    """
    measure, error, axes = _columns(measure, error, hyperparameters, direction)
    max_conditioning = check_int(max_conditioning, "max_conditioning", minimum=0)
    n_resamples = check_int(n_resamples, "n_resamples", minimum=0)
    names = list(axes)
    sets = [U for k in range(min(max_conditioning, len(names)) + 1) for U in itertools.combinations(names, k)]
    codes = {a: np.unique(np.asarray(axes[a], dtype=object).astype(str), return_inverse=True)[1] for a in names}

    def scores(rows):
        rows = np.asarray(rows)
        i, j = np.meshgrid(rows, rows, indexing="ij")
        i, j = i.ravel(), j.ravel()
        keep = error[i] != error[j]
        i, j = i[keep], j[keep]
        cell = 2 * (error[i] > error[j]) + (measure[i] > measure[j])  # (V_g, V_mu) as 0..3
        result = {}
        for U in sets:
            key = np.zeros(len(i), dtype=np.int64)
            for u in U:  # the pair's values of each conditioning axis, as one integer
                size = int(codes[u].max()) + 1
                key = (key * size + codes[u][i]) * size + codes[u][j]
            _, group = np.unique(key, return_inverse=True)
            tables = np.zeros((group.max() + 1 if len(group) else 0, 4))
            np.add.at(tables, (group, cell), 1)
            tables = tables.reshape(-1, 2, 2)
            weights = tables.sum((1, 2)) / max(tables.sum(), 1.0)  # p(u)
            information = float(weights @ _mutual_informations(tables))
            entropy = float(weights @ _entropies(tables.sum(2)))
            result[" & ".join(U) or "(none)"] = information / entropy if entropy > 0 else float("nan")
        return result

    def minimum(per_set):
        values = [v for v in per_set.values() if np.isfinite(v)]
        return float(min(values)) if values else float("nan")

    per_set = scores(np.arange(len(measure)))
    value = minimum(per_set)
    interval = _bootstrap(lambda rows: minimum(scores(rows)), value, _strata(axes, repeat_axis), n_resamples, seed,
                          bounds=(0.0, 1.0))
    return RankingResult(value, interval, "conditional mutual information", dict(per_set=per_set))


def robust_sign_error(measure: Sequence[float], error: Sequence[float], hyperparameters: Mapping[str, Sequence],
                      *, direction: int = 1, repeat_axis: Optional[str] = "seed", n_resamples: int = 1000,
                      seed: int = 0) -> RankingResult:
    r"""Dziugaite et al.'s (2020) robust sign error. An environment is a pair of hyperparameter settings that
    differ in exactly one axis (the ``repeat_axis``, the seed, is not a hyperparameter but the draw: it varies
    within each environment). In each environment the sign error is the mean, over the pairs of networks drawn
    from the two settings, of

    .. math::
        \tfrac12 \big(1 - \mathrm{sign}(\mu_a - \mu_b)\, \mathrm{sign}(g_a - g_b)\big),

    0 when the measure orders the pair as the errors do, 1 when it orders it the other way, 1/2 for a tie. The
    robust sign error is the largest over the environments, the measure's worst case; ``info`` holds the mean and
    every environment's error. Its interval runs from the largest to the largest of the environments' own
    bootstrap intervals (the draws resampled within each setting), which always holds the estimate: the percentile
    interval of a resampled maximum is biased upward.

    Parameters
    ----------
    measure, error, hyperparameters, direction : as for :func:`granulated_kendall`.
    repeat_axis : str or None
        The axis that repeats a setting (default "seed"); None if every axis is a hyperparameter. The bootstrap
        resamples networks within each setting, so every environment stays.
    n_resamples, seed : int
        The bootstrap's resamples and seed.

    Returns
    -------
    RankingResult: ``value`` the largest environment's sign error in [0, 1] (lower is better), ``info["mean"]``
    and ``info["per_environment"]`` (each environment named by the axis it varies, its two values and the other
    axes' shared values).

    Examples
    --------
    >>> import flatfast
    >>> error = [0.1, 0.2, 0.3, 0.4]
    >>> hp = {"size": [0, 1, 0, 1], "optimizer": ["sgd", "sgd", "adam", "adam"]}
    >>> flatfast.robust_sign_error([1, 2, 3, 4], error, hp, repeat_axis=None, n_resamples=0).value   # always right
    0.0
    """
    measure, error, axes = _columns(measure, error, hyperparameters, direction)
    n_resamples = check_int(n_resamples, "n_resamples", minimum=0)
    if repeat_axis is not None and repeat_axis not in axes:
        raise ValueError(f"repeat_axis: {repeat_axis!r} is not an axis of hyperparameters ({', '.join(axes)})")
    hyper = [a for a in axes if a != repeat_axis]
    if not hyper:
        raise ValueError("hyperparameters: need at least one axis besides the repeat axis")

    def environments(rows):
        settings = defaultdict(list)
        for r in rows:
            settings[tuple(axes[a][r] for a in hyper)].append(r)
        result = {}
        for (sa, ra), (sb, rb) in itertools.combinations(sorted(settings.items(), key=lambda kv: repr(kv[0])), 2):
            differing = [k for k, (x, y) in enumerate(zip(sa, sb)) if x != y]
            if len(differing) != 1:
                continue
            k = differing[0]
            shared = ", ".join(f"{a}={v}" for a, v in zip(hyper, sa) if a != hyper[k])
            pairs = [(a, b) for a in ra for b in rb]
            errors = [0.5 * (1.0 - np.sign(measure[a] - measure[b]) * np.sign(error[a] - error[b])) for a, b in pairs]
            result[f"{hyper[k]} {sa[k]} vs {sb[k]}" + (f" ({shared})" if shared else "")] = float(np.mean(errors))
        return result

    everyone = np.arange(len(measure))
    per_environment = environments(everyone)
    if not per_environment:
        raise ValueError("hyperparameters: no two settings differ in exactly one axis; there is no environment")

    value = max(per_environment.values())
    interval = (value, value)
    if n_resamples:
        # each environment's error bootstrapped by resampling the draws within its two settings; the interval of
        # the largest is the largest lower end to the largest upper end (the max of a resampled max is biased up)
        samples = defaultdict(list)
        for rows in _resampled_rows(_strata(axes, repeat_axis), n_resamples, seed):
            for name, v in environments(rows).items():
                samples[name].append(v)
        low = max(float(np.percentile(samples[name], 2.5)) for name in per_environment)
        high = max(float(np.percentile(samples[name], 97.5)) for name in per_environment)
        interval = (low, high)
    return RankingResult(value, interval, "robust sign error",
                         dict(mean=float(np.mean(list(per_environment.values()))), per_environment=per_environment))


def kendall_tau(measure: Sequence[float], error: Sequence[float], *, direction: int = 1, n_resamples: int = 1000,
            seed: int = 0) -> RankingResult:
    """Kendall's tau between the measure (times ``direction``) and the error over all networks, with its bootstrap
    interval (the single coefficient the other three refine).

    Examples
    --------
    >>> import flatfast
    >>> flatfast.kendall_tau([3, 2, 1], [0.1, 0.2, 0.3], direction=-1, n_resamples=0).value
    1.0
    """
    measure, error, _ = _columns(measure, error, {"all": [0] * len(np.atleast_1d(measure))}, direction)
    value = _kendall(measure, error)
    interval = _bootstrap(lambda rows: _kendall(measure[rows], error[rows]), value, [np.arange(len(measure))],
                          n_resamples, seed)
    return RankingResult(value, interval, "Kendall tau")


RANKING_METRICS: Dict[str, object] = {"kendall_tau": kendall_tau, "granulated_kendall": granulated_kendall,
                                      "conditional_mutual_information": conditional_mutual_information,
                                      "robust_sign_error": robust_sign_error}
