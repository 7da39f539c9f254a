"""Curvature of the dataset-mean loss of any PyTorch model.

Convention (the one PyHessian uses): L(theta) = (1/N) sum_i l(f_theta(x_i), y_i), the mean over all N
examples the loader yields. A ``loss_fn(outputs, targets)`` must return the *batch mean* of the per-example
losses (as ``nn.CrossEntropyLoss()`` does); each batch is weighted by its size, so a short last batch counts
correctly. The default loss is cross-entropy for integer targets and mean squared error (averaged over output
dimensions) for floating targets. The model is evaluated in eval mode (BatchNorm running statistics, no
dropout) and its modes are restored afterwards; parameters with requires_grad=False are left out. Under
torch.distributed each rank passes its own shard of the data and the products are all-reduced.
"""
from __future__ import annotations

import contextlib
import sys
from typing import List, Optional

import numpy as np

from flatfast._dispatch import dispatch, register
from flatfast._validate import check_float, check_int
from flatfast.estimators import (EigenResult, SpectrumResult, TraceResult, hutchinson, hutchpp,
                                 lanczos_eigenvalues, slq)


# --- the operator ----------------------------------------------------------------------------------------

class HessianOperator:
    """H V for blocks of vectors, one pass over the data per block (shared forward pass and data loading)."""

    def __init__(self, model, loader, loss_fn=None, *, backend="auto", progress=None):
        import torch

        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.model, self.loader, self.user_loss = model, loader, loss_fn
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError("loss_fn: expected a callable loss_fn(outputs, targets) returning the batch mean")
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model: has no trainable parameters (every parameter has requires_grad=False)")
        first = self.params[0][1]
        self.dtype, self.device = first.dtype, first.device
        self.sizes = [p.numel() for _, p in self.params]
        self.shapes = [p.shape for _, p in self.params]
        self.dimension = int(sum(self.sizes))
        self.progress = progress
        self.linears = _plain_mlp_layers(model, self.params) if loss_fn is None else None
        want = backend or "auto"
        if want == "generic" or (self.linears is None and want == "auto"):
            want = "reference"
        elif self.linears is None:
            raise ValueError(f"backend: {want!r} is the fast path for nn.Sequential Linear/ReLU models with the "
                             "default loss; this model or loss is not one (use backend='auto' or 'generic')")
        self.impl = dispatch("mlp_hvp", want, self.device.type)
        self.quadratic_impl = dispatch("mlp_vhv", want, self.device.type)
        self.backend = self.impl.name
        self._use_double_backward = False

    # the data ---------------------------------------------------------------------------------------
    def batches(self):
        count = 0
        iterator = self.loader
        if self.progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc="flatfast H.V", leave=False, file=sys.stderr)
        for batch in iterator:
            if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                raise TypeError("loader: each batch must be an (inputs, targets) pair")
            x, y = batch[0], batch[1]
            yield x.to(self.device), y.to(self.device)
            count += 1
        if count == 0:
            raise ValueError("loader: yielded no batches")

    def loss_and_targets(self, outputs, targets):
        """The batch-mean loss, after checking that targets fit outputs (no silent broadcasting)."""
        import torch.nn.functional as F

        if self.user_loss is not None:
            return self.user_loss(outputs, targets)
        if not targets.is_floating_point():
            if outputs.dim() != 2 or targets.shape != outputs.shape[:1]:
                raise ValueError(f"loader: integer targets of shape {tuple(targets.shape)} do not match outputs of "
                                 f"shape {tuple(outputs.shape)} (cross-entropy needs (B,) class indices for (B, C))")
            return F.cross_entropy(outputs, targets)
        if targets.shape != outputs.shape:
            raise ValueError(f"loader: targets of shape {tuple(targets.shape)} do not match outputs of shape "
                             f"{tuple(outputs.shape)} (mean squared error)")
        return F.mse_loss(outputs, targets)

    def flat_params(self):
        import torch

        return torch.cat([p.detach().reshape(-1) for _, p in self.params])

    def unflatten(self, flat):
        return {n: t.view(s) for (n, _), t, s in zip(self.params, flat.split(self.sizes, dim=-1), self.shapes)}

    # products ---------------------------------------------------------------------------------------
    def matmat(self, V):
        """H V for V of shape (k, P) (or (P,)), in the model's dtype."""
        squeeze = V.dim() == 1
        result = self._accumulate(self.impl.fn, V[None] if squeeze else V, per_vector_shape=True)
        return result[0] if squeeze else result

    def quadratic(self, V):
        """v^T H v for each row v of V (k, P): a second directional derivative, forward-over-forward, about half
        the work of H v."""
        return self._accumulate(self.quadratic_impl.fn, V, per_vector_shape=False)

    def _accumulate(self, fn, V, per_vector_shape):
        import torch

        V = V.to(device=self.device, dtype=self.dtype)
        if V.dim() != 2 or V.shape[-1] != self.dimension:
            raise ValueError(f"vectors: expected {self.dimension} entries per vector (the trainable parameters), "
                             f"got shape {tuple(V.shape)}")
        total = torch.zeros_like(V) if per_vector_shape else torch.zeros(V.shape[0], dtype=self.dtype,
                                                                          device=self.device)
        count = 0
        with _eval_mode(self.model), torch.no_grad():
            for x, y in self.batches():
                total += fn(self, x, y, V)
                count += int(x.shape[0])
        if _distributed():
            import torch.distributed as dist

            n = torch.tensor([count], dtype=torch.float64, device=total.device)
            dist.all_reduce(total)
            dist.all_reduce(n)
            count = int(n.item())
        return total / count


