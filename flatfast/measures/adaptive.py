"""Adaptive sharpness (Kwon et al. 2021; Andriushchenko et al. 2023): the loss's rise under perturbations measured
relative to each weight's size, in the worst case and on average -- a flatness measure that the alpha-rescaling
cannot move."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import numpy as np

from flatfast._progress import with_progress
from flatfast._typing import BatchFn, Loader, LossFn
from flatfast._validate import check_float, check_int
from flatfast.curvature.operator import HessianOperator
from flatfast.models.passes import dataset_mean_loss, summed_over_ranks
from flatfast.results import MeasureResult

if TYPE_CHECKING:  # pragma: no cover
    from flatfast._typing import Model, ParamsLike


def _dataset_loss(op, shifts=None):
    """The dataset-mean loss (:func:`flatfast.models.passes.dataset_mean_loss`) with the measured parameters moved by
    ``shifts`` (a list like ``op.params``, or None); it carries the graph to the shifts when they require grad."""
    tensors = op.tensors_moved_by(shifts)
    return dataset_mean_loss(op, lambda inputs: inputs.functional_call(op.model, tensors))


ADAPTIVE_KINDS = ("worst", "average")


def adaptive_sharpness(model: Model, loader: Loader, rho: float = 0.05, *, kind: str = "worst", p: float = math.inf,
                       eta: float = 0.0, steps: int = 20, samples: int = 20, loss_fn: Optional[LossFn] = None,
                       params: Optional[ParamsLike] = None, batch_fn: Optional[BatchFn] = None, mode: str = "eval",
                       seed: int = 0, progress: Optional[bool] = None) -> MeasureResult:
    r"""Adaptive sharpness (Kwon et al. 2021, "ASAM"; Andriushchenko et al. 2023): the rise of the dataset-mean loss
    under perturbations measured relative to each weight's own size, :math:`c = |\theta| + \eta`.

    .. math::
        S_{\text{worst}} = \max_{\lVert \delta \rVert_p \le \rho} L(\theta + c \odot \delta) - L(\theta),
        \qquad S_{\text{average}} = \mathbb{E}_{\delta \sim N(0, \rho^2 I)}\,
        L(\theta + c \odot \delta) - L(\theta).

    ``kind="worst"`` maximises by projected gradient ascent in the normalised coordinates :math:`\delta` (sign
    steps for p = inf, normalised gradient steps for p = 2), from :math:`\delta = 0`, with the step halved whenever a
    stretch of steps finds no higher loss (auto-PGD's rule, Croce & Hein 2020); the best loss seen is kept, so the
    value is a lower bound of the maximum. ``kind="average"`` averages ``samples`` Gaussian draws and reports their
    Monte Carlo standard error.

    Invariance: with eta = 0 the measure is a function of the network alone under any elementwise rescaling that
    leaves the function unchanged, the alpha-rescaling included: a perturbation of the rescaled weights in the
    normalised coordinates is the rescaled perturbation, and so is every ascent step. Cost: ``steps`` + 2
    forward+backward passes over the data (worst), ``samples`` + 1 forward passes (average).

    Parameters
    ----------
    model, loader, loss_fn, params, batch_fn, mode : as for :func:`flatfast.hvp`.
    rho : float
        The radius of the perturbation in the normalised coordinates (worst), or their standard deviation
        (average).
    kind : {"worst", "average"}
    p : float
        ``math.inf`` or 2: the norm of the worst case's ball.
    eta : float
        Added to :math:`|\theta|` (ASAM's eta; 0 keeps the measure invariant).
    steps : int
        Ascent steps (worst).
    samples : int
        Gaussian draws (average).
    seed : int
        Seeds the average's draws.
    progress : bool or None
        A bar over the steps or draws (None: when stderr is a terminal).

    Returns
    -------
    MeasureResult: ``value`` (loss units: the dataset-mean loss's rise), ``stderr`` (0 for the worst case, a lower
    bound; the Monte Carlo error for the average), ``info`` with the base loss.

    Examples
    --------
    >>> import torch, flatfast
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(64, 4), torch.randint(0, 3, (64,)))]
    >>> worst = flatfast.adaptive_sharpness(model, data, rho=0.05)
    >>> scaled = flatfast.rescale(model, 5.9)            # the same function
    >>> abs(flatfast.adaptive_sharpness(scaled, data, rho=0.05).value - worst.value) < 1e-5 * worst.value
    True
    """
    import torch

    rho = check_float(rho, "rho", positive=True)
    if kind not in ADAPTIVE_KINDS:
        raise ValueError(f"kind: expected one of {ADAPTIVE_KINDS}, got {kind!r}")
    if p not in (2, math.inf):
        raise ValueError(f"p: expected 2 or math.inf, got {p!r}")
    eta = check_float(eta, "eta", nonnegative=True)
    steps = check_int(steps, "steps", minimum=1)
    samples = check_int(samples, "samples", minimum=2)
    seed = check_int(seed, "seed", minimum=0)
    op = HessianOperator(model, loader, loss_fn, params=params, batch_fn=batch_fn, mode=mode)
    op.probe()
    scale = [p_.detach().abs() + eta for _, p_ in op.params]
    with op.session():
        with torch.no_grad():
            base = float(_dataset_loss(op))
        if kind == "average":
            return _average_sharpness(op, scale, rho, samples, seed, base, progress)
        return _worst_sharpness(op, scale, rho, p, steps, base, progress)


def _average_sharpness(op, scale, rho, samples, seed, base, progress):
    import torch

    generator = torch.Generator(device=op.device).manual_seed(seed)

    def draws(update):
        rises = []
        with torch.no_grad():
            for k in range(samples):
                shifts = [c * rho * torch.randn(c.shape, generator=generator, device=c.device, dtype=c.dtype)
                          for c in scale]
                rises.append(float(_dataset_loss(op, shifts)) - base)
                if update is not None:
                    update(k + 1)
        return np.asarray(rises)

    rises = with_progress(samples, "flatfast adaptive sharpness (average)", progress, draws)
    return MeasureResult(float(rises.mean()), float(rises.std(ddof=1) / math.sqrt(len(rises))),
                         "adaptive sharpness", "average", dict(base_loss=base, rho=rho, samples=len(rises)))


def _project(delta, rho, p):
    import torch

    if p == math.inf:
        return [d.clamp(-rho, rho) for d in delta]
    norm = torch.sqrt(sum((d * d).sum() for d in delta))
    factor = min(1.0, rho / float(norm)) if float(norm) > 0 else 1.0
    return [d * factor for d in delta]


def _worst_sharpness(op, scale, rho, p, steps, base, progress):
    """Projected ascent in the normalised coordinates delta; the step halves after a stretch without a new best
    (checkpoints at 22 %, 41 %, ... of the budget, as auto-PGD places them)."""
    import torch

    checkpoints = {max(1, int(round(f * steps))) for f in (0.22, 0.41, 0.56, 0.68, 0.77, 0.85, 0.9, 0.95)}

    def ascend(update):
        delta = [torch.zeros_like(c) for c in scale]
        step = 2.0 * rho
        best, last_checkpoint_best = 0.0, 0.0
        for k in range(1, steps + 1):
            leaves = [d.clone().requires_grad_(True) for d in delta]
            with torch.enable_grad():
                loss = _dataset_loss(op, [c * d for c, d in zip(scale, leaves)])
                grads = summed_over_ranks(torch.autograd.grad(loss, leaves))
            best = max(best, float(loss.detach()) - base)
            with torch.no_grad():
                if p == math.inf:
                    moved = [d + step * g.sign() for d, g in zip(delta, grads)]
                else:
                    norm = float(torch.sqrt(sum((g * g).sum() for g in grads)))
                    moved = [d + step * g / norm for d, g in zip(delta, grads)] if norm > 0 else delta
                delta = _project(moved, rho, p)
            if k in checkpoints:
                if best <= last_checkpoint_best:
                    step /= 2.0
                last_checkpoint_best = best
            if update is not None:
                update(k)
        with torch.no_grad():  # the last point's loss too
            return max(best, float(_dataset_loss(op, [c * d for c, d in zip(scale, delta)])) - base)

    best = with_progress(steps, "flatfast adaptive sharpness (worst)", progress, ascend)
    return MeasureResult(best, 0.0, "adaptive sharpness", "worst", dict(base_loss=base, rho=rho, p=p, steps=steps))
