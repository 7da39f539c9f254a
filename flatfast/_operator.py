"""HessianOperator: H V and v^T H v of the dataset-mean loss for blocks of vectors, one data pass per block.
See :mod:`flatfast.hessian` for the loss convention."""
from __future__ import annotations

import sys

from flatfast._mlp_rop import plain_mlp_layers
from flatfast._model_util import distributed, eval_mode
from flatfast._registry import dispatch


def loss_kind(loss_fn):
    """None for the default loss (cross-entropy on integer class targets); 'cross_entropy', 'mse' or
    'bce_with_logits' for torch's loss modules with their default settings (closed-form curvature, and the MLP
    fast path for the first two); 'autograd' for any other loss_fn."""
    import torch.nn as nn

    if loss_fn is None:
        return None
    plain = getattr(loss_fn, "reduction", None) == "mean"
    if type(loss_fn) is nn.CrossEntropyLoss and plain and loss_fn.weight is None and loss_fn.label_smoothing == 0.0 \
            and loss_fn.ignore_index == -100:
        return "cross_entropy"
    if type(loss_fn) is nn.MSELoss and plain:
        return "mse"
    if type(loss_fn) is nn.BCEWithLogitsLoss and plain and loss_fn.weight is None and loss_fn.pos_weight is None:
        return "bce_with_logits"
    return "autograd"


def default_loss(outputs, targets):
    """Cross-entropy, the one default: integer class targets (B,) for (B, C) outputs with C >= 2. Any other
    pairing must name its loss: no loss is guessed from float targets (a one-logit classifier with 0/1 float
    targets would otherwise get MSE instead of the BCE it was trained with)."""
    import torch.nn.functional as F

    one_output = outputs.dim() == 1 or (outputs.dim() == 2 and outputs.shape[1] == 1)
    default_is = "the default loss is cross-entropy, for integer class targets and two or more outputs"
    if targets.is_floating_point():
        binary = bool(((targets == 0) | (targets == 1)).all())
        if one_output and binary:
            raise ValueError("loss_fn: one output and float targets in {0, 1}: name the loss, e.g. "
                             "loss_fn=torch.nn.BCEWithLogitsLoss() (the paper's binary classifiers) or "
                             f"loss_fn=torch.nn.MSELoss(); {default_is}")
        raise ValueError(f"loss_fn: float targets of shape {tuple(targets.shape)} for outputs of shape "
                         f"{tuple(outputs.shape)}: name the loss, e.g. loss_fn=torch.nn.MSELoss() for regression"
                         + (" or loss_fn=torch.nn.BCEWithLogitsLoss() for 0/1 labels" if binary else "")
                         + f"; {default_is}")
    if one_output:
        raise ValueError("loss_fn: one output and integer targets: cross-entropy needs two or more outputs; for "
                         "binary labels pass loss_fn=torch.nn.BCEWithLogitsLoss() with float 0/1 targets shaped "
                         f"like the outputs; {default_is}")
    if outputs.dim() != 2 or targets.shape != outputs.shape[:1]:
        raise ValueError(f"loader: integer targets of shape {tuple(targets.shape)} do not match outputs of "
                         f"shape {tuple(outputs.shape)} (cross-entropy needs (B,) class indices for (B, C))")
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= outputs.shape[1]:
        raise ValueError(f"loader: class target {low if low < 0 else high} is out of range for a model with "
                         f"{outputs.shape[1]} outputs (cross-entropy needs 0 <= target < {outputs.shape[1]})")
    return F.cross_entropy(outputs, targets)


class HessianOperator:
    """H V for blocks of vectors, one pass over the data per block (shared forward pass and data loading)."""

    def __init__(self, model, loader, loss_fn=None, *, backend="auto", progress=None):
        import torch

        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if iter(loader) is loader:  # a generator or other iterator: the second pass would see nothing (or less)
            raise TypeError("loader: is a one-shot iterator (e.g. a generator); flatfast makes several passes over "
                            "the data (method='auto' looks at the first batch before the trace's own pass), so pass "
                            "a list of (inputs, targets) batches or a DataLoader")
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
        self.loss_kind = loss_kind(loss_fn)
        self.linears = plain_mlp_layers(model, self.params) if self.loss_kind in (None, "cross_entropy", "mse") \
            else None
        want = backend or "auto"
        if want in ("reference", "generic") or (self.linears is None and want == "auto"):
            want = "reference"
        elif self.linears is None:
            raise ValueError(f"backend: {want!r} is the fast path for nn.Sequential Linear/ReLU models with the "
                             "default loss; this model or loss is not one (use backend='auto' or 'reference')")
        self.impl = dispatch("mlp_hvp", want, self.device.type)
        self.quadratic_impl = dispatch("mlp_vhv", want, self.device.type)
        self.backend = self.impl.name
        self._use_double_backward = False

    # the data ---------------------------------------------------------------------------------------
    def batches(self):
        """The loader's (inputs, targets) batches on the model's device; empty batches are skipped, and a loader
        that yields no example at all is an error (the dataset mean would be 0/0)."""
        count = examples = 0
        iterator = self.loader
        if self.progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc="flatfast H.V", leave=False, file=sys.stderr)
        for batch in iterator:
            if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                raise TypeError("loader: each batch must be an (inputs, targets) pair")
            x, y = batch[0], batch[1]
            count += 1
            if x.shape[0] == 0:
                continue
            examples += int(x.shape[0])
            yield x.to(self.device), y.to(self.device)
        if count == 0:
            raise ValueError("loader: yielded no batches")
        if examples == 0:
            raise ValueError(f"loader: its {count} batch(es) hold no examples")

    def loss_and_targets(self, outputs, targets):
        """The batch-mean loss: the user's, or the default (:func:`default_loss`), which checks that the targets
        fit the outputs (no silent broadcasting) and refuses to guess a loss for anything but class targets."""
        if self.user_loss is not None:
            if self.loss_kind == "mse" and targets.shape != outputs.shape:
                raise ValueError(f"loader: targets of shape {tuple(targets.shape)} do not match outputs of shape "
                                 f"{tuple(outputs.shape)} (MSELoss would broadcast them)")
            return self.user_loss(outputs, targets)
        return default_loss(outputs, targets)

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
        with eval_mode(self.model), torch.no_grad():
            for x, y in self.batches():
                total += fn(self, x, y, V)
                count += int(x.shape[0])
        if distributed():
            import torch.distributed as dist

            n = torch.tensor([count], dtype=torch.float64, device=total.device)
            dist.all_reduce(total)
            dist.all_reduce(n)
            count = int(n.item())
        return total / count
