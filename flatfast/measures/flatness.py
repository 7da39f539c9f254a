"""Flatness measures, the alpha-scale transformation, and the function a trained classifier expresses."""
from __future__ import annotations

import contextlib
import copy
import math

from typing import TYPE_CHECKING, Optional

import numpy as np

from flatfast._typing import BatchFn, Loader, LossFn
from flatfast._validate import check_float, check_int
from flatfast.curvature.estimators import hutchinson
from flatfast.results import FlatnessReport, TraceResult
from flatfast.models.passes import dataset_mean_loss, distributed, summed_over_ranks
from flatfast.models.probe import check_chunks
from flatfast.models.modes import eval_mode
from flatfast.curvature.operator import HessianOperator
from flatfast.curvature.hessian import hessian_eigenvalues, hessian_spectrum
from flatfast.curvature.trace import hessian_trace

if TYPE_CHECKING:  # pragma: no cover
    from flatfast._typing import InputsLike, Model, ParamsLike


SHARPNESS_METHODS = ("sgd-ascent", "sign-ascent")


def sharpness(model: Model, loader: Loader, eps: float = 1e-4, *, loss_fn: Optional[LossFn] = None,
              params: Optional[ParamsLike] = None, batch_fn: Optional[BatchFn] = None, mode: str = "eval",
              method: str = "sgd-ascent", epochs: int = 100, lr: float = 1e-3, steps: int = 20, seed: int = 0,
              progress: Optional[bool] = None) -> float:
    r"""Keskar et al.'s epsilon-sharpness of the dataset-mean loss L (see :func:`flatfast.hvp` for the convention):

    .. math::
        100 \cdot \frac{\max_{z \in C_\epsilon} L(\theta + z) - L(\theta)}{1 + L(\theta)},\qquad
        C_\epsilon = \{ z : |z_j| \le \epsilon (|\theta_j| + 1) \}.

    The maximum is found by one of two ascents, both keeping the largest full-data loss seen:

    * ``method="sgd-ascent"`` (default; Keskar et al.'s and Zhang et al.'s procedure): plain SGD on -L over the
      loader's minibatches, step ``lr``, starting at z = 0, projected back into the box after **every** step, with
      the full-data loss evaluated after every step; ``epochs`` passes over the loader. Give it the loader you
      want the ascent to see (Zhang et al.: batches of 32, shuffled; 100 epochs, lr 1e-3). Costs ``epochs`` x
      (batches + batches^2) forward passes. The full-data loss is evaluated on the batches of the first pass,
      held in memory up to 1 GiB (a larger data set is read from the loader every time): the same mean, without
      the loader's cost at every step.
    * ``method="sign-ascent"``: ``steps`` full-batch projected sign-gradient steps from a seeded random point of
      the box (step ``2 eps (|theta| + 1) / steps``). Much cheaper; a lower bound on the same maximum like the other.

    The box perturbs the measured parameters (``params``; default every trainable one) and holds the others.
    The model is evaluated in ``mode`` (eval by default); its parameters, modes and ``.grad`` are left as they
    were. Under
    torch.distributed each rank passes its shard: losses are all-reduced, and the ascent steps follow the
    all-reduced gradients, so every rank computes the same sharpness.

    Parameters
    ----------
    model : torch.nn.Module
    loader : iterable of batches (see :func:`flatfast.hvp`)
    eps : float
        Relative box size (Zhang et al.: 1e-4 for FCNs, 1e-5 for ResNets).
    loss_fn : callable(outputs, targets) -> batch-mean loss, optional
        Keyword-only. Default: cross-entropy, for integer class targets and two or more outputs only; other data
        must name its loss (e.g. ``torch.nn.BCEWithLogitsLoss()`` for one logit and 0/1 float targets).
    params, batch_fn, mode : as for :func:`flatfast.hvp`.
    method : {"sgd-ascent", "sign-ascent"}
    epochs, lr : the SGD ascent's passes and step size.
    steps : the sign ascent's number of steps.
    seed : int
        Seeds the sign ascent's random start (the SGD ascent is deterministic given the loader's order).
    progress : bool or None
        A bar over the epochs (or steps); None shows one when stderr is a terminal. The SGD ascent evaluates the
        full loss after every minibatch step: tens of thousands of forward passes at the authors' 100 epochs.

    Returns
    -------
    float
        The sharpness: the largest rise of the dataset-mean loss found in the box, in percent of 1 + L(theta)
        (dimensionless, 0 or more; 0 when no step raised the loss). Zhang et al. report log10 of it. A maximum
        found by ascent, so a lower bound of the true maximum. Not invariant to rescaling: the box scales with
        ``|theta| + 1``, but the loss's curvature does not (see :func:`rescale`).

    Examples
    --------
    >>> import torch, flatfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(64, 4), torch.randint(0, 3, (64,)))]
    >>> flatfast.sharpness(model, data, eps=1e-3, epochs=5) >= 0
    True
    >>> flatfast.sharpness(model, data, eps=1e-3, method="sign-ascent") >= 0
    True
    """
    import torch

    eps = check_float(eps, "eps", positive=True)
    if method not in SHARPNESS_METHODS:
        raise ValueError(f"method: expected one of {SHARPNESS_METHODS}, got {method!r}")
    steps = check_int(steps, "steps", minimum=1)
    epochs = check_int(epochs, "epochs", minimum=1)
    lr = check_float(lr, "lr", positive=True)
    op = HessianOperator(model, loader, loss_fn, params=params, batch_fn=batch_fn, mode=mode)
    op.probe()  # a model whose loss is a random function has no sharpness either: refused before the ascent
    params = [p for _, p in op.params]
    original = [p.detach().clone() for p in params]
    box = [eps * (w.abs() + 1.0) for w in original]

    def move_to(z):
        with torch.no_grad():
            for p, w, dz in zip(params, original, z):
                p.copy_(w + dz)

    def full_loss():
        with torch.no_grad():
            return float(dataset_mean_loss(op))

    def ascend(loss, z, step_of):
        grads = summed_over_ranks(torch.autograd.grad(loss, params))  # leaves .grad alone
        with torch.no_grad():
            return [torch.maximum(torch.minimum(dz + step_of(g, b), b), -b) for dz, g, b in zip(z, grads, box)]

    world = 1
    if distributed():
        import torch.distributed as dist

        world = dist.get_world_size()
    from flatfast._progress import progress_counter

    update, bar = progress_counter(epochs if method == "sgd-ascent" else steps + 1, f"flatfast sharpness ({method})",
                                    progress)
    try:
        with op.session(), _differentiable(params):
            base = best = full_loss()
            if method == "sgd-ascent":
                z = [torch.zeros_like(w) for w in original]
                for epoch in range(epochs):
                    if update is not None:
                        update(epoch + 1)
                    for inputs, y in op.batches():
                        with torch.enable_grad():
                            # DDP's convention: the step follows the mean over ranks of their batch-mean gradients
                            loss = op.loss_and_targets(inputs.call(model), y) / world
                        z = ascend(loss, z, lambda g, b: lr * g)
                        move_to(z)
                        best = max(best, full_loss())
            else:
                gen = torch.Generator().manual_seed(int(seed))
                z = [((torch.rand(w.shape, generator=gen, dtype=w.dtype) * 2 - 1).to(w.device)) * b
                     for w, b in zip(original, box)]
                for step in range(steps + 1):
                    if update is not None:
                        update(step + 1)
                    move_to(z)
                    with torch.enable_grad():
                        loss = dataset_mean_loss(op)
                    best = max(best, float(loss.detach()))
                    z = ascend(loss, z, lambda g, b: 2.0 * b / steps * torch.sign(g))
    finally:
        move_to([torch.zeros_like(w) for w in original])
        if bar is not None:
            bar.close()
    return 100.0 * (best - base) / (1.0 + base)


