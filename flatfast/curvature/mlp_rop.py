"""The fast path for nn.Sequential Linear/ReLU models with the default loss: a batched Pearlmutter R-operator
(H V), a second-order forward pass (v^T H v) and the exact trace. Each product is written once over one fused
primitive, ``masked_matmul(A, B, mask, C) = (A @ B + C) * mask``, that the backends provide
(:mod:`flatfast.curvature.masked_matmul`), each registered below with its rank."""
from __future__ import annotations

import functools
from typing import List, Optional

from flatfast.backend import native
from flatfast.backend.dispatch import register
from flatfast.curvature.exact_trace import OutputCurvature
from flatfast.curvature.generic_hvp import generic_batch, generic_quadratic
from flatfast.curvature.masked_matmul import (cpp_masked_matmul, cuda_masked_matmul, torch_masked_matmul,
                                              triton_masked_matmul)
from flatfast.models.passes import check_finite, mean_over_ranks


def _plain(module, kind) -> bool:
    """Exactly ``kind`` (no subclass, which may compute something else), with no hooks or parametrizations,
    which would change the function the R-operator differentiates."""
    from torch.nn.utils import parametrize

    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
             getattr(module, "_backward_pre_hooks", {}))
    return type(module) is kind and not any(hooks) and not parametrize.is_parametrized(module)


def plain_mlp_layers(model, params) -> Optional[List]:
    """The Linear layers of an nn.Sequential([Flatten], Linear, ReLU, ..., Linear) -- exactly those classes, no
    hooks or parametrizations -- whose parameters are all trainable and have biases; None for any other model
    (which then takes the generic path)."""
    import torch.nn as nn

    if not _plain(model, nn.Sequential):
        return None
    modules = list(model)
    if modules and _plain(modules[0], nn.Flatten):
        modules = modules[1:]
    if not modules or len(modules) % 2 == 0:
        return None
    for i, m in enumerate(modules):
        if not _plain(m, nn.Linear if i % 2 == 0 else nn.ReLU):
            return None
    linears = modules[::2]
    if any(l.bias is None for l in linears):
        return None
    expected = [p for l in linears for p in (l.weight, l.bias)]
    if len(expected) != len(params) or any(a is not b for a, (_, b) in zip(expected, params)):
        return None
    return linears


def flat_input(inputs, dtype):
    """The one input tensor of an nn.Sequential MLP, flattened per example, in the parameters' dtype."""
    if inputs.kwargs or len(inputs.args) != 1:
        raise TypeError("loader: an nn.Sequential takes one input tensor per batch; got "
                        f"{len(inputs.args)} positional and {len(inputs.kwargs)} keyword inputs")
    x = inputs.args[0]
    return x.reshape(x.shape[0], -1).to(dtype)


def output_gradient(op, out, y):
    """Check the batch loss, then g = d(summed loss)/d(outputs) and, for cross-entropy, the softmax p (None for
    MSE averaged over the outputs, whose g is 2 (out - y) / C)."""
    import torch

    check_finite(op.loss_and_targets(out, y))
    if op.loss_kind != "mse":  # the default loss or nn.CrossEntropyLoss()
        p = torch.softmax(out, dim=1)
        g = p.clone()
        g[torch.arange(out.shape[0]), y] -= 1.0
        return g, p
    return (2.0 / out.shape[1]) * (out - y), None


def split_directions(layers, V):
    k = V.shape[0]
    VW, Vb = [], []
    offset = 0
    for layer in layers:
        out_f, in_f = layer.weight.shape
        VW.append(V[:, offset: offset + out_f * in_f].view(k, out_f, in_f))
        offset += out_f * in_f
        Vb.append(V[:, offset: offset + out_f])
        offset += out_f
    return VW, Vb


