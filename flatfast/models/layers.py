"""Which layers a model runs, found by running it."""
from __future__ import annotations


def last_linear(model, inputs):
    """The last nn.Linear that a forward pass of ``inputs`` (a :class:`flatfast.models.batches.ModelInputs`) runs --
    not the last one registered: the two can differ -- or None if it runs none. Errors of the model propagate."""
    import torch

    order = []

    def ran(module, args, output):  # returns None: a forward hook's return value would replace the output
        order.append(module)

    run_with_hooks(model, inputs, [m.register_forward_hook(ran) for m in model.modules()
                                   if isinstance(m, torch.nn.Linear)])
    return order[-1] if order else None


def run_with_hooks(model, inputs, handles):
    """One forward pass of ``inputs`` without gradients, then the hooks of ``handles`` removed, whatever happened."""
    import torch

    try:
        with torch.no_grad():
            inputs.call(model)
    finally:
        for h in handles:
            h.remove()