def frobenius_norm(model: Model, loader: Loader, *, loss_fn: Optional[LossFn] = None,
                   params: Optional[ParamsLike] = None, batch_fn: Optional[BatchFn] = None, mode: str = "eval",
                   probes: Optional[int] = None, rtol: float = 0.02, seed: int = 0, block: int = 16,
                   max_probes: int = 1000, progress: Optional[bool] = None) -> TraceResult:
    r"""Frobenius norm of the Hessian of the dataset-mean loss, :math:`\|H\|_F = \sqrt{\mathrm{tr}(H^2)}`, with
    :math:`\mathrm{tr}(H^2) = E\|Hv\|^2` estimated by Hutchinson over Rademacher v (stderr by the delta method).
    Stops when the norm's relative standard error is below ``rtol`` (that of tr(H^2) below 2 rtol), or after
    exactly ``probes`` products.

    Parameters
    ----------
    model, loader, loss_fn, params, batch_fn, mode : as for :func:`flatfast.hvp`.
    probes : int, optional
        Exactly this many products (default: adaptive to ``rtol``, at most ``max_probes``).
    rtol : float
        Target relative standard error of the norm.
    seed : int
        Seeds the probes.
    block : int
        Probes per data pass.
    max_probes : int
        The most products the adaptive run takes.
    progress : bool or None
        A bar over the probes (None: when stderr is a terminal).

    Returns
    -------
    TraceResult with the norm as ``.value``, its ``.stderr``, ``.probes``, ``.method`` ("hutchinson-frobenius")
    and ``.mode``.

    Examples
    --------
    >>> import torch, flatfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(64, 4), torch.randint(0, 3, (64,)))]
    >>> flatfast.frobenius_norm(model, data, probes=32).value > 0
    True
    """
    op = HessianOperator(model, loader, loss_fn, params=params, batch_fn=batch_fn, mode=mode)

    def squared_norms(V):
        HV = op.matmat(V)
        return (HV * HV).sum(dim=1)

    from flatfast._progress import with_progress

    res = with_progress(probes or max_probes, "flatfast Frobenius norm", progress, lambda update: hutchinson(
        op.matmat, op.dimension, quadratic=squared_norms, probes=probes, rtol=2 * rtol, seed=seed, block=block,
        max_probes=max_probes, dtype=op.dtype, device=op.device, progress=update))
    value = math.sqrt(max(res.value, 0.0))
    stderr = res.stderr / (2 * value) if value > 0 else float("inf")
    return TraceResult(value, stderr, res.probes, "hutchinson-frobenius", res.samples, mode=op.mode)


