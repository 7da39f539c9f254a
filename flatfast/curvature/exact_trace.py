"""The exact Hessian trace of any network that is piecewise linear in each single parameter.

Why it is exact: write the per-example loss as l(f(theta)). Then d^2 l / d theta_j^2 = J_j^T H_out J_j + g_out^T
d^2 f / d theta_j^2, with J_j the Jacobian column of parameter j and H_out the loss's Hessian in the outputs. If f
is piecewise linear in theta_j alone (every other parameter held fixed) the second term is 0 almost everywhere, so
tr H = sum_i sum_j J_ij^T H_out,i J_ij = sum_i sum_k w_k |J_i^T s_ik|^2 for any factorisation
H_out,i = sum_k w_k s_ik s_ik^T (w_k = +-1). Each |J_i^T s_ik|^2 is a per-example squared gradient norm: one
backward pass per factor vector k, about C backward passes for C outputs.

Which networks qualify is decided by watching one forward pass (``check_piecewise_linear``): every torch
function the model calls is classified, and the set of parameters each intermediate tensor depends on is
tracked. Linear, convolution, eval-mode BatchNorm, ReLU-like and pooling operations, reshapes, additions and
concatenations keep the network piecewise linear in each parameter; a product whose two factors depend on the
same parameter (a weight applied twice in sequence, gating, attention) or a smooth nonlinearity applied to
parameter-dependent values (tanh, GELU, softplus, LayerNorm, softmax, train-mode BatchNorm) does not, and is
refused with the name of the module that did it.
"""
from __future__ import annotations

from flatfast.models.passes import check_finite, mean_over_ranks
from flatfast.errors import NotPiecewiseLinearError

# Operations after which the output is piecewise linear in the inputs (and in every parameter they depend on).
# Names are torch's function names with leading underscores and a trailing in-place "_" removed.
_PIECEWISE_LINEAR = frozenset("""
    view view_as reshape reshape_as flatten unflatten permute transpose t contiguous clone squeeze unsqueeze expand
    expand_as repeat tile cat concat concatenate stack hstack vstack split chunk narrow select getitem unbind roll
    flip pad to type float double add iadd radd sub isub rsub neg sum mean avg_pool1d avg_pool2d avg_pool3d
    adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d relu leaky_relu hardtanh relu6 threshold
    max_pool1d max_pool2d max_pool3d max_pool1d_with_indices max_pool2d_with_indices max_pool3d_with_indices
    adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d clamp clip abs maximum minimum max min amax amin
    identity interpolate upsample zero_pad2d embedding
""".split())
# Operations multiplying their factor arguments: piecewise linear in a parameter only if at most one factor
# depends on it. Values: the positions of the factors (None: every tensor argument is a factor).
_PRODUCTS = {"mul": None, "imul": None, "rmul": None, "matmul": None, "rmatmul": None, "mm": None, "bmm": None,
             "einsum": None, "outer": None, "dot": None, "tensordot": None, "bilinear": (0, 1, 2),
             "linear": (0, 1), "conv1d": (0, 1), "conv2d": (0, 1), "conv3d": (0, 1), "conv_transpose1d": (0, 1),
             "conv_transpose2d": (0, 1), "conv_transpose3d": (0, 1), "addmm": (1, 2), "baddbmm": (1, 2)}
_DIVISIONS = frozenset({"div", "truediv", "itruediv", "rtruediv"})
# Dropout is the identity in eval mode; in training mode it is random, which the forward pass reveals.
_DROPOUTS = frozenset({"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"})


def _op_name(func) -> str:
    """torch's name for the function without underscores around it: ``relu_`` (in place), ``__iadd__`` and
    ``_max_pool2d`` are ``relu``, ``iadd`` and ``max_pool2d``."""
    return (getattr(func, "__name__", None) or str(func)).strip("_")


def _argument(args, kwargs, index, name, default=None):
    return args[index] if len(args) > index else kwargs.get(name, default)


