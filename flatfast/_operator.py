"""HessianOperator: H V and v^T H v of the dataset-mean loss for blocks of vectors, one data pass per block.
See :mod:`flatfast.hessian` for the loss convention."""
from __future__ import annotations

import sys

from flatfast._mlp_rop import plain_mlp_layers
from flatfast._model_util import distributed, eval_mode
from flatfast._registry import dispatch


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
        self.linears = plain_mlp_layers(model, self.params) if loss_fn is None else None
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
        """The batch-mean loss, after checking that targets fit outputs (no silent broadcasting)."""
        import torch.nn.functional as F

        if self.user_loss is not None:
            return self.user_loss(outputs, targets)
        if not targets.is_floating_point():
            if outputs.dim() != 2 or targets.shape != outputs.shape[:1]:
                raise ValueError(f"loader: integer targets of shape {tuple(targets.shape)} do not match outputs of "
                                 f"shape {tuple(outputs.shape)} (cross-entropy needs (B,) class indices for (B, C))")
            low, high = int(targets.min()), int(targets.max())
            if low < 0 or high >= outputs.shape[1]:
                raise ValueError(f"loader: class target {low if low < 0 else high} is out of range for a model with "
                                 f"{outputs.shape[1]} outputs (cross-entropy needs 0 <= target < {outputs.shape[1]})")
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