def flatness_report(model: Model, loader: Loader, *, loss_fn: Optional[LossFn] = None,
                    params: Optional[ParamsLike] = None, batch_fn: Optional[BatchFn] = None, mode: str = "eval",
                    eps: float = 1e-4, rtol: float = 0.02, seed: int = 0, volume_delta: float = 1e-3,
                    slq_probes: int = 4, slq_iterations: int = 40, progress: Optional[bool] = None) -> FlatnessReport:
    r"""Trace, top eigenvalue, Frobenius norm, epsilon-sharpness and the log-volume measure of one model.

    The log-volume is the Laplace-approximation basin volume up to constants,
    :math:`-\frac12\sum_j \log(|\lambda_j| + \delta)` over the Hessian's P eigenvalues, estimated by stochastic
    Lanczos quadrature (P times the quadrature mean of :math:`\log(|\lambda| + \delta)`, stderr over probes).
    The trace takes :func:`hessian_trace`'s ``method="auto"`` route: exact for networks that are piecewise linear
    in each parameter -- ReLU MLPs, CNNs, ResNets with eval-mode BatchNorm -- and for models with fewer parameters
    than the estimator would need probes, the Hutch++ estimate to ``rtol`` otherwise.

    Parameters
    ----------
    model, loader, loss_fn, params, batch_fn, mode : as for :func:`flatfast.hvp`; they apply to every measure.
    eps : float
        The sharpness box's relative size (:func:`sharpness`, by its default SGD ascent).
    rtol : float
        Target relative standard error of the trace (when estimated) and of the Frobenius norm.
    seed : int
        Seeds every random part.
    volume_delta : float
        The shift :math:`\delta` of the log-volume.
    slq_probes, slq_iterations : int
        The log-volume's stochastic Lanczos quadrature (:func:`flatfast.hessian_spectrum`).
    progress : bool or None
        Each measure's own bar in turn (None: when stderr is a terminal).

    Returns
    -------
    FlatnessReport: ``.trace`` and ``.frobenius`` (TraceResult), ``.top_eigenvalue`` and its residual,
    ``.sharpness``, ``.log_volume`` and its stderr, ``.mode``; ``.as_dict()`` for a table row.

    Examples
    --------
    >>> import torch, flatfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(64, 4), torch.randint(0, 3, (64,)))]
    >>> report = flatfast.flatness_report(model, data)
    >>> sorted(report.as_dict())[:3]
    ['frobenius', 'frobenius_stderr', 'log_volume']
    """
    op = HessianOperator(model, loader, loss_fn, params=params, batch_fn=batch_fn, mode=mode)
    common = dict(loss_fn=loss_fn, params=params, batch_fn=batch_fn, mode=mode, seed=seed, progress=progress)
    # each measure shows its own bar (progress=None: when stderr is a terminal)
    trace = hessian_trace(model, loader, method="auto", rtol=rtol, **common)
    eig = hessian_eigenvalues(model, loader, k=1, tol=1e-4, **common)
    frob = frobenius_norm(model, loader, rtol=rtol, **common)
    sharp = sharpness(model, loader, eps=eps, **common)
    spec = hessian_spectrum(model, loader, probes=slq_probes, iterations=min(slq_iterations, op.dimension), **common)
    per_probe = (spec.weights * np.log(np.abs(spec.nodes) + volume_delta)).sum(axis=1) * op.dimension
    log_volume = -0.5 * float(per_probe.mean())
    log_volume_se = 0.5 * float(per_probe.std(ddof=1) / math.sqrt(len(per_probe))) if len(per_probe) > 1 else float("inf")
    return FlatnessReport(trace, float(eig.values[0]), float(eig.residuals[0]), frob, sharp, log_volume,
                          log_volume_se, op.mode)


