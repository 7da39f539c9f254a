"""The generic curvature path for any model and loss, by the fastest of three exact routes that works for the model:

1. ``"forward-over-reverse"``: torch.func's jvp of grad, vmapped over the vectors -- one pass for all of them;
2. ``"double backward, batched"``: the gradient with its graph, then one vmapped backward pass for all vectors
   (``torch.autograd.grad(..., is_grads_batched=True)``), for models with an operation that has no forward-mode
   derivative;
3. ``"double backward"``: the same, one backward pass per vector, for an operation that vmap cannot batch either.

Each gives the same products (to rounding); they differ in speed only. The first product tries them in that order
and the operator remembers the route that worked (``HessianOperator.route``); only torch's own "not implemented"
errors move on to the next route, anything else (out of memory, a dtype error, a bug in the user's loss)
propagates. Attention and recurrent layers run on backends that support the first route (see
:func:`flatfast._model_util.measuring`), so it is the one taken for transformers, LSTMs and GRUs.
"""
from __future__ import annotations

import logging

from flatfast._model_util import check_finite

ROUTES = ("forward-over-reverse", "double backward, batched", "double backward")
_LOG = logging.getLogger("flatfast")


def _batch_loss_of_flat_params(op, inputs, y):
    """(theta, f) with f(flat) = the batch's summed loss at measured parameters `flat` (functional_call; the other
    parameters and the buffers held fixed)."""
    fixed = op.fixed_tensors()

    def batch_loss(flat):
        out = inputs.functional_call(op.model, {**op.unflatten(flat), **fixed})
        return op.loss_and_targets(out, y) * inputs.size

    return op.flat_params(), batch_loss


# What torch raises where an operation lacks a forward-mode derivative or a vmap batching rule (e.g. mse_loss under
# forward-over-reverse: "ZeroTensors are immutable").
_TORCH_LIMITS = ("ZeroTensors are immutable", "forward AD", "forward-mode", "vmap", "functorch",
                 "Batching rule", "batching rule", "not implemented for", "does not support", "is_grads_batched")


def _is_torch_limit(exc) -> bool:
    return isinstance(exc, NotImplementedError) or any(text in str(exc) for text in _TORCH_LIMITS)


def _first_route_that_works(op, attempts):
    """Run ``attempts`` ({route: callable}) from the operator's remembered route on; remember the one that ran."""
    first = ROUTES.index(op.route) if op.route is not None else 0
    for route in ROUTES[first:]:
        try:
            result = attempts[route]()
        except (RuntimeError, NotImplementedError) as exc:
            if route == ROUTES[-1] or not _is_torch_limit(exc):
                raise
            _LOG.info("flatfast: %s is not available for %s (%s); trying %s", route, type(op.model).__name__,
                      str(exc).splitlines()[0][:200], ROUTES[ROUTES.index(route) + 1])
            continue
        op.route = route
        return result
    raise AssertionError("unreachable")  # pragma: no cover


def _double_backward(op, batch_loss, theta, V, batched):
    import torch

    with torch.enable_grad():
        flat = theta.clone().requires_grad_(True)
        loss = batch_loss(flat)
        check_finite(loss)
        (g,) = torch.autograd.grad(loss, flat, create_graph=True)
        if batched:
            return torch.autograd.grad(g, flat, grad_outputs=V, is_grads_batched=True)[0]
        return torch.stack([torch.autograd.grad(g, flat, grad_outputs=v, retain_graph=True)[0] for v in V])


def generic_batch(op, inputs, y, V):
    """Sum over the batch of H_i V, by the operator's route (see the module docstring)."""
    import torch
    from torch.func import grad, jvp, vmap

    theta, batch_loss = _batch_loss_of_flat_params(op, inputs, y)

    def forward_over_reverse():
        def loss_and_value(flat):
            loss = batch_loss(flat)
            return loss, loss.detach()

        grad_fn = grad(loss_and_value, has_aux=True)
        with torch.enable_grad():
            _, hv, loss = vmap(lambda v: jvp(grad_fn, (theta,), (v,), has_aux=True))(V)
        check_finite(loss)
        return hv

    return _first_route_that_works(op, {
        ROUTES[0]: forward_over_reverse,
        ROUTES[1]: lambda: _double_backward(op, batch_loss, theta, V, batched=True),
        ROUTES[2]: lambda: _double_backward(op, batch_loss, theta, V, batched=False)})


def generic_quadratic(op, inputs, y, V):
    """Sum over the batch of v^T H_i v, as v . (H_i v) from :func:`generic_batch`.

    Not by a second forward-mode derivative (jvp of jvp), which would skip the backward pass: torch 2.13's
    forward-over-forward derivatives of layer_norm (in its input), of batch_norm on batch statistics and of
    instance_norm are wrong -- on a 4 x 5 layer_norm test function jvp of jvp gives +18.08 where finite
    differences and jvp of grad give -15.76 -- and on a small CNN and a transformer encoder it was also slower
    (1.07 s and 0.27 s against 0.67 s and 0.20 s for 16 vectors on 2 cores)."""
    return (V * generic_batch(op, inputs, y, V)).sum(dim=1)
