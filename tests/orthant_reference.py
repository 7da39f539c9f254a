"""Reference orthant probabilities for tests/test_prior.py, computed once and stored.

log P(y g > 0), g ~ N(0, C), for the 12 seeded problems of ``problems()`` (C = the depth-2 NNGP kernel of X for
the Heaviside case, that kernel + I for the probit case), by Genz's quasi-Monte Carlo algorithm in scipy
(``multivariate_normal.cdf`` with releps=1e-6, abseps=1e-10, maxpts=1e7, rng seeded 0): relative error ~1e-6 in
P, so ~1e-6 nats (P is 1e-2 to 1e-5 here, so abseps is the binding tolerance). Each call takes 3-10 s on 2 cores, which is why the values are stored: the tests compare EP to
them at tolerances of 0.02-0.15 nats. ``python tests/orthant_reference.py`` recomputes them and prints the table
(with scipy 1.17.1 it reproduces the stored values to 1e-6).
"""
import numpy as np

GENZ_RELEPS = 1e-6


def problems():
    """(id, X, y) of the 12 small problems: n in 4..12 points in d in 2..7 dimensions, random labels."""
    rng = np.random.default_rng(2024)
    for case in range(12):
        n = int(rng.integers(4, 13))
        d = int(rng.integers(2, 8))
        X = rng.standard_normal((n, d))
        y = np.where(rng.random(n) < 0.5, -1.0, 1.0)
        yield f"n{n}-d{d}-{case}", X, y


def genz_log_orthant(C, y, releps=GENZ_RELEPS, abseps=1e-10):
    from scipy.stats import multivariate_normal

    signed = C * np.outer(y, y)
    p = multivariate_normal.cdf(np.zeros(len(y)), mean=np.zeros(len(y)), cov=signed, allow_singular=True,
                                abseps=abseps, releps=releps, maxpts=10**7, rng=np.random.default_rng(0))
    return float(np.log(p))


# id: (log P on K = Heaviside, log P on K + I = probit), made by compute() with scipy 1.17.1
STORED = {
    "n6-d6-0": (-4.980577236055533, -4.691480170619444),
    "n4-d7-1": (-3.770490671278326, -3.5615554425693507),
    "n10-d5-2": (-10.353850283040428, -7.941232252819204),
    "n11-d2-3": (-10.86654547013397, -9.453497019404852),
    "n10-d2-4": (-9.493801689038081, -6.73045936448408),
    "n8-d3-5": (-10.135552224544211, -5.870042860574365),
    "n12-d3-6": (-8.838800986498757, -8.726892439528855),
    "n12-d7-7": (-11.187839971929995, -9.963183860865373),
    "n10-d2-8": (-9.325769108994091, -8.329771627552935),
    "n8-d7-9": (-8.821469722360282, -7.245109769338954),
    "n10-d5-10": (-9.940174498640257, -8.392929142520877),
    "n12-d4-11": (-10.493589084193498, -9.773964020887153),
}


def compute():
    import flatfast

    table = {}
    for name, X, y in problems():
        K = flatfast.nngp_kernel(X, depth=2)
        table[name] = (genz_log_orthant(K, y), genz_log_orthant(K + np.eye(len(y)), y))
    return table


if __name__ == "__main__":
    for name, (heaviside, probit) in compute().items():
        print(f'    "{name}": ({heaviside!r}, {probit!r}),')


def equicorrelated_log_orthant(n, minority, rho, points=400001):
    """Exact log P(y g > 0) for K = rho 11^T + (1 - rho) I with ``minority`` labels -1 and the rest +1: with
    g_i = sqrt(rho) z + sqrt(1 - rho) e_i, P = int phi(z) Phi(a z)^(n - k) Phi(-a z)^k dz, a = sqrt(rho / (1 - rho)),
    a 1-D integral, here by the trapezoid rule in log space on [-12, 12] (checked against the bivariate closed
    form 1/4 +- asin(rho) / (2 pi) to 1e-11)."""
    from scipy.special import log_ndtr, logsumexp

    a = np.sqrt(rho / (1.0 - rho))
    z = np.linspace(-12.0, 12.0, points)
    f = -0.5 * z * z - 0.5 * np.log(2 * np.pi) + (n - minority) * log_ndtr(a * z) + minority * log_ndtr(-a * z)
    return float(logsumexp(f) + np.log(z[1] - z[0]))