@contextlib.contextmanager
def _differentiable(params):
    """requires_grad on every measured parameter for the ascent's gradients (one named explicitly in params=
    may be frozen), restored afterwards."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def weighted_layer_positions(model):
    """Indices in an nn.Sequential of the layers ``rescale`` counts: nn.Linear and nn.Conv1d/2d/3d."""
    import torch.nn as nn

    return [i for i, m in enumerate(model) if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]


def rescale(model: Model, alpha: float, *, divided_layer: int = 0, layer: None = None) -> Model:
    r"""Dinh et al.'s alpha-scale transformation of a ReLU network, on a copy of ``model``, in Zhang et al.'s
    direction: the weighted layer ``divided_layer`` (counting the nn.Linear and nn.Conv1d/2d/3d modules of an
    nn.Sequential) is **divided** by alpha and the next weighted layer's weight **multiplied** by alpha:

    .. math::
        W_k \leftarrow W_k / \alpha,\quad b_k \leftarrow b_k / \alpha,\quad W_{k+1} \leftarrow \alpha W_{k+1}
        \qquad (b_{k+1} \text{ and every other layer unchanged}).

    Everything between the two layers must be positively homogeneous (ReLU, LeakyReLU, max or average pooling,
    Flatten, Dropout, Identity), so the network computes the same function (and has the same log P(f)); a Linear
    pair and a Conv -> ReLU -> Conv pair both qualify. The Hessian block of layer k grows by :math:`\alpha^2` and
    that of layer k+1's weight shrinks by :math:`\alpha^2`, so whether the network gets sharper depends on which
    layer holds the curvature: with the paper's alpha = 5.9 on an FCN's large first layer every Hessian measure
    grows ~25x, on a small CNN's first conv (few weights) the trace less than 2.5x and the epsilon-sharpness falls
    (the documentation's results, "The experiment on the digits"). For the opposite direction pass ``1 / alpha``.

    Parameters
    ----------
    model : torch.nn.Sequential of Linear/Conv layers separated by positively homogeneous modules
    alpha : float > 0
    divided_layer : int
        Index k among the weighted (Linear and Conv) layers; layer k + 1 must exist.

    Returns
    -------
    A rescaled deep copy; ``model`` itself is untouched.

    Examples
    --------
    >>> import torch, flatfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    >>> scaled = flatfast.rescale(model, 5.9)
    >>> bool(torch.allclose(scaled[0].weight * 5.9, model[0].weight)), bool(torch.allclose(scaled[2].weight, 5.9 * model[2].weight))
    (True, True)
    >>> x = torch.randn(5, 4)
    >>> bool(torch.allclose(scaled(x), model(x), atol=1e-5))
    True
    """
    import torch

    if layer is not None:
        raise TypeError("layer: rescale's `layer` is now `divided_layer`, and that layer is divided by alpha (the "
                        "next multiplied), as Zhang et al. did; for the old direction pass 1 / alpha")
    alpha = check_float(alpha, "alpha", positive=True)
    divided_layer = check_int(divided_layer, "divided_layer", minimum=0)
    nn = torch.nn
    if not isinstance(model, nn.Sequential):
        raise TypeError("model: rescale needs an nn.Sequential of Linear/Conv layers separated by ReLU")
    homogeneous = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Flatten, nn.MaxPool1d, nn.MaxPool2d,
                   nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                   nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
    positions = weighted_layer_positions(model)
    if divided_layer + 1 >= len(positions):
        raise ValueError(f"divided_layer: must index a Linear/Conv layer that has a next one "
                         f"(0..{len(positions) - 2}), got {divided_layer}")
    first, second = positions[divided_layer], positions[divided_layer + 1]
    between = list(model)[first + 1: second]
    if not any(isinstance(m, (nn.ReLU, nn.LeakyReLU)) for m in between) or \
            not all(isinstance(m, homogeneous) for m in between):
        raise ValueError(f"divided_layer: layer {divided_layer} and the next weighted layer must be separated by a "
                         f"ReLU and positively homogeneous modules only, found {between}")
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled[first].weight.div_(alpha)
        if scaled[first].bias is not None:
            scaled[first].bias.div_(alpha)
        scaled[second].weight.mul_(alpha)
    return scaled


def function_of(model: Model, X: InputsLike, *, batch_size: int = 4096) -> np.ndarray:
    """The +-1 labelling f that a trained binary classifier expresses on X: the function whose prior probability
    :func:`flatfast.log_prior` measures (``log_prior(X, function_of(model, X))``).

    Parameters
    ----------
    model : torch.nn.Module
        A binary classifier: one logit (+1 where it is >= 0) or two (+1 where class 1 wins). Evaluated in eval
        mode (its modes restored afterwards) under no_grad; its output may be a tensor, a tuple (first element) or
        an object with ``logits``.
    X : tensor, array or mapping of tensors, n examples first
        What the model takes: ``model(X)``, or ``model(**X)`` for a mapping such as a tokenizer's output.
    batch_size : int
        Inputs per forward pass; a model whose outputs depend on the whole batch (checked) needs batch_size >= n.

    Returns
    -------
    numpy.ndarray of int, shape (n,), values in {-1, +1}.

    Examples
    --------
    >>> import torch, flatfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    >>> set(flatfast.function_of(model, torch.randn(10, 4)).tolist()) <= {-1, 1}
    True
    """
    import torch

    from flatfast.kernel.empirical import model_inputs

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    first = next(model.parameters())
    inputs = model_inputs(X).to(first.device, first.dtype)
    outs = []
    with eval_mode(model), torch.no_grad():
        check_chunks(model, inputs, batch_size)
        for start in range(0, inputs.size, batch_size):
            outs.append(inputs[start: start + batch_size].call(model))
    out = torch.cat(outs)
    if out.dim() == 1 or out.shape[1] == 1:
        logits = out.reshape(-1)
        return np.where(logits.cpu().numpy() >= 0, 1, -1)
    if out.shape[1] == 2:
        return np.where((out[:, 1] > out[:, 0]).cpu().numpy(), 1, -1)
    raise ValueError(f"model: function_of needs a binary classifier (1 or 2 outputs), got {out.shape[1]} outputs")
