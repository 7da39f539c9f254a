"""The trace of the Hessian: ``hessian_trace`` and the choice of its route.

The loss, batch, parameter and mode conventions are :func:`flatfast.hvp`'s. Routes: the exact trace of a network
that is piecewise linear in each parameter (:mod:`flatfast.curvature.exact_trace`), the P products with unit
vectors, or the Hutch++ / Hutchinson estimators (:mod:`flatfast.curvature.estimators`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Optional

from flatfast._progress import with_progress
from flatfast._typing import BatchFn, Loader, LossFn
from flatfast._validate import check_float, check_int
from flatfast.curvature.estimators import hutchinson, hutchpp, probe_block, unit_vector_trace
from flatfast.curvature.exact_trace import PerExampleFailure, exact_trace
from flatfast.curvature.mlp_rop import mlp_exact_trace
from flatfast.curvature.operator import HessianOperator
from flatfast.errors import NotPiecewiseLinearError
from flatfast.results import TraceResult

if TYPE_CHECKING:  # pragma: no cover
    from flatfast._typing import Model, ParamsLike


_TRACE_METHODS = ("auto", "exact", "unit-vectors", "hutch++", "hutchinson")
# The cost model of method="auto", in forward+backward passes over the data: one Hessian-vector product (or
# quadratic form) costs about two; the exact trace about one per output-curvature factor (C for C outputs).
HVP_PASSES = 2


def expected_estimator_probes(probes, rtol, max_probes):
    """Operator products the estimator is expected to need: ``probes`` when given; else 2 / rtol^2 (Hutchinson's
    relative variance 2 (|H|_F^2 - sum H_ii^2) / tr(H)^2 is near 2 when a few top eigenvalues dominate the
    spectrum, as in trained networks), capped at ``max_probes``."""
    if probes is not None:
        return probes
    return int(min(max_probes, math.ceil(2.0 / rtol ** 2)))


def choose_trace_method(op, *, probes=None, rtol=0.01, max_probes=2000):
    """The cheapest honest route to tr H for ``hessian_trace(method="auto")``; returns (method, why).

    1. ``"exact"`` when the model treats the examples independently (the first batch split in two gives the
       whole batch's outputs: :meth:`HessianOperator.probe`), the network is piecewise linear in each measured
       parameter (one watched forward pass of the first batch decides, as for method="exact"), and its cost, about
       K passes for K output-curvature factors (the outputs C), is at most the estimator's expected cost,
       HVP_PASSES x expected_estimator_probes.
    2. ``"unit-vectors"`` when the estimator would need at least as many products as there are parameters P:
       the P products with unit vectors give the trace exactly.
    3. ``"hutch++"`` otherwise, never with more than P probes.
    """
    budget = expected_estimator_probes(probes, rtol, max_probes)
    why_not = op.probe()
    outputs = op.outputs_per_example
    if why_not is None:
        why_not = _why_not_exact(op, outputs)
    if why_not is None and outputs <= HVP_PASSES * budget:
        return "exact", f"piecewise linear; ~{outputs} passes against ~{HVP_PASSES * budget} for the estimator"
    return _estimator_route(op, budget, why_not or f"~{outputs} passes for the exact trace > "
                                                   f"~{HVP_PASSES * budget} for the estimator")


def _why_not_exact(op, outputs):
    """None when the exact trace applies to a model whose examples are independent, else why not."""
    import torch

    from flatfast.curvature.exact_trace import AUTOGRAD_LOSS_MAX_OUTPUTS, _loss_kind, check_piecewise_linear

    if op.linears is None:
        inputs, _ = next(iter(op.batches()))
        try:
            with op.session(), torch.no_grad():
                check_piecewise_linear(op.model, inputs, op.params)
        except NotPiecewiseLinearError as exc:
            return str(exc)
    if _loss_kind(op) == "autograd" and outputs > AUTOGRAD_LOSS_MAX_OUTPUTS:
        return f"the loss's {outputs} x {outputs} output Hessian is not factored beyond {AUTOGRAD_LOSS_MAX_OUTPUTS} " \
               "outputs"
    return None


def _estimator_route(op, budget, why):
    """(route, why) among the routes that need no per-example pass: the P products with unit vectors when the
    estimator would need at least P, else Hutch++."""
    if op.dimension <= budget:
        return "unit-vectors", f"{op.dimension} parameters <= the estimator's ~{budget} probes ({why})"
    return "hutch++", why


def hessian_trace(model: Model, loader: Loader, *, loss_fn: Optional[LossFn] = None,
                  params: Optional[ParamsLike] = None, batch_fn: Optional[BatchFn] = None, mode: str = "eval",
                  probes: Optional[int] = None,
                  rtol: float = 0.01, method: str = "auto", seed: int = 0, block: Optional[int] = None,
                  max_probes: int = 2000, backend: str = "auto", progress: Optional[bool] = None) -> TraceResult:
    r"""Trace of the Hessian of the dataset-mean loss (see :func:`hvp` for the convention), with its standard error.

    ``method="auto"`` (default) takes the cheapest honest route (:func:`choose_trace_method`): the exact trace
    below when the network is piecewise linear in each parameter and its cost (about C passes for C outputs) is
    at most the estimator's expected cost (two passes per probe, ``probes`` or 2 / rtol^2 of them, capped at
    ``max_probes``); the exact trace from the P products with unit vectors (``"unit-vectors"``) when the
    estimator would need at least P probes for the model's P parameters; Hutch++ otherwise, with at most P
    probes. ``result.method`` says which ran.

    ``method="hutch++"`` sketches the top of the spectrum exactly and runs Hutchinson on the rest;
    ``method="hutchinson"`` is plain Hutchinson with Rademacher probes, :math:`\mathrm{tr} H \approx
    \frac1m\sum_j v_j^\top H v_j` (each :math:`v^\top H v` a second directional derivative). Probes are drawn
    in blocks of ``block`` (one data pass per block; default: as many as fit in 256 MiB on the CPU or an eighth
    of the device's free memory, at most 64), drawn on the model's device. Stops when ``stderr <= rtol *
    |value|``, or after exactly ``probes`` operator products (>= 6 for Hutch++, >= 2 for Hutchinson) when given.

    ``method="exact"`` is the exact trace, with zero standard error, of any network that is piecewise linear in
    each single parameter -- built from Linear, Conv1d/2d/3d (and transposed), ReLU, LeakyReLU, Hardtanh/ReLU6,
    max/average/adaptive pooling, Flatten and reshapes, Dropout and BatchNorm in eval mode, residual additions
    and concatenations, in any nn.Module (not only nn.Sequential) -- or piecewise linear in the measured
    ``params`` alone: a transformer's classifier head, say, whatever comes before it. For such a network the
    second derivative of the outputs in one parameter is 0, so the Hessian's diagonal is the Gauss-Newton
    diagonal and
    :math:`\mathrm{tr} H = \frac1N \sum_i \sum_k w_k \lVert J_i^\top s_{ik} \rVert^2`, where
    :math:`H_{out,i} = \sum_k w_k s_{ik} s_{ik}^\top` factors the loss's Hessian in example i's outputs:
    cross-entropy :math:`s_k = \sqrt{p_k}(e_k - p)`, MSE (mean over C outputs) :math:`\sqrt{2/C}\, e_k`,
    BCE-with-logits :math:`\sqrt{\sigma(1-\sigma)/C}\, e_k` (the default loss and torch's CrossEntropyLoss,
    MSELoss, BCEWithLogitsLoss with default settings); any other ``loss_fn`` that is a mean of per-example losses
    is factored by the eigendecomposition of its autograd output Hessian (up to 256 outputs). One forward pass
    on the first batch checks the network: a smooth nonlinearity on parameter-dependent values (tanh, GELU,
    softplus, LayerNorm, softmax), BatchNorm on batch statistics, dropout in training mode, or a product of two
    values that depend on the same parameter (a weight applied twice in sequence, gating, attention) raises
    ValueError naming the module. Cost: one forward pass, then per example a backward pass for each of the K
    factor vectors (K = C for cross-entropy and MSE, so about C backward passes with per-example gradient
    norms; bench/bench_hessian.py measures it on a small ResNet against one forward+backward pass and a 100-probe
    Hutchinson estimate); the per-example gradients are held at most 256 MiB at a time,
    chunked over examples and factor vectors, so C = 1000 classes fits. nn.Sequential Linear/ReLU models with
    cross-entropy or MSE take a batched fast path with the same result.

    Parameters
    ----------
    model, loader, loss_fn, params, batch_fn, mode : as for :func:`hvp`.
    probes : int, optional
        Exactly this many operator products for the estimators (>= 6 for Hutch++, >= 2 for Hutchinson).
    rtol : float
        Without ``probes``: stop when ``stderr <= rtol * |value|``.
    method : {"auto", "exact", "unit-vectors", "hutch++", "hutchinson"}
    seed : int
        Seeds the probes: the same seed gives the same estimate.
    block : int, optional
        Probes per data pass.
    max_probes : int
        The most probes the adaptive estimators take.
    backend : str
        The R-operator's backend for plain Linear/ReLU MLPs (see :func:`hvp`).
    progress : bool or None
        A bar over the probes (None: when stderr is a terminal).

    Returns
    -------
    TraceResult with ``.value``, ``.stderr``, ``.probes`` (operator products used; 0 for "exact"), ``.method`` and
    ``.mode``.

    Examples
    --------
    >>> import torch, flatfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(64, 4), torch.randint(0, 3, (64,)))]
    >>> res = flatfast.hessian_trace(model, data, probes=64, method="hutchinson")
    >>> res.probes
    64
    >>> cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
    ...                           torch.nn.Flatten(), torch.nn.Linear(16, 1))
    >>> images, labels = torch.randn(32, 1, 6, 6), torch.randint(0, 2, (32, 1)).float()
    >>> bce = torch.nn.BCEWithLogitsLoss()
    >>> exact = flatfast.hessian_trace(cnn, [(images, labels)], loss_fn=bce, method="exact")
    >>> exact.stderr
    0.0
    >>> flatfast.hessian_trace(cnn, [(images, labels)], loss_fn=bce).method   # auto
    'exact'
    """
    if method not in _TRACE_METHODS:
        raise ValueError(f"method: expected one of {_TRACE_METHODS}, got {method!r}")
    if probes is not None:
        probes = check_int(probes, "probes", minimum=2 if method == "hutchinson" else 6)
    rtol = check_float(rtol, "rtol", positive=True)
    seed = check_int(seed, "seed", minimum=0)
    max_probes = check_int(max_probes, "max_probes", minimum=2)
    if block is not None:
        block = check_int(block, "block", minimum=1)
    op = HessianOperator(model, loader, loss_fn, params=params, batch_fn=batch_fn, mode=mode, backend=backend)
    import torch

    block = probe_block(op.dimension, torch.empty((), dtype=op.dtype).element_size(), op.device, block)
    chosen, reason = method, "asked for"
    if method == "auto":
        chosen, reason = choose_trace_method(op, probes=probes, rtol=rtol, max_probes=max_probes)
        max_probes = min(max_probes, op.dimension)  # never more probes than the unit vectors would take
    if chosen == "exact":
        try:
            value = mlp_exact_trace(op) if op.linears is not None else exact_trace(op)
            return TraceResult(value, 0.0, 0, "exact", mode=op.mode, reason=reason)
        except PerExampleFailure as exc:
            if method == "exact":
                raise ValueError(f"method: 'exact' takes the examples one at a time, and torch could not: {exc}; "
                                 "use method='auto' or 'hutch++', which need no per-example pass") from exc
            budget = expected_estimator_probes(probes, rtol, max_probes)
            chosen, reason = _estimator_route(op, budget, f"the exact trace's per-example pass failed inside "
                                                          f"torch ({exc})")
    if chosen == "unit-vectors":
        result = with_progress(op.dimension, "flatfast trace (unit-vectors)", progress, lambda update: (
            unit_vector_trace(op.matmat, op.dimension, quadratic=op.quadratic, block=block, dtype=op.dtype,
                              device=op.device, progress=update)))
        return dataclasses.replace(result, mode=op.mode, reason=reason)
    estimator = hutchpp if chosen == "hutch++" else hutchinson
    if probes is not None and method == "auto":
        probes = min(probes, op.dimension)
    result = with_progress(probes or max_probes, f"flatfast trace ({chosen})", progress, lambda update: estimator(
        op.matmat, op.dimension, quadratic=op.quadratic, probes=probes, rtol=rtol, seed=seed, block=block,
        max_probes=max_probes, dtype=op.dtype, device=op.device, progress=update))
    return dataclasses.replace(result, mode=op.mode, reason=reason)


__all__ = ["choose_trace_method", "expected_estimator_probes", "hessian_trace"]
