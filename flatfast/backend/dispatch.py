"""One dispatch mechanism for every native primitive.

It knows nothing of its clients: each part registers its own implementations where they are defined (the NNGP
kernel's in :mod:`flatfast.kernel.nngp_backends`, the R-operator's in :mod:`flatfast.curvature.mlp_rop`), and
``import flatfast`` imports every part. Each primitive (``nngp``, ``mlp_hvp``) registers its implementations with a device list, a priority and an
availability probe. ``dispatch(op, backend, device)`` returns the implementation to run:

* ``backend="auto"`` takes the highest-priority available implementation for the device. Falling back to
  the pure reference where a native one exists for that device issues one :class:`BackendFallbackWarning`
  per reason, naming why the native one cannot run.
* A named backend runs that implementation or raises :class:`BackendUnavailableError` saying why not.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

from flatfast.errors import BackendFallbackWarning, BackendUnavailableError, warn

Probe = Callable[[], Optional[str]]  # returns None when available, else the reason it is not


@dataclasses.dataclass(frozen=True)
class Impl:
    op: str
    name: str
    fn: Callable
    devices: Tuple[str, ...]
    priority: int
    probe: Probe
    reference: bool = False
    auto_devices: Tuple[str, ...] = ()  # where "auto" may pick it; empty = all of `devices`

    def unavailable_reason(self, device: str) -> Optional[str]:
        if device not in self.devices:
            return f"{self.name} does not run on {device} data (runs on: {', '.join(self.devices)})"
        return self.probe()


_REGISTRY: Dict[str, List[Impl]] = {}
_WARNED: set = set()


def register(op: str, name: str, fn: Callable, *, devices, priority: int, probe: Probe = lambda: None,
             reference: bool = False, auto_devices=None) -> None:
    """Register ``fn`` as backend ``name`` of primitive ``op``. ``auto_devices`` limits where ``backend="auto"``
    may choose it (Triton runs CPU tensors only under its interpreter, for testing)."""
    impls = _REGISTRY.setdefault(op, [])
    impls[:] = [i for i in impls if i.name != name]
    impls.append(Impl(op, name, fn, tuple(devices), priority, probe, reference, tuple(auto_devices or ())))
    impls.sort(key=lambda i: -i.priority)


def backend_names(op: str) -> List[str]:
    return [i.name for i in _REGISTRY.get(op, [])]


def dispatch(op: str, backend: str, device: str) -> Impl:
    impls = _REGISTRY[op]
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a string, got {type(backend).__name__}")
    if backend != "auto":
        for impl in impls:
            if impl.name == backend:
                reason = impl.unavailable_reason(device)
                if reason is not None:
                    raise BackendUnavailableError(f"backend={backend!r} for {op} cannot run: {reason}")
                return impl
        raise ValueError(f"backend: unknown backend {backend!r} for {op}; choose 'auto' or one of {backend_names(op)}")
    skipped = []
    for impl in impls:
        if device not in (impl.auto_devices or impl.devices):
            continue
        reason = impl.probe()
        if reason is None:
            if impl.reference and skipped:
                key = (op, device, tuple(skipped))
                if key not in _WARNED:
                    _WARNED.add(key)
                    why = "; ".join(f"{name}: {r}" for name, r in skipped)
                    warn(f"flatfast: {op} falls back to the slow reference implementation ({why})",
                         BackendFallbackWarning)
            return impl
        skipped.append((impl.name, reason))
    raise BackendUnavailableError(f"no backend for {op} runs on {device}: {skipped}")


def backends() -> Dict[str, Dict[str, str]]:
    """What can run here: ``{op: {backend: "available (devices)" | "unavailable: reason"}}`` for every primitive
    (``nngp``, the NNGP kernel; ``mlp_hvp`` and ``mlp_vhv``, the R-operator of Linear/ReLU networks) and every
    backend registered for it. ``flatfast info`` prints the same.

    Examples
    --------
    >>> import flatfast
    >>> flatfast.backends()["nngp"]["reference"]
    'available (cpu/cuda)'
    """
    result: Dict[str, Dict[str, str]] = {}
    for op, impls in _REGISTRY.items():
        result[op] = {}
        for impl in impls:
            reason = impl.probe()
            where = "/".join(impl.devices)
            result[op][impl.name] = f"available ({where})" if reason is None else f"unavailable: {reason}"
    return result
