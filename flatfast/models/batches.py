"""Batches as users have them, and model outputs as models return them.

A batch is ``(inputs, targets)`` with inputs a tensor (``model(x)``), a tuple or list (``model(*x)``) or a mapping
(``model(**x)``); or a mapping holding the targets under ``"labels"`` (Hugging Face's name; ``"label"`` too) beside
the model's keyword arguments; or anything that ``batch_fn`` maps to ``(inputs, targets)``. A model may return a
tensor, a tuple or list (its first element), or a mapping or object with ``logits`` (Hugging Face's
``ModelOutput``). :class:`ModelInputs` holds one batch's inputs and knows how to call the model on them, slice
them by example, move them, and vmap over their examples.
"""
from __future__ import annotations

from collections.abc import Mapping

TARGET_KEYS = ("labels", "label")
ACCEPTED_BATCHES = ("(inputs, targets) with inputs a tensor, a tuple of tensors (model(*inputs)) or a mapping "
                    "(model(**inputs)); a mapping with the targets under 'labels'; or batch_fn=callable(batch) -> "
                    "(inputs, targets) for any other form")


def _describe(value) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a mapping with keys {sorted(map(str, value))}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


class ModelInputs:
    """One batch's inputs as the model takes them, ``model(*args, **kwargs)``, with ``size`` examples (the
    targets'). Tensors whose leading dimension is ``size`` are per-example (sliced and vmapped over); every other
    value is passed as it is. A sequence-first model's inputs (L, B, ...) have no per-example tensor: they are
    passed whole, and only what needs single examples (the exact trace) refuses them."""

    __slots__ = ("args", "kwargs", "size")

    def __init__(self, args, kwargs, size):
        self.args, self.kwargs, self.size = tuple(args), dict(kwargs), int(size)

    @classmethod
    def of(cls, inputs, size=None, *, name="loader"):
        """Wrap a tensor, tuple/list or mapping of inputs. ``size``: the number of examples (the targets' length);
        without it, the leading dimension that the tensors share."""
        import torch

        if isinstance(inputs, torch.Tensor):
            args, kwargs = (inputs,), {}
        elif isinstance(inputs, Mapping):
            args, kwargs = (), dict(inputs)
        elif isinstance(inputs, (list, tuple)):
            args, kwargs = tuple(inputs), {}
        else:
            raise TypeError(f"{name}: the inputs are {_describe(inputs)}; expected a tensor, a tuple of tensors or "
                            "a mapping of tensors")
        leading = [v.shape[0] for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() > 0]
        if size is None:
            if not leading:
                raise TypeError(f"{name}: the inputs ({_describe(inputs)}) hold no tensor with a batch dimension")
            if len(set(leading)) > 1:
                raise ValueError(f"{name}: the input tensors disagree on the number of examples (leading dimensions "
                                 f"{sorted(set(leading))}); give every per-example tensor the same first dimension")
            size = leading[0]
        return cls(args, kwargs, size)

    # --- structure -------------------------------------------------------------------------------------------
    def _is_batched(self, value) -> bool:
        import torch

        return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == self.size

    def _map(self, batched, other=None) -> "ModelInputs":
        def one(value):
            if self._is_batched(value):
                return batched(value)
            return other(value) if other is not None else value

        args = tuple(one(v) for v in self.args)
        kwargs = {k: one(v) for k, v in self.kwargs.items()}
        return ModelInputs(args, kwargs, self.size)

    def __getitem__(self, index: slice) -> "ModelInputs":
        """The examples ``index`` (a slice) of every per-example tensor."""
        if not isinstance(index, slice):
            raise TypeError("ModelInputs: index with a slice")
        start, stop, step = index.indices(self.size)
        size = len(range(start, stop, step))
        sliced = self._map(lambda t: t[index])
        sliced.size = size
        return sliced

    def to(self, device, dtype=None) -> "ModelInputs":
        """Every tensor moved to ``device``; floating-point tensors also cast to ``dtype`` (the parameters'), so
        float32 data meets a float64 model; integer tensors (token ids, masks) keep their dtype."""
        import torch

        def move(t):
            if not isinstance(t, torch.Tensor):
                return t
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device)

        return self._map(move, move)

    def with_floats(self, fn) -> "ModelInputs":
        """The same inputs with every floating-point per-example tensor replaced by ``fn(tensor)``."""
        return self._map(lambda t: fn(t) if t.is_floating_point() else t)

    def tensors(self):
        """The per-example tensors (for checks and device inspection)."""
        return [v for v in (*self.args, *self.kwargs.values()) if self._is_batched(v)]

    # --- calling the model -----------------------------------------------------------------------------------
    def call(self, model):
        """``logits_of(model(*args, **kwargs))``."""
        return logits_of(model(*self.args, **self.kwargs))

    def functional_call(self, model, tensors):
        """The model's logits with its parameters and buffers replaced by ``tensors`` (torch.func)."""
        from torch.func import functional_call

        return logits_of(functional_call(model, tensors, self.args, self.kwargs))

    def vmap_dims(self):
        """(args, kwargs) and their ``in_dims`` for ``torch.func.vmap`` over the examples: 0 for per-example
        tensors, None for everything else."""
        if not self.tensors():
            raise ValueError(f"loader: no input tensor has the batch's {self.size} examples as its first dimension, "
                             "and the exact trace takes the examples one at a time; give the model batch-first "
                             "inputs (batch_first=True) or use method='hutch++'")
        args_dims = tuple(0 if self._is_batched(v) else None for v in self.args)
        kwargs_dims = {k: (0 if self._is_batched(v) else None) for k, v in self.kwargs.items()}
        return (self.args, self.kwargs), (args_dims, kwargs_dims)

    def example_call(self, model, tensors, args, kwargs):
        """Inside vmap over the examples: the logits of one example (its per-example tensors given without their
        batch dimension, as vmap hands them over), with a batch dimension of 1 restored for the model."""
        from torch.func import functional_call

        batched_args = tuple(a[None] if self._is_batched(orig) else a for a, orig in zip(args, self.args))
        batched_kwargs = {k: (v[None] if self._is_batched(self.kwargs[k]) else v) for k, v in kwargs.items()}
        return logits_of(functional_call(model, tensors, batched_args, batched_kwargs))