def _distributed():
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return False
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _eval_mode(model):
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _check_finite(loss):
    import torch

    if not bool(torch.isfinite(loss).all()):
        raise FloatingPointError("loss: is NaN or infinite on a batch; the Hessian is undefined there")


# --- the generic path: torch.func forward-over-reverse, vmapped over the vectors ---------------------------

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


def _with_double_backward_fallback(op, functional_path, fallback):
    """Run the torch.func path unless it failed before; some modules and losses lack forward-mode or vmap
    support in torch.func, and double backward is exact too (any genuine error surfaces there)."""
    if not op._use_double_backward:
        try:
            return functional_path()
        except (RuntimeError, NotImplementedError):
            op._use_double_backward = True
    return fallback()


def _generic_batch(op, x, y, V):
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
        _check_finite(loss)
        return hv

    def double_backward():
        with torch.enable_grad():
            flat = theta.clone().requires_grad_(True)
            loss = batch_loss(flat)
            _check_finite(loss)
            (g,) = torch.autograd.grad(loss, flat, create_graph=True)
            return torch.stack([torch.autograd.grad(g, flat, grad_outputs=v, retain_graph=True)[0] for v in V])

    return _with_double_backward_fallback(op, functional_path, double_backward)


register("mlp_hvp", "reference", devices=("cpu", "cuda"), priority=0, reference=True)(_generic_batch)


def _generic_quadratic(op, x, y, V):
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
        _check_finite(first)
        return curvature

    return _with_double_backward_fallback(op, functional_path,
                                          lambda: (V * _generic_batch(op, x, y, V)).sum(dim=1))


register("mlp_vhv", "reference", devices=("cpu", "cuda"), priority=0, reference=True)(_generic_quadratic)


# --- the fast path: nn.Sequential of Linear and ReLU, batched R-operator -----------------------------------

def _plain_mlp_layers(model, params) -> Optional[List]:
    """The Linear layers of an nn.Sequential([Flatten], Linear, ReLU, ..., Linear) whose parameters are all
    trainable and have biases; None for any other model."""
    import torch.nn as nn

    if not isinstance(model, nn.Sequential):
        return None
    modules = list(model)
    if modules and isinstance(modules[0], nn.Flatten):
        modules = modules[1:]
    if not modules or len(modules) % 2 == 0:
        return None
    for i, m in enumerate(modules):
        if isinstance(m, nn.Linear) != (i % 2 == 0) or (i % 2 == 1 and not isinstance(m, nn.ReLU)):
            return None
    linears = modules[::2]
    if any(l.bias is None for l in linears):
        return None
    expected = [p for l in linears for p in (l.weight, l.bias)]
    if len(expected) != len(params) or any(a is not b for a, (_, b) in zip(expected, params)):
        return None
    return linears


