"""Generalization predictors that a rescaling of a ReLU network cannot fool: adaptive sharpness, relative flatness,
the Fisher-Rao norm, magnitude-aware PAC-Bayes flatness and the path norm. Each takes a model and its data with the
calling conventions of :func:`flatfast.hessian_trace`, and each is a function of the network that the
alpha-rescaling (:func:`flatfast.rescale`) leaves unchanged, to float rounding (the PAC-Bayes measure's small
additive noise aside)."""
from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Optional, Union

import numpy as np

from flatfast._progress import progress_counter
from flatfast._typing import BatchFn, Loader, LossFn
from flatfast._validate import check_float, check_int
from flatfast.curvature.operator import HessianOperator
from flatfast.models.passes import mean_over_ranks
from flatfast.results import MeasureResult

if TYPE_CHECKING:  # pragma: no cover
    from flatfast._typing import Model, ParamsLike


def _dataset_loss(op, params, shifts=None):
    """The dataset-mean loss with the measured parameters moved by ``shifts`` (a list like ``params``, or None),
    as a tensor that carries the graph to the shifts when they require grad."""
    import torch

    fixed = op.fixed_tensors()
    total, count = 0.0, 0
    moved = {n: (p.detach() + s if shifts is not None else p.detach()) for (n, p), s in
             zip(op.params, shifts if shifts is not None else [None] * len(op.params))}
    for inputs, y in op.batches():
        out = inputs.functional_call(op.model, {**moved, **fixed})
        total = total + op.loss_and_targets(out, y) * inputs.size
        count += inputs.size
    if isinstance(total, torch.Tensor) and total.requires_grad:
        return total / count
    return torch.as_tensor(mean_over_ranks(float(total), count, op.device))


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
        Added to |theta| (ASAM's eta; 0 keeps the measure invariant).
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
            base = float(_dataset_loss(op, op.params))
        if kind == "average":
            return _average_sharpness(op, scale, rho, samples, seed, base, progress)
        return _worst_sharpness(op, scale, rho, p, steps, base, progress)


def _average_sharpness(op, scale, rho, samples, seed, base, progress):
    import torch

    generator = torch.Generator(device=op.device).manual_seed(seed)
    rises = []
    update, bar = progress_counter(samples, "flatfast adaptive sharpness (average)", progress)
    try:
        with torch.no_grad():
            for k in range(samples):
                shifts = [c * rho * torch.randn(c.shape, generator=generator, device=c.device, dtype=c.dtype)
                          for c in scale]
                rises.append(float(_dataset_loss(op, op.params, shifts)) - base)
                if update is not None:
                    update(k + 1)
    finally:
        if bar is not None:
            bar.close()
    rises = np.asarray(rises)
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

    delta = [torch.zeros_like(c) for c in scale]
    step = 2.0 * rho
    best, best_at, last_checkpoint_best = 0.0, 0, 0.0
    checkpoints = {max(1, int(round(f * steps))) for f in (0.22, 0.41, 0.56, 0.68, 0.77, 0.85, 0.9, 0.95)}
    update, bar = progress_counter(steps, "flatfast adaptive sharpness (worst)", progress)
    try:
        for k in range(1, steps + 1):
            leaves = [d.clone().requires_grad_(True) for d in delta]
            with torch.enable_grad():
                loss = _dataset_loss(op, op.params, [c * d for c, d in zip(scale, leaves)])
                grads = torch.autograd.grad(loss, leaves)
            rise = float(loss.detach()) - base
            if rise > best:
                best, best_at = rise, k
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
            rise = float(_dataset_loss(op, op.params, [c * d for c, d in zip(scale, delta)])) - base
        best = max(best, rise)
    finally:
        if bar is not None:
            bar.close()
    return MeasureResult(best, 0.0, "adaptive sharpness", "worst", dict(base_loss=base, rho=rho, p=p, steps=steps))


def relative_flatness(model: Model, loader: Loader, *, layer: Union[str, "torch.nn.Module", None] = None,
                      loss_fn: Optional[LossFn] = None, batch_fn: Optional[BatchFn] = None, mode: str = "eval",
                      exact: Optional[bool] = None, probes: int = 32, seed: int = 0,
                      progress: Optional[bool] = None) -> MeasureResult:
    r"""Relative flatness (Petzka et al. 2021) of one layer: its Hessian blocks weighted by its weights' Gram matrix,

    .. math::
        \kappa = \sum_{s, s'} \langle w_s, w_{s'} \rangle \,\mathrm{tr}\, H_{s, s'},

    with :math:`w_s` the weight rows of the layer (one per output unit) and :math:`H_{s,s'}` the Hessian of the
    dataset-mean loss in rows s and s'. Petzka et al. take the layer that maps the penultimate features to the
    outputs, the default here.

    ``tr H_{s,s'}`` is taken from Hessian products in the layer's weights alone: exactly from the layer's C x d
    unit vectors (C outputs, d inputs; ``exact=True``, the default when C d <= 4096), or by Hutchinson over the
    input dimension, ``probes`` random sign vectors for each output s' (C x probes products), with the Monte
    Carlo error. Invariant to any rescaling of the layers before it that leaves their output unchanged (the
    alpha-rescaling of two earlier layers included) and to rescaling the layer itself against its inputs, Petzka
    et al.'s point.

    Parameters
    ----------
    model, loader, loss_fn, batch_fn, mode : as for :func:`flatfast.hvp`.
    layer : nn.Linear or str, optional
        The layer (a module of the model, or its name); default: the last nn.Linear the forward pass runs.
    exact : bool, optional
        Unit vectors (True) or Hutchinson (False); default: exact when C d <= 4096.
    probes, seed : int
        Hutchinson's probes per output and their seed.
    progress : bool or None
        A bar over the products.

    Returns
    -------
    MeasureResult: ``value`` (loss units times weight units squared), ``stderr`` (0 when exact), ``info`` with the
    layer's name.

    Examples
    --------
    >>> import torch, flatfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(64, 4), torch.randint(0, 3, (64,)))]
    >>> kappa = flatfast.relative_flatness(model, data)             # the last layer, 3 x 8 weights
    >>> kappa.method, kappa.info["layer"]
    ('exact', '2')
    """
    import torch

    from flatfast.curvature.estimators import rademacher

    probes = check_int(probes, "probes", minimum=2)
    seed = check_int(seed, "seed", minimum=0)
    name, weight = _chosen_layer(model, loader, layer, batch_fn)
    op = HessianOperator(model, loader, loss_fn, params=[weight], batch_fn=batch_fn, mode=mode)
    C, d = weight.shape
    if exact is None:
        exact = C * d <= 4096
    W = weight.detach().reshape(C, d)
    gram = W @ W.T
    generator = torch.Generator(device=op.device).manual_seed(seed)
    # directions e_s' (x) z for z a unit or random sign vector over the d inputs: (H v) row s, dotted with z, is an
    # unbiased term of tr H_{s,s'} (exact when z runs over the unit vectors)
    zs = torch.eye(d, dtype=op.dtype, device=op.device) if exact else \
        rademacher(probes, d, generator, op.dtype, op.device)
    total = torch.zeros(C, C, dtype=op.dtype, device=op.device)
    per_probe = []
    update, bar = progress_counter(C * len(zs), "flatfast relative flatness", progress)
    try:
        for k, z in enumerate(zs):
            V = torch.zeros(C, C, d, dtype=op.dtype, device=op.device)
            V[torch.arange(C), torch.arange(C)] = z
            HV = op.matmat(V.reshape(C, C * d)).reshape(C, C, d)  # [s', s, :]
            block = (HV * z).sum(-1).T  # [s, s']: z^T H_{s,s'} z
            total += block
            per_probe.append(float((gram * block).sum()))
            if update is not None:
                update((k + 1) * C)
    finally:
        if bar is not None:
            bar.close()
    if exact:
        return MeasureResult(float((gram * total).sum()), 0.0, "relative flatness", "exact",
                             dict(layer=name, products=C * d))
    samples = np.asarray(per_probe)
    return MeasureResult(float(samples.mean() ), float(samples.std(ddof=1) / math.sqrt(len(samples))),
                         "relative flatness", "hutchinson", dict(layer=name, products=C * len(zs)))


def _chosen_layer(model, loader, layer, batch_fn):
    """(name, weight) of the layer relative flatness is taken in: ``layer`` (a module or its name) or the last
    nn.Linear the forward pass runs."""
    import torch

    from flatfast.models.batches import split_batch
    from flatfast.models.layers import last_linear

    names = {m: n for n, m in model.named_modules()}
    if layer is None:
        inputs, _ = split_batch(next(iter(loader)), batch_fn)
        first = next(model.parameters())
        layer = last_linear(model, inputs.to(first.device, first.dtype))
        if layer is None:
            raise ValueError("layer: the model runs no nn.Linear; name the layer to measure")
    elif isinstance(layer, str):
        try:
            layer = model.get_submodule(layer)
        except AttributeError:
            raise ValueError(f"layer: {layer!r} is not a module of the model") from None
    if not isinstance(layer, torch.nn.Linear):
        raise TypeError(f"layer: expected an nn.Linear of the model, got {type(layer).__name__}")
    if layer not in names:
        raise ValueError("layer: is not a module of the model")
    return names[layer], layer.weight


def fisher_rao_norm(model: Model, loader: Loader, *, loss_fn: Optional[LossFn] = None,
                    params: Optional[ParamsLike] = None, batch_fn: Optional[BatchFn] = None, mode: str = "eval",
                    progress: Optional[bool] = None) -> MeasureResult:
    r"""The Fisher-Rao norm (Liang et al. 2019) in its general, empirical form: the data mean of the squared
    derivative of each example's loss along the parameters themselves,

    .. math::
        \lVert \theta \rVert_{fr}^2 = \frac1N \sum_i \langle \theta, \nabla_\theta \ell_i \rangle^2,

    the labels being the data's (Jiang et al. 2020's empirical variant). For a bias-free ReLU network of L + 1
    weight layers it equals :math:`(L+1)^2 \frac1N \sum_i \langle \partial\ell_i/\partial f, f \rangle^2` (Euler's
    theorem: the outputs are homogeneous of degree L + 1 in the weights). Invariant to the alpha-rescaling (and to
    any rescaling that leaves the function unchanged): each layer's weights shrink as its gradient grows.

    Cost: one forward-mode pass over the data (torch.func.jvp of the per-example losses along theta), about two
    forward passes.

    Parameters
    ----------
    model, loader, loss_fn, params, batch_fn, mode : as for :func:`flatfast.hvp`; ``loss_fn`` must be a batch mean
        of per-example losses (each example's is taken on its own).
    progress : bool or None
        A bar over the batches.

    Returns
    -------
    MeasureResult: ``value`` the squared norm (loss units squared), ``stderr`` 0 (the data mean is exact).

    Examples
    --------
    >>> import torch, flatfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8, bias=False), torch.nn.ReLU(),
    ...                             torch.nn.Linear(8, 3, bias=False)).double()
    >>> x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    >>> norm = flatfast.fisher_rao_norm(model, [(x, y)])
    >>> f = model(x).detach().requires_grad_(True)                     # the closed form: (L + 1)^2 <dl/df, f>^2
    >>> per = torch.autograd.grad(torch.nn.functional.cross_entropy(f, y, reduction="sum"), f)[0]
    >>> closed = float(((2 * (per * f.detach()).sum(1)) ** 2).mean())
    >>> abs(norm.value - closed) < 1e-10 * closed
    True
    """
    import torch
    from torch.func import jvp

    op = HessianOperator(model, loader, loss_fn, params=params, batch_fn=batch_fn, mode=mode,
                         progress=progress)
    op.probe()
    theta = op.flat_params()
    fixed = op.fixed_tensors()
    total, count = 0.0, 0
    with op.session(), torch.no_grad():
        for inputs, y in op.batches():
            def per_example_losses(flat):
                out = inputs.functional_call(op.model, {**op.unflatten(flat), **fixed})
                # each example's loss by the batch-mean loss on that example alone (any loss_fn; its checks of
                # the targets need concrete values, which vmap would not give)
                return torch.stack([op.loss_and_targets(out[i:i + 1], y[i:i + 1]).reshape(())
                                    for i in range(inputs.size)])

            _, directional = jvp(per_example_losses, (theta,), (theta,))
            total += float((directional * directional).sum())
            count += inputs.size
    return MeasureResult(mean_over_ranks(total, count, op.device), 0.0, "Fisher-Rao norm", "jvp",
                         dict(squared=True))


def path_norm(model: Model, loader: Loader, *, batch_fn: Optional[BatchFn] = None) -> MeasureResult:
    r"""The path norm (Neyshabur et al. 2015) as Jiang et al. 2020 compute it: the network with every parameter
    squared, run in eval mode on one all-ones input, its outputs summed,

    .. math::
        \mathrm{pathnorm}^2 = \sum_{\text{paths } i \to o} \prod_{w \in \text{path}} w^2,

    for a network of Linear or Conv layers and ReLU-like or pooling activations, where every activation of the
    squared network is non-negative and the forward pass sums over all paths (biases start paths of their own).
    Invariant to the alpha-rescaling: every path through the two rescaled layers gains 1/alpha^2 and alpha^2.
    Normalization layers have no path form and are refused. Cost: one forward pass of one input. The loader is read
    for the shape of one input only.

    Parameters
    ----------
    model : torch.nn.Module
        Linear/Conv layers with ReLU-like activations, pooling, reshapes.
    loader : iterable of batches
        Its first batch gives the shape of one input.
    batch_fn : callable, optional
        As for :func:`flatfast.hvp`.

    Returns
    -------
    MeasureResult: ``value`` the squared path norm (the outputs' sum).

    Examples
    --------
    >>> import torch, flatfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    >>> data = [(torch.randn(5, 2), torch.randn(5, 1))]
    >>> W1, b1, W2, b2 = (p.detach() for p in model.parameters())
    >>> paths = (W2 ** 2) @ ((W1 ** 2) @ torch.ones(2) + b1 ** 2) + b2 ** 2      # every path's squared weights
    >>> abs(flatfast.path_norm(model, data).value - float(paths.sum())) < 1e-6
    True
    """
    import torch

    from flatfast.models.batches import split_batch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    norms = [n or type(m).__name__ for n, m in model.named_modules()
             if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm))]
    if norms:
        raise ValueError(f"model: the path norm has no form through normalization layers ({', '.join(norms[:3])})")
    inputs, _ = split_batch(next(iter(loader)), batch_fn)
    squared = copy.deepcopy(model).eval()
    first = next(squared.parameters())
    with torch.no_grad():
        for p in squared.parameters():
            p.pow_(2)
        one = inputs[:1].to(first.device, first.dtype)
        out = one.with_floats(torch.ones_like).call(squared)
    return MeasureResult(float(out.sum()), 0.0, "path norm", "squared network", dict(squared=True))


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
    nearly monotone curve); sigma' is found by bisection in log sigma over ``search_steps`` steps. The standard
    error of sigma' is the draws' standard error of the accuracy at sigma' divided by the curve's slope there (the
    delta method); ``info`` holds the final bracket too.

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
    MeasureResult: ``value`` = 1 / sigma'^2 (larger is sharper), ``stderr`` its delta-method standard error,
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

    update, bar = progress_counter(search_steps + 1, "flatfast PAC-Bayes flatness", progress)
    try:
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
    finally:
        if bar is not None:
            bar.close()
    sigma = math.sqrt(lo * hi)
    sigma_stderr = _delta_method_stderr(curve, sigma)
    value = 1.0 / sigma ** 2
    return MeasureResult(value, 2.0 * value * sigma_stderr / sigma, "PAC-Bayes flatness", "bisection",
                         dict(sigma=sigma, sigma_stderr=sigma_stderr, bracket=(lo, hi), base_accuracy=base,
                              draws=draws))