def mlp_rop(op, x, y, V, masked_matmul):
    """Pearlmutter's R-operator through Linear/ReLU layers, batched over the k vectors: an R-forward pass, the
    output-loss curvature, an R-backward pass. ReLU's second derivative is 0 almost everywhere, so this is the
    exact Hessian (as autograd computes it). ``masked_matmul(A, B, mask, C)`` = (A @ B + C) * mask is the one
    fused GEMM-plus-mask primitive the backends (torch, C++, Triton) provide."""
    import torch

    layers = op.linears
    k = V.shape[0]
    VW, Vb = split_directions(layers, V)
    a = flat_input(x, op.dtype)
    acts, r_acts, masks = [a], [None], []
    r_a = None
    for i, layer in enumerate(layers):
        z = torch.addmm(layer.bias, a, layer.weight.T)
        direct = torch.matmul(a, VW[i].transpose(1, 2)) + Vb[i][:, None, :]
        if i < len(layers) - 1:
            mask = z > 0
            r_a = direct * mask if r_a is None else masked_matmul(r_a, layer.weight.T, mask, direct)
            a = z * mask
            acts.append(a)
            r_acts.append(r_a)
            masks.append(mask)
        else:
            out = z
            r_out = direct if r_a is None else direct + torch.matmul(r_a, layer.weight.T)
    g, p = output_gradient(op, out, y)
    if p is not None:  # cross-entropy: H_out = diag(p) - p p^T
        r_g = p * r_out - p * (p * r_out).sum(dim=2, keepdim=True)
    else:  # MSE averaged over the C outputs: H_out = 2/C I
        r_g = (2.0 / out.shape[1]) * r_out
    pieces = [None] * (2 * len(layers))
    for i in range(len(layers) - 1, -1, -1):
        a_prev, r_a_prev = acts[i], r_acts[i]
        hw = torch.matmul(r_g.transpose(1, 2), a_prev)
        if r_a_prev is not None:
            hw += torch.matmul(g.T, r_a_prev)
        pieces[2 * i] = hw.reshape(k, -1)
        pieces[2 * i + 1] = r_g.sum(dim=1)
        if i > 0:
            W = layers[i].weight
            mask = masks[i - 1]
            r_g = masked_matmul(r_g, W, mask, torch.matmul(g, VW[i]))
            g = masked_matmul(g, W, mask)
    return torch.cat(pieces, dim=1)


def mlp_vhv(op, x, y, V, masked_matmul):
    """v^T H v through Linear/ReLU layers by a second-order forward pass (no backward pass): with R and R^2 the
    first and second directional derivatives along v, R^2 z_l = 2 R(a_{l-1}) V_l^T + R^2(a_{l-1}) W_l^T and
    R^2 a_l = mask R^2 z_l (ReLU is piecewise linear); per example d^2 l = R(z)^T H_out R(z) + g_out^T R^2(z)."""
    import torch

    layers = op.linears
    VW, Vb = split_directions(layers, V)
    a = flat_input(x, op.dtype)
    r_a = r2_a = None
    for i, layer in enumerate(layers):
        z = torch.addmm(layer.bias, a, layer.weight.T)
        direct = torch.matmul(a, VW[i].transpose(1, 2)) + Vb[i][:, None, :]
        second = None if r_a is None else 2.0 * torch.matmul(r_a, VW[i].transpose(1, 2))
        if i < len(layers) - 1:
            mask = z > 0
            new_r_a = direct * mask if r_a is None else masked_matmul(r_a, layer.weight.T, mask, direct)
            if second is not None:
                r2_a = second * mask if r2_a is None else masked_matmul(r2_a, layer.weight.T, mask, second)
            r_a = new_r_a
            a = z * mask
        else:
            out = z
            r_out = direct if r_a is None else direct + torch.matmul(r_a, layer.weight.T)
            r2_out = second
            if r2_a is not None:
                r2_out = r2_out + torch.matmul(r2_a, layer.weight.T)
    g, p = output_gradient(op, out, y)
    if p is not None:
        curvature = (p * r_out * r_out).sum(dim=(1, 2)) - ((p * r_out).sum(dim=2) ** 2).sum(dim=1)
    else:
        curvature = (2.0 / out.shape[1]) * (r_out * r_out).sum(dim=(1, 2))
    if r2_out is not None:
        curvature += (g * r2_out).sum(dim=(1, 2))
    return curvature