def check_piecewise_linear(model, inputs, trainable):
    """Run the model once on ``inputs`` (a :class:`flatfast.models.batches.ModelInputs`), watching every torch function
    it calls; raise NotPiecewiseLinearError naming the first module whose computation breaks piecewise linearity
    in a single parameter of ``trainable`` (see the module docstring). Parameters outside ``trainable`` are
    constants here, so a network can qualify in a subset of its parameters (its last layer, say)."""
    import torch
    from torch.overrides import TorchFunctionMode

    depends = {id(p): frozenset([name]) for name, p in trainable}
    keep_alive = []  # ids of tensors are looked up later, so the tensors must not be freed and their ids reused
    module_stack = [f"{type(model).__name__}.forward"]
    names = {m: n for n, m in model.named_modules()}

    def deps_of(value):
        if isinstance(value, torch.Tensor):
            return depends.get(id(value), frozenset())
        if isinstance(value, (list, tuple)):
            return frozenset().union(*(deps_of(v) for v in value)) if value else frozenset()
        return frozenset()

    def refuse(message):
        module = module_stack[-1]
        raise NotPiecewiseLinearError(
            f"model: {module} {message}, so the network is not piecewise linear in each parameter and "
            "method='exact' does not apply (use method='hutch++' or 'hutchinson')")

    def record(result, deps):
        tensors = [result] if isinstance(result, torch.Tensor) else \
            [r for r in result if isinstance(r, torch.Tensor)] if isinstance(result, (list, tuple)) else []
        for t in tensors:
            if deps:
                depends[id(t)] = deps
                keep_alive.append(t)

    class Watcher(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            result = func(*args, **kwargs)
            values = list(args) + list(kwargs.values())
            deps = frozenset().union(*(deps_of(v) for v in values)) if values else frozenset()
            if not deps:
                return result
            name = _op_name(func)
            floating = (isinstance(result, torch.Tensor) and result.is_floating_point()) or (
                isinstance(result, (list, tuple)) and any(isinstance(r, torch.Tensor) and r.is_floating_point()
                                                          for r in result))
            if not floating:  # shapes, comparisons, indices: no value that the loss is differentiated through
                return result
            if name in _DROPOUTS:
                if _argument(args, kwargs, 2, "training", True):
                    refuse(f"applies dropout in training mode ({name})")
            elif name == "batch_norm":
                if _argument(args, kwargs, 5, "training", False) or _argument(args, kwargs, 1, "running_mean") is None:
                    refuse("normalises by batch statistics (BatchNorm in training mode or without running "
                           "statistics)")
                factors = [_argument(args, kwargs, 0, "input"), _argument(args, kwargs, 3, "weight")]
                _check_disjoint(factors, deps_of, refuse, name)
            elif name in _PRODUCTS:
                positions = _PRODUCTS[name]
                factors = values if positions is None else [args[i] for i in positions if i < len(args)]
                _check_disjoint(factors, deps_of, refuse, name)
            elif name in _DIVISIONS:
                if deps_of(_argument(args, kwargs, 1, "other")):
                    refuse(f"divides by a value that depends on parameters ({name})")
            elif name not in _PIECEWISE_LINEAR:
                refuse(f"applies {name}, which is not piecewise linear, to values that depend on parameters")
            record(result, deps)
            return result

    def push(module, _inputs):
        name = names.get(module)
        module_stack.append(f"module '{name}' ({type(module).__name__})" if name else
                            f"{type(module).__name__}.forward")

    def pop(module, _inputs, _output):
        module_stack.pop()

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(push))
        handles.append(module.register_forward_hook(pop))
    try:
        with torch.no_grad(), Watcher():
            output = inputs.call(model)
    finally:
        for h in handles:
            h.remove()
    return output


def _check_disjoint(factors, deps_of, refuse, name):
    seen = frozenset()
    for factor in factors:
        deps = deps_of(factor)
        shared = seen & deps
        if shared:
            refuse(f"multiplies two values that both depend on parameter {sorted(shared)[0]} ({name}: a weight "
                   "used twice in sequence, gating or attention)")
        seen |= deps


def _example(values, dims, i):
    """Example i of the per-example entries (dim 0) of a tuple or dict of inputs, as vmap would hand it over."""
    if isinstance(values, dict):
        return ({k: (v[i] if dims[k] == 0 else v) for k, v in values.items()},)
    return (tuple(v[i] if d == 0 else v for v, d in zip(values, dims)),)


# --- the loss's output curvature ------------------------------------------------------------------------------