def _torch_masked_matmul(A, B, mask, C=None):
    """(A @ B + C) * mask with torch ops; A may carry a leading batch dimension, mask broadcasts over it."""
    import torch

    out = torch.matmul(A, B)
    if C is not None:
        out += C
    return out * mask


def _output_gradient(op, out, y):
    """Check the batch loss, then g = d(summed loss)/d(outputs) and, for cross-entropy, the softmax p (None for
    MSE averaged over the outputs, whose g is 2 (out - y) / C)."""
    import torch

    _check_finite(op.loss_and_targets(out, y))
    if not y.is_floating_point():
        p = torch.softmax(out, dim=1)
        g = p.clone()
        g[torch.arange(out.shape[0]), y] -= 1.0
        return g, p
    return (2.0 / out.shape[1]) * (out - y), None


def _mlp_rop(op, x, y, V, masked_matmul):
    """Pearlmutter's R-operator through Linear/ReLU layers, batched over the k vectors: an R-forward pass, the
    output-loss curvature, an R-backward pass. ReLU's second derivative is 0 almost everywhere, so this is the
    exact Hessian (as autograd computes it). ``masked_matmul(A, B, mask, C)`` = (A @ B + C) * mask is the one
    fused GEMM-plus-mask primitive the backends (torch, C++, Triton) provide."""
    import torch

    layers = op.linears
    k = V.shape[0]
    VW, Vb = _split_directions(layers, V)
    a = x.reshape(x.shape[0], -1).to(op.dtype)
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
    g, p = _output_gradient(op, out, y)
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


def _mlp_rop_torch(op, x, y, V):
    return _mlp_rop(op, x, y, V, _torch_masked_matmul)


register("mlp_hvp", "torch", devices=("cpu", "cuda"), priority=10)(_mlp_rop_torch)


def _probe_cpp():
    from flatfast import _native

    return _native.load_cpp()[1]


def _cpp_masked_matmul(A, B, mask, C=None):
    """(A @ B + C) * mask by the C++ kernel on numpy views of the CPU tensors (no copies for contiguous ones)."""
    import torch

    from flatfast import _native

    module = _native.load_cpp()[0]
    lead, (R, K), N = A.shape[:-2], A.shape[-2:], B.shape[1]
    if B.T.is_contiguous():  # a transposed weight, W.T: hand over W itself
        b, transposed = B.T.numpy(), True
    else:
        b, transposed = B.contiguous().numpy(), False
    a = A.reshape(-1, K).contiguous().numpy()
    c = None if C is None else C.reshape(-1, N).contiguous().numpy()
    fn = module.masked_matmul_f64 if A.dtype == torch.float64 else module.masked_matmul_f32
    keep = mask.contiguous().view(torch.uint8).numpy()
    if a.shape[0] * N * K >= 2_000_000:
        with _native.single_threaded_blas():
            out = fn(a, b, transposed, keep, c)
    else:
        out = fn(a, b, transposed, keep, c)
    return torch.from_numpy(out).reshape(*lead, R, N)


def _mlp_rop_cpp(op, x, y, V):
    return _mlp_rop(op, x, y, V, _cpp_masked_matmul)


register("mlp_hvp", "cpp", devices=("cpu",), priority=5, probe=_probe_cpp)(_mlp_rop_cpp)


def _probe_cuda():
    from flatfast import _native

    return _native.load_cuda()[1]


