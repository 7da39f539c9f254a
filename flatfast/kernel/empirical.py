"""Monte Carlo NNGP kernels of any PyTorch model: the prior covariance of its outputs over random initialisations."""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Callable, Optional, Tuple, Union

from flatfast._progress import progress_counter
from flatfast._validate import check_float, check_int, memory_guard
from flatfast.models.probe import check_chunks

if TYPE_CHECKING:  # pragma: no cover
    from flatfast._typing import ArrayLike, InputsLike, Model

_READOUTS = ("penultimate", "output")


class _StopForward(Exception):
    """Raised by the readout hook once the penultimate features are captured: the last layer is not run."""


def empirical_nngp_kernel(model: Model, X: InputsLike, kernel_samples: int = 64, *, readout: str = "penultimate",
                          sigma_w2: float = 2.0, sigma_b2: float = 1.0, init: Optional[Callable] = None,
                          batch_size: int = 1024, seed: int = 0, return_stderr: bool = False,
                          progress: Optional[bool] = None, samples: Optional[int] = None
                          ) -> Union[ArrayLike, Tuple[ArrayLike, ArrayLike]]:
    r"""The NNGP kernel of ``model``'s architecture by Monte Carlo over random initialisations.

    .. math::
        \hat K(x, x') = \frac{1}{M}\sum_{m=1}^{M} k_m(x, x'), \qquad
        k_m = \sigma_b^2 + \frac{\sigma_w^2}{d_\phi}\,\phi_m(x)\cdot\phi_m(x') \ \ (\text{readout="penultimate"}),
        \qquad k_m = \frac{1}{C} f_m(x)\cdot f_m(x') \ \ (\text{readout="output"}),

    where draw m re-initialises the network (below), :math:`\phi_m` are the
    inputs of the model's last Linear layer (its penultimate features, dimension :math:`d_\phi`) and
    :math:`f_m` its C outputs. The penultimate estimator (the authors') integrates the last layer exactly, so its
    variance is much lower than that of output products. As the width grows and M grows it converges to the
    architecture's NNGP kernel (for a ReLU MLP, :func:`flatfast.nngp_kernel`); the Monte Carlo error of each
    entry falls like 1/sqrt(M) (``return_stderr=True`` estimates it), down to the finite-width bias.

    What a draw re-initialises -- every parameterised layer:

    * the linear maps, by the paper's prior: weights :math:`N(0, \sigma_w^2/\text{fan\_in})` and biases
      :math:`N(0, \sigma_b^2)` for nn.Linear and nn.Conv layers (subclasses included), the input projections of
      nn.MultiheadAttention (fan-in: the embedding dimension) and every weight matrix of nn.LSTM, nn.GRU and
      nn.RNN (input-to-hidden and hidden-to-hidden, fan-in: their columns);
    * every other layer with parameters -- LayerNorm, embeddings, a ViT's class token and position embeddings --
      by the model's own initialiser: a Hugging Face model's ``_init_weights`` (its ``initializer_range``) for
      the modules inside it, otherwise the module's ``reset_parameters()`` (nn.Embedding N(0, 1), LayerNorm's
      ones and zeros); those draws come from torch's global generator, seeded from ``seed`` and restored
      afterwards;
    * BatchNorm keeps its parameters and running statistics (in eval mode it is a fixed affine map).

    A parameterised module that none of these covers is refused, naming it; ``init=`` then draws the whole
    network yourself. The model is copied (its own parameters are untouched) and run in eval mode on its device,
    in its dtype; K is accumulated in float64 one draw at a time (one n x n GEMM per draw; the features of all
    draws are never held at once).

    Monte Carlo error: each entry's error falls like 1/sqrt(M) down to the finite-width bias, for any
    architecture; ``return_stderr=True`` gives it for the kernel at hand, and the documentation's results ("EP's
    accuracy", the empirical kernel's Monte Carlo error; bench/empirical_log_prior.py) measure how it moves
    log P(f) for an MLP, a CNN, a BERT-style encoder and an LSTM. For another architecture, repeat with two seeds.

    Parameters
    ----------
    model : torch.nn.Module
        Any architecture whose parameterised layers the rules above cover (MLPs, CNNs, ResNets, transformers,
        LSTM/GRU nets, Hugging Face models); ``init=`` for the rest. Its output may be a tensor, a tuple (first
        element) or an object with ``logits``.
    X : torch.Tensor, array_like or mapping of tensors, n examples
        Inputs as the model takes them: a tensor or array (``model(X)``; integer token ids stay integers) or a
        mapping such as a tokenizer's output (``model(**X)``), every tensor with the n examples first.
    kernel_samples : int
        Draws M (>= 2): the same name as :func:`flatfast.log_prior`'s (``samples=``, its former name here, is still
        accepted with a FutureWarning).
    readout : {"penultimate", "output"}
    sigma_w2, sigma_b2 : float
        The prior's weight and bias variances (also the last layer's, in the penultimate formula).
    init : callable(model, generator) or None
        Your own initialiser: re-draws the copy's parameters in place from ``generator`` (a torch.Generator).
        With ``init``, the penultimate formula still uses sigma_w2 and sigma_b2 for the last layer.
    batch_size : int
        Inputs per forward pass.
    seed : int
        Seed of the draws: the same seed gives the same K.
    return_stderr : bool
        Also return the Monte Carlo standard error of every entry (float64, n x n; two more n x n arrays).
    progress : bool or None
        A progress bar over the draws (default: when stderr is a terminal).

    Returns
    -------
    K (n, n) float64, or (K, stderr): torch tensors on the model's device when X is a tensor, numpy arrays when
    X is an array (the kind it was given, as :func:`flatfast.nngp_kernel` does).

    Examples
    --------
    >>> import torch, flatfast
    >>> net = torch.nn.Sequential(torch.nn.Linear(5, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
    >>> K = flatfast.empirical_nngp_kernel(net, torch.rand(10, 5), kernel_samples=32)   # tensor in, tensor out
    >>> tuple(K.shape), K.dtype
    ((10, 10), torch.float64)
    >>> type(flatfast.empirical_nngp_kernel(net, torch.rand(10, 5).numpy(), kernel_samples=32)).__name__
    'ndarray'
    >>> class Tagger(torch.nn.Module):   # token ids in a mapping, an embedding and an LSTM
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.embed, self.rnn = torch.nn.Embedding(20, 8), torch.nn.LSTM(8, 16, batch_first=True)
    ...         self.head = torch.nn.Linear(16, 2)
    ...     def forward(self, input_ids):
    ...         return self.head(self.rnn(self.embed(input_ids))[0][:, -1])
    >>> tokens = {"input_ids": torch.randint(0, 20, (6, 5))}
    >>> tuple(flatfast.empirical_nngp_kernel(Tagger(), tokens, kernel_samples=8).shape)
    (6, 6)
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if samples is not None:
        from flatfast.errors import warn

        warn("empirical_nngp_kernel: samples= is now kernel_samples= (log_prior's name for the kernel's draws)",
             FutureWarning)
        kernel_samples = samples
    given_tensor = isinstance(X, torch.Tensor) or (  # a mapping or tuple of tensors counts as tensors
        isinstance(X, (Mapping, list, tuple)) and any(isinstance(v, torch.Tensor) for v in
                                                       (X.values() if isinstance(X, Mapping) else X)))
    draws = check_int(kernel_samples, "kernel_samples", minimum=2)
    if readout not in _READOUTS:
        raise ValueError(f"readout: expected one of {_READOUTS}, got {readout!r}")
    sigma_w2 = check_float(sigma_w2, "sigma_w2", positive=True)
    sigma_b2 = check_float(sigma_b2, "sigma_b2", nonnegative=True)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    seed = check_int(seed, "seed", minimum=0)
    if init is not None and not callable(init):
        raise TypeError(f"init: expected a callable(model, generator), got {type(init).__name__}")

    net, X = _copy_with_inputs(model, X)
    memory_guard((3 if return_stderr else 1) * 8.0 * X.size * X.size,
                 f"empirical_nngp_kernel on n = {X.size} inputs (n x n float64 accumulators)")
    redraw = _redraw(net, init, sigma_w2, sigma_b2, seed)
    first_chunk = check_chunks(net, X, batch_size)
    last_linear = _last_linear(net, first_chunk) if readout == "penultimate" else None

    def draw_kernel():
        features = _features(net, X, last_linear, batch_size).to(torch.float64)
        k = features @ features.T
        if readout == "penultimate":
            return k.mul_(sigma_w2 / features.shape[1]).add_(sigma_b2)
        return k.div_(features.shape[1])

    K, stderr = _monte_carlo_mean(redraw, draw_kernel, draws, X.size, net_device(net), return_stderr, progress)
    # the kind it was given: a tensor (on the model's device) for tensor inputs, numpy otherwise
    as_given = (lambda t: t) if given_tensor else (lambda t: t.cpu().numpy())
    return as_given(K) if stderr is None else (as_given(K), as_given(stderr))


def net_device(net):
    """The device of a network's first parameter (the CPU for a network without any)."""
    import torch

    first = next(net.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _copy_with_inputs(model, X):
    """A copy of the model in eval mode (the draws never touch the user's parameters), and X as
    :class:`~flatfast.models.batches.ModelInputs` on its device, floating-point inputs in its dtype."""
    import torch

    net = copy.deepcopy(model).eval()
    first = next(net.parameters(), None)
    dtype = first.dtype if first is not None else torch.float32
    return net, model_inputs(X).to(net_device(net), dtype)


def _redraw(net, init, sigma_w2, sigma_b2, seed):
    """A function that re-draws every parameter of ``net`` in place, from the prior (see empirical_nngp_kernel)
    or from ``init``, each call the next draw of the seeded sequence."""
    import torch

    generator = torch.Generator(device=net_device(net))
    generator.manual_seed(seed)
    if init is not None:
        return lambda: init(net, generator)
    rules = _prior_rules(net)
    global_draws = torch.Generator().manual_seed(seed + 1)  # seeds torch's global RNG for the own initialisers
    return lambda: _draw_from_prior(net, generator, sigma_w2, sigma_b2, rules=rules, global_draws=global_draws)


def _monte_carlo_mean(redraw, draw_kernel, draws, n, device, return_stderr, progress):
    """(mean of ``draws`` kernels, each taken after ``redraw()``, and the standard error of every entry or None),
    accumulated in float64 one draw at a time."""
    import torch

    total = torch.zeros(n, n, dtype=torch.float64, device=device)
    squares = torch.zeros_like(total) if return_stderr else None
    update, bar = progress_counter(draws, "flatfast empirical NNGP", progress)
    try:
        with torch.no_grad():
            for drawn in range(1, draws + 1):
                redraw()
                k = draw_kernel()
                total += k
                if squares is not None:
                    squares.addcmul_(k, k)
                if update is not None:
                    update(drawn)
    finally:
        if bar is not None:
            bar.close()
    K = total / draws
    if squares is None:
        return K, None
    variance = (squares / draws - K * K).clamp_(min=0.0) * (draws / (draws - 1))
    return K, (variance / draws).sqrt_()


def model_inputs(X, name="X"):
    """X as :class:`flatfast.models.batches.ModelInputs`: a tensor or array (one positional input) or a mapping of
    tensors (keyword inputs), with n >= 1 examples first and finite floating-point values."""
    import torch

    from flatfast.models.batches import ModelInputs

    if not isinstance(X, (torch.Tensor, Mapping, list, tuple)):
        X = torch.as_tensor(X)
    elif isinstance(X, (list, tuple)) and not any(isinstance(v, torch.Tensor) for v in X):
        X = torch.as_tensor(X)  # nested lists of numbers: one array
    if isinstance(X, torch.Tensor) and (X.ndim < 1 or X.shape[0] == 0):
        raise ValueError(f"{name}: expected a batch of inputs (n, ...), got shape {tuple(X.shape)}")
    inputs = ModelInputs.of(X, name=name)
    if inputs.size == 0:
        raise ValueError(f"{name}: holds no examples")
    for t in inputs.tensors():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: contains NaN or infinite values")
    return inputs


def _linear_maps(module):
    """[(weight, fan_in)] and [bias] of a layer whose parameters are linear maps (see empirical_nngp_kernel), or
    None for any other module."""
    import torch.nn as nn

    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        weights = [(module.weight, module.weight[0].numel())]  # in_features, or in_channels / groups x kernel
        return weights, [module.bias] if module.bias is not None else []
    if isinstance(module, nn.MultiheadAttention):  # out_proj is an nn.Linear of its own
        own = dict(module.named_parameters(recurse=False))
        weights = [(w, w.shape[1]) for k, w in own.items() if k.endswith("proj_weight")]
        return weights, [b for k, b in own.items() if k in ("in_proj_bias", "bias_k", "bias_v")]
    if isinstance(module, nn.RNNBase):
        own = dict(module.named_parameters(recurse=False))
        return [(w, w.shape[1]) for k, w in own.items() if k.startswith("weight")], \
            [b for k, b in own.items() if k.startswith("bias")]
    return None


def _own_initialiser(net, name, module):
    """The model's own initialiser of ``module``: the innermost enclosing Hugging Face model's _init_weights, else
    the module's reset_parameters; None if it has neither."""
    parts = name.split(".") if name else []
    for depth in range(len(parts) - 1, -1, -1):
        owner = net.get_submodule(".".join(parts[:depth]))
        if callable(getattr(owner, "_init_weights", None)) and hasattr(owner, "config"):
            return lambda: owner._init_weights(module)
    if callable(getattr(module, "reset_parameters", None)):
        return module.reset_parameters
    return None


def _prior_rules(net):
    """How each parameterised module of ``net`` is drawn: [("linear", weights, biases) | ("own", initialiser)];
    BatchNorm is kept. Refuses, naming it, a module that no rule covers."""
    import torch.nn as nn

    rules = []
    for name, module in net.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        maps = _linear_maps(module)
        if maps is not None:
            rules.append(("linear",) + maps)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        else:
            initialiser = _own_initialiser(net, name, module)
            if initialiser is None:
                raise ValueError(f"model: module {name or '(root)'} ({type(module).__name__}) has parameters that "
                                 "no prior covers (not a linear map, no reset_parameters(), not inside a Hugging "
                                 "Face model); pass init=callable(model, generator) to draw them yourself")
            rules.append(("own", initialiser))
    return rules


def _draw_from_prior(net, generator, sigma_w2, sigma_b2, *, rules=None, global_draws=None):
    """One draw of every parameterised layer of ``net`` (see empirical_nngp_kernel), in place: the linear maps
    from ``generator`` (module by module, weight before bias: the draw flatfast.experiments' networks start
    from), the own initialisers from torch's global generator, seeded from ``global_draws`` (default:
    ``generator``) and restored afterwards. ``rules``: :func:`_prior_rules` of ``net``, computed once by callers
    that draw many times."""
    import torch

    rules = _prior_rules(net) if rules is None else rules
    with torch.no_grad():
        _draw_linear_maps(rules, generator, sigma_w2, sigma_b2)
        own = [rule[1] for rule in rules if rule[0] == "own"]
        if own:
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=global_draws or generator))
            devices = [generator.device] if generator.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                for initialise in own:
                    initialise()


