"""EP's Gaussian posterior N(mean, Sigma) as a whole n x n matrix, from its sites: what the second-order
correction and the SMC's stages start from (the EP loop itself never forms it)."""
from __future__ import annotations

import math

import numpy as np

from flatfast.backend.xp import xp_of
from flatfast.errors import NotPSDError


def posterior_covariance(K, tau, nu, shift=0.0):
    """EP's Gaussian posterior N(mean, Sigma) from its sites (tau, nu), for the prior covariance C = K + shift I,
    in float64 on K's array module (numpy on the host, cupy on its device): (Sigma, mean, half_log_det) with
    B = I + S^1/2 C S^1/2 = L L^T, V = L^-1 S^1/2 C, Sigma = (C^-1 + S)^-1 = C - V^T V, mean = Sigma nu and
    half_log_det = sum log diag L (= 1/2 log|B|). On numpy two n x n arrays beside K: B's buffer, factored in place,
    ends as Sigma; V is solved in place (on cupy three: B's factor is a copy). Raises NotPSDError when B is not
    positive definite."""
    from scipy.linalg import lapack

    xp = xp_of(K)
    if xp is not np:  # pragma: no cover - GPU only
        return _posterior_covariance_on_device(K, tau, nu, shift, xp)
    n = len(tau)
    root = np.sqrt(tau)
    B = np.multiply(K, root[:, None])
    B *= root[None, :]
    B[np.diag_indices(n)] += 1.0 + shift * tau
    L, info = lapack.dpotrf(B.T, lower=1, clean=1, overwrite_a=1)  # B's Fortran view: factored in place
    if info != 0:
        raise NotPSDError("K: B = I + S^1/2 K S^1/2 is not positive definite at EP's sites")
    half_log_det = float(np.sum(np.log(np.diagonal(L))))
    V = np.multiply(K, root[None, :]).T  # S^1/2 K, Fortran-ordered so that TRTRS solves in place
    V[np.diag_indices(n)] += shift * root
    V, info = lapack.dtrtrs(L, V, lower=1, overwrite_b=1)
    Sigma = np.matmul(V.T, V, out=B)
    del V, L
    np.subtract(K, Sigma, out=Sigma)
    Sigma[np.diag_indices(n)] += shift
    return Sigma, Sigma @ nu, half_log_det


def _posterior_covariance_on_device(K, tau, nu, shift, xp):  # pragma: no cover - GPU only
    """posterior_covariance's algorithm on cupy arrays (cuSOLVER's Cholesky, cuBLAS's triangular solve)."""
    from cupyx.scipy.linalg import solve_triangular

    n = tau.shape[0]
    diagonal = xp.arange(n)
    root = xp.sqrt(tau)
    B = K * root[:, None]
    B *= root[None, :]
    B[diagonal, diagonal] += 1.0 + shift * tau
    L = xp.linalg.cholesky(B)
    del B
    half_log_det = float(xp.sum(xp.log(xp.diagonal(L))))
    if not math.isfinite(half_log_det):  # cuSOLVER leaves NaNs where numpy raises
        raise NotPSDError("K: B = I + S^1/2 K S^1/2 is not positive definite at EP's sites")
    V = K * root[:, None]  # S^1/2 C
    V[diagonal, diagonal] += shift * root
    V = solve_triangular(L, V, lower=True, overwrite_b=True)
    del L
    Sigma = V.T @ V
    del V
    xp.subtract(K, Sigma, out=Sigma)
    Sigma[diagonal, diagonal] += shift
    return Sigma, Sigma @ nu, half_log_det
