"""Monte Carlo NNGP kernels of any PyTorch model: the prior covariance of its outputs over random initialisations."""
from __future__ import annotations

import copy
import math

from flatfast._validate import check_float, check_int, memory_guard

_READOUTS = ("penultimate", "output")
# Modules whose parameters the paper's prior re-draws: weights N(0, sigma_w2 / fan_in), biases N(0, sigma_b2).
_DRAWN = ("Linear", "Conv1d", "Conv2d", "Conv3d")
# Modules whose parameters are left as they are (eval-mode BatchNorm is an affine map of fixed statistics).
_KEPT = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d")


class _StopForward(Exception):
    """Raised by the readout hook once the penultimate features are captured: the last layer is not run."""


def empirical_nngp_kernel(model, X, samples=64, *, readout="penultimate", sigma_w2=2.0, sigma_b2=1.0, init=None,
                          batch_size=1024, seed=0, return_stderr=False, progress=None):
    r"""The NNGP kernel of ``model``'s architecture by Monte Carlo over random initialisations.

    .. math::
        \hat K(x, x') = \frac{1}{M}\sum_{m=1}^{M} k_m(x, x'), \qquad
        k_m = \sigma_b^2 + \frac{\sigma_w^2}{d_\phi}\,\phi_m(x)\cdot\phi_m(x') \ \ (\text{readout="penultimate"}),
        \qquad k_m = \frac{1}{C} f_m(x)\cdot f_m(x') \ \ (\text{readout="output"}),

    where draw m re-initialises every Linear and Conv layer from the prior (weights
    :math:`N(0, \sigma_w^2/\text{fan\_in})`, biases :math:`N(0, \sigma_b^2)`: the paper's), :math:`\phi_m` are the
    inputs of the model's last Linear layer (its penultimate features, dimension :math:`d_\phi`) and
    :math:`f_m` its C outputs. The penultimate estimator (the authors') integrates the last layer exactly, so its
    variance is much lower than that of output products. As the width grows and M grows it converges to the
    architecture's NNGP kernel (for a ReLU MLP, :func:`flatfast.nngp_kernel`); the Monte Carlo error of each
    entry falls like 1/sqrt(M) (``return_stderr=True`` estimates it), down to the finite-width bias.

    The model is copied (its own parameters are untouched) and run in eval mode on its device, in its dtype; K
    is accumulated in float64 one draw at a time (one n x n GEMM per draw; the features of all draws are never
    held at once).

    Parameters
    ----------
    model : torch.nn.Module
        Built from Linear/Conv layers and parameter-free or eval-mode modules (BatchNorm keeps its parameters
        and statistics). Parameters of any other module need ``init=``.
    X : torch.Tensor or array_like, shape (n, ...)
        Inputs, shaped as the model takes them.
    samples : int
        Draws M (>= 2).
    readout : {"penultimate", "output"}
    sigma_w2, sigma_b2 : float
        The prior's weight and bias variances (also the last layer's, in the penultimate formula).
    init : callable(model, generator) or None
        Your own initialiser: re-draws the copy's parameters in place from ``generator`` (a torch.Generator).
        With ``init``, the penultimate formula still uses sigma_w2 and sigma_b2 for the last layer.
    batch_size : int
        Inputs per forward pass.
    seed : int
        Seed of the draws: the same seed gives the same K.
    return_stderr : bool
        Also return the Monte Carlo standard error of every entry (float64, n x n; two more n x n arrays).
    progress : bool or None
        A progress bar over the draws (default: when stderr is a terminal).

    Returns
    -------
    K (n, n) float64, or (K, stderr): torch tensors on the model's device when X is a tensor, numpy arrays when
    X is an array (the kind it was given, as :func:`flatfast.nngp_kernel` does).

    Examples
    --------
    >>> import torch, flatfast
    >>> net = torch.nn.Sequential(torch.nn.Linear(5, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
    >>> K = flatfast.empirical_nngp_kernel(net, torch.rand(10, 5), samples=32)   # tensor in, tensor out
    >>> tuple(K.shape), K.dtype
    ((10, 10), torch.float64)
    >>> type(flatfast.empirical_nngp_kernel(net, torch.rand(10, 5).numpy(), samples=32)).__name__
    'ndarray'
    """
    import torch

    from flatfast.hessian import _progress_counter

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    given_tensor = isinstance(X, torch.Tensor)
    samples = check_int(samples, "samples", minimum=2)
    if readout not in _READOUTS:
        raise ValueError(f"readout: expected one of {_READOUTS}, got {readout!r}")
    sigma_w2 = check_float(sigma_w2, "sigma_w2", positive=True)
    sigma_b2 = check_float(sigma_b2, "sigma_b2", nonnegative=True)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    seed = check_int(seed, "seed", minimum=0)
    if init is not None and not callable(init):
        raise TypeError(f"init: expected a callable(model, generator), got {type(init).__name__}")

    net = copy.deepcopy(model).eval()
    params = list(net.parameters())
    device = params[0].device if params else torch.device("cpu")
    dtype = params[0].dtype if params else torch.float32
    X = torch.as_tensor(X)
    if X.ndim < 1 or X.shape[0] == 0:
        raise ValueError(f"X: expected a batch of inputs (n, ...), got shape {tuple(X.shape)}")
    if not X.is_floating_point():
        raise TypeError(f"X: expected floating-point inputs, got {X.dtype}")
    if not bool(torch.isfinite(X).all()):
        raise ValueError("X: contains NaN or infinite values")
    X = X.to(device=device, dtype=dtype)
    n = X.shape[0]
    memory_guard((3 if return_stderr else 1) * 8.0 * n * n,
                 f"empirical_nngp_kernel on n = {n} inputs (n x n float64 accumulators)")
    if init is None:
        _check_prior_covers(net)
    last_linear = _last_linear(net, X[:1]) if readout == "penultimate" else None

    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    total = torch.zeros(n, n, dtype=torch.float64, device=device)
    squares = torch.zeros_like(total) if return_stderr else None
    update, bar = _progress_counter(samples, "flatfast empirical NNGP", progress)
    with torch.no_grad():
        for drawn in range(1, samples + 1):
            if init is None:
                _draw_from_prior(net, generator, sigma_w2, sigma_b2)
            else:
                init(net, generator)
            features = _features(net, X, last_linear, batch_size).to(torch.float64)
            if readout == "penultimate":
                draw = features @ features.T
                draw.mul_(sigma_w2 / features.shape[1]).add_(sigma_b2)
            else:
                draw = (features @ features.T).div_(features.shape[1])
            total += draw
            if squares is not None:
                squares.addcmul_(draw, draw)
            if update is not None:
                update(drawn)
    if bar is not None:
        bar.close()
    K = total / samples
    # the kind it was given: a tensor (on the model's device) for tensor inputs, numpy otherwise
    as_given = (lambda t: t) if given_tensor else (lambda t: t.cpu().numpy())
    if squares is None:
        return as_given(K)
    variance = (squares / samples - K * K).clamp_(min=0.0) * (samples / (samples - 1))
    return as_given(K), as_given((variance / samples).sqrt_())


