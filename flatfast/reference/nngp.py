"""The deep ReLU NNGP kernel, straight from the recursion (numpy, float64, O(depth) n x m temporaries)."""
import numpy as np


def nngp_kernel_reference(X, Z=None, depth=2, sigma_w2=2.0, sigma_b2=1.0):
    """K[i, j] = Cov(f(X[i]), f(Z[j])) for an infinitely wide ReLU net with `depth` hidden layers.

    K0 = sigma_w2 x.z/d + sigma_b2; per layer c = clamp(K/sqrt(qx qz), -1, 1), theta = arccos c,
    K <- sigma_b2 + sigma_w2/(2 pi) sqrt(qx qz) (sin theta + (pi - theta) c), q <- sigma_b2 + sigma_w2 q / 2.
    With Z None the diagonal is the exact closed form q_depth.
    """
    X = np.asarray(X, dtype=np.float64)
    symmetric = Z is None
    Z = X if symmetric else np.asarray(Z, dtype=np.float64)
    d = X.shape[1]
    qx = sigma_w2 * np.sum(X * X, axis=1) / d + sigma_b2
    qz = sigma_w2 * np.sum(Z * Z, axis=1) / d + sigma_b2
    K = sigma_w2 * (X @ Z.T) / d + sigma_b2
    for _ in range(depth):
        s = np.sqrt(qx)[:, None] * np.sqrt(qz)[None, :]
        c = np.clip(np.divide(K, s, out=np.zeros_like(K), where=s > 0), -1.0, 1.0)
        theta = np.arccos(c)
        K = sigma_b2 + sigma_w2 / (2 * np.pi) * s * (np.sqrt((1 - c) * (1 + c)) + (np.pi - theta) * c)
        qx = sigma_b2 + sigma_w2 / 2 * qx
        qz = sigma_b2 + sigma_w2 / 2 * qz
    if symmetric:
        np.fill_diagonal(K, qx)
    return K
