"""The generic curvature path for any model and loss, by the first of two exact routes that works for the model:

1. ``"double backward"``: per batch, the gradient with its graph (one forward and backward pass), then one
   backward pass through that graph per vector, the graph kept for the batch's vectors -- what PyHessian and
   curvlinops do. Its memory does not grow with the number of vectors.
2. ``"forward-over-reverse"``: torch.func's jvp of grad, vmapped over the vectors, for a model with an operation
   that has no double backward (a custom autograd.Function without one, say).

Both give the same products (to rounding). The operator remembers the route that worked
(``HessianOperator.route``); only torch's own "not implemented" errors move on to the next route, anything else
(out of memory, a dtype error, a bug in the user's loss) propagates. Attention and recurrent layers run on
backends that support both (see :func:`flatfast.models.modes.measuring`).

Why double backward first, measured on 2 cores (seconds per vector, one run each; double backward against
forward-over-reverse): a ResNet-18-shaped CNN with 1.1M parameters 0.36 / 0.48 at 1 vector a call, 0.25 / 0.41 at
8, 0.26 / 0.75 at 32 (vmapping over the vectors holds that many copies of the activations); a ViT with 0.9M
0.30 / 0.39, 0.21 / 0.57, 0.24 / 0.71; a BERT-style encoder with 1.6M 0.34 / 0.38, 0.24 / 0.27, 0.23 / 0.69; at 1
and 16 vectors a call, a 183k-parameter CNN 0.60 / 0.66 and 0.42 / 0.63, a small ResNet with BatchNorm
0.11 / 0.12 and 0.06 / 0.17, a transformer encoder with 46k parameters 0.030 / 0.042 and 0.019 / 0.019. Only a
21k-parameter LSTM at 16 vectors went faster by vmapping (0.016 / 0.009), where every product takes milliseconds.
"""
from __future__ import annotations

import logging

from flatfast.models.passes import check_finite

ROUTES = ("double backward", "forward-over-reverse")
_LOG = logging.getLogger("flatfast")


def _batch_loss_of_flat_params(op, inputs, y):
    """(theta, f) with f(flat) = the batch's summed loss at measured parameters `flat` (functional_call; the other
    parameters and the buffers held fixed)."""
    fixed = op.fixed_tensors()

    def batch_loss(flat):
        out = inputs.functional_call(op.model, {**op.unflatten(flat), **fixed})
        return op.loss_and_targets(out, y) * inputs.size

    return op.flat_params(), batch_loss


# What torch raises where an operation lacks a double backward ("derivative for aten::... is not implemented",
# @once_differentiable), a forward-mode derivative or a vmap batching rule (e.g. mse_loss under
# forward-over-reverse: "ZeroTensors are immutable").
_TORCH_LIMITS = ("ZeroTensors are immutable", "forward AD", "forward-mode", "vmap", "functorch", "Batching rule",
                 "batching rule", "not implemented", "does not support", "differentiate twice")


def _is_torch_limit(exc) -> bool:
    return isinstance(exc, NotImplementedError) or any(text in str(exc) for text in _TORCH_LIMITS)


def _first_route_that_works(op, attempts):
    """Run ``attempts`` ({route: callable}) from the operator's remembered route on; remember the one that ran."""
    first = ROUTES.index(op.route) if op.route is not None else 0
    for route in ROUTES[first:]:
        try:
            result = attempts[route]()
        except (RuntimeError, NotImplementedError) as exc:
            if "once_differentiable" in str(exc):
                # its backward ran without a graph: forward-over-reverse would differentiate it as if constant in
                # the function's inputs, a silently wrong product, so there is no route to take
                raise ValueError("model: an operation's backward is marked @once_differentiable, so torch has no "
                                 "second derivative of it and no Hessian product through it is right; give it a "
                                 "differentiable backward (or a jvp), or measure with params= the parameters "
                                 "after it only") from exc
            if route == ROUTES[-1] or not _is_torch_limit(exc):
                raise
            _LOG.info("flatfast: %s is not available for %s (%s); trying %s", route, type(op.model).__name__,
                      str(exc).splitlines()[0][:200], ROUTES[ROUTES.index(route) + 1])
            continue
        op.route = route
        return result
    raise AssertionError("unreachable")  # pragma: no cover


def _gradient_graph(op, inputs, y):
    """(flat parameters, their gradient with its graph) for one batch: one forward and backward pass, or the
    operator's cached pair (HessianOperator.cached_gradient_graph)."""
    import torch

    def build():
        theta, batch_loss = _batch_loss_of_flat_params(op, inputs, y)
        with torch.enable_grad():
            flat = theta.clone().requires_grad_(True)
            loss = batch_loss(flat)
            check_finite(loss)
            (g,) = torch.autograd.grad(loss, flat, create_graph=True)
        return flat, g

    return op.cached_gradient_graph(inputs, y, build)


def _double_backward(op, inputs, y, V, reduce):
    """reduce(v, H_batch v) for each vector, one backward pass each through the batch's gradient graph."""
    import torch

    flat, g = _gradient_graph(op, inputs, y)
    results = None  # filled row by row: stacking a list would hold every product twice
    for i, v in enumerate(V):
        if g.requires_grad:
            with torch.enable_grad():
                hv = torch.autograd.grad(g, flat, grad_outputs=v, retain_graph=True)[0]
        else:  # the gradient does not depend on the parameters: H = 0
            hv = torch.zeros_like(v)
        reduced = reduce(v, hv)
        del hv
        if results is None:
            results = reduced.new_empty((len(V),) + tuple(reduced.shape))
        results[i] = reduced
    return results


def _forward_over_reverse(op, inputs, y, V):
    import torch
    from torch.func import grad, jvp, vmap

    theta, batch_loss = _batch_loss_of_flat_params(op, inputs, y)

    def loss_and_value(flat):
        loss = batch_loss(flat)
        return loss, loss.detach()

    grad_fn = grad(loss_and_value, has_aux=True)
    with torch.enable_grad():
        _, hv, loss = vmap(lambda v: jvp(grad_fn, (theta,), (v,), has_aux=True))(V)
    check_finite(loss)
    return hv


def generic_batch(op, inputs, y, V):
    """Sum over the batch of H_i V, by the operator's route (see the module docstring)."""
    return _first_route_that_works(op, {
        ROUTES[0]: lambda: _double_backward(op, inputs, y, V, lambda v, hv: hv),
        ROUTES[1]: lambda: _forward_over_reverse(op, inputs, y, V)})


def generic_quadratic(op, inputs, y, V):
    """Sum over the batch of v^T H_i v, as v . (H_i v), each product reduced as it is made (a block of k vectors
    never holds k products).

    Not by a second forward-mode derivative (jvp of jvp), which would skip the double backward: torch 2.13's
    forward-over-forward derivatives of layer_norm (in its input), of batch_norm on batch statistics and of
    instance_norm are wrong -- on a 4 x 5 layer_norm test function jvp of jvp gives +18.08 where finite
    differences and jvp of grad give -15.76 (PyTorch issue 196700 reports the layer_norm case) -- and on a small
    CNN and a transformer encoder it was also slower
    (1.07 s and 0.27 s against 0.67 s and 0.20 s for 16 vectors on 2 cores)."""
    return _first_route_that_works(op, {
        ROUTES[0]: lambda: _double_backward(op, inputs, y, V, lambda v, hv: (v * hv).sum()),
        ROUTES[1]: lambda: (V * _forward_over_reverse(op, inputs, y, V)).sum(dim=1)})
