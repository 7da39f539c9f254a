"""Lazy loaders for the optional native pieces. Each returns (module or None, reason it is unavailable).

Nothing here is imported at ``import flatfast`` time: torch alone costs ~1.7 s to import, and a missing
extension, Triton or GPU must never stop flatfast from importing.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
from typing import Optional


@functools.lru_cache(maxsize=None)
def load_cpp():
    """flatfast._C, the C++ CPU kernels (OpenMP or std::thread workers), once its BLAS is known to work.

    ``FLATFAST_NO_NATIVE=1`` in the environment turns it off at run time as it does at install time.
    """
    if os.environ.get("FLATFAST_NO_NATIVE") == "1":
        return None, "turned off by FLATFAST_NO_NATIVE=1; every function runs on the numpy/torch reference"
    try:
        # The C++ kernels borrow scipy's BLAS; import it first so that thread limits below see it.
        importlib.import_module("scipy.linalg.cython_blas")
    except ImportError as exc:
        return None, f"scipy.linalg.cython_blas, whose BLAS the C++ kernels call, cannot be imported ({exc})"
    try:
        module = importlib.import_module("flatfast._C")
    except ImportError as exc:
        return None, (f"the C++ extension flatfast._C is not built ({exc}): a pure-Python install "
                      "(FLATFAST_NO_NATIVE=1) or an install from source without a compiler; build it with "
                      "`pip install -e .` and a C++17 compiler")
    try:
        error = module.blas_check()
    except Exception as exc:  # a capsule that is missing or does not resolve
        return None, f"scipy's BLAS (scipy.linalg.cython_blas) is not usable from C++ ({exc})"
    if not error <= 1e-5:
        return None, f"scipy's BLAS returned a wrong product through scipy.linalg.cython_blas (error {error:g})"
    return module, None


def cpp_build_summary() -> str:
    """One line on how the C++ core was built and runs: threading runtime and worker count."""
    module, reason = load_cpp()
    if module is None:
        return f"C++ core: not in use ({reason})"
    return (f"C++ core: {module.threading()} workers, {module.num_threads()} threads "
            "(FLATFAST_NUM_THREADS sets it); BLAS from scipy.linalg.cython_blas")


def torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def load_triton():
    """The Triton kernels (flatfast.kernels); they run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return None, f"triton is not installed ({exc}); `pip install triton`"
    try:
        return importlib.import_module("flatfast.kernels"), None
    except ImportError as exc:  # pragma: no cover - a broken install
        return None, f"flatfast.kernels failed to import ({exc})"


@functools.lru_cache(maxsize=None)
def load_cuda():
    """flatfast._C_cuda, the CUDA C++ kernels (built only with FLATFAST_CUDA=1)."""
    try:
        mod = importlib.import_module("flatfast._C_cuda")
    except ImportError as exc:
        return None, f"the CUDA extension flatfast._C_cuda is not built ({exc}); build with FLATFAST_CUDA=1"
    if not torch_cuda_available():
        return None, "no CUDA device is visible to torch"
    return mod, None


# Availability probes for the dispatcher: None when the backend can run here, else the reason it cannot.

def cpp_unavailable():
    return load_cpp()[1]


def cuda_unavailable():
    return load_cuda()[1]


def triton_unavailable():
    module, reason = load_triton()
    if module is None:
        return reason
    if not (torch_cuda_available() or triton_interpreted()):
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly, for testing)"
    return None


def triton_devices():
    """The devices whose tensors Triton runs: CUDA; the CPU too under its interpreter (tests), which is chosen
    before triton is imported."""
    return ("cuda", "cpu") if triton_interpreted() else ("cuda",)


def require_triton_device(device_type):
    """Triton launches on CUDA tensors; CPU tensors only under its interpreter (tests)."""
    if device_type == "cpu" and not triton_interpreted():
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")


@functools.lru_cache(maxsize=None)
def _blas_controller():
    """threadpoolctl's view of the loaded libraries, taken once scipy's BLAS -- the one the C++ core calls -- is
    loaded (a controller made earlier would not see it); None without threadpoolctl."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    import scipy.linalg.cython_blas  # noqa: F401

    return ThreadpoolController()


_BLAS_LOCK = threading.Lock()
_BLAS_STATE = {"users": 0, "limiter": None}


@contextlib.contextmanager
def single_threaded_blas():
    """Limit every loaded BLAS to one thread while native code calls BLAS from its own worker threads; yields
    whether a BLAS was found and limited (False without threadpoolctl, or when it sees no BLAS).

    Without the limit, OpenBLAS's threads spin on the same cores as the workers and halve throughput. The limit is
    process-wide, so it is reference-counted: the first caller in sets it, the last one out restores the
    original, and Python threads calling the kernels concurrently cannot leave numpy single-threaded.
    """
    controller = _blas_controller()
    if controller is None or not controller.select(user_api="blas").lib_controllers:
        yield False
        return
    with _BLAS_LOCK:
        if _BLAS_STATE["users"] == 0:
            _BLAS_STATE["limiter"] = controller.limit(limits=1, user_api="blas")
        _BLAS_STATE["users"] += 1
    try:
        yield True
    finally:
        with _BLAS_LOCK:
            _BLAS_STATE["users"] -= 1
            if _BLAS_STATE["users"] == 0:
                _BLAS_STATE["limiter"].restore_original_limits()
                _BLAS_STATE["limiter"] = None


# Below this many multiply-adds the threadpoolctl round trip (~1 ms) costs more than parallel tiles could gain.
_SINGLE_THREAD_BLAS_MIN_WORK = 2_000_000


def run_with_blas_limited(work, fn, *args):
    """``fn(*args)``, a C++ kernel whose workers call BLAS, so that no threaded BLAS is ever called inside a
    parallel region: its tiles run in parallel only while every loaded BLAS is limited to one thread; below
    ``work`` = 2 million multiply-adds (where the limit's round trip costs more than it saves), or where no BLAS
    can be limited, they run on the calling thread (``serial=True``) and BLAS may thread on its own."""
    if work >= _SINGLE_THREAD_BLAS_MIN_WORK:
        with single_threaded_blas() as limited:
            if limited:
                return fn(*args)
    return fn(*args, serial=True)


def set_num_threads(threads: Optional[int] = None) -> Optional[int]:
    """Set how many threads the C++ kernels use (None: the default -- FLATFAST_NUM_THREADS, else OpenMP's or the
    hardware's count). Returns the count in force before. Without the C++ core it does nothing and returns None.

    Examples
    --------
    >>> import flatfast
    >>> previous = flatfast.set_num_threads(1)
    >>> _ = flatfast.set_num_threads(None)   # back to the default
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads: expected a positive integer or None, got {threads!r}")
    module = load_cpp()[0]
    if module is None:
        return None
    previous = module.num_threads()
    module.set_num_threads(0 if threads is None else threads)
    return previous
