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
