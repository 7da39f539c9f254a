"""Magnitude-aware PAC-Bayes flatness (Jiang et al. 2020): the largest scale of weight noise proportional to each
weight that the training accuracy survives."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import numpy as np

from flatfast._progress import with_progress
from flatfast._typing import BatchFn, Loader
from flatfast._validate import check_float, check_int
from flatfast.curvature.operator import HessianOperator
from flatfast.models.passes import mean_over_ranks
from flatfast.results import MeasureResult

if TYPE_CHECKING:  # pragma: no cover
    from flatfast._typing import Model, ParamsLike


def pac_bayes_flatness(model: Model, loader: Loader, *, accuracy_drop: float = 0.1, eps: float = 1e-3,
                       draws: int = 16, search_steps: int = 20, batch_fn: Optional[BatchFn] = None,
                       params: Optional[ParamsLike] = None, mode: str = "eval", seed: int = 0,
                       progress: Optional[bool] = None) -> MeasureResult:
    r"""Magnitude-aware PAC-Bayes flatness (Jiang et al. 2020, "pacbayes.mag.flatness"): :math:`1/\sigma'^2`, with
    :math:`\sigma'` the largest noise scale for which weight noise

    .. math::
        u \sim N\big(0, \sigma'^2 \theta^2 + \epsilon^2\big) \quad \text{(elementwise)}

    lowers the training accuracy by at most ``accuracy_drop`` in expectation. The expectation is a mean over
    ``draws`` noise draws, the same draws at every sigma (common random numbers, so the search sees a smooth,
    nearly monotone curve); sigma' is found by bisection in log sigma over ``search_steps`` steps. Its standard
    error is the one the finite draws leave, by the bootstrap: the draws resampled, and the crossing found again
    on each resample's mean accuracy at the points already evaluated (interpolated in log sigma). The bisection's
    bracket, in ``info``, is far narrower than that error: more steps do not make sigma' more certain; more draws
    do.

    Invariant to the alpha-rescaling with the same draws when eps = 0; the default eps = 1e-3 (Jiang et al.'s) adds
    an absolute noise that the rescaling does not scale, so there it holds to within that noise. Accuracy: the
    argmax of the outputs for two or more, the sign of a single logit (targets 0/1). Cost: draws x (search_steps +
    1) forward passes.

    Parameters
    ----------
    model, loader, batch_fn, params, mode : as for :func:`flatfast.hvp`.
    accuracy_drop : float
        The drop in training accuracy that defines sigma' (Jiang et al.: 0.1).
    eps : float
        The absolute noise floor epsilon.
    draws, search_steps : int
        Monte Carlo draws per sigma, bisection steps.
    seed : int
        Seeds the draws.
    progress : bool or None
        A bar over the search.

    Returns
    -------
    MeasureResult: ``value`` = 1 / sigma'^2 (larger is sharper), ``stderr`` its bootstrap standard error,
    ``info`` with sigma', its stderr and bracket, and the base accuracy.

    Examples
    --------
    >>> import torch, flatfast
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> x = torch.randn(128, 4); y = (x[:, 0] > 0).long()
    >>> measure = flatfast.pac_bayes_flatness(model, [(x, y)], draws=8)
    >>> 0 < measure.info["sigma"] < 10
    True
    """
    import torch

    accuracy_drop = check_float(accuracy_drop, "accuracy_drop", positive=True)
    eps = check_float(eps, "eps", nonnegative=True)
    draws = check_int(draws, "draws", minimum=2)
    search_steps = check_int(search_steps, "search_steps", minimum=1)
    seed = check_int(seed, "seed", minimum=0)
    op = HessianOperator(model, loader, None, params=params, batch_fn=batch_fn, mode=mode)
    op.probe()
    generator = torch.Generator(device=op.device).manual_seed(seed)
    noise = [[torch.randn(p.shape, generator=generator, device=op.device, dtype=op.dtype) for _, p in op.params]
             for _ in range(draws)]
    magnitude = [p.detach().abs() for _, p in op.params]

    def accuracies(sigma):
        """Training accuracy under each draw's noise at scale sigma."""
        return np.array([_accuracy(op, [torch.sqrt((sigma * m) ** 2 + eps ** 2) * xi for m, xi in zip(magnitude, d)])
                         for d in noise])

    def search(update):
        """(base accuracy, the last bracket (lo, hi), every evaluated sigma's accuracies)."""
        with op.session(), torch.no_grad():
            base = _accuracy(op, None)
            lo, hi = 1e-6, 1.0
            curve = {hi: accuracies(hi)}
            while curve[hi].mean() >= base - accuracy_drop and hi < _SIGMA_CAP:  # bracket sigma' from above
                lo, hi = hi, hi * 10.0
                curve[hi] = accuracies(hi)
            if update is not None:
                update(1)
            if curve[hi].mean() >= base - accuracy_drop:  # even the cap keeps the accuracy: sigma' >= the cap
                lo = hi
            for step in range(search_steps):
                if lo == hi:
                    break
                mid = math.sqrt(lo * hi)
                curve[mid] = accuracies(mid)
                if curve[mid].mean() >= base - accuracy_drop:
                    lo = mid
                else:
                    hi = mid
                if update is not None:
                    update(step + 2)
        return base, lo, hi, curve

    base, lo, hi, curve = with_progress(search_steps + 1, "flatfast PAC-Bayes flatness", progress, search)
    sigma = math.sqrt(lo * hi)
    sigma_stderr, value_stderr = _bootstrap_stderr(curve, base - accuracy_drop, seed)
    value = 1.0 / sigma ** 2
    return MeasureResult(value, value_stderr, "PAC-Bayes flatness", "bisection",
                         dict(sigma=sigma, sigma_stderr=sigma_stderr, bracket=(lo, hi), base_accuracy=base,
                              draws=draws))


_SIGMA_CAP = 1e4  # a network whose accuracy survives noise this large has a sigma' reported as at least this
_RESAMPLES = 400  # bootstrap resamples of the draws for the standard error


def _accuracy(op, shifts):
    """Training accuracy over the data with the measured parameters moved by ``shifts``."""
    tensors = op.tensors_moved_by(shifts)
    correct, count = 0.0, 0
    for inputs, y in op.held_batches():
        out = inputs.functional_call(op.model, tensors)
        if out.dim() == 1 or out.shape[-1] == 1:
            predicted = (out.reshape(-1) >= 0).to(y.dtype)
            correct += float((predicted == y.reshape(-1)).sum())
        else:
            correct += float((out.argmax(dim=-1) == y).sum())
        count += inputs.size
    return mean_over_ranks(correct, count, op.device)


def _crossings(log_sigmas, means, threshold):
    """Where each column of ``means`` (mean accuracy at the sorted ``log_sigmas``, one column per resample) falls
    below ``threshold`` for good: after the last point at or above it, interpolated linearly in log sigma."""
    above = means >= threshold
    # the last evaluated point at or above the threshold (points past it all fall below)
    last = np.where(above.any(axis=0), above.shape[0] - 1 - np.argmax(above[::-1], axis=0), -1)
    crossing = np.empty(means.shape[1])
    crossing[last < 0] = log_sigmas[0]  # every point below: sigma' is at most the smallest point
    crossing[last == len(log_sigmas) - 1] = log_sigmas[-1]  # every point above: at least the largest
    inside = (last >= 0) & (last < len(log_sigmas) - 1)
    i, columns = last[inside], np.flatnonzero(inside)
    a, b = means[i, columns], means[i + 1, columns]
    t = (a - threshold) / (a - b)
    crossing[inside] = log_sigmas[i] + t * (log_sigmas[i + 1] - log_sigmas[i])
    return crossing


def _bootstrap_stderr(curve, threshold, seed, resamples=_RESAMPLES):
    """The standard errors of sigma' and of 1/sigma'^2 that the finite draws leave: the draws resampled with
    replacement, and sigma' found again on each resample's mean accuracy at the points already evaluated (no new
    forward pass). The bisection's own bracket is far narrower; the draws' noise is the error that matters."""
    points = sorted(curve)
    per_draw = np.stack([curve[s] for s in points])  # (points, draws)
    draws = per_draw.shape[1]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, draws, size=(resamples, draws))
    means = per_draw[:, picks].mean(axis=2)  # (points, resamples)
    sigmas = np.exp(_crossings(np.log(points), means, threshold))
    return float(np.std(sigmas, ddof=1)), float(np.std(1.0 / sigmas ** 2, ddof=1))
