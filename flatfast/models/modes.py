"""The state a model is measured in: its mode (eval or train, refusing random layers) and the backends every
curvature pass runs on (attention on the math kernel, recurrent layers on their composite implementation)."""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def eval_mode(model):
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


MODES = ("eval", "train")


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
