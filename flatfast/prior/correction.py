"""The second-order correction of Opper, Paquet & Winther to EP's log Z (``log_prior(..., correction=True)``)."""
from __future__ import annotations

import math

import numpy as np

from flatfast.backend.xp import to_host
from flatfast.prior.posterior import posterior_covariance


def second_order_correction(K, y, result, shift=0.0):
    """The leading correction to EP's log Z of Opper, Paquet & Winther ("Improving on Expectation Propagation",
    NIPS 2008; JMLR 14, 2013): log Z = log Z_EP + log R with R = E_q[prod_i (1 + eps_i)], q = EP's Gaussian
    posterior and eps_i = (tilted marginal i) / (q's marginal i) - 1. Expanding each eps_i in Hermite polynomials
    of z_i = (g_i - mu_i) / sigma_i, whose coefficients c_ki = E_tilted[He_k(z_i)] start at k = 3 (EP matches the
    first two moments), the pair terms give

        log R ~ sum_{i<j} sum_{k=3,4} c_ki c_kj rho_ij^k / k!,

    rho the posterior correlations of q: the skewness and excess-kurtosis products of every pair of sites. Here the
    tilted distributions are Gaussians N(m_i, v_i) truncated to y_i g_i > 0, and each c_ki is a 400-point
    Gauss-Legendre integral over that half-line.

    Cost: the posterior covariance (:func:`posterior_covariance`: one Cholesky, one triangular solve, one
    product, ~10 Cholesky-equivalents) and two n x n arrays beside K, in float64 on the CPU (a cupy K is copied to
    the host). ``K`` is the prior
    covariance without the probit shift; ``shift`` is added on its diagonal."""
    from scipy.special import log_ndtr

    y = to_host(y).astype(np.float64)
    tau = to_host(result.site_precision).astype(np.float64)
    nu = to_host(result.site_natural_mean).astype(np.float64)
    n = len(y)
    Sigma, mean, _ = posterior_covariance(to_host(K), tau, nu, shift)
    var = np.diagonal(Sigma).copy()
    tau_cav = 1.0 / var - tau
    cav_mean, cav_var = (mean / var - nu) / tau_cav, 1.0 / tau_cav
    c3, c4 = _truncated_hermite_coefficients(y, cav_mean, cav_var, mean, var, log_ndtr)
    scale = 1.0 / np.sqrt(var)
    block = max(64, n // 32)  # rows of rho at a time: its powers take 0.1 n^2 at most
    total = 0.0
    for start in range(0, n, block):
        rho = Sigma[start: start + block] * scale[start: start + block, None] * scale[None, :]
        rho3 = rho * rho * rho
        total += c3[start: start + block] @ rho3 @ c3 / 6.0 + c4[start: start + block] @ (rho3 * rho) @ c4 / 24.0
    total -= np.sum(c3 * c3) / 6.0 + np.sum(c4 * c4) / 24.0  # the i = j terms (rho_ii = 1) are not pairs
    return 0.5 * float(total)


def _truncated_hermite_coefficients(y, cav_mean, cav_var, mean, var, log_ndtr, nodes=400):
    """E[He_3(z)], E[He_4(z)] under N(cav_mean, cav_var) truncated to y g > 0, z = (g - mean) / sqrt(var): with
    u = y (g - cav_mean) / sqrt(cav_var) >= a, the density phi(u) / Phi(-a), integrated by Gauss-Legendre on
    [a, max(a, 0) + 14] (the tail beyond is below 1e-40 of the mass)."""
    x, w = np.polynomial.legendre.leggauss(nodes)
    a = -y * cav_mean / np.sqrt(cav_var)
    width = (np.maximum(a, 0.0) + 14.0 - a)[:, None] / 2.0
    u = a[:, None] + width * (x[None, :] + 1.0)
    weight = w[None, :] * width * np.exp(-0.5 * u * u - 0.5 * math.log(2.0 * math.pi) - log_ndtr(-a)[:, None])
    z = (cav_mean[:, None] + y[:, None] * np.sqrt(cav_var)[:, None] * u - mean[:, None]) / np.sqrt(var)[:, None]
    z2 = z * z
    return np.sum(weight * z * (z2 - 3.0), axis=1), np.sum(weight * (z2 * z2 - 6.0 * z2 + 3.0), axis=1)