def low_rank_problem(n, labels, seed=0):
    """(diagonal, U, K, y) of the diagonal-plus-low-rank family K = diag(d) + U U^T with rank 2 and unit diagonal:
    U = [sqrt(0.7) 1, 0.2 x] with x ~ N(0, 1) per point clipped to |x| <= 2.5 (a component all points share, as
    the NNGP kernel's leading eigenvector, and a point-dependent one), d = 1 - 0.7 - 0.04 x^2 >= 0.05; so the
    correlation of points i and j is 0.7 + 0.04 x_i x_j. ``labels``: "unanimous" (all +1),
    "rule" (the sign of x, the labelling the second component explains), or "minority" (unanimous with 1 % of
    the points, chosen by ``seed``, -1)."""
    rng = np.random.default_rng(seed)
    x = np.clip(rng.standard_normal(n), -2.5, 2.5)
    U = np.stack([np.full(n, np.sqrt(0.7)), 0.2 * x], axis=1)
    diagonal = 1.0 - np.sum(U * U, axis=1)
    if labels == "unanimous":
        y = np.ones(n)
    elif labels == "rule":
        y = np.where(x > 0, 1.0, -1.0)
    elif labels == "minority":
        y = np.ones(n)
        y[rng.choice(n, size=max(1, n // 100), replace=False)] = -1.0
    else:
        raise ValueError(f"labels: expected unanimous, rule or minority, got {labels!r}")
    return diagonal, U, np.diag(diagonal) + U @ U.T, y


def low_rank_log_orthant(diagonal, U, y, points=301):
    """Exact log P(y g > 0) for K = diag(diagonal) + U U^T with U of rank r in (1, 2): with g = U z + sqrt(d) e,
    P = E_z[prod_i Phi(a_i . z)], a_i = y_i U_i / sqrt(d_i), z ~ N(0, I_r), an r-dimensional integral of the
    log-concave f(z) = log phi_r(z) + sum_i log Phi(a_i . z). Here by the trapezoid rule in log space on a grid of
    ``points`` per axis in the coordinates whitened at f's mode (z = mode + L w, L L^T the inverse Hessian), over a
    box widened until f on its boundary is 60 nats below the peak; the rule converges spectrally for such smooth,
    fast-decaying integrands: on the family of low_rank_problem at n = 1500, 301 points agree with 401 and 601 to
    1e-13 (101: 4e-4). tests/test_smc.py checks it against the equicorrelated value and Genz's algorithm."""
    from scipy.optimize import minimize
    from scipy.special import log_ndtr, logsumexp

    A = (np.asarray(y, dtype=np.float64)[:, None] * U) / np.sqrt(diagonal)[:, None]
    r = A.shape[1]

    def log_f(Z):  # Z: (..., r)
        return -0.5 * np.sum(Z * Z, axis=-1) - 0.5 * r * np.log(2 * np.pi) + log_ndtr(Z @ A.T).sum(axis=-1)

    def mills(s):  # phi(s) / Phi(s), stably
        return np.exp(-0.5 * s * s - 0.5 * np.log(2 * np.pi) - log_ndtr(s))

    def negative_and_gradient(z):
        s = A @ z
        return -float(log_f(z)), z - A.T @ mills(s)

    mode = minimize(negative_and_gradient, np.zeros(r), jac=True, method="BFGS", options={"gtol": 1e-10}).x
    s = A @ mode
    lam = mills(s)
    hessian = np.eye(r) + A.T @ ((lam * (lam + s))[:, None] * A)
    L = np.linalg.cholesky(np.linalg.inv(hessian))
    peak = float(log_f(mode))
    width = 6.0
    while True:
        w = np.linspace(-width, width, points)
        grids = np.meshgrid(*([w] * r), indexing="ij")
        W = np.stack([g.ravel() for g in grids], axis=1)
        values = log_f(mode + W @ L.T).reshape((points,) * r)
        edges = [np.take(values, [0, -1], axis=k) for k in range(r)]
        if max(float(e.max()) for e in edges) < peak - 60.0:
            break
        width *= 1.5
    return float(logsumexp(values) + r * np.log(w[1] - w[0]) + np.log(np.linalg.det(L)))
