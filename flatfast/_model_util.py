"""Small helpers shared by the curvature code: eval mode, torch.distributed, finite losses."""
from __future__ import annotations

import contextlib


def distributed():
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return False
    return dist.is_available() and dist.is_initialized()


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
