"""cuSOLVER's 64-bit Cholesky and cuBLAS's triangular solve, called through ctypes on cupy arrays in place: the
GPU side of EP's dense linear algebra (:func:`flatfast.backend.xp.linalg_for`). Runs only on a GPU."""
from __future__ import annotations

import numpy as np


_CUSOLVER_NAMES = ("libcusolver.so.12", "libcusolver.so.11", "libcusolver.so")
_FILL_LOWER = 0
_CUDA_R_32F, _CUDA_R_64F = 0, 1
_CUSOLVER = {}


def cusolver_unavailable():
    """None when cuSOLVER's 64-bit POTRF can be loaded, else why not."""
    try:
        _cusolver_library()
    except OSError as exc:
        return str(exc)
    return None


def _cusolver_library():
    """cuSOLVER, as cupy loaded it (a library already in the process is found by its soname), for the 64-bit
    generic POTRF (cusolverDnXpotrf, with 64-bit sizes)."""
    if "lib" in _CUSOLVER:
        return _CUSOLVER["lib"]
    import ctypes
    import os

    import cupy

    try:
        cupy.cuda.device.get_cusolver_handle()  # makes cupy load its cuSOLVER first
    except Exception:  # noqa: BLE001 - then the names below decide
        pass
    names = [os.environ["FLATFAST_CUSOLVER"]] if os.environ.get("FLATFAST_CUSOLVER") else \
        list(_CUSOLVER_NAMES) + _cusolver_paths_of_the_cuda_wheels()
    errors = []
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError as exc:
            errors.append(str(exc))
    else:
        raise OSError("cuSOLVER could not be loaded (" + "; ".join(errors) + "); set FLATFAST_CUSOLVER to the path "
                      "of libcusolver.so")
    p, i32, i64, size, size_p = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_size_t, \
        ctypes.POINTER(ctypes.c_size_t)
    signatures = {
        "cusolverDnSetStream": (p, p),
        "cusolverDnCreateParams": (ctypes.POINTER(p),),
        "cusolverDnXpotrf_bufferSize": (p, p, i32, i64, i32, p, i64, i32, size_p, size_p),
        "cusolverDnXpotrf": (p, p, i32, i64, i32, p, i64, i32, p, size, p, size, p),
    }
    for fname, argtypes in signatures.items():
        try:
            fn = getattr(lib, fname)
        except AttributeError as exc:
            raise OSError(f"the loaded cuSOLVER has no {fname} (CUDA 11.4 or newer is needed)") from exc
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    _CUSOLVER["lib"] = lib
    return lib


def _cusolver_paths_of_the_cuda_wheels():
    """Where NVIDIA's pip wheels (nvidia-cusolver, as cupy-cuda13x installs them) keep libcusolver, found by
    cuda-pathfinder when it is installed; a soname lookup finds these only once something has loaded them."""
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib
    except ImportError:
        return []
    try:
        return [load_nvidia_dynamic_lib("cusolver").abs_path]
    except Exception:  # noqa: BLE001 - not found: the error list above already says what was tried
        return []


class CusolverFactor:  # pragma: no cover - runs only on a GPU
    """POTRF in place on a cupy buffer (cusolverDnXpotrf, the 64-bit API), on cupy's handle and current stream.
    Returns 0 or devInfo (> 0: the leading minor that is not positive definite); a nonzero cuSOLVER status raises
    RuntimeError."""

    def __init__(self, cupy):
        import ctypes

        self.cp, self.ct = cupy, ctypes
        self.lib = _cusolver_library()
        self._params = ctypes.c_void_p()
        self._check(self.lib.cusolverDnCreateParams(ctypes.byref(self._params)), "cusolverDnCreateParams")

    def _check(self, status, what):
        if status != 0:
            raise RuntimeError(f"{what} returned cuSOLVER status {status}")

    def __call__(self, buffer):
        cp, ct, lib = self.cp, self.ct, self.lib
        _check_square_buffer(cp, buffer)
        n = buffer.shape[0]
        kind = _CUDA_R_64F if buffer.dtype == cp.float64 else _CUDA_R_32F
        handle = cp.cuda.device.get_cusolver_handle()
        self._check(lib.cusolverDnSetStream(handle, cp.cuda.get_current_stream().ptr), "cusolverDnSetStream")
        info = cp.zeros(1, dtype=cp.int32)
        dev_bytes, host_bytes = ct.c_size_t(), ct.c_size_t()
        self._check(lib.cusolverDnXpotrf_bufferSize(handle, self._params, _FILL_LOWER, n, kind, buffer.data.ptr, n,
                                                    kind, ct.byref(dev_bytes), ct.byref(host_bytes)),
                    "cusolverDnXpotrf_bufferSize")
        dev_work = cp.empty(max(1, dev_bytes.value), dtype=cp.uint8)
        host_work = np.empty(max(1, host_bytes.value), dtype=np.uint8)
        self._check(lib.cusolverDnXpotrf(handle, self._params, _FILL_LOWER, n, kind, buffer.data.ptr, n, kind,
                                         dev_work.data.ptr, dev_bytes.value, host_work.ctypes.data, host_bytes.value,
                                         info.data.ptr), "cusolverDnXpotrf")
        return int(info.get()[0])


class CublasSolve:  # pragma: no cover - runs only on a GPU
    """rhs <- L[start:, start:]^-1 rhs (L^-T with ``transpose``) in place, by cuBLAS TRSM through cupy's binding:
    L is the column-major lower triangle of the C-ordered buffer, so its trailing block starts at element
    (start, start) with leading dimension n; rhs is a vector or an F-ordered (n - start) x k block."""

    def __init__(self, cupy):
        from cupy.cuda import cublas

        self.cp, self.cublas = cupy, cublas

    def __call__(self, buffer, start, rhs, transpose=False):
        cp, cublas = self.cp, self.cublas
        _check_square_buffer(cp, buffer)
        n = buffer.shape[0]
        rows = n - start
        if rhs.dtype != buffer.dtype or rhs.shape[0] != rows or not rhs.flags.f_contiguous:
            raise ValueError(f"rhs: expected an F-ordered {buffer.dtype} block of {rows} rows")
        trsm = cublas.dtrsm if buffer.dtype == cp.float64 else cublas.strsm
        one = np.ones(1, dtype=buffer.dtype)
        trsm(cp.cuda.device.get_cublas_handle(), cublas.CUBLAS_SIDE_LEFT, cublas.CUBLAS_FILL_MODE_LOWER,
             cublas.CUBLAS_OP_T if transpose else cublas.CUBLAS_OP_N, cublas.CUBLAS_DIAG_NON_UNIT, rows,
             1 if rhs.ndim == 1 else rhs.shape[1], one.ctypes.data, buffer.data.ptr + (start * n + start) *
             buffer.itemsize, n, rhs.data.ptr, rows)
        return rhs


def _check_square_buffer(cp, buffer):
    if buffer.ndim != 2 or buffer.shape[0] != buffer.shape[1] or not buffer.flags.c_contiguous:
        raise ValueError("buffer: expected a C-contiguous square matrix")
    if buffer.dtype not in (cp.float64, cp.float32):
        raise TypeError(f"buffer: expected float64 or float32, got {buffer.dtype}")
