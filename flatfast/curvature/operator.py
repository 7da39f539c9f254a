"""HessianOperator: H V and v^T H v of the dataset-mean loss for blocks of vectors, one data pass per block.
See :mod:`flatfast.curvature.hessian` for the loss convention."""
from __future__ import annotations

import sys

from flatfast.models.batches import split_batch
from flatfast.curvature.mlp_rop import plain_mlp_layers
from flatfast.models.modes import check_mode, measuring
from flatfast.models.probe import check_deterministic, custom_functions, examples_are_independent
from flatfast.models.passes import distributed
from flatfast.models.parameters import select_parameters
from flatfast.backend.dispatch import dispatch

# Measures that evaluate the loss hundreds of times hold the batches they read once, up to this many bytes.
HELD_BATCH_BYTES = 1 << 30


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


def _padding_rows(model, params, dimension):
    """A (P,) bool mask of the entries that torch's gradient holds constant -- the padding_idx row of every
    nn.Embedding, whose gradient torch defines as zero although the forward pass reads it -- or None if there are
    none. The Hessian is then taken with those entries constant (M H M), as a double backward sees it (PyHessian,
    curvlinops); otherwise forward-over-reverse would give an asymmetric operator (it differentiates the forward
    pass's use of the row but not the gradient's)."""
    import torch

    padded = {id(m.weight): m.padding_idx for m in model.modules()
              if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.padding_idx is not None}
    if not padded:
        return None
    mask = torch.zeros(dimension, dtype=torch.bool)
    offset = 0
    for _, p in params:
        if id(p) in padded:
            row = padded[id(p)] % p.shape[0]
            width = p[0].numel()
            mask[offset + row * width: offset + (row + 1) * width] = True
        offset += p.numel()
    return mask if bool(mask.any()) else None


def _check_arguments(model, loader, loss_fn, batch_fn):
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if iter(loader) is loader:  # a generator or other iterator: the second pass would see nothing (or less)
        raise TypeError("loader: is a one-shot iterator (e.g. a generator); flatfast makes several passes over "
                        "the data (method='auto' looks at the first batch before the trace's own pass), so pass "
                        "a list of batches or a DataLoader")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError("loss_fn: expected a callable loss_fn(outputs, targets) returning the batch mean")
    if batch_fn is not None and not callable(batch_fn):
        raise TypeError("batch_fn: expected a callable batch_fn(batch) -> (inputs, targets)")


