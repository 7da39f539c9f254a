"""The array-module seam: the EP solver is written once against `xp` and runs on numpy/scipy on the CPU and on
cupy on a GPU. Only the dense linear algebra below differs between the two.

Both keep EP in two n x n arrays: K and one workspace that is, in turn, the scaled system B and its Cholesky
factor (POTRF in place); on the CPU TRTRI then inverts the factor there, on the GPU the inverse is applied by
triangular solves (cuSOLVER's TRTRI cost 3.5-6 Cholesky-equivalents on an H100). The probit likelihood's K + I
is never formed: its 1 is added on the diagonal inside the pass that writes B.
"""
from __future__ import annotations

import numpy as np


def xp_of(a):
    """numpy for numpy arrays, cupy for cupy arrays."""
    if type(a).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


def to_host(a):
    """A numpy array for a numpy or cupy array (a cupy array is copied to the host)."""
    return a.get() if xp_of(a) is not np else np.asarray(a)


# --- where EP runs -----------------------------------------------------------------------------------------

_WARNED = set()


def is_cuda_tensor(a) -> bool:
    return type(a).__module__.startswith("torch") and hasattr(a, "device") and a.device.type == "cuda"


def device_ep_unavailable():
    """None when EP can run on a CUDA device here (cupy with a GPU, and cuSOLVER's 64-bit POTRF), else
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
    from flatfast.backend.cusolver import cusolver_unavailable

    return cusolver_unavailable()


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
        from flatfast.backend import native as _native

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
        return lapack_factor(B) == 0

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
    """EP's linear algebra for any array module, given two in-place primitives on the factor's buffer:
    ``factor(buffer) -> status`` (POTRF) and ``solve(buffer, start, rhs, transpose=False) -> rhs``
    (TRSM/TRSV with the factor's trailing block L[start:, start:]).

    ``factor`` treats the C-ordered n x n buffer as the column-major matrix it is to cuSOLVER and LAPACK (its
    transpose; B is symmetric, so the same matrix), factors B = L L^T in that lower triangle and returns 0 or the
    leading minor that failed. The inverse factor W = L^-1 is never formed (cuSOLVER's TRTRI was measured slow on
    an H100): every product with W is a triangular solve with L, and diag(B^-1) = sum_k W_ki^2 is computed from
    blocks of W's columns, each solved from a block of identity columns (n^3/3 flops in all, the cost of TRTRI, in
    n x (block) of extra memory). The stale other triangle is never read.

    On cupy these are :class:`~flatfast.backend.cusolver.CusolverFactor` and
    :class:`~flatfast.backend.cusolver.CublasSolve`; the tests run this class on numpy with LAPACK and scipy standing
    in.
    """

    def __init__(self, xp, factor, solve, special, block_bytes=None):
        self.xp, self._factor, self._solve = xp, factor, solve
        self.erfcx, self.log_ndtr = special
        self._block_bytes = block_bytes

    def _block(self, n, itemsize):
        """Columns per TRSM block: 1/16 of an n x n array (at most 1 GiB) unless ``block_bytes`` says otherwise,
        so the solves stay wide enough to run at GEMM-like speed and EP's peak stays near two arrays."""
        budget = self._block_bytes if self._block_bytes is not None else min(2**30, n * n * itemsize / 16)
        return max(1, min(n, int(budget // max(1, n * itemsize))))

    def scaled_system(self, K, s, out, shift=0.0):
        return scaled_system_blocked(self.xp, K, s, out, shift, self._block(K.shape[0], K.itemsize))

    def cholesky_inplace(self, B):
        """Factor B in place (POTRF); False if it is not numerically positive definite (a PSD check)."""
        return self._factor(B) == 0

    def inverse_cholesky_inplace(self, B):
        """Factor B = L L^T in place; (W, sum log diag L) with W = L^-1 held implicitly by the factor, or None
        when B is not numerically positive definite."""
        xp = self.xp
        if self._factor(B) != 0:
            return None
        diagonal = xp.diagonal(B).astype(xp.float64)
        if not bool(xp.all(diagonal > 0)):
            return None
        return InverseFactor(B), float(xp.sum(xp.log(diagonal)))

    def column_norms_sq(self, W):
        """diag(B^-1) = sum_k W[k, i]^2: the columns i in [start, stop) of W = L^-1 are zero above row start, and
        below it they solve L[start:, start:] X = (identity columns), one TRSM per block."""
        xp, buffer = self.xp, W.buffer
        n = buffer.shape[0]
        columns = self._block(n, buffer.itemsize)
        norms = xp.empty(n, dtype=xp.float64)
        for start in range(0, n, columns):
            stop = min(n, start + columns)
            width = stop - start
            X = xp.zeros((n - start, width), dtype=buffer.dtype, order="F")
            X[xp.arange(width), xp.arange(width)] = 1.0
            self._solve(buffer, start, X)
            X *= X
            norms[start:stop] = X.sum(axis=0, dtype=xp.float64)
        return norms

    def sym_matvec(self, K, x):
        return K @ x.astype(K.dtype, copy=False)

    def tri_matvec(self, W, x, transpose=False):
        """W x = L^-1 x (W^T x = L^-T x with ``transpose``), in the factor's precision."""
        return self._solve(W.buffer, 0, x.astype(W.buffer.dtype, copy=True), transpose)

    def tri_matmul(self, W, X):
        """W X = L^-1 X for a block of columns."""
        return self._solve(W.buffer, 0, self.xp.array(X, dtype=W.buffer.dtype, order="F", copy=True))


class InverseFactor:
    """W = L^-1, held as the buffer whose column-major lower triangle is L (ArrayLinalg applies it by solves)."""

    def __init__(self, buffer):
        self.buffer = buffer


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


def lapack_factor(buffer):
    """The CPU stand-in for CusolverFactor: LAPACK POTRF in place on the buffer's Fortran view; 0 or the
    leading minor that is not positive definite."""
    from scipy.linalg import lapack

    potrf = lapack.dpotrf if buffer.dtype == np.float64 else lapack.spotrf
    return potrf(buffer.T, lower=1, overwrite_a=1, clean=0)[1]


def lapack_solve(buffer, start, rhs, transpose=False):
    """The CPU stand-in for CublasSolve: rhs <- L[start:, start:]^-1 rhs (or L^-T), L the buffer's Fortran lower
    triangle."""
    from scipy.linalg import solve_triangular

    rhs[...] = solve_triangular(buffer.T[start:, start:], rhs, lower=True, trans=1 if transpose else 0,
                                check_finite=False)
    return rhs


def linalg_for(xp):
    """The dense linear algebra EP needs on ``xp``'s device: LAPACK on the host, cuSOLVER and cuBLAS on a GPU."""
    if xp is np:
        return NumpyLinalg()
    from cupyx.scipy.special import erfcx, log_ndtr  # pragma: no cover - GPU only

    from flatfast.backend.cusolver import CublasSolve, CusolverFactor  # pragma: no cover - GPU only

    return ArrayLinalg(xp, CusolverFactor(xp), CublasSolve(xp), (erfcx, log_ndtr))  # pragma: no cover
