"""Flatness measures, the alpha-scale transformation, and the function a trained classifier expresses."""
from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np

from flatfast._validate import check_float, check_int
from flatfast.estimators import TraceResult, hutchinson
from flatfast.hessian import HessianOperator, _eval_mode, hessian_eigenvalues, hessian_spectrum, hessian_trace


def _dataset_loss(model, loader, loss_fn, op):
    """L(theta) = (1/N) sum_i l(f(x_i), y_i), with its gradient accumulated in .grad when grads are enabled."""
    total, count = 0.0, 0
    for x, y in op.batches():
        loss = op.loss_and_targets(model(x), y) * x.shape[0]
        total = total + loss
        count += int(x.shape[0])
    return total / count


def sharpness(model, loader, eps=1e-4, loss_fn=None, *, steps=20, seed=0):
    r"""Keskar et al.'s epsilon-sharpness of the dataset-mean loss L (see :func:`flatfast.hvp` for the convention):

    .. math::
        100 \cdot \frac{\max_{z \in C_\epsilon} L(\theta + z) - L(\theta)}{1 + L(\theta)},\qquad
        C_\epsilon = \{ z : |z_j| \le \epsilon (|\theta_j| + 1) \},

    maximised by clipped (projected) sign-gradient ascent from a seeded random point of the box, ``steps`` full
    passes over the data. The model is evaluated in eval mode and left unchanged.

    Examples
    --------
    >>> import torch, flatfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(64, 4), torch.randint(0, 3, (64,)))]
    >>> flatfast.sharpness(model, data, eps=1e-3) >= 0
    True
    """
    import torch

    eps = check_float(eps, "eps", positive=True)
    steps = check_int(steps, "steps", minimum=1)
    op = HessianOperator(model, loader, loss_fn)
    params = [p for _, p in op.params]
    original = [p.detach().clone() for p in params]
    box = [eps * (w.abs() + 1.0) for w in original]
    gen = torch.Generator().manual_seed(int(seed))
    z = [((torch.rand(w.shape, generator=gen, dtype=w.dtype) * 2 - 1).to(w.device)) * b for w, b in zip(original, box)]
    step = [2.0 * b / steps for b in box]
    try:
        with _eval_mode(model):
            with torch.no_grad():
                base = float(_dataset_loss(model, loader, loss_fn, op))
            best = base
            for _ in range(steps + 1):
                with torch.no_grad():
                    for p, w, dz in zip(params, original, z):
                        p.copy_(w + dz)
                for p in params:
                    p.grad = None
                with torch.enable_grad():
                    loss = _dataset_loss(model, loader, loss_fn, op)
                    grads = torch.autograd.grad(loss, params)
                best = max(best, float(loss.detach()))
                with torch.no_grad():
                    z = [torch.maximum(torch.minimum(dz + s * torch.sign(g), b), -b)
                         for dz, s, g, b in zip(z, step, grads, box)]
    finally:
        with torch.no_grad():
            for p, w in zip(params, original):
                p.copy_(w)
    return 100.0 * (best - base) / (1.0 + base)


def frobenius_norm(model, loader, loss_fn=None, *, probes=None, rtol=0.02, seed=0, block=16, max_probes=1000):
    r"""Frobenius norm of the Hessian of the dataset-mean loss, :math:`\|H\|_F = \sqrt{\mathrm{tr}(H^2)}`, with
    :math:`\mathrm{tr}(H^2) = E\|Hv\|^2` estimated by Hutchinson over Rademacher v (stderr by the delta method).
    Stops when the norm's relative standard error is below ``rtol`` (that of tr(H^2) below 2 rtol), or after
    exactly ``probes`` products.

    Examples
    --------
    >>> import torch, flatfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(64, 4), torch.randint(0, 3, (64,)))]
    >>> flatfast.frobenius_norm(model, data, probes=32).value > 0
    True
    """
    op = HessianOperator(model, loader, loss_fn)

    def squared_norms(V):
        HV = op.matmat(V)
        return (HV * HV).sum(dim=1)

    res = hutchinson(op.matmat, op.dimension, quadratic=squared_norms, probes=probes, rtol=2 * rtol, seed=seed,
                     block=block, max_probes=max_probes, dtype=op.dtype, device=op.device)
    value = math.sqrt(max(res.value, 0.0))
    stderr = res.stderr / (2 * value) if value > 0 else float("inf")
    return TraceResult(value, stderr, res.probes, "hutchinson-frobenius", res.samples)


@dataclasses.dataclass
class FlatnessReport:
    """Every local flatness measure of one model and data set, each with its uncertainty."""

    trace: TraceResult
    top_eigenvalue: float
    top_eigenvalue_residual: float
    frobenius: TraceResult
    sharpness: float
    log_volume: float
    log_volume_stderr: float

    def as_dict(self):
        return {"trace": self.trace.value, "trace_stderr": self.trace.stderr, "top_eigenvalue": self.top_eigenvalue,
                "top_eigenvalue_residual": self.top_eigenvalue_residual, "frobenius": self.frobenius.value,
                "frobenius_stderr": self.frobenius.stderr, "sharpness": self.sharpness,
                "log_volume": self.log_volume, "log_volume_stderr": self.log_volume_stderr}


