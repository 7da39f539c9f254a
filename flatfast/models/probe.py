"""What a model does with a batch, found by running it rather than guessed from its type or its inputs' shapes.

Two questions are asked of the first batch, in the mode the model is measured in, before any curvature is taken:

* **Is the loss a function?** Two forward passes over the same batch must give the same outputs. Dropout in
  training mode (``nn.Dropout`` or ``F.dropout``), attention's ``dropout_p``, stochastic depth and noise layers
  draw at every pass: the loss would be a different random function at each product, and no curvature of it is
  defined. Such a model is refused with the module where the randomness enters (:func:`check_deterministic`).
* **Are the examples independent?** The outputs of the batch split in two must equal the outputs of the whole
  batch. Only then may a route take the examples one at a time (the exact trace, per-example chunks), and only
  then are the inputs whose first dimension is the batch size truly per-example: a model that mixes examples
  (batch statistics, a (B, B) matrix), a mask of side B passed beside the inputs, or sequence-first inputs fail
  this check, and the per-example routes are not taken (:func:`examples_are_independent`).

Each costs one forward pass of the first batch: the checks together cost three (the whole batch twice and its two
halves), against the dozens of passes of any curvature estimate.
"""
from __future__ import annotations

from typing import Optional

from flatfast.models.layers import run_with_hooks

# Outputs of two passes agree when they differ by at most this many units of their dtype's rounding, relative to
# the largest output: deterministic kernels give identical or last-bit-different results (a half batch may take
# another blocking in a GEMM), while any layer that draws moves outputs by far more.
_ROUNDING_UNITS = 1000


def _close(a, b) -> bool:
    """Equal to rounding, NaN and infinity in the same places (a loss of NaN is reported by the pass that
    computes it, not taken for randomness)."""
    import torch

    if a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return bool(torch.equal(a, b))
    finite_a, finite_b = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(finite_a, finite_b) or not torch.equal(a[~finite_a].nan_to_num(), b[~finite_b].nan_to_num()):
        return False
    a, b = a[finite_a], b[finite_b]
    if not a.numel():
        return True
    scale = float(torch.maximum(a.abs().max(), b.abs().max()))
    return bool((a - b).abs().max() <= _ROUNDING_UNITS * torch.finfo(a.dtype).eps * max(scale, 1.0))


def check_deterministic(model, inputs, *, mode: str, keep_graph: bool = False):
    """Run the model twice on ``inputs`` (a :class:`flatfast.models.batches.ModelInputs`) and return its outputs;
    raise ValueError naming where the randomness enters if the first pass draws random numbers through torch (any
    aten operation tagged ``nondeterministic_seeded``: dropout, bernoulli, rand, randn, ...) or the two passes
    disagree (randomness from elsewhere). ``keep_graph``: the second pass keeps its autograd graph, and its
    outputs are returned (for :func:`custom_functions`)."""
    import torch

    with torch.no_grad():
        first, where = _watched_pass(model, inputs)
    if where is None:
        with torch.set_grad_enabled(keep_graph):
            second = inputs.call(model)
        if _close(first, second.detach()):
            return second if keep_graph else first
        with torch.no_grad():
            where = _random_module(model, inputs)
    advice = ("use mode='eval' (the default), which turns dropout and stochastic depth off, or set the layer's "
              "drop probability to 0" if mode == "train" else
              "this layer draws even in eval mode (F.dropout(..., training=True), a noise layer, an attention "
              "dropout_p that ignores the mode): make it deterministic while measuring")
    raise ValueError(f"model: its forward pass draws random numbers in mode={mode!r}, so two passes over the same "
                     f"batch give different outputs and its loss is a random function with no curvature; the "
                     f"randomness enters {where}; {advice}")


