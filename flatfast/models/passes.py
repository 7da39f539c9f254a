"""What every pass over the data shares: sums over the ranks under torch.distributed, and a loss that must be
finite."""
from __future__ import annotations


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


def check_finite(loss):
    import torch

    if not bool(torch.isfinite(loss).all()):
        raise FloatingPointError("loss: is NaN or infinite on a batch; the Hessian is undefined there")
