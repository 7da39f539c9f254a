"""The array-module seam: the EP solver is written once against `xp` and runs on numpy/scipy on the CPU and on
cupy/cupyx.scipy on a GPU. Only the dense linear algebra below differs between the two."""
from __future__ import annotations

import numpy as np


def xp_of(a):
    """numpy for numpy arrays, cupy for cupy arrays."""
    if type(a).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


class NumpyLinalg:
    """LAPACK/BLAS in place on a symmetric workspace: one POTRF and one TRTRI per EP sweep, no copies.

    The workspace B is symmetric, so its transpose (a Fortran-ordered view) is the same matrix and LAPACK can
    overwrite it directly. Only the lower triangle of the returned inverse factor is meaningful; every method
    here reads the lower triangle alone, so nothing is spent zeroing the rest.
    """

    def __init__(self):
        from scipy.linalg import blas, lapack
        from scipy.special import erfcx, log_ndtr

        # float64, and float32 for mixed-precision EP's early sweeps (LAPACK float32 is ~2x faster)
        self._lapack = {np.dtype(np.float64): (lapack.dpotrf, lapack.dtrtri, blas.dtrmv, blas.dtrmm, blas.dsymv),
                        np.dtype(np.float32): (lapack.spotrf, lapack.strtri, blas.strmv, blas.strmm, blas.ssymv)}
        self.erfcx, self.log_ndtr = erfcx, log_ndtr
        from flatfast import _native

        self._fused = _native.load_cpp()[0]  # the C++ core's fused EP passes, when built

    def scaled_system(self, K, s, out):
        """out = diag(s) K diag(s) + I, in K's precision, written where POTRF reads it (see class doc).
        One pass over the triangle in the C++ core; two full passes in numpy without it."""
        if self._fused is not None and K.flags.c_contiguous and out.flags.c_contiguous:
            kind = "f64" if K.dtype == np.float64 else "f32"
            getattr(self._fused, f"ep_scaled_system_{kind}")(K, np.ascontiguousarray(s, dtype=np.float64), out)
            return out
        return _scaled_system(np, K, s, out)

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


class CupyLinalg:  # pragma: no cover - exercised only on a GPU
    def __init__(self):
        import cupy
        import cupyx.scipy.linalg as cl
        from cupyx.scipy.special import erfcx, log_ndtr

        self.cp, self.cl = cupy, cl
        self.erfcx, self.log_ndtr = erfcx, log_ndtr

    def scaled_system(self, K, s, out):
        return _scaled_system(self.cp, K, s, out)

    def inverse_cholesky_inplace(self, B):
        cp = self.cp
        L = cp.linalg.cholesky(B)
        if not bool(cp.isfinite(L).all()):
            return None
        half_log_det = float(cp.sum(cp.log(cp.diagonal(L))))
        W = self.cl.solve_triangular(L, cp.eye(B.shape[0], dtype=B.dtype), lower=True, overwrite_b=True)
        return cp.tril(W), half_log_det

    def column_norms_sq(self, W):
        return (W * W).sum(axis=0, dtype=self.cp.float64)

    def sym_matvec(self, K, x):
        return K @ x.astype(K.dtype, copy=False)

    def tri_matvec(self, W, x, transpose=False):
        return (W.T if transpose else W) @ x.astype(W.dtype, copy=False)

    def tri_matmul(self, W, X):
        return W @ X.astype(W.dtype, copy=False)


def _scaled_system(xp, K, s, out):
    """out = diag(s) K diag(s) + I in K's precision, whole matrix (the array-module version of the fused pass)."""
    s_low = s.astype(K.dtype)
    xp.multiply(K, s_low[:, None], out=out)
    out *= s_low[None, :]
    out[xp.arange(K.shape[0]), xp.arange(K.shape[0])] += 1.0
    return out


def linalg_for(xp):
    return NumpyLinalg() if xp is np else CupyLinalg()
