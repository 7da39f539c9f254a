import os

# The Triton kernels run on CPU tensors under the interpreter; it must be set before flatfast.kernels is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(scope="module")
def float64_by_default():
    """Every model and tensor a module builds in float64 (a module asks with ``pytestmark =
    pytest.mark.usefixtures("float64_by_default")``), so products agree with dense float64 references to 1e-6."""
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def devices_here():
    """The devices this machine has: always "cpu", and "cuda" when torch sees a GPU. Backend tests run once per
    device present, so on a GPU machine the same suite checks the CUDA paths against the same references."""
    try:
        import torch
    except ImportError:
        return ["cpu"]
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def nngp_backends_here():
    """(backend, device) pytest params for every nngp backend on every device present that it runs on; one that
    cannot run here is skipped with its reason (never silently dropped)."""
    import flatfast.backend.dispatch  # noqa: F401  (registers the backends)
    from flatfast.backend.dispatch import _REGISTRY

    params = []
    for device in devices_here():
        for impl in _REGISTRY["nngp"]:
            if device not in impl.devices:
                continue
            reason = impl.unavailable_reason(device)
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            params.append(pytest.param(impl.name, device, marks=marks, id=f"{impl.name}-{device}"))
    return params


def on_device(array, device):
    """A numpy array as the kernel should see it on ``device``: numpy on the CPU, a torch tensor on CUDA."""
    if array is None or device == "cpu":
        return array
    import torch

    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def to_numpy(result):
    return result if isinstance(result, np.ndarray) else result.detach().cpu().numpy()


def native_module_or_skip():
    """flatfast._C for native-only tests. A pure-Python install, declared by FLATFAST_NO_NATIVE=1, skips them with
    the reason; anywhere else a missing or broken module is a failure, never a silent skip."""
    from flatfast.backend.native import load_cpp

    module, reason = load_cpp()
    if module is None and os.environ.get("FLATFAST_NO_NATIVE") == "1":
        pytest.skip(f"native-only test in a pure-Python install: {reason}")
    assert module is not None, reason
    return module