def _check_prior_covers(net):
    for name, module in net.named_modules():
        own = [p for _, p in module.named_parameters(recurse=False)]
        if own and type(module).__name__ not in _DRAWN + _KEPT:
            raise ValueError(f"model: module {name or '(root)'} ({type(module).__name__}) has parameters the "
                             "prior does not define (only Linear and Conv layers are re-drawn, BatchNorm kept); "
                             "pass init=callable(model, generator) to draw them yourself")


def _draw_from_prior(net, generator, sigma_w2, sigma_b2):
    for module in net.modules():
        if type(module).__name__ in _DRAWN:
            weight = module.weight
            fan_in = weight[0].numel()  # in_features, or in_channels / groups x kernel size
            weight.normal_(0.0, math.sqrt(sigma_w2 / fan_in), generator=generator)
            if module.bias is not None:
                module.bias.normal_(0.0, math.sqrt(sigma_b2), generator=generator)


def _last_linear(net, probe):
    """The last nn.Linear the forward pass runs (not the last one registered: the two can differ)."""
    import torch

    order = []
    handles = [m.register_forward_hook(lambda mod, inp, out: order.append(mod))
               for m in net.modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            _forward(net, probe)
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise ValueError("model: has no nn.Linear layer, so readout='penultimate' has no penultimate features; "
                         "use readout='output'")
    return order[-1]


def _forward(net, x):
    try:
        return net(x)
    except _StopForward:
        raise
    except Exception as exc:  # the model's own error, with the argument it concerns
        raise ValueError(f"X: the model rejected inputs of shape {tuple(x.shape)}: {exc}") from exc


def _features(net, X, last_linear, batch_size):
    """Penultimate features (inputs of the last Linear layer, flattened), or the outputs, for all of X."""
    import torch

    out = []
    for start in range(0, X.shape[0], batch_size):
        chunk = X[start: start + batch_size]
        if last_linear is None:
            out.append(_forward(net, chunk).reshape(chunk.shape[0], -1))
            continue
        captured = []

        def hook(module, inputs):
            captured.append(inputs[0])
            raise _StopForward

        handle = last_linear.register_forward_pre_hook(hook)
        try:
            _forward(net, chunk)
        except _StopForward:
            pass
        finally:
            handle.remove()
        out.append(captured[0].reshape(chunk.shape[0], -1))
    return out[0] if len(out) == 1 else torch.cat(out)

