"""Which parameters a curvature measure differentiates: ``params=`` as users give it."""
from __future__ import annotations


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
