"""Small helpers shared by the curvature code: eval mode, torch.distributed, finite losses."""
from __future__ import annotations

import contextlib


def distributed():
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return False
    return dist.is_available() and dist.is_initialized()


def mean_over_ranks(total, count, device):
    """total / count, with both summed over the ranks first under torch.distributed (each rank holds a shard)."""
    if distributed():
        import torch
        import torch.distributed as dist

        buf = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
        dist.all_reduce(buf)
        total, count = float(buf[0]), int(buf[1])
    return total / count


@contextlib.contextmanager
def eval_mode(model):
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def check_finite(loss):
    import torch

    if not bool(torch.isfinite(loss).all()):
        raise FloatingPointError("loss: is NaN or infinite on a batch; the Hessian is undefined there")


# --- which parameters, and the state every curvature pass runs in ------------------------------------------------

MODES = ("eval", "train")


def select_parameters(model, params=None):
    """[(name, parameter)] that a curvature measure differentiates, in ``model.named_parameters()`` order.

    ``params`` None: every parameter with requires_grad (frozen ones left out, as PyHessian and curvlinops do).
    Otherwise parameters (tensors), their names in ``model.named_parameters()``, (name, parameter) pairs as
    ``module.named_parameters()`` yields them, or modules (all their parameters), alone or in any iterable;
    parameters named explicitly are included even when frozen. Duplicates count once.
    """
    import difflib

    import torch

    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError("model: has no trainable parameters (every parameter has requires_grad=False); name "
                             "the ones to measure with params=")
        return chosen
    by_id = {id(p): n for n, p in named}
    by_name = dict(named)
    if isinstance(params, (str, torch.Tensor, torch.nn.Module)):
        params = [params]
    try:
        entries = list(params)
    except TypeError:
        raise TypeError(f"params: expected parameters, parameter names or modules (or an iterable of them), got "
                        f"{type(params).__name__}") from None
    wanted = set()
    for i, entry in enumerate(entries):
        if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], torch.Tensor):
            entry = entry[1]  # (name, parameter) from a submodule's named_parameters(): matched by identity
        if isinstance(entry, torch.nn.Module):
            found = [id(p) for p in entry.parameters()]
            missing = [f for f in found if f not in by_id]
            if not found or missing:
                raise ValueError(f"params: entry {i} ({type(entry).__name__}) "
                                 + ("has no parameters" if not found else "is not a submodule of the model"))
            wanted.update(found)
        elif isinstance(entry, str):
            if entry not in by_name:
                close = difflib.get_close_matches(entry, list(by_name), n=3)
                listed = ", ".join(list(by_name)[:6]) + (", ..." if len(by_name) > 6 else "")
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else \
                    f"; the model's parameters are {listed}"
                raise ValueError(f"params: {entry!r} is not a parameter name of the model{hint}")
            wanted.add(id(by_name[entry]))
        elif isinstance(entry, torch.Tensor):
            if id(entry) not in by_id:
                raise ValueError(f"params: entry {i} (a tensor of shape {tuple(entry.shape)}) is not a parameter of "
                                 "the model")
            wanted.add(id(entry))
        else:
            raise TypeError(f"params: entry {i} is a {type(entry).__name__}; expected a parameter, a parameter "
                            "name or a module")
    if not wanted:
        raise ValueError("params: is empty; name at least one parameter (or leave params=None for all trainable "
                         "ones)")
    return [(n, p) for n, p in named if id(p) in wanted]


def _random_dropouts(model):
    """Names of the modules that drop out at random in training mode (nn.Dropout* with p > 0, and attention
    dropout inside nn.MultiheadAttention)."""
    import torch.nn as nn

    found = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            found.append(name or type(m).__name__)
        elif isinstance(m, nn.MultiheadAttention) and m.dropout > 0:
            found.append(name or type(m).__name__)
    return found


def check_mode(model, mode):
    """Validate ``mode`` for a curvature measure: "eval" (default; BatchNorm's running statistics, no dropout)
    or "train" (BatchNorm's batch statistics), which refuses a model with active dropout: its loss is a
    different random function at every pass, so products of one operator would disagree."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if mode == "train":
        dropouts = _random_dropouts(model)
        if dropouts:
            raise ValueError(f"mode: 'train' would drop out at random in {', '.join(dropouts[:4])}"
                             f"{' and more' if len(dropouts) > 4 else ''}, so the loss would change from pass to "
                             "pass; use mode='eval' (the default, as PyHessian does) or set their p to 0")
    return mode


_JVP_DECOMPOSITIONS_LOADED = False


def _load_jvp_decompositions():
    """torch.func's first jvp imports torch._decomp.decompositions_for_jvp, which calls the deprecated
    torch.jit.script at import time; import it once here with that one warning silenced, so that a user's
    first curvature call does not print torch's deprecation notice."""
    global _JVP_DECOMPOSITIONS_LOADED
    if _JVP_DECOMPOSITIONS_LOADED:
        return
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=DeprecationWarning)
        try:
            import torch._decomp.decompositions_for_jvp  # noqa: F401
        except ImportError:  # pragma: no cover - a torch without it has no such warning either
            pass
    _JVP_DECOMPOSITIONS_LOADED = True


@contextlib.contextmanager
def measuring(model, mode="eval"):
    """The state every curvature pass runs in, restored afterwards:

    * the model in ``mode`` (see :func:`check_mode`); in "train" mode BatchNorm normalises by batch statistics
      without updating its running statistics (``track_running_stats`` off for the pass), so measuring never
      changes the model and the pass can be vmapped;
    * attention through torch's math backend for scaled_dot_product_attention and without nn.MultiheadAttention's
      fused fast path: the fused kernels (flash, memory-efficient, the CPU flash kernel) have neither a
      forward-mode derivative nor a double backward, the math backend has both;
    * recurrent layers (LSTM, GRU, RNN) on torch's composite implementation instead of oneDNN (CPU) or cuDNN
      (GPU), whose fused kernels have no forward-mode derivative (cuDNN's no double backward either); only
      when the model has such a layer, since turning them off slows convolutions too.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _load_jvp_decompositions()
    modes = [(m, m.training) for m in model.modules()]
    norms = [(m, m.track_running_stats) for m in model.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    recurrent = any(isinstance(m, torch.nn.RNNBase) for m in model.modules())
    fastpath = torch.backends.mha.get_fastpath_enabled()
    fused_rnn = (torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled)
    with sdpa_kernel(SDPBackend.MATH):
        try:
            model.train(mode == "train")
            if mode == "train":
                for m, _ in norms:
                    m.track_running_stats = False
            torch.backends.mha.set_fastpath_enabled(False)
            if recurrent:
                torch.backends.mkldnn.enabled = torch.backends.cudnn.enabled = False
            yield
        finally:
            torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled = fused_rnn
            torch.backends.mha.set_fastpath_enabled(fastpath)
            for m, tracking in norms:
                m.track_running_stats = tracking
            for m, training in modes:
                m.training = training
