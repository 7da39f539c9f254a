"""The generic curvature path for any model and loss: torch.func forward-over-reverse (H V) and forward-over-
forward (v^T H v), vmapped over the vectors, with double backward where torch.func cannot run."""
from __future__ import annotations

from flatfast._model_util import check_finite


def _batch_loss_of_flat_params(op, x, y):
    """(theta, f) with f(flat) = the batch's summed loss at parameters `flat` (functional_call; frozen parameters
    and buffers held fixed)."""
    from torch.func import functional_call

    frozen = {n: p for n, p in op.model.named_parameters() if not p.requires_grad}
    buffers = dict(op.model.named_buffers())

    def batch_loss(flat):
        out = functional_call(op.model, {**op.unflatten(flat), **frozen, **buffers}, (x,))
        return op.loss_and_targets(out, y) * x.shape[0]

    return op.flat_params(), batch_loss


# What torch.func raises where a module or loss lacks forward-mode AD or vmap support (e.g. mse_loss under
# forward-over-reverse: "ZeroTensors are immutable"). Anything else -- out of memory, a dtype error, a bug in
# the user's loss -- is a real error and propagates.
_TORCH_FUNC_LIMITS = ("ZeroTensors are immutable", "forward AD", "forward-mode", "vmap", "functorch",
                      "Batching rule", "batching rule", "not implemented for", "does not support")
_WARNED_FALLBACK = set()


def _is_torch_func_limit(exc) -> bool:
    return isinstance(exc, NotImplementedError) or any(text in str(exc) for text in _TORCH_FUNC_LIMITS)


def _with_double_backward_fallback(op, functional_path, fallback):
    """Run the torch.func path unless it met one of torch.func's known limits before, and then double
    backward, which is exact too but slower (one backward pass per vector); says so once per kind of model."""
    from flatfast.errors import warn

    if not op._use_double_backward:
        try:
            return functional_path()
        except (RuntimeError, NotImplementedError) as exc:
            if not _is_torch_func_limit(exc):
                raise
            op._use_double_backward = True
            key = (type(op.model).__name__, str(exc).splitlines()[0][:200])
            if key not in _WARNED_FALLBACK:
                _WARNED_FALLBACK.add(key)
                warn(f"flatfast: torch.func cannot differentiate this model/loss twice in forward mode "
                     f"({key[1]}); using double backward, one backward pass per vector",
                     RuntimeWarning)
    return fallback()


def generic_batch(op, x, y, V):
    """sum over the batch of H_i V: jvp of grad (forward-over-reverse) vmapped over the k vectors, or double
    backward."""
    import torch
    from torch.func import grad, jvp, vmap

    theta, batch_loss = _batch_loss_of_flat_params(op, x, y)

    def loss_and_value(flat):
        loss = batch_loss(flat)
        return loss, loss.detach()

    def functional_path():
        grad_fn = grad(loss_and_value, has_aux=True)
        with torch.enable_grad():
            _, hv, loss = vmap(lambda v: jvp(grad_fn, (theta,), (v,), has_aux=True))(V)
        check_finite(loss)
        return hv

    def double_backward():
        with torch.enable_grad():
            flat = theta.clone().requires_grad_(True)
            loss = batch_loss(flat)
            check_finite(loss)
            (g,) = torch.autograd.grad(loss, flat, create_graph=True)
            return torch.stack([torch.autograd.grad(g, flat, grad_outputs=v, retain_graph=True)[0] for v in V])

    return _with_double_backward_fallback(op, functional_path, double_backward)


def generic_quadratic(op, x, y, V):
    """sum over the batch of v^T H_i v = d^2/dt^2 L(theta + t v) at t = 0: jvp of jvp, vmapped over the vectors
    (or v . H v by double backward)."""
    import torch
    from torch.func import jvp, vmap

    theta, batch_loss = _batch_loss_of_flat_params(op, x, y)

    def functional_path():
        def second(v):
            return jvp(lambda th: jvp(batch_loss, (th,), (v,))[1], (theta,), (v,))

        with torch.enable_grad():
            first, curvature = vmap(second)(V)
        check_finite(first)
        return curvature

    return _with_double_backward_fallback(op, functional_path,
                                          lambda: (V * generic_batch(op, x, y, V)).sum(dim=1))
