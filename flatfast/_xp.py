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

        self._potrf, self._trtri, self._trmv, self._trmm = lapack.dpotrf, lapack.dtrtri, blas.dtrmv, blas.dtrmm
        self.erfcx, self.log_ndtr = erfcx, log_ndtr

    def inverse_cholesky_inplace(self, B):
        """Overwrite symmetric positive definite B with W = L^{-1}, B = L L^T. Returns (W, sum log diag L), or
        None when B is not numerically positive definite."""
        factor, info = self._potrf(B.T, lower=1, overwrite_a=1, clean=0)
        if info != 0:
            return None
        half_log_det = float(np.sum(np.log(np.diagonal(factor))))
        W, info = self._trtri(factor, lower=1, overwrite_c=1)
        return (W, half_log_det) if info == 0 else None

    def column_norms_sq(self, W):
        """sum_k W[k, i]^2 over the lower triangle: diag(W^T W) = diag(B^{-1})."""
        return np.fromiter((np.dot(W[i:, i], W[i:, i]) for i in range(W.shape[0])), dtype=np.float64,
                           count=W.shape[0])

    def tri_matvec(self, W, x, transpose=False):
        """W x (or W^T x) with W lower triangular."""
        return self._trmv(W, x, lower=1, trans=1 if transpose else 0)

    def tri_matmul(self, W, X):
        """W X with W lower triangular (one BLAS-3 call for a block of columns)."""
        return self._trmm(1.0, W, np.asfortranarray(X), lower=1)


class CupyLinalg:  # pragma: no cover - exercised only on a GPU
    def __init__(self):
        import cupy
        import cupyx.scipy.linalg as cl
        from cupyx.scipy.special import erfcx, log_ndtr

        self.cp, self.cl = cupy, cl
        self.erfcx, self.log_ndtr = erfcx, log_ndtr

    def inverse_cholesky_inplace(self, B):
        cp = self.cp
        L = cp.linalg.cholesky(B)
        if not bool(cp.isfinite(L).all()):
            return None
        half_log_det = float(cp.sum(cp.log(cp.diagonal(L))))
        W = self.cl.solve_triangular(L, cp.eye(B.shape[0], dtype=B.dtype), lower=True, overwrite_b=True)
        return cp.tril(W), half_log_det

    def column_norms_sq(self, W):
        return (W * W).sum(axis=0)

    def tri_matvec(self, W, x, transpose=False):
        return (W.T if transpose else W) @ x

    def tri_matmul(self, W, X):
        return W @ X


def linalg_for(xp):
    return NumpyLinalg() if xp is np else CupyLinalg()