def mlp_exact_trace(op) -> float:
    """tr H of a Linear/ReLU MLP exactly. Cost: one forward pass plus a backward pass of C vectors per example
    (C = the number of outputs), i.e. about C backward passes; memory C times one backward pass's activations.

    The network is piecewise linear in every single parameter (ReLU masks are locally constant), so each
    diagonal entry of the Hessian equals the Gauss-Newton one: H_jj = sum_i J_ij^T H_out,i J_ij. Factor the output
    curvature H_out = sum_c s_c s_c^T (cross-entropy: s_c = sqrt(p_c) (e_c - p); MSE: sqrt(2/C) e_c) and back-
    propagate the C vectors s_c: with delta_l the back-propagated vectors at layer l's pre-activations,
    tr H_{W_l} = sum_{i,c} |delta_{l,i,c}|^2 |a_{l-1,i}|^2 and tr H_{b_l} = sum_{i,c} |delta_{l,i,c}|^2.
    """
    op.probe()  # a random model is refused before any curvature is taken
    import torch

    layers = op.linears
    total, count = 0.0, 0
    with op.session(), torch.no_grad():
        for inputs, y in op.batches():
            a = flat_input(inputs, op.dtype)
            sq_norms, masks = [(a * a).sum(dim=1)], []
            for i, layer in enumerate(layers):
                z = torch.addmm(layer.bias, a, layer.weight.T)
                if i < len(layers) - 1:
                    mask = z > 0
                    a = z * mask
                    masks.append(mask)
                    sq_norms.append((a * a).sum(dim=1))
            check_finite(op.loss_and_targets(z, y))
            curvature = OutputCurvature(op, op.loss_kind, z, y)  # cross-entropy or MSE: all signs +1
            factors, _ = curvature.rows(curvature.state, 0, curvature.count)  # (B, C, C)
            delta = factors.transpose(0, 1)  # (C, B, C): the C factor vectors back-propagated together
            for i in range(len(layers) - 1, -1, -1):
                per_example = (delta * delta).sum(dim=(0, 2))  # sum over c of |delta_{i,c}|^2
                total += float(((sq_norms[i] + 1.0) * per_example).sum())
                if i > 0:
                    delta = torch.matmul(delta, layers[i].weight) * masks[i - 1]
            count += inputs.size
    return mean_over_ranks(total, count, op.device)


# --- the backends of mlp_hvp (H V) and mlp_vhv (v^T H v): one R-operator pass over each masked matmul ----------
# On one H100 80GB (bench/bench_gpu.py, 2026-11-27, two runs), one HVP of an MLP 784-512-512-10 on 20,000 inputs
# cost 1.75-2.30x a forward+backward with torch (cuBLAS), 1.67-2.20x with Triton (4-5 % less), 2.52-2.82x with the
# CUDA C++ kernel: cuBLAS stays first on CUDA, the one path any torch has. On the CPU the C++ fused GEMM measured
# equal to torch, so it is selectable but not preferred.
_MASKED_MATMULS = [  # name, implementation, devices, rank, probe, where "auto" may pick it
    ("torch", torch_masked_matmul, ("cpu", "cuda"), 10, None, None),
    ("triton", triton_masked_matmul, native.triton_devices(), 8, native.triton_unavailable, ("cuda",)),
    ("cuda", cuda_masked_matmul, ("cuda",), 7, native.cuda_unavailable, None),
    ("cpp", cpp_masked_matmul, ("cpu",), 5, native.cpp_unavailable, None),
]
for _name, _matmul, _devices, _rank, _probe, _auto in _MASKED_MATMULS:
    for _op, _pass in (("mlp_hvp", mlp_rop), ("mlp_vhv", mlp_vhv)):
        register(_op, _name, functools.partial(_pass, masked_matmul=_matmul), devices=_devices, priority=_rank,
                 probe=_probe or (lambda: None), auto_devices=_auto)
register("mlp_hvp", "reference", generic_batch, devices=("cpu", "cuda"), priority=0, reference=True)
register("mlp_vhv", "reference", generic_quadratic, devices=("cpu", "cuda"), priority=0, reference=True)