def _cuda_masked_matmul(A, B, mask, C=None):
    """(A @ B + C) * mask by the CUDA C++ kernel on the tensors' device memory."""
    import torch

    from flatfast import _native

    module = _native.load_cuda()[0]
    lead, (R, K), N = A.shape[:-2], A.shape[-2:], B.shape[1]
    if B.T.is_contiguous():
        b, transposed = B.T, True
    else:
        b, transposed = B.contiguous(), False
    a = A.reshape(-1, K).contiguous()
    c = None if C is None else C.reshape(-1, N).contiguous()
    keep = mask.contiguous().view(torch.uint8)
    out = torch.empty((a.shape[0], N), dtype=A.dtype, device=A.device)
    module.masked_matmul(a.data_ptr(), a.shape[0], K, b.data_ptr(), N, transposed, keep.data_ptr(), R,
                         0 if c is None else c.data_ptr(), out.data_ptr(), A.dtype == torch.float64,
                         torch.cuda.current_stream(A.device).cuda_stream)
    return out.reshape(*lead, R, N)


def _mlp_rop_cuda(op, x, y, V):
    return _mlp_rop(op, x, y, V, _cuda_masked_matmul)


def _mlp_vhv_cuda(op, x, y, V):
    return _mlp_vhv(op, x, y, V, _cuda_masked_matmul)


register("mlp_hvp", "cuda", devices=("cuda",), priority=25, probe=_probe_cuda)(_mlp_rop_cuda)
register("mlp_vhv", "cuda", devices=("cuda",), priority=25, probe=_probe_cuda)(_mlp_vhv_cuda)


def _probe_triton():
    from flatfast.nngp import _probe_triton as probe

    return probe()


def _triton_masked_matmul(A, B, mask, C=None):
    from flatfast import _native

    if A.device.type == "cpu" and not _native.triton_interpreted():
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    return _native.load_triton()[0].masked_matmul_triton(A, B, mask, C)


def _mlp_rop_triton(op, x, y, V):
    return _mlp_rop(op, x, y, V, _triton_masked_matmul)


register("mlp_hvp", "triton", devices=("cuda", "cpu"), priority=20, probe=_probe_triton,
          auto_devices=("cuda",))(_mlp_rop_triton)


def _split_directions(layers, V):
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


def _mlp_vhv(op, x, y, V, masked_matmul):
    """v^T H v through Linear/ReLU layers by a second-order forward pass (no backward pass): with R and R^2 the
    first and second directional derivatives along v, R^2 z_l = 2 R(a_{l-1}) V_l^T + R^2(a_{l-1}) W_l^T and
    R^2 a_l = mask R^2 z_l (ReLU is piecewise linear); per example d^2 l = R(z)^T H_out R(z) + g_out^T R^2(z)."""
    import torch

    layers = op.linears
    VW, Vb = _split_directions(layers, V)
    a = x.reshape(x.shape[0], -1).to(op.dtype)
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
    g, p = _output_gradient(op, out, y)
    if p is not None:
        curvature = (p * r_out * r_out).sum(dim=(1, 2)) - ((p * r_out).sum(dim=2) ** 2).sum(dim=1)
    else:
        curvature = (2.0 / out.shape[1]) * (r_out * r_out).sum(dim=(1, 2))
    if r2_out is not None:
        curvature += (g * r2_out).sum(dim=(1, 2))
    return curvature


def _mlp_vhv_torch(op, x, y, V):
    return _mlp_vhv(op, x, y, V, _torch_masked_matmul)


register("mlp_vhv", "torch", devices=("cpu", "cuda"), priority=10)(_mlp_vhv_torch)


def _mlp_vhv_cpp(op, x, y, V):
    return _mlp_vhv(op, x, y, V, _cpp_masked_matmul)


register("mlp_vhv", "cpp", devices=("cpu",), priority=5, probe=_probe_cpp)(_mlp_vhv_cpp)


def _mlp_vhv_triton(op, x, y, V):
    return _mlp_vhv(op, x, y, V, _triton_masked_matmul)


register("mlp_vhv", "triton", devices=("cuda", "cpu"), priority=20, probe=_probe_triton,
          auto_devices=("cuda",))(_mlp_vhv_triton)