def flatness_report(model, loader, loss_fn=None, *, eps=1e-4, rtol=0.02, seed=0, volume_delta=1e-3,
                    slq_probes=4, slq_iterations=40):
    r"""Trace, top eigenvalue, Frobenius norm, epsilon-sharpness and the log-volume measure of one model.

    The log-volume is the Laplace-approximation basin volume up to constants,
    :math:`-\frac12\sum_j \log(|\lambda_j| + \delta)` over the Hessian's P eigenvalues, estimated by stochastic
    Lanczos quadrature (P times the quadrature mean of :math:`\log(|\lambda| + \delta)`, stderr over probes).
    The trace is exact for Linear/ReLU MLPs with the default loss and Hutch++ otherwise.

    Examples
    --------
    >>> import torch, flatfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(64, 4), torch.randint(0, 3, (64,)))]
    >>> report = flatfast.flatness_report(model, data)
    >>> sorted(report.as_dict())[:3]
    ['frobenius', 'frobenius_stderr', 'log_volume']
    """
    op = HessianOperator(model, loader, loss_fn)
    method = "exact" if op.linears is not None else "hutch++"
    trace = hessian_trace(model, loader, loss_fn, method=method, rtol=rtol, seed=seed, progress=False)
    eig = hessian_eigenvalues(model, loader, k=1, loss_fn=loss_fn, tol=1e-4, seed=seed)
    frob = frobenius_norm(model, loader, loss_fn, rtol=rtol, seed=seed)
    sharp = sharpness(model, loader, eps=eps, loss_fn=loss_fn, seed=seed)
    spec = hessian_spectrum(model, loader, loss_fn, probes=slq_probes, iterations=min(slq_iterations, op.dimension),
                            seed=seed)
    per_probe = (spec.weights * np.log(np.abs(spec.nodes) + volume_delta)).sum(axis=1) * op.dimension
    log_volume = -0.5 * float(per_probe.mean())
    log_volume_se = 0.5 * float(per_probe.std(ddof=1) / math.sqrt(len(per_probe))) if len(per_probe) > 1 else float("inf")
    return FlatnessReport(trace, float(eig.values[0]), float(eig.residuals[0]), frob, sharp, log_volume, log_volume_se)


def rescale(model, alpha, layer=0):
    r"""Dinh et al.'s alpha-scale transformation of a ReLU network, on a copy of ``model``.

    Linear layer ``layer`` (counting only the nn.Linear modules of an nn.Sequential) has its weight and bias
    multiplied by :math:`\alpha > 0` and the next Linear layer its weight by :math:`1/\alpha`. ReLU is positively
    homogeneous, so the network computes the same function (and so has the same log P(f)), while every local
    flatness measure of the loss changes.

    Examples
    --------
    >>> import torch, flatfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    >>> x = torch.randn(5, 4)
    >>> bool(torch.allclose(flatfast.rescale(model, 5.9)(x), model(x), atol=1e-5))
    True
    """
    import torch

    alpha = check_float(alpha, "alpha", positive=True)
    layer = check_int(layer, "layer", minimum=0)
    if not isinstance(model, torch.nn.Sequential):
        raise TypeError("model: rescale needs an nn.Sequential of Linear layers separated by ReLU")
    positions = [i for i, m in enumerate(model) if isinstance(m, torch.nn.Linear)]
    if layer + 1 >= len(positions):
        raise ValueError(f"layer: must index a Linear layer that has a next one (0..{len(positions) - 2}), got {layer}")
    first, second = positions[layer], positions[layer + 1]
    between = list(model)[first + 1: second]
    if not between or not all(isinstance(m, (torch.nn.ReLU, torch.nn.Identity, torch.nn.Dropout)) for m in between):
        raise ValueError(f"layer: Linear {layer} and the next one must be separated by ReLU only, found {between}")
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled[first].weight.mul_(alpha)
        if scaled[first].bias is not None:
            scaled[first].bias.mul_(alpha)
        scaled[second].weight.div_(alpha)
    return scaled


def function_of(model, X, *, batch_size=4096):
    """The +-1 labelling a trained binary classifier expresses on X: sign of its single logit (>= 0 -> +1), or
    +1 where class 1 wins for a two-logit model. Evaluated in eval mode. Returns a numpy int array of shape (n,).

    Examples
    --------
    >>> import torch, flatfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    >>> set(flatfast.function_of(model, torch.randn(10, 4)).tolist()) <= {-1, 1}
    True
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    X = torch.as_tensor(X)
    dtype = next(model.parameters()).dtype
    outs = []
    with _eval_mode(model), torch.no_grad():
        for start in range(0, X.shape[0], batch_size):
            outs.append(model(X[start: start + batch_size].to(dtype)))
    out = torch.cat(outs)
    if out.dim() == 1 or out.shape[1] == 1:
        logits = out.reshape(-1)
        return np.where(logits.cpu().numpy() >= 0, 1, -1)
    if out.shape[1] == 2:
        return np.where((out[:, 1] > out[:, 0]).cpu().numpy(), 1, -1)
    raise ValueError(f"model: function_of needs a binary classifier (1 or 2 outputs), got {out.shape[1]} outputs")
