"""Norms and flatness of a network that a rescaling of a ReLU network cannot fool: relative flatness, the Fisher-Rao
norm and the path norm (adaptive sharpness and PAC-Bayes flatness have modules of their own). Each takes a model
and its data with the calling conventions of :func:`flatfast.hessian_trace`, and each is a function of the network
that the alpha-rescaling (:func:`flatfast.rescale`) leaves unchanged, to float rounding."""
from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Optional, Union

import numpy as np

from flatfast._progress import with_progress
from flatfast._typing import BatchFn, Loader, LossFn
from flatfast._validate import check_int
from flatfast.curvature.operator import HessianOperator
from flatfast.models.passes import mean_over_ranks
from flatfast.results import MeasureResult

if TYPE_CHECKING:  # pragma: no cover
    from flatfast._typing import Model, ParamsLike


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

    def products(update):
        """Each direction's term sum_{s,s'} G_{s,s'} z^T H_{s,s'} z."""
        terms = []
        for k, z in enumerate(zs):
            V = torch.zeros(C, C, d, dtype=op.dtype, device=op.device)
            V[torch.arange(C), torch.arange(C)] = z
            HV = op.matmat(V.reshape(C, C * d)).reshape(C, C, d)  # [s', s, :]
            block = (HV * z).sum(-1).T  # [s, s']: z^T H_{s,s'} z
            terms.append(float((gram * block).sum()))
            if update is not None:
                update((k + 1) * C)
        return np.asarray(terms)

    terms = with_progress(C * len(zs), "flatfast relative flatness", progress, products)
    if exact:  # the unit vectors' terms add up to the whole sum
        return MeasureResult(float(terms.sum()), 0.0, "relative flatness", "exact", dict(layer=name, products=C * d))
    return MeasureResult(float(terms.mean()), float(terms.std(ddof=1) / math.sqrt(len(terms))),
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

    Route: one forward-mode pass of the model per batch (``torch.func.jvp`` along theta gives each output's
    derivative :math:`J_i \theta`) and one backward pass of the loss to the outputs, since for a batch-mean loss
    :math:`L = \frac1B \sum_i \ell_i` each example's :math:`\partial \ell_i / \partial f_i = B\, \partial L /
    \partial f_i`, so that :math:`\langle \theta, \nabla_\theta \ell_i \rangle = B \langle \partial L /
    \partial f_i, J_i \theta \rangle` (``method="jvp"``; 7 forward+backward passes' time on the digits FCN of 500
    examples, the behaviour checks included). Whether the loss is that mean is checked on the first batch, by the
    loss of its first examples against the mean of their losses taken one at a time; where it is not (a summed
    loss, a token mean over padded sequences), every example's loss is taken on its own inside the forward-mode
    pass (``method="jvp per example"``, a cost that grows with the examples: about 500 passes' time for 500
    examples), and ``info["route"]`` says why. Models whose examples are not independent (a batch statistic, inputs
    not batch-first) are refused: no example has a loss of its own.

    Parameters
    ----------
    model, loader, loss_fn, params, batch_fn, mode : as for :func:`flatfast.hvp`; each example's loss is
        ``loss_fn`` on that example alone.
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
    why = op.probe()
    if why is not None:
        raise ValueError(f"model: the Fisher-Rao norm needs each example's own loss, but {why}")
    theta = op.flat_params()
    fixed = op.fixed_tensors()
    route = None
    total, count = 0.0, 0
    with op.session(), torch.no_grad():
        for inputs, y in op.batches():
            def outputs_of(flat):
                return inputs.functional_call(op.model, {**op.unflatten(flat), **fixed})

            if route is None:
                route = _batch_mean_or_why(op, outputs_of(theta), y)
            if route == "":
                out, along = jvp(outputs_of, (theta,), (theta,))
                with torch.enable_grad():
                    out = out.detach().requires_grad_(True)
                    (slope,) = torch.autograd.grad(op.loss_and_targets(out, y), out)
                directional = inputs.size * (slope * along).reshape(inputs.size, -1).sum(1)
            else:
                def per_example_losses(flat):
                    out = outputs_of(flat)
                    # each example's loss by the loss on that example alone (any loss_fn; its checks of the
                    # targets need concrete values, which vmap would not give)
                    return torch.stack([op.loss_and_targets(out[i:i + 1], y[i:i + 1]).reshape(())
                                        for i in range(inputs.size)])

                _, directional = jvp(per_example_losses, (theta,), (theta,))
            total += float((directional * directional).sum())
            count += inputs.size
    return MeasureResult(mean_over_ranks(total, count, op.device), 0.0, "Fisher-Rao norm",
                         "jvp" if route == "" else "jvp per example",
                         dict(squared=True, route=route or "the loss is the batch mean of per-example losses"))


_MEAN_CHECK_EXAMPLES = 8


def _batch_mean_or_why(op, outputs, targets):
    """"" when the loss of the batch's first examples is the mean of their losses taken one at a time (to the
    square root of the outputs' machine epsilon, relative: rounding passes, a sum or a token mean does not), else
    why not: whether the one-pass route of :func:`fisher_rao_norm` holds."""
    import torch

    k = min(_MEAN_CHECK_EXAMPLES, len(outputs))
    together = float(op.loss_and_targets(outputs[:k], targets[:k]))
    alone = float(torch.stack([op.loss_and_targets(outputs[i:i + 1], targets[i:i + 1]).reshape(())
                               for i in range(k)]).mean())
    tolerance = math.sqrt(torch.finfo(outputs.dtype).eps) if outputs.is_floating_point() else 1e-8
    if abs(together - alone) <= tolerance * max(abs(together), abs(alone), 1e-300):
        return ""
    return (f"the loss of the first {k} examples ({together:.6g}) is not the mean of their own losses "
            f"({alone:.6g}): each example's loss was taken on its own")


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