class HessianOperator:
    """H V for blocks of vectors, one pass over the data per block (shared forward pass and data loading).

    ``params`` picks the parameters (see :func:`flatfast.models.parameters.select_parameters`; the others are held
    fixed), ``batch_fn`` maps each raw batch to (inputs, targets) (see :mod:`flatfast.models.batches`), ``mode`` is
    the modules' mode during the passes ("eval" by default; see :func:`flatfast.models.modes.measuring`)."""

    def __init__(self, model, loader, loss_fn=None, *, params=None, batch_fn=None, mode="eval", backend="auto",
                 progress=None):
        _check_arguments(model, loader, loss_fn, batch_fn)
        self.model, self.loader, self.user_loss, self.batch_fn = model, loader, loss_fn, batch_fn
        self.progress = progress
        self.params = select_parameters(model, params)
        self.mode = check_mode(model, mode)
        self._lay_out_parameters()
        self.loss_kind = loss_kind(loss_fn)
        self._choose_products(backend)
        # How torch.func differentiates this model twice; set by the first product (flatfast.curvature.generic_hvp)
        self.route = None
        self.constant_entries = _padding_rows(model, self.params, self.dimension)
        # A loader that is a list or tuple of one batch gives the same batch to every pass: its gradient graph
        # can serve every product, as PyHessian's data= mode does (see cached_gradient_graph).
        self._single_batch = isinstance(loader, (list, tuple)) and len(loader) == 1
        self._graph = None
        self._held = None  # set by the first complete pass of held_batches()
        self._not_independent = None  # set by probe(): None until then, then "" or why the examples are not
        self.outputs_per_example = None  # set by probe(): the outputs the loss sees per example
        self._symmetry_checked = False
        self._custom_functions = []  # custom autograd.Functions found by probe()

    def _lay_out_parameters(self):
        """The flat layout of the measured parameters: P = ``dimension`` entries in ``named_parameters()`` order,
        in the first parameter's dtype and on its device."""
        first = self.params[0][1]
        self.dtype, self.device = first.dtype, first.device
        self.sizes = [p.numel() for _, p in self.params]
        self.shapes = [p.shape for _, p in self.params]
        self.dimension = int(sum(self.sizes))

    def _choose_products(self, backend):
        """Which implementation takes the products: the R-operator fast path (its masked GEMMs on the chosen
        backend) for a plain Linear/ReLU MLP with the default, cross-entropy or MSE loss; the reference (double
        backward, forward-over-reverse as a fallback) for any other model."""
        fast_path_losses = (None, "cross_entropy", "mse")
        self.linears = plain_mlp_layers(self.model, self.params) if self.loss_kind in fast_path_losses else None
        want = backend or "auto"
        if want in ("reference", "generic") or (self.linears is None and want == "auto"):
            want = "reference"
        elif self.linears is None:
            raise ValueError(f"backend: {want!r} is the fast path for nn.Sequential Linear/ReLU models with the "
                             "default loss; this model or loss is not one (use backend='auto' or 'reference')")
        self.impl = dispatch("mlp_hvp", want, self.device.type)
        self.quadratic_impl = dispatch("mlp_vhv", want, self.device.type)
        self.backend = self.impl.name

    # the data ---------------------------------------------------------------------------------------
    def batches(self):
        """The loader's batches as (ModelInputs, targets) on the model's device (floating-point inputs in its
        dtype); empty batches are skipped, and a loader that yields no example at all is an error (the dataset
        mean would be 0/0)."""
        count = examples = 0
        iterator = self.loader
        if self.progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc="flatfast H.V", leave=False, file=sys.stderr)
        for batch in iterator:
            inputs, y = split_batch(batch, self.batch_fn)
            count += 1
            if inputs.size == 0:
                continue
            examples += inputs.size
            yield inputs.to(self.device, self.dtype), y.to(self.device)
        if count == 0:
            raise ValueError("loader: yielded no batches")
        if examples == 0:
            raise ValueError(f"loader: its {count} batch(es) hold no examples")

    def held_batches(self):
        """:meth:`batches` for the measures that evaluate the loss hundreds of times (the sharpness ascents, the
        Monte Carlo draws of the PAC-Bayes measure): the first complete pass reads the loader and keeps its
        batches on the model's device while they take at most ``HELD_BATCH_BYTES`` (1 GiB); later passes replay
        them. A larger data set is read from the loader every time. Replaying changes no dataset mean (every
        example still counts once; only the order could differ from a shuffling loader's), and a loader that
        augments at random is drawn once, so the loss evaluated is one function of the parameters."""
        if self._held is not None:
            yield from self._held
            return
        held, size = [], 0
        for inputs, y in self.batches():
            if held is not None:
                size += sum(t.numel() * t.element_size() for t in inputs.tensors() + [y])
                if size <= HELD_BATCH_BYTES:
                    held.append((inputs, y))
                else:
                    held = None
            yield inputs, y
        self._held = held

    def probe(self):
        """What the model does with the first batch, asked once per operator before any curvature is taken
        (:mod:`flatfast.models.probe`; three forward passes of that batch): raises ValueError if two passes give
        different outputs (a random layer), and returns None when the examples are independent -- so that a route
        may take them one at a time -- or why they are not. A model with a custom autograd.Function (whose second
        derivative is user code torch cannot check) also pays one product of two vectors, which must be symmetric
        (:meth:`_check_symmetry`)."""
        if self._not_independent is None:
            import torch

            inputs, _ = next(iter(self.batches()))
            with self.session():
                outputs = check_deterministic(self.model, inputs, mode=self.mode, keep_graph=True)
                custom = custom_functions(outputs) if outputs.requires_grad else []
                outputs = outputs.detach()
                with torch.no_grad():
                    self._not_independent = examples_are_independent(self.model, inputs, outputs) or ""
            self.outputs_per_example = max(1, outputs.numel() // inputs.size)
            if custom:  # their second derivative is user code: check that the products are a Hessian's
                self._custom_functions = custom
                generator = torch.Generator(device=self.device).manual_seed(0)
                self.matmat(torch.randn(2, self.dimension, generator=generator, device=self.device,
                                        dtype=self.dtype))
        return self._not_independent or None

    def require_independent_examples(self, route):
        """Raise ValueError, saying why, unless the examples are independent (:meth:`probe`); ``route`` names
        what needs them one at a time."""
        why = self.probe()
        if why is not None:
            raise ValueError(f"method: {route} takes the examples one at a time, but {why}; use method='auto' or "
                             "'hutch++', which need no per-example pass")

    def fixed_tensors(self):
        """Everything ``functional_call`` needs besides the measured parameters: the other parameters and the
        buffers, held fixed."""
        chosen = {id(p) for _, p in self.params}
        return {**{n: p.detach() for n, p in self.model.named_parameters() if id(p) not in chosen},
                **dict(self.model.named_buffers())}

    def tensors_moved_by(self, shifts=None):
        """What ``functional_call`` needs with the measured parameters moved by ``shifts`` (a list like
        ``params``; None leaves them where they are) and the rest held fixed (:meth:`fixed_tensors`)."""
        moved = {n: p.detach() for n, p in self.params} if shifts is None else \
            {n: p.detach() + s for (n, p), s in zip(self.params, shifts)}
        return {**moved, **self.fixed_tensors()}

    def cached_gradient_graph(self, inputs, y, build):
        """``build()`` -- (flat parameters, gradient with its graph) of this batch -- or the pair kept from the
        previous pass when the loader holds this one batch only and nothing it depends on has changed since:
        torch's version counters of the parameters, the buffers, the inputs and the targets, and the mode. The
        forward and backward pass then runs once for all products (Lanczos asks for one vector at a time), at the
        price of keeping one batch's graph between products."""
        if not self._single_batch:
            return build()
        tensors = [p for _, p in self.model.named_parameters()] + list(self.model.buffers()) + \
            inputs.tensors() + [y]
        key = (self.mode, tuple((id(t), t._version) for t in tensors))
        if self._graph is None or self._graph[0] != key:
            self._graph = None  # free the old graph before building the new one
            # the tensors are kept with the key so that no id in it can be reused by a new tensor
            self._graph = (key, build(), tensors)
        return self._graph[1]

    def session(self):
        """The context every pass over the data runs in (:func:`flatfast.models.modes.measuring`)."""
        return measuring(self.model, self.mode)

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
        """v^T H v for each row v of V (k, P): by a second-order forward pass for plain Linear/ReLU MLPs, v . (H v)
        otherwise (see flatfast.curvature.generic_hvp.generic_quadratic)."""
        return self._accumulate(self.quadratic_impl.fn, V, per_vector_shape=False)

    def _accumulate(self, fn, V, per_vector_shape):
        import torch

        V = V.to(device=self.device, dtype=self.dtype)
        if V.dim() != 2 or V.shape[-1] != self.dimension:
            raise ValueError(f"vectors: expected {self.dimension} entries per vector (the measured parameters), "
                             f"got shape {tuple(V.shape)}")
        if V.shape[0] == 0:  # no vectors: nothing to pass over the data for
            return V.new_zeros(V.shape if per_vector_shape else (0,))
        self.probe()  # a model whose loss is a random function has no curvature: refused before any product
        if self.constant_entries is not None:  # H -> M H M, M zeroing the entries torch holds constant
            V = V.masked_fill(self.constant_entries.to(self.device), 0.0)
        total, count = None, 0  # the first batch's result becomes the total: no k x P buffer of zeros besides
        with self.session(), torch.no_grad():
            for inputs, y in self.batches():
                part = fn(self, inputs, y, V).to(dtype=self.dtype)  # a no-op where the backend kept the dtype
                total = part if total is None else total.add_(part)
                count += inputs.size
        if total is None:  # this process saw no batch (a distributed rank with none): it adds zero
            total = torch.zeros_like(V) if per_vector_shape else torch.zeros(V.shape[0], dtype=self.dtype,
                                                                              device=self.device)
        if distributed():
            import torch.distributed as dist

            n = torch.tensor([count], dtype=torch.float64, device=total.device)
            dist.all_reduce(total)
            dist.all_reduce(n)
            count = int(n.item())
        if per_vector_shape and self.constant_entries is not None:
            total.masked_fill_(self.constant_entries.to(self.device), 0.0)
        total.div_(count)
        if per_vector_shape and V.shape[0] >= 2 and not self._symmetry_checked:
            self._check_symmetry(V, total)
        return total

    # Relative asymmetry of V^T H V beyond which the products are not a Hessian's, by dtype: rounding leaves far
    # less (about 1e-12 in float64 and 1e-5 in float32, where a GPU's TF32 convolutions may add 1e-3).
    _SYMMETRY_TOLERANCE = {8: 1e-6, 4: 1e-2}

    def _check_symmetry(self, V, HV):
        """V^T H V must be symmetric: the first block of two or more products checks it, at the cost of a k x k
        product. A custom autograd.Function whose backward torch cannot differentiate but does not say so (one
        marked @once_differentiable whose inputs' gradient needs no graph, say) drops a term of the second
        derivative, silently in double backward and forward-over-reverse alike, and leaves H asymmetric."""
        self._symmetry_checked = True
        S = V @ HV.T
        scale = float(S.abs().max())
        tolerance = self._SYMMETRY_TOLERANCE.get(S.element_size())
        if tolerance is None or scale == 0.0:
            return
        asymmetry = float((S - S.T).abs().max()) / scale
        if asymmetry > tolerance:
            named = f" ({', '.join(self._custom_functions)} here)" if self._custom_functions else ""
            raise ValueError(f"model: its Hessian-vector products are not symmetric (v^T H w and w^T H v differ by "
                             f"{asymmetry:.2g} of their scale), so torch's second derivative of some operation is "
                             f"wrong -- a custom autograd.Function{named} whose backward cannot be differentiated "
                             "(one marked @once_differentiable, say): give it a differentiable backward, or measure "
                             "with params= only parameters that come after it")