def _mlp_exact_trace(op) -> float:
    """tr H of a Linear/ReLU MLP exactly, in about two forward+backward passes' worth of work.

    The network is piecewise linear in every single parameter (ReLU masks are locally constant), so each
    diagonal entry of the Hessian equals the Gauss-Newton one: H_jj = sum_i J_ij^T H_out,i J_ij. Factor the output
    curvature H_out = sum_c s_c s_c^T (cross-entropy: s_c = sqrt(p_c) (e_c - p); MSE: sqrt(2/C) e_c) and back-
    propagate the C vectors s_c: with delta_l the back-propagated vectors at layer l's pre-activations,
    tr H_{W_l} = sum_{i,c} |delta_{l,i,c}|^2 |a_{l-1,i}|^2 and tr H_{b_l} = sum_{i,c} |delta_{l,i,c}|^2.
    """
    import torch

    layers = op.linears
    total, count = 0.0, 0
    with _eval_mode(op.model), torch.no_grad():
        for x, y in op.batches():
            a = x.reshape(x.shape[0], -1).to(op.dtype)
            sq_norms, masks = [(a * a).sum(dim=1)], []
            for i, layer in enumerate(layers):
                z = torch.addmm(layer.bias, a, layer.weight.T)
                if i < len(layers) - 1:
                    mask = z > 0
                    a = z * mask
                    masks.append(mask)
                    sq_norms.append((a * a).sum(dim=1))
            _check_finite(op.loss_and_targets(z, y))
            classes = z.shape[1]
            if not y.is_floating_point():
                p = torch.softmax(z, dim=1)
                eye = torch.eye(classes, dtype=op.dtype, device=z.device)
                delta = torch.sqrt(p).T[:, :, None] * (eye[:, None, :] - p[None, :, :])  # (C, B, C)
            else:
                eye = torch.eye(classes, dtype=op.dtype, device=z.device)
                delta = (2.0 / classes) ** 0.5 * eye[:, None, :].expand(classes, z.shape[0], classes)
            for i in range(len(layers) - 1, -1, -1):
                per_example = (delta * delta).sum(dim=(0, 2))  # sum over c of |delta_{i,c}|^2
                total += float(((sq_norms[i] + 1.0) * per_example).sum())
                if i > 0:
                    delta = torch.matmul(delta, layers[i].weight) * masks[i - 1]
            count += int(x.shape[0])
    if _distributed():
        import torch.distributed as dist

        buf = torch.tensor([total, float(count)], dtype=torch.float64, device=op.device)
        dist.all_reduce(buf)
        total, count = float(buf[0]), int(buf[1])
    return total / count


# --- public API ------------------------------------------------------------------------------------------

def _as_matrix(op, vectors):
    import torch

    if isinstance(vectors, (list, tuple)):
        if len(vectors) != len(op.params):
            raise ValueError(f"vectors: a list must hold one tensor per trainable parameter ({len(op.params)}), "
                             f"got {len(vectors)}")
        for v, (name, p) in zip(vectors, op.params):
            if tuple(v.shape) != tuple(p.shape):
                raise ValueError(f"vectors: the entry for {name} has shape {tuple(v.shape)}, expected {tuple(p.shape)}")
        return torch.cat([v.reshape(-1) for v in vectors])[None], "list"
    if not isinstance(vectors, torch.Tensor):
        raise TypeError("vectors: expected a (k, P) tensor or a list of parameter-shaped tensors")
    if vectors.dim() == 1:
        return vectors[None], "vector"
    if vectors.dim() != 2:
        raise ValueError(f"vectors: expected a (k, P) tensor, got shape {tuple(vectors.shape)}")
    return vectors, "matrix"