def _loss_kind(op):
    """The operator's loss kind (flatfast.curvature.operator.loss_kind); None is the default, cross-entropy."""
    return op.loss_kind


# Above this many outputs an arbitrary loss's per-example output Hessian is not eigendecomposed (C^3 per example).
AUTOGRAD_LOSS_MAX_OUTPUTS = 256


class OutputCurvature:
    """The loss's Hessian in each example's C outputs as H_out,i = sum_k w_ik s_ik s_ik^T (w = +-1; the (B, C)
    outputs of a batch flattened per example), with the factor rows s_ik made on demand, k in [start, stop): cross-
    entropy over C = 1000 classes would otherwise hold B x C x C numbers. ``state`` is a tuple of per-example
    tensors (leading dimension B) that ``rows`` turns into factor rows, batched or, under vmap, for one example.

    Per-example loss convention: the batch loss is the mean of per-example losses, each the mean over its C
    outputs for MSE and BCE-with-logits (torch's reduction='mean')."""

    def __init__(self, op, kind, out, y):
        import torch

        B = out.shape[0]
        flat = out.reshape(B, -1)
        C = flat.shape[1]
        if kind is None:  # the default loss, which accepts only class targets (HessianOperator.loss_and_targets)
            kind = "cross_entropy"
        self.kind = kind
        self.count = C  # K, the number of factor rows per example
        self._eye = torch.eye(C, dtype=flat.dtype, device=flat.device)
        if kind == "cross_entropy":  # H = diag(p) - p p^T = sum_k s_k s_k^T with s_k = sqrt(p_k) (e_k - p)
            if out.dim() != 2:
                raise ValueError(f"method: 'exact' with cross-entropy needs (B, C) outputs, got {tuple(out.shape)}")
            self.state = (torch.softmax(flat, dim=1),)
        elif kind == "mse":  # mean over the C outputs: H = (2/C) I
            self.state = (torch.full_like(flat, 2.0 / C),)
        elif kind == "bce_with_logits":  # mean over the C logits: H = diag(sigmoid (1 - sigmoid)) / C
            q = torch.sigmoid(flat)
            self.state = (q * (1.0 - q) / C,)
        else:
            self.state = _autograd_factors(op, out, y)
            self.count = self.state[0].shape[-2]

    def rows(self, state, start, stop):
        """(rows (..., stop - start, C), weights (..., stop - start) or None for all +1)."""
        if self.kind == "cross_entropy":
            (p,) = state
            return p[..., start:stop, None].sqrt() * (self._eye[start:stop] - p[..., None, :]), None
        if self.kind in ("mse", "bce_with_logits"):  # diagonal H: s_k = sqrt(H_kk) e_k
            (diagonal,) = state
            return diagonal[..., start:stop, None].sqrt() * self._eye[start:stop], None
        factors, signs = state
        return factors[..., start:stop, :], signs[..., start:stop]


def _autograd_factors(op, out, y):
    """Any other loss: the per-example output Hessian by autograd, factored by its eigendecomposition: factors
    (B, C, C) and signs (B, C). The loss must be the mean of per-example losses, which is checked on the batch."""
    import torch
    from torch.func import hessian, vmap

    B = out.shape[0]
    C = out[0].numel()
    if C > AUTOGRAD_LOSS_MAX_OUTPUTS:
        raise ValueError(f"loss_fn: method='exact' factors an arbitrary loss's {C} x {C} output Hessian per example "
                         f"(at most {AUTOGRAD_LOSS_MAX_OUTPUTS} outputs); use the default loss or one of "
                         "nn.CrossEntropyLoss/MSELoss/BCEWithLogitsLoss, whose curvature flatfast knows")
    per_example = torch.stack([op.loss_and_targets(out[i:i + 1], y[i:i + 1]).reshape(()) for i in range(B)])
    batch = op.loss_and_targets(out, y)
    if not torch.allclose(per_example.mean(), batch, rtol=1e-6, atol=1e-12):
        raise ValueError("loss_fn: the batch loss is not the mean of the per-example losses (e.g. class weights or "
                         "reduction='sum'), which method='exact' relies on")

    def one(o, t):
        return op.loss_and_targets(o.reshape((1,) + out.shape[1:]), t[None]).reshape(())

    H = vmap(hessian(one))(out.reshape(B, C), y)  # (B, C, C)
    values, vectors = torch.linalg.eigh(0.5 * (H + H.transpose(1, 2)))
    factors = (vectors * values.abs().sqrt()[:, None, :]).transpose(1, 2)  # rows: sqrt|lambda_k| u_k
    return factors, torch.sign(values)