_SIGMA_CAP = 1e4  # a network whose accuracy survives noise this large has a sigma' reported as at least this


def _accuracy(op, shifts):
    """Training accuracy over the data with the measured parameters moved by ``shifts``."""
    import torch

    fixed = op.fixed_tensors()
    moved = {n: (p.detach() + s if shifts is not None else p.detach()) for (n, p), s in
             zip(op.params, shifts if shifts is not None else [None] * len(op.params))}
    correct, count = 0.0, 0
    for inputs, y in op.batches():
        out = inputs.functional_call(op.model, {**moved, **fixed})
        if out.dim() == 1 or out.shape[-1] == 1:
            predicted = (out.reshape(-1) >= 0).to(y.dtype)
            correct += float((predicted == y.reshape(-1)).sum())
        else:
            correct += float((out.argmax(dim=-1) == y).sum())
        count += inputs.size
    return mean_over_ranks(correct, count, op.device)


def _delta_method_stderr(curve, sigma):
    """The standard error of the crossing sigma': the draws' standard error of the mean accuracy at the evaluated
    point nearest sigma', over the mean accuracy's slope in sigma between the two evaluated points around it."""
    points = sorted(curve)
    if len(points) < 2:
        return float("nan")
    nearest = min(points, key=lambda s: abs(math.log(s / sigma)))
    below = max([s for s in points if s <= sigma] or [points[0]])
    above = min([s for s in points if s > sigma] or [points[-1]])
    if above == below:
        return float("nan")
    slope = (curve[above].mean() - curve[below].mean()) / (above - below)
    spread = curve[nearest].std(ddof=1) / math.sqrt(len(curve[nearest]))
    return float(abs(spread / slope)) if slope != 0 else float("inf")