def hvp(model, loader, vectors, loss_fn=None, *, backend="auto", progress=False):
    r"""Hessian-vector products of the dataset-mean loss :math:`L(\theta) = \frac1N\sum_i \ell(f_\theta(x_i), y_i)`.

    All k products come from ONE pass over the data: the forward pass and the data loading are shared and the k
    products are batched (vmap of forward-over-reverse AD; for nn.Sequential Linear/ReLU models with the default
    loss, a batched R-operator).

    Parameters
    ----------
    model : torch.nn.Module
        Evaluated in eval mode; its modes are restored afterwards and its parameters never change.
    loader : iterable of (inputs, targets)
        A DataLoader or any iterable of batches.
    vectors : torch.Tensor (k, P) or (P,), or a list of parameter-shaped tensors (one vector)
        Directions in the space of the trainable parameters, in ``model.named_parameters()`` order.
    loss_fn : callable, optional
        ``loss_fn(outputs, targets)`` returning the batch mean; default cross-entropy (integer targets) or MSE.
    backend : {"auto", "generic", "torch"}
        "auto" takes the R-operator fast path when the model is a plain Linear/ReLU MLP with the default loss.
    progress : bool
        Show a progress bar over the batches.

    Returns
    -------
    H V in the same layout as ``vectors``.

    Examples
    --------
    >>> import torch, flatfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
    >>> P = sum(p.numel() for p in model.parameters())
    >>> flatfast.hvp(model, data, torch.randn(2, P)).shape
    torch.Size([2, 67])
    """
    op = HessianOperator(model, loader, loss_fn, backend=backend, progress=progress)
    V, layout = _as_matrix(op, vectors)
    HV = op.matmat(V)
    if layout == "list":
        return [t.view(s) for t, s in zip(HV[0].split(op.sizes), op.shapes)]
    return HV[0] if layout == "vector" else HV


def _progress_counter(total, desc, enabled):
    if not (enabled if enabled is not None else sys.stderr.isatty()):
        return None, None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)
    state = {"n": 0}

    def update(n):
        bar.update(n - state["n"])
        state["n"] = n

    return update, bar


def hessian_trace(model, loader, loss_fn=None, *, probes=None, rtol=0.01, method="hutch++", seed=0, block=16,
                  max_probes=2000, backend="auto", progress=None) -> TraceResult:
    r"""Trace of the Hessian of the dataset-mean loss (see :func:`hvp` for the convention), with its standard error.

    ``method="hutch++"`` (default) sketches the top of the spectrum exactly and runs Hutchinson on the rest;
    ``method="hutchinson"`` is plain Hutchinson with Rademacher probes, :math:`\mathrm{tr} H \approx
    \frac1m\sum_j v_j^\top H v_j` (each :math:`v^\top H v` a second directional derivative). Probes are drawn
    in blocks of ``block`` (one data pass per block). Stops when ``stderr <= rtol * |value|``, or after exactly
    ``probes`` operator products when given. ``method="exact"`` (nn.Sequential Linear/ReLU models with the default
    loss only) is the exact trace with zero standard error in about two forward+backward passes: such a network
    is piecewise linear in each single parameter, so the Hessian's diagonal is the Gauss-Newton diagonal.

    Returns
    -------
    TraceResult with ``.value``, ``.stderr``, ``.probes``.

    Examples
    --------
    >>> import torch, flatfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(64, 4), torch.randint(0, 3, (64,)))]
    >>> res = flatfast.hessian_trace(model, data, probes=64, method="hutchinson")
    >>> res.probes
    64
    """
    if method not in ("hutch++", "hutchinson", "exact"):
        raise ValueError(f"method: expected 'hutch++', 'hutchinson' or 'exact', got {method!r}")
    if probes is not None:
        probes = check_int(probes, "probes", minimum=3 if method == "hutch++" else 2)
    rtol = check_float(rtol, "rtol", positive=True)
    seed = check_int(seed, "seed", minimum=0)
    block = check_int(block, "block", minimum=1)
    op = HessianOperator(model, loader, loss_fn, backend=backend)
    if method == "exact":
        if op.linears is None:
            raise ValueError("method: 'exact' needs an nn.Sequential of Linear and ReLU layers with the default loss")
        return TraceResult(_mlp_exact_trace(op), 0.0, 0, "exact")
    update, bar = _progress_counter(probes or max_probes, f"flatfast trace ({method})", progress)
    estimator = hutchpp if method == "hutch++" else hutchinson
    try:
        return estimator(op.matmat, op.dimension, quadratic=op.quadratic, probes=probes, rtol=rtol, seed=seed, block=block,
                         max_probes=max_probes, dtype=op.dtype, device=op.device, progress=update)
    finally:
        if bar is not None:
            bar.close()