def _draw_linear_maps(rules, generator, sigma_w2, sigma_b2):
    for rule in rules:
        if rule[0] == "linear":
            _, weights, biases = rule
            for weight, fan_in in weights:
                weight.normal_(0.0, math.sqrt(sigma_w2 / fan_in), generator=generator)
            for bias in biases:
                bias.normal_(0.0, math.sqrt(sigma_b2), generator=generator)


def _last_linear(net, probe):
    """The last nn.Linear the forward pass runs (:func:`flatfast.models.layers.last_linear`), the model's own errors
    named with the inputs' shapes."""
    from flatfast.models.layers import last_linear

    try:
        found = last_linear(net, probe)
    except Exception as exc:  # noqa: BLE001 - the model's own error, with the argument it concerns
        _raise_rejected(probe, exc)
    if found is None:
        raise ValueError("model: has no nn.Linear layer, so readout='penultimate' has no penultimate features; "
                         "use readout='output'")
    return found


def _forward(net, inputs):
    try:
        return inputs.call(net)
    except _StopForward:
        raise
    except Exception as exc:  # noqa: BLE001 - the model's own error, with the argument it concerns
        _raise_rejected(inputs, exc)


def _raise_rejected(inputs, exc):
    shapes = [tuple(t.shape) for t in (*inputs.args, *inputs.kwargs.values()) if hasattr(t, "shape")]
    raise ValueError(f"X: the model rejected inputs of shape{'s' if len(shapes) > 1 else ''} "
                     f"{', '.join(map(str, shapes))}: {exc}") from exc


def _features(net, X, last_linear, batch_size):
    """Penultimate features (inputs of the last Linear layer, flattened), or the outputs, for all of X."""
    import torch

    out = []
    for start in range(0, X.size, batch_size):
        chunk = X[start: start + batch_size]
        if last_linear is None:
            out.append(_forward(net, chunk).reshape(chunk.size, -1))
            continue
        captured = []

        def hook(module, inputs):
            captured.append(inputs[0])
            raise _StopForward

        handle = last_linear.register_forward_pre_hook(hook)
        try:
            _forward(net, chunk)
        except _StopForward:
            pass
        finally:
            handle.remove()
        out.append(captured[0].reshape(chunk.size, -1))
    return out[0] if len(out) == 1 else torch.cat(out)