# --- the trace ---------------------------------------------------------------------------------------------------

class PerExampleFailure(RuntimeError):
    """The exact trace's per-example pass failed inside torch, vmapped and one example at a time (a layer torch
    cannot differentiate example by example); ``hessian_trace(method="auto")`` then takes a route that needs no
    per-example pass."""


# Bytes of per-example gradients held at once (examples x factor vectors x parameters); sets the chunk sizes.
GRADIENT_MEMORY_BYTES = 256 * 2 ** 20


def exact_trace(op) -> float:
    """tr H of the dataset-mean loss for a model that ``check_piecewise_linear`` accepts; see the module docstring.
    Per batch: one forward pass for the outputs and curvature factors, then per-example vector-Jacobian products
    of the K factor vectors (vmap over examples and factors), in chunks of at most GRADIENT_MEMORY_BYTES."""
    import torch
    from torch.func import vjp, vmap

    kind = _loss_kind(op)
    params = {n: p.detach() for n, p in op.params}
    fixed = op.fixed_tensors()
    itemsize = torch.empty((), dtype=op.dtype).element_size()
    total, count, checked = 0.0, 0, False
    one_at_a_time = False  # set when the model's forward pass cannot be vmapped over examples
    op.probe()  # a random model is refused before anything else
    with op.session(), torch.no_grad():
        for inputs, y in op.batches():
            if not checked:  # on the whole first batch: no example is sliced off before independence is known
                check_piecewise_linear(op.model, inputs, op.params)
                op.require_independent_examples("'exact'")
                checked = True
            out = inputs.call(op.model)
            check_finite(op.loss_and_targets(out, y))
            curvature = OutputCurvature(op, kind, out, y)
            K = curvature.count
            per_factor = op.dimension * itemsize
            factor_chunk = max(1, min(K, GRADIENT_MEMORY_BYTES // per_factor))
            example_chunk = max(1, GRADIENT_MEMORY_BYTES // (per_factor * factor_chunk))

            def weighted_sq_norms(args_i, kwargs_i, state_i):
                def outputs_of(p):
                    return inputs.example_call(op.model, {**p, **fixed}, args_i, kwargs_i).reshape(-1)

                _, pullback = vjp(outputs_of, params)
                acc = torch.zeros((), dtype=op.dtype, device=op.device)
                for start in range(0, K, factor_chunk):
                    rows, signs = curvature.rows(state_i, start, min(K, start + factor_chunk))
                    (grads,) = vmap(pullback)(rows.to(op.dtype))
                    sq = sum(g.reshape(g.shape[0], -1).square().sum(dim=1) for g in grads.values())
                    acc = acc + (sq if signs is None else signs * sq).sum()
                return acc

            (args, kwargs), (args_dims, kwargs_dims) = inputs.vmap_dims()
            with torch.enable_grad():
                if not one_at_a_time:
                    try:
                        per_example = vmap(weighted_sq_norms, in_dims=(args_dims, kwargs_dims, 0),
                                           chunk_size=example_chunk)(args, kwargs, curvature.state)
                    except Exception:  # noqa: BLE001 - torch has no vmap rule for some layer, or the model
                        # branches on data (Hugging Face's `if mask.all()`): the same products, one example at a
                        # time
                        one_at_a_time = True
                if one_at_a_time:
                    try:
                        per_example = torch.stack([
                            weighted_sq_norms(*_example(args, args_dims, i), *_example(kwargs, kwargs_dims, i),
                                              tuple(t[i] for t in curvature.state)) for i in range(inputs.size)])
                    except Exception as exc:  # noqa: BLE001 - reported, with torch's error, by the caller
                        raise PerExampleFailure(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") \
                            from exc
            total += float(per_example.sum())
            count += inputs.size
    return mean_over_ranks(total, count, op.device)