def hessian_eigenvalues(model, loader, k=1, loss_fn=None, *, max_iter=None, tol=1e-6, seed=0, backend="auto",
                        return_vectors=False) -> EigenResult:
    """Top-k eigenvalues (largest first) of the Hessian of the dataset-mean loss by Lanczos with full
    reorthogonalisation; ``.residuals`` holds |H u - theta u| of each Ritz pair (one data pass per iteration).

    Examples
    --------
    >>> import torch, flatfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(64, 4), torch.randint(0, 3, (64,)))]
    >>> flatfast.hessian_eigenvalues(model, data, k=2).values.shape
    (2,)
    """
    k = check_int(k, "k", minimum=1)
    op = HessianOperator(model, loader, loss_fn, backend=backend)
    if k > op.dimension:
        raise ValueError(f"k: asks for {k} eigenvalues of a {op.dimension}-dimensional Hessian")
    return lanczos_eigenvalues(op.matmat, op.dimension, k=k, max_iter=max_iter, tol=tol, seed=seed, dtype=op.dtype,
                               device=op.device, keep_vectors=return_vectors)


def hessian_spectrum(model, loader, loss_fn=None, *, probes=4, iterations=64, seed=0, sigma=None, grid_size=1000,
                     backend="auto") -> SpectrumResult:
    """Spectral density of the Hessian of the dataset-mean loss by stochastic Lanczos quadrature: nodes and
    weights per probe and a Gaussian-smoothed density on a grid (``result.plot()``). The probes' Lanczos runs
    advance together, one data pass per iteration.

    Examples
    --------
    >>> import torch, flatfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(64, 4), torch.randint(0, 3, (64,)))]
    >>> spec = flatfast.hessian_spectrum(model, data, probes=2, iterations=10)
    >>> spec.nodes.shape
    (2, 10)
    """
    probes = check_int(probes, "probes", minimum=1)
    iterations = check_int(iterations, "iterations", minimum=1)
    op = HessianOperator(model, loader, loss_fn, backend=backend)
    return slq(op.matmat, op.dimension, probes=probes, iterations=iterations, seed=seed, sigma=sigma,
               grid_size=grid_size, dtype=op.dtype, device=op.device)


def hessian_operator(model, loader, loss_fn=None, *, backend="auto"):
    """The Hessian of the dataset-mean loss as a ``scipy.sparse.linalg.LinearOperator`` (matvec and matmat on
    numpy arrays; one data pass per call), for scipy's eigsh, cg, etc.

    Examples
    --------
    >>> import torch, flatfast
    >>> from scipy.sparse.linalg import eigsh
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).double()
    >>> data = [(torch.randn(64, 4, dtype=torch.float64), torch.randint(0, 3, (64,)))]
    >>> H = flatfast.hessian_operator(model, data)
    >>> eigsh(H, k=1, which="LA", return_eigenvectors=False).shape
    (1,)
    """
    import torch
    from scipy.sparse.linalg import LinearOperator

    op = HessianOperator(model, loader, loss_fn, backend=backend)
    np_dtype = np.float64 if op.dtype == torch.float64 else np.float32

    def matmat(M):
        M = np.asarray(M)
        V = torch.from_numpy(np.ascontiguousarray(M.T, dtype=np_dtype))
        return op.matmat(V).cpu().numpy().T

    return LinearOperator((op.dimension, op.dimension), matvec=lambda v: matmat(np.reshape(v, (-1, 1)))[:, 0],
                          matmat=matmat, rmatvec=lambda v: matmat(np.reshape(v, (-1, 1)))[:, 0], dtype=np_dtype)
