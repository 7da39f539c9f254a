"""The array-module seam: the EP solver is written once against `xp` and runs on numpy/scipy on the CPU and on
cupy on a GPU. Only the dense linear algebra below differs between the two.

Both keep EP in two n x n arrays: K and one workspace that is, in turn, the scaled system B, its Cholesky factor
and the factor's inverse (POTRF then TRTRI, in place). The probit likelihood's K + I is never formed: its 1 is
added on the diagonal inside the pass that writes B.
"""
from __future__ import annotations


import numpy as np


def xp_of(a):
    """numpy for numpy arrays, cupy for cupy arrays."""
    if type(a).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


# --- where EP runs -----------------------------------------------------------------------------------------

_WARNED = set()


def is_cuda_tensor(a) -> bool:
    return type(a).__module__.startswith("torch") and hasattr(a, "device") and a.device.type == "cuda"


def device_ep_unavailable():
    """None when EP can run on a CUDA device here (cupy with a GPU, and cuSOLVER's in-place POTRF/TRTRI), else
    the reason it cannot."""
    try:
        import cupy
    except ImportError:
        return ("cupy is not installed: `pip install cupy-cuda12x` (CUDA 12) or `pip install cupy-cuda13x` "
                "(CUDA 13) runs EP on the GPU")
    try:
        if not cupy.cuda.is_available():
            return "cupy sees no CUDA device"
    except Exception as exc:  # a driver/runtime mismatch raises instead of answering False
        return f"cupy cannot use the GPU ({exc})"
    return _cusolver_unavailable()


def ep_array(a, name="K"):
    """The array EP runs on for input ``a``: numpy for numpy arrays, array-likes and CPU tensors (no copy where
    the dtype and layout allow); cupy for cupy arrays and CUDA tensors (by DLPack, no copy). A CUDA tensor where
    the GPU solver cannot run is copied to the host once, with one warning saying why and what to install."""
    if type(a).__module__.startswith("cupy"):
        return _on_device_or_host(name, lambda: a, a.get)
    if type(a).__module__.startswith("torch") and hasattr(a, "detach"):
        t = a.detach()
        if not is_cuda_tensor(t):
            return t.resolve_conj().resolve_neg().numpy()

        def shared_with_cupy():
            import cupy
            import torch

            shared = cupy.from_dlpack(t if _either_contiguous(t) else t.contiguous())
            # blocks torch has freed but still caches are not free to cupy, whose workspace comes next
            torch.cuda.empty_cache()
            return shared

        return _on_device_or_host(name, shared_with_cupy, lambda: t.cpu().numpy())
    return a if hasattr(a, "shape") and hasattr(a, "dtype") else np.asarray(a, dtype=np.float64)


def _on_device_or_host(name, on_device, to_host):
    """``on_device()`` where the GPU solver can run, else ``to_host()`` after one warning saying why."""
    reason = device_ep_unavailable()
    if reason is None:
        return on_device()
    _warn_once(("ep-host", reason), f"flatfast: EP runs on the CPU, and {name} is copied to the host, because "
                                    f"{reason}")
    return to_host()


def _either_contiguous(t):
    return t.is_contiguous() or t.t().is_contiguous()


def _warn_once(key, message):
    if key in _WARNED:
        return
    _WARNED.add(key)
    from flatfast.errors import BackendFallbackWarning, warn

    warn(message, BackendFallbackWarning)


def free_bytes(xp):
    """Memory an allocation of this array module can still get: the host's available memory for numpy; for cupy
    the device's free memory plus what cupy's pool holds unused."""
    if xp is np:
        from flatfast._validate import _available_bytes

        return _available_bytes()
    free, _ = xp.cuda.runtime.memGetInfo()
    pool = xp.get_default_memory_pool()
    return free + pool.free_bytes()


# --- CPU: LAPACK in place ----------------------------------------------------------------------------------

