import os

# The Triton kernels run on CPU tensors under the interpreter; it must be set before flatfast.kernels is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def nngp_backends_here():
    """Every nngp backend that can run on CPU data in this process, as pytest params (skips name the reason)."""
    import flatfast._registry  # noqa: F401  (registers the backends)
    from flatfast._dispatch import _REGISTRY

    params = []
    for impl in _REGISTRY["nngp"]:
        reason = impl.unavailable_reason("cpu")
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(impl.name, marks=marks, id=impl.name))
    return params


def native_module_or_skip():
    """flatfast._C for native-only tests. A pure-Python install, declared by FLATFAST_NO_NATIVE=1, skips them with
    the reason; anywhere else a missing or broken module is a failure, never a silent skip."""
    from flatfast._native import load_cpp

    module, reason = load_cpp()
    if module is None and os.environ.get("FLATFAST_NO_NATIVE") == "1":
        pytest.skip(f"native-only test in a pure-Python install: {reason}")
    assert module is not None, reason
    return module