def logits_of(output):
    """The tensor of outputs a loss is taken of: the output itself, the first element of a tuple or list, or the
    ``logits`` of a mapping or of an object (Hugging Face's ModelOutput)."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        found = output["logits"]
    elif hasattr(output, "logits") and not isinstance(output, (list, tuple)):
        found = output.logits
    elif isinstance(output, (list, tuple)) and output:
        found = output[0]
    else:
        found = None
    if not isinstance(found, torch.Tensor):
        raise TypeError(f"model: returned {_describe(output)}; flatfast needs a tensor of outputs, a tuple or list "
                        "whose first element is one, or a mapping/object with a 'logits' tensor")
    return found


def split_batch(batch, batch_fn=None):
    """(ModelInputs, targets) of one raw batch from the loader (the forms the module docstring lists)."""
    import torch

    if batch_fn is not None:
        batch = batch_fn(batch)
        if not (isinstance(batch, (list, tuple)) and len(batch) == 2):
            raise TypeError(f"batch_fn: must return an (inputs, targets) pair, returned {_describe(batch)}")
    if isinstance(batch, Mapping):
        key = next((k for k in TARGET_KEYS if k in batch), None)
        if key is None:
            raise TypeError(f"loader: a batch is {_describe(batch)} with no targets under 'labels' or 'label'; "
                            f"accepted: {ACCEPTED_BATCHES}")
        inputs, targets = {k: v for k, v in batch.items() if k != key}, batch[key]
    elif isinstance(batch, (list, tuple)) and len(batch) == 2:
        inputs, targets = batch
    elif isinstance(batch, (list, tuple)) and len(batch) > 2:
        raise TypeError(f"loader: a batch is {_describe(batch)}, not an (inputs, targets) pair; flatfast would "
                        f"ignore its last {len(batch) - 2} element(s) (sample weights, indices?). Say what they are: "
                        "batch_fn=lambda b: (b[0], b[1]) drops them; for sample weights, put them beside the "
                        "targets, batch_fn=lambda b: (b[0], torch.stack([b[1].to(b[2].dtype), b[2]], 1)), with a "
                        "loss_fn that weights each example's loss (the user guide's 'Sample weights' shows one)")
    else:
        raise TypeError(f"loader: a batch is {_describe(batch)}; accepted: {ACCEPTED_BATCHES}")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"loader: the targets are {_describe(targets)}; expected a tensor")
    if targets.dim() == 0:
        raise ValueError("loader: the targets are a 0-d tensor; expected one target per example (a leading "
                         "batch dimension)")
    return ModelInputs.of(inputs, int(targets.shape[0])), targets