class NumpyLinalg:
    """LAPACK/BLAS in place on a symmetric workspace: one POTRF and one TRTRI per EP sweep, no copies.

    The workspace B is symmetric, so its transpose (a Fortran-ordered view) is the same matrix and LAPACK can
    overwrite it directly. Only the lower triangle of the returned inverse factor is meaningful; every method
    here reads the lower triangle alone, so nothing is spent zeroing the rest.
    """

    xp = np

    def __init__(self):
        from scipy.linalg import blas, lapack
        from scipy.special import erfcx, log_ndtr

        # float64, and float32 for mixed-precision EP's early sweeps (LAPACK float32 is ~2x faster)
        self._lapack = {np.dtype(np.float64): (lapack.dpotrf, lapack.dtrtri, blas.dtrmv, blas.dtrmm, blas.dsymv),
                        np.dtype(np.float32): (lapack.spotrf, lapack.strtri, blas.strmv, blas.strmm, blas.ssymv)}
        self.erfcx, self.log_ndtr = erfcx, log_ndtr
        from flatfast import _native

        self._fused = _native.load_cpp()[0]  # the C++ core's fused EP passes, when built

    def scaled_system(self, K, s, out, shift=0.0):
        """out = diag(s) (K + shift I) diag(s) + I, in K's precision, written where POTRF reads it (see class
        doc). One pass over the triangle in the C++ core; two full passes in numpy without it."""
        if self._fused is not None and K.flags.c_contiguous and out.flags.c_contiguous:
            kind = "f64" if K.dtype == np.float64 else "f32"
            getattr(self._fused, f"ep_scaled_system_{kind}")(K, np.ascontiguousarray(s, dtype=np.float64), out,
                                                             float(shift))
            return out
        return scaled_system_blocked(np, K, s, out, shift)

    def cholesky_inplace(self, B):
        """Overwrite B's lower triangle (of its Fortran view) with its Cholesky factor; False if B is not
        numerically positive definite."""
        return lapack_factor(B, inverse=False) == 0

    def inverse_cholesky_inplace(self, B):
        """Overwrite symmetric positive definite B with W = L^{-1}, B = L L^T. Returns (W, sum log diag L), or
        None when B is not numerically positive definite. B is read in its C-ordered upper triangle (the lower
        triangle of its Fortran view B.T, which LAPACK factors in place); W is that Fortran view."""
        potrf, trtri = self._lapack[B.dtype][:2]
        factor, info = potrf(B.T, lower=1, overwrite_a=1, clean=0)
        if info != 0:
            return None
        half_log_det = float(np.sum(np.log(np.diagonal(factor).astype(np.float64))))
        W, info = trtri(factor, lower=1, overwrite_c=1)
        return (W, half_log_det) if info == 0 else None

    def column_norms_sq(self, W):
        """sum_k W[k, i]^2 over the lower triangle: diag(W^T W) = diag(B^{-1}), summed in float64."""
        if self._fused is not None and W.flags.f_contiguous:
            kind = "f64" if W.dtype == np.float64 else "f32"
            return getattr(self._fused, f"ep_factor_column_norms_{kind}")(W.T)
        columns = (W[i:, i].astype(np.float64, copy=False) for i in range(W.shape[0]))
        return np.fromiter((np.dot(c, c) for c in columns), dtype=np.float64, count=W.shape[0])

    def sym_matvec(self, K, x):
        """K x for symmetric K, in K's precision, through scipy's BLAS like the LAPACK calls. numpy's own
        ``K @ x`` runs on numpy's separate OpenBLAS, whose spinning threads then halve the speed of the next
        POTRF/TRTRI on a 2-core machine (measured: 60 ms instead of 32 at n = 2000). K.T is K's Fortran view."""
        return self._lapack[K.dtype][4](1.0, K.T, x.astype(K.dtype, copy=False))

    def tri_matvec(self, W, x, transpose=False):
        """W x (or W^T x) with W lower triangular, in W's precision."""
        return self._lapack[W.dtype][2](W, x.astype(W.dtype, copy=False), lower=1, trans=1 if transpose else 0)

    def tri_matmul(self, W, X):
        """W X with W lower triangular (one BLAS-3 call for a block of columns), in W's precision."""
        return self._lapack[W.dtype][3](1.0, W, np.asfortranarray(X, dtype=W.dtype), lower=1)


