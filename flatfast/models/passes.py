"""What every pass over the data shares: sums over the ranks under torch.distributed, the dataset-mean loss, and a
loss that must be finite."""
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


def dataset_mean_loss(op, outputs_of=None):
    """L = (1/N) sum_i l(f(x_i), y_i) over the batches ``op`` (a HessianOperator) holds, f the model as it is or
    ``outputs_of(inputs)``: over all ranks' data under torch.distributed, where the value is global but the
    gradient graph covers this rank's share only (:func:`summed_over_ranks` completes the gradient)."""
    import torch

    total, count = 0.0, 0
    for inputs, y in op.held_batches():
        outputs = inputs.call(op.model) if outputs_of is None else outputs_of(inputs)
        total = total + op.loss_and_targets(outputs, y) * inputs.size
        count += inputs.size
    if not distributed():
        return total / count
    import torch.distributed as dist

    sums = torch.tensor([float(total), float(count)], dtype=torch.float64, device=op.device)
    dist.all_reduce(sums)
    # this rank's terms carry the gradient; the other ranks' are added as a constant
    return (total + (float(sums[0]) - float(total))) / float(sums[1])


def summed_over_ranks(grads):
    """Under torch.distributed, the sum over ranks of each rank's gradient, in place (every rank then takes the same
    step); the gradients as they are otherwise."""
    if distributed():
        import torch.distributed as dist

        for g in grads:
            dist.all_reduce(g)
    return grads


def check_finite(loss):
    import torch

    if not bool(torch.isfinite(loss).all()):
        raise FloatingPointError("loss: is NaN or infinite on a batch; the Hessian is undefined there")