def custom_functions(outputs):
    """The names of the custom autograd.Functions in the graph behind ``outputs``: operations whose second
    derivative torch takes from user code, which may drop a term without saying so (see
    :meth:`flatfast.curvature.operator.HessianOperator.probe`)."""
    import torch

    seen, found, stack = set(), [], [outputs.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            found.append(type(node).__name__.removesuffix("Backward"))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sorted(set(found))


def _describe_module(module, names):
    name = names.get(module, "")
    if name:
        return f"module '{name}' ({type(module).__name__})"
    return f"the model's own forward ({type(module).__name__}.forward)"


def _draws(func, args, kwargs) -> bool:
    """Whether an aten call draws random numbers: an operation torch tags ``nondeterministic_seeded``, unless its
    own arguments switch the drawing off (attention's ``dropout_p`` = 0, dropout's ``p`` = 0 or ``train`` = False,
    as every attention kernel and dropout in eval mode is called)."""
    import torch

    if torch.Tag.nondeterministic_seeded not in func.tags:
        return False
    for index, argument in enumerate(func._schema.arguments):
        value = args[index] if index < len(args) else kwargs.get(argument.name, argument.default_value)
        if argument.name in ("dropout_p", "p") and isinstance(value, (int, float)) and value == 0:
            return False
        if argument.name == "train" and value is False:
            return False
    return True


def _watched_pass(model, inputs):
    """(outputs, where): one forward pass that notes the first random aten operation and the innermost module
    running when it was called (None if there was none)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    import torch

    names = {m: n for n, m in model.named_modules()}
    stack, found = [model], []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if not found and _draws(func, args, kwargs):
                found.append(f"in {_describe_module(stack[-1], names)}, which calls {func}")
            return func(*args, **kwargs)

    def enter(module, args):
        stack.append(module)

    def leave(module, args, output):  # returns None: a hook's return value would replace the output
        stack.pop()

    handles = [m.register_forward_pre_hook(enter) for m in model.modules()]
    handles += [m.register_forward_hook(leave) for m in model.modules()]
    try:
        with Watch():
            outputs = inputs.call(model)
    finally:
        for h in handles:
            h.remove()
    return outputs, (found[0] if found else None)


def _random_module(model, inputs) -> str:
    """Where two passes first part: the first module call (in order of completion) whose inputs were the same in
    both passes and whose outputs were not."""
    names = {m: n for n, m in model.named_modules()}
    passes = []
    for _ in range(2):
        calls = []
        pending = []

        def before(module, args, kwargs, pending=pending):
            pending.append(_snapshot((args, kwargs)))

        def after(module, args, kwargs, output, pending=pending, calls=calls):
            calls.append((module, pending.pop(), _snapshot(output)))

        handles = [m.register_forward_pre_hook(before, with_kwargs=True) for m in model.modules()]
        handles += [m.register_forward_hook(after, with_kwargs=True) for m in model.modules()]
        run_with_hooks(model, inputs, handles)
        passes.append(calls)
    # calls are matched by module and occurrence: a layer that skips its children at random (stochastic depth)
    # makes the two passes' call sequences differ
    first, second = _by_occurrence(passes[0]), _by_occurrence(passes[1])
    for key, (module, args_a, out_a) in first.items():  # in order of completion
        if key not in second:
            continue
        _, args_b, out_b = second[key]
        if _same(args_a, args_b) and not _same(out_a, out_b):
            return f"in {_describe_module(module, names)}"
    return "somewhere no module boundary shows (a random function called between modules)"


def _by_occurrence(calls):
    """{(module, its n-th call): (module, arguments, output)}, in the order the calls completed."""
    counts, keyed = {}, {}
    for module, args, out in calls:
        counts[id(module)] = counts.get(id(module), -1) + 1
        keyed[(id(module), counts[id(module)])] = (module, args, out)
    return keyed


def _snapshot(value):
    """The tensors of a module's arguments or output, cloned (an in-place layer would change them afterwards)."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value.detach().clone()]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _snapshot(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _snapshot(v)]
    if hasattr(value, "to_tuple"):  # a Hugging Face ModelOutput
        return _snapshot(value.to_tuple())
    return []


def _same(a, b) -> bool:
    return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))


def examples_are_independent(model, inputs, outputs) -> Optional[str]:
    """None when the model treats the examples of ``inputs`` independently -- the outputs of its two halves (every
    input tensor whose first dimension is the batch size sliced) equal ``outputs``, the whole batch's -- else why
    not, in words. A batch of one example is trivially independent."""
    import torch

    size = inputs.size
    if size <= 1:
        return None
    if not inputs.tensors():
        return (f"no input tensor has the batch's {size} examples as its first dimension (sequence-first inputs, "
                "say)")
    if outputs.dim() == 0 or outputs.shape[0] != size:
        return f"its outputs of shape {tuple(outputs.shape)} do not have the batch's {size} examples first"
    half = size // 2
    try:
        with torch.no_grad():
            parts = torch.cat([inputs[:half].call(model), inputs[half:].call(model)])
    except Exception as exc:  # noqa: BLE001 - any failure on half the batch means the examples are not separable
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        return f"it fails on half of the batch ({type(exc).__name__}: {first_line})"
    if not _close(parts, outputs):
        return ("the outputs of the batch split in two differ from the outputs of the whole batch (the model "
                "mixes examples -- batch statistics, attention across the batch -- or an input whose first "
                "dimension happens to equal the batch size is not per-example)")
    return None


def check_chunks(model, inputs, batch_size, *, name="X"):
    """Before a pass over ``inputs`` in chunks of ``batch_size`` examples (an eval-mode model, as the NNGP kernel
    and ``function_of`` run it): the model must be deterministic, and when the inputs are split at all, treat
    the examples independently -- else the chunks' outputs would not be the whole's. Returns the first chunk."""
    import torch

    first = inputs if inputs.size <= batch_size else inputs[:batch_size]
    try:
        with torch.no_grad():
            outputs = check_deterministic(model, first, mode="eval")
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model's own error, with the argument it concerns
        shapes = ", ".join(str(tuple(t.shape)) for t in (*first.args, *first.kwargs.values()) if hasattr(t, "shape"))
        split = "" if first is inputs else (f" (its first {first.size} inputs; if an input is not per-example, pass "
                                            f"batch_size >= {inputs.size} so that {name} is never split)")
        raise ValueError(f"{name}: the model rejected inputs of shape {shapes}{split}: {exc}") from exc
    if inputs.size > batch_size:
        why = examples_are_independent(model, first, outputs)
        if why is not None:
            raise ValueError(f"{name}: is taken in chunks of batch_size = {batch_size} inputs, but {why}; pass "
                             f"batch_size >= {inputs.size} so that all {inputs.size} inputs go through the model "
                             "together")
    return first
