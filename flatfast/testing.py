"""Helpers shared by the tests and benchmarks."""
import numpy as np


def scaled_error(K, K_ref, diag_x, diag_z):
    """max |K - K_ref| / sqrt(q_x q_z): the error relative to each entry's natural scale (its Cauchy-Schwarz
    bound), which stays meaningful where an entry itself is near zero (depth 0, centred data)."""
    scale = np.sqrt(np.outer(diag_x, diag_z))
    return float(np.max(np.abs(np.asarray(K, dtype=np.float64) - K_ref) / scale)) if K_ref.size else 0.0


def kernel_diagonal(A, depth, sigma_w2=2.0, sigma_b2=1.0):
    """The exact q_depth of every row of A."""
    A = np.asarray(A, dtype=np.float64)
    q = sigma_w2 * np.sum(A * A, axis=1) / A.shape[1] + sigma_b2
    for _ in range(depth):
        q = sigma_b2 + sigma_w2 / 2 * q
    return q
