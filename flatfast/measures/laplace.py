"""The Laplace approximation's log marginal likelihood (the evidence) of a trained classifier, with its
log-determinant exact on small models and by stochastic Lanczos quadrature on the generalized Gauss-Newton matrix
otherwise -- defined as laplace-torch defines it, so that the two can be compared."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import numpy as np

from flatfast._progress import with_progress
from flatfast._typing import BatchFn, Loader, LossFn
from flatfast._validate import check_float, check_int
from flatfast.curvature.estimators import slq
from flatfast.curvature.operator import HessianOperator
from flatfast.models.passes import mean_over_ranks
from flatfast.results import MeasureResult

if TYPE_CHECKING:  # pragma: no cover
    from flatfast._typing import Model, ParamsLike

LAPLACE_METHODS = ("auto", "exact", "slq")
# Up to this many parameters the GGN is formed and its log-determinant taken exactly (P^2 numbers held).
EXACT_MAX_PARAMETERS = 3000


def laplace_evidence(model: Model, loader: Loader, *, prior_precision: float = 1.0, method: str = "auto",
                     probes: int = 8, iterations: int = 40, loss_fn: Optional[LossFn] = None,
                     params: Optional[ParamsLike] = None, batch_fn: Optional[BatchFn] = None, mode: str = "eval",
                     seed: int = 0, progress: Optional[bool] = None) -> MeasureResult:
    r"""The Laplace log marginal likelihood of a trained classifier (MacKay 1992; Immer et al. 2021), with an
    isotropic Gaussian prior :math:`N(0, \delta^{-1} I)` on the measured parameters:

    .. math::
        \log p(D) \approx \log p(D \mid \theta^*) - \tfrac12 \log\det\big(I + G / \delta\big)
        - \tfrac12\, \delta\, \lVert \theta^* \rVert^2,

    with :math:`\log p(D \mid \theta^*) = -\sum_i \ell_i` (the **summed** loss: cross-entropy, or BCE-with-logits
    for one logit) and G the generalized Gauss-Newton matrix of the summed loss, :math:`\sum_i J_i^\top
    H_{\mathrm{out},i} J_i`. This is laplace-torch's ``Laplace(model, "classification", subset_of_weights="all",
    hessian_structure="full").log_marginal_likelihood(prior_precision=delta)``: ``log_likelihood -
    (log_det_ratio + scatter) / 2``, the log-determinant ratio being :math:`\log\det(G + \delta I) - P\log\delta`.
    For one logit z with BCE, compare with laplace-torch on the logits (0, z): its classification is a softmax
    cross-entropy, under which a single logit has zero loss and zero curvature.

    ``method="exact"`` forms G (P^2 numbers) from the per-example Jacobians and takes the log-determinant from its
    eigenvalues; ``"slq"`` estimates :math:`\mathrm{tr}\log(I + G/\delta)` by stochastic Lanczos quadrature on G's
    products (one forward-mode and one backward pass each, never forming G), ``probes`` x ``iterations`` products,
    with the probes' standard error; ``"auto"`` is exact up to 3000 parameters. Not invariant to the
    alpha-rescaling: the isotropic prior weighs the rescaled weights differently.

    Parameters
    ----------
    model, loader, params, batch_fn, mode : as for :func:`flatfast.hvp`.
    prior_precision : float
        :math:`\delta`, laplace-torch's ``prior_precision``.
    method : {"auto", "exact", "slq"}
    probes, iterations, seed : int
        Stochastic Lanczos quadrature's probes, Lanczos steps and seed.
    loss_fn : callable, optional
        The default cross-entropy (class targets), ``nn.CrossEntropyLoss()`` or ``nn.BCEWithLogitsLoss()`` (one
        logit, 0/1 targets): the classification likelihoods the evidence is defined for.
    progress : bool or None
        A bar over the products.

    Returns
    -------
    MeasureResult: ``value`` the log evidence in nats, ``stderr`` SLQ's (0 when exact), ``info`` with
    ``log_likelihood``, ``log_det_ratio`` and ``scatter`` (laplace-torch's names) and the number of parameters.

    Examples
    --------
    >>> import torch, flatfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).double()
    >>> data = [(torch.randn(64, 4, dtype=torch.float64), torch.randint(0, 3, (64,)))]
    >>> evidence = flatfast.laplace_evidence(model, data, prior_precision=1.0)
    >>> parts = evidence.info
    >>> abs(evidence.value - (parts["log_likelihood"] - (parts["log_det_ratio"] + parts["scatter"]) / 2)) < 1e-9
    True
    """
    import torch

    prior_precision = check_float(prior_precision, "prior_precision", positive=True)
    if method not in LAPLACE_METHODS:
        raise ValueError(f"method: expected one of {LAPLACE_METHODS}, got {method!r}")
    probes = check_int(probes, "probes", minimum=2)
    iterations = check_int(iterations, "iterations", minimum=1)
    seed = check_int(seed, "seed", minimum=0)
    op = HessianOperator(model, loader, loss_fn, params=params, batch_fn=batch_fn, mode=mode)
    if op.loss_kind not in (None, "cross_entropy", "bce_with_logits"):
        raise ValueError("loss_fn: the Laplace evidence is defined here for classification likelihoods: the default "
                         "cross-entropy, nn.CrossEntropyLoss() or nn.BCEWithLogitsLoss()")
    op.probe()
    if method == "auto":
        method = "exact" if op.dimension <= EXACT_MAX_PARAMETERS else "slq"
    theta = op.flat_params()
    with op.session(), torch.no_grad():
        mean_loss, count = _mean_loss(op)
    log_likelihood = -mean_loss * count
    scatter = prior_precision * float(theta.double().square().sum())
    if method == "exact":
        G = with_progress(None, "flatfast Laplace (GGN)", progress, lambda update: _dense_ggn(op))
        eigenvalues = torch.linalg.eigvalsh(G.double()).clamp(min=0.0)
        log_det_ratio, stderr = float(torch.log1p(eigenvalues / prior_precision).sum()), 0.0
    else:
        spectrum = with_progress(iterations, "flatfast Laplace (SLQ)", progress, lambda update: slq(
            lambda V: _ggn_matmat(op, V), op.dimension, probes=probes, iterations=min(iterations, op.dimension),
            seed=seed, dtype=op.dtype, device=op.device, progress=update))
        per_probe = op.dimension * (spectrum.weights * np.log1p(np.clip(spectrum.nodes, 0.0, None)
                                                                / prior_precision)).sum(axis=1)
        log_det_ratio = float(per_probe.mean())
        stderr = 0.5 * float(per_probe.std(ddof=1) / math.sqrt(len(per_probe)))
    value = log_likelihood - 0.5 * (log_det_ratio + scatter)
    return MeasureResult(value, stderr, "Laplace evidence", method,
                         dict(log_likelihood=log_likelihood, log_det_ratio=log_det_ratio, scatter=scatter,
                              prior_precision=prior_precision, parameters=op.dimension))


def _mean_loss(op):
    total, count = 0.0, 0
    for inputs, y in op.batches():
        total += float(op.loss_and_targets(inputs.call(op.model), y)) * inputs.size
        count += inputs.size
    return mean_over_ranks(total, count, op.device), mean_over_ranks(float(count), 1, op.device)


def _output_curvature_apply(op, out, u):
    """H_out u for each example: cross-entropy's diag(p) - p p^T, or BCE-with-logits' sigma (1 - sigma), on the
    per-example (not batch-mean) loss."""
    import torch

    if op.loss_kind == "bce_with_logits":
        q = torch.sigmoid(out)
        return q * (1.0 - q) * u
    p = torch.softmax(out, dim=-1)
    return p * u - p * (p * u).sum(dim=-1, keepdim=True)


def _ggn_matmat(op, V):
    """G V for the rows of V (k, P): G of the summed loss, per batch one forward-mode pass (J v) and one backward
    pass (J^T H_out J v) per vector."""
    import torch
    from torch.func import jvp, vjp

    fixed = op.fixed_tensors()
    theta = op.flat_params()
    V = V.to(device=op.device, dtype=op.dtype)
    total = torch.zeros_like(V)
    with op.session():
        for inputs, _ in op.batches():
            def outputs_of(flat):
                return inputs.functional_call(op.model, {**op.unflatten(flat), **fixed})

            out, pullback = vjp(outputs_of, theta)
            out = out.detach()
            for i, v in enumerate(V):
                _, Jv = jvp(outputs_of, (theta,), (v,))
                total[i] += pullback(_output_curvature_apply(op, out, Jv))[0]
    return total


def _dense_ggn(op):
    """G = sum_i J_i^T H_out,i J_i, formed from each batch's Jacobian (B C x P)."""
    import torch
    from torch.func import jacrev

    fixed = op.fixed_tensors()
    theta = op.flat_params()
    G = torch.zeros(op.dimension, op.dimension, dtype=op.dtype, device=op.device)
    with op.session():
        for inputs, _ in op.batches():
            def outputs_of(flat):
                return inputs.functional_call(op.model, {**op.unflatten(flat), **fixed})

            out = outputs_of(theta).detach()
            J = jacrev(outputs_of)(theta)  # (B, C..., P)
            B = out.shape[0]
            J = J.reshape(B, -1, op.dimension)
            flat_out = out.reshape(B, -1)
            if op.loss_kind == "bce_with_logits":
                q = torch.sigmoid(flat_out)
                weighted = (J * (q * (1.0 - q)).sqrt()[..., None]).reshape(-1, op.dimension)
                G += weighted.T @ weighted
            else:  # diag(p) - p p^T per example, as two products of (B C, P) matrices
                p = torch.softmax(flat_out, dim=-1)
                weighted = (J * p.sqrt()[..., None]).reshape(-1, op.dimension)
                Jp = (J * p[..., None]).sum(dim=1)
                G += weighted.T @ weighted - Jp.T @ Jp
    return G