# --- any array module: the GPU solver, whose factorisation is injected -----------------------------------

class ArrayLinalg:
    """EP's linear algebra for any array module, given an in-place factorisation
    ``factor(buffer, inverse=True) -> status``.

    ``factor`` treats the C-ordered n x n buffer as the column-major matrix it is to cuSOLVER and LAPACK (its
    transpose; B is symmetric, so the same matrix), factors B = L L^T in its lower triangle and inverts L there
    (POTRF then, with ``inverse``, TRTRI), and returns 0 or the failing step's nonzero status. The strict other
    triangle is then
    zeroed, so the inverse factor W = buffer.T is a plain lower-triangular matrix and every product is an
    ordinary matrix-vector product. Whole-matrix passes run over blocks of rows: nothing else n x n is allocated.

    On cupy ``factor`` is :class:`CusolverFactor`; the tests run this class on numpy with a LAPACK ``factor``.
    """

    def __init__(self, xp, factor, special, block_bytes=256 * 2**20):
        self.xp, self._factor = xp, factor
        self.erfcx, self.log_ndtr = special
        self._block_bytes = block_bytes

    def _row_blocks(self, n, itemsize):
        rows = max(1, min(n, int(self._block_bytes // max(1, n * itemsize))))
        return range(0, n, rows), rows

    def scaled_system(self, K, s, out, shift=0.0):
        return scaled_system_blocked(self.xp, K, s, out, shift, self._row_blocks(K.shape[0], K.itemsize)[1])

    def cholesky_inplace(self, B):
        """Factor B in place (POTRF alone); False if it is not numerically positive definite (a PSD check)."""
        return self._factor(B, inverse=False) == 0

    def inverse_cholesky_inplace(self, B):
        xp = self.xp
        if self._factor(B) != 0:
            return None
        n = B.shape[0]
        starts, rows = self._row_blocks(n, B.itemsize)
        columns = xp.arange(n)
        for start in starts:
            stop = min(n, start + rows)
            # buffer row i holds column i of W (entries k >= i); what lies before the diagonal is stale B
            B[start:stop] *= (columns[None, :] >= xp.arange(start, stop)[:, None])
        diagonal = xp.diagonal(B).astype(xp.float64)
        if not bool(xp.all(diagonal > 0)):
            return None
        # diag(W) = 1 / diag(L): sum log diag L without keeping the factor
        return B.T, -float(xp.sum(xp.log(diagonal)))

    def column_norms_sq(self, W):
        xp = self.xp
        buffer = W.T  # C-ordered; its row i is W's column i
        n = buffer.shape[0]
        starts, rows = self._row_blocks(n, buffer.itemsize)
        norms = xp.empty(n, dtype=xp.float64)
        for start in starts:
            block = buffer[start:start + rows]
            norms[start:start + rows] = xp.einsum("ij,ij->i", block, block, dtype=xp.float64) \
                if xp is np else (block * block).sum(axis=1, dtype=xp.float64)
        return norms

    def sym_matvec(self, K, x):
        return K @ x.astype(K.dtype, copy=False)

    def tri_matvec(self, W, x, transpose=False):
        return (W.T if transpose else W) @ x.astype(W.dtype, copy=False)

    def tri_matmul(self, W, X):
        return W @ X.astype(W.dtype, copy=False)


def scaled_system_blocked(xp, K, s, out, shift=0.0, rows=1024):
    """out = diag(s) (K + shift I) diag(s) + I in K's precision, over blocks of rows (no n x n temporary)."""
    n = K.shape[0]
    s_low = s.astype(K.dtype)
    for start in range(0, n, rows):
        block = out[start:start + rows]
        xp.multiply(K[start:start + rows], s_low[start:start + rows, None], out=block)
        block *= s_low[None, :]
    index = xp.arange(n)
    out[index, index] += (1.0 + shift * s * s).astype(K.dtype)
    return out


def lapack_factor(buffer, inverse=True):
    """The CPU stand-in for CusolverFactor: LAPACK POTRF (+ TRTRI) in place on the buffer's Fortran view."""
    from scipy.linalg import lapack

    potrf, trtri = (lapack.dpotrf, lapack.dtrtri) if buffer.dtype == np.float64 else (lapack.spotrf, lapack.strtri)
    _, info = potrf(buffer.T, lower=1, overwrite_a=1, clean=0)
    if info != 0 or not inverse:
        return info
    _, info = trtri(buffer.T, lower=1, overwrite_c=1)
    return -1 if info != 0 else 0


# --- cuSOLVER through ctypes -------------------------------------------------------------------------------

_CUSOLVER_NAMES = ("libcusolver.so.12", "libcusolver.so.11", "libcusolver.so")
_FILL_LOWER, _DIAG_NON_UNIT = 0, 0
_CUDA_R_32F, _CUDA_R_64F = 0, 1
_CUSOLVER = {}


def _cusolver_unavailable():
    try:
        _cusolver_library()
    except OSError as exc:
        return str(exc)
    return None


def _cusolver_library():
    """cuSOLVER, as cupy loaded it (a library already in the process is found by its soname); the 64-bit generic
    POTRF and TRTRI (TRTRI is the one cupy does not bind)."""
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
        "cusolverDnXtrtri_bufferSize": (p, i32, i32, i64, i32, p, i64, size_p, size_p),
        "cusolverDnXtrtri": (p, i32, i32, i64, i32, p, i64, p, size, p, size, p),
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
    """POTRF (+ TRTRI with ``inverse``) in place on a cupy buffer (cusolverDnXpotrf, cusolverDnXtrtri), on cupy's
    handle and current stream. Returns 0, the POTRF devInfo (> 0: the leading minor that is not positive definite),
    or -1 when TRTRI finds a zero pivot. A nonzero cuSOLVER status raises RuntimeError."""

    def __init__(self, cupy):
        import ctypes

        self.cp, self.ct = cupy, ctypes
        self.lib = _cusolver_library()
        self._params = ctypes.c_void_p()
        self._check(self.lib.cusolverDnCreateParams(ctypes.byref(self._params)), "cusolverDnCreateParams")

    def _check(self, status, what):
        if status != 0:
            raise RuntimeError(f"{what} returned cuSOLVER status {status}")

    def __call__(self, buffer, inverse=True):
        cp, ct, lib = self.cp, self.ct, self.lib
        if buffer.ndim != 2 or buffer.shape[0] != buffer.shape[1] or not buffer.flags.c_contiguous:
            raise ValueError("buffer: expected a C-contiguous square matrix")
        if buffer.dtype not in (cp.float64, cp.float32):
            raise TypeError(f"buffer: expected float64 or float32, got {buffer.dtype}")
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
        status = int(info.get()[0])
        if status != 0 or not inverse:
            return status
        del dev_work
        self._check(lib.cusolverDnXtrtri_bufferSize(handle, _FILL_LOWER, _DIAG_NON_UNIT, n, kind, buffer.data.ptr, n,
                                                    ct.byref(dev_bytes), ct.byref(host_bytes)),
                    "cusolverDnXtrtri_bufferSize")
        dev_work = cp.empty(max(1, dev_bytes.value), dtype=cp.uint8)
        host_work = np.empty(max(1, host_bytes.value), dtype=np.uint8)
        self._check(lib.cusolverDnXtrtri(handle, _FILL_LOWER, _DIAG_NON_UNIT, n, kind, buffer.data.ptr, n,
                                         dev_work.data.ptr, dev_bytes.value, host_work.ctypes.data, host_bytes.value,
                                         info.data.ptr), "cusolverDnXtrtri")
        return 0 if int(info.get()[0]) == 0 else -1


def linalg_for(xp):
    if xp is np:
        return NumpyLinalg()
    from cupyx.scipy.special import erfcx, log_ndtr  # pragma: no cover - GPU only

    return ArrayLinalg(xp, CusolverFactor(xp), (erfcx, log_ndtr))  # pragma: no cover
