"""A second, deliberately simple EP: sequential site updates (Rasmussen & Williams 2006, Algorithm 3.5) with
a full covariance kept and rank-one updated, log Z from eq. 3.65 with dense matrices. Slow, textbook, and
sharing no code with flatfast.prior: the oracle the fast solver is tested against.

Two likelihoods, each with its own site update: the Heaviside step 1[y g > 0] (the orthant probability) and
the probit Phi(y g) with R&W's eqs. 3.58 (z = y m / sqrt(1 + v)) -- not the "Heaviside on K + I" identity the
fast solver uses, so the probit comparison checks that identity too."""
import numpy as np
from scipy.stats import norm


def _tilted(y, m, v, likelihood):
    """log Z_i, mean and variance of N(g; m, v) times the likelihood of label y."""
    if likelihood == "heaviside":
        z = y * m / np.sqrt(v)
        ratio = np.exp(norm.logpdf(z) - norm.logcdf(z))
        return norm.logcdf(z), m + y * np.sqrt(v) * ratio, v * (1.0 - ratio * (z + ratio))
    s = np.sqrt(1.0 + v)  # probit, R&W eq. 3.58
    z = y * m / s
    ratio = np.exp(norm.logpdf(z) - norm.logcdf(z))
    return norm.logcdf(z), m + y * v * ratio / s, v - v * v * ratio * (z + ratio) / (1.0 + v)


def sequential_ep_log_z(K, y, *, max_sweeps=200, tol=1e-10, likelihood="heaviside"):
    n = K.shape[0]
    tau_t = np.zeros(n)
    nu_t = np.zeros(n)
    Sigma = K.copy()
    mu = np.zeros(n)
    for _ in range(max_sweeps):
        old = np.concatenate([tau_t, nu_t])
        for i in range(n):
            tau_c = 1.0 / Sigma[i, i] - tau_t[i]
            nu_c = mu[i] / Sigma[i, i] - nu_t[i]
            m, v = nu_c / tau_c, 1.0 / tau_c
            _, mu_hat, var_hat = _tilted(y[i], m, v, likelihood)
            d_tau = max(1.0 / var_hat - tau_c, 0.0) - tau_t[i]
            tau_t[i] += d_tau
            nu_t[i] = mu_hat / var_hat - nu_c
            s = Sigma[:, i].copy()
            Sigma -= np.outer(s, s) * (d_tau / (1.0 + d_tau * s[i]))
            mu = Sigma @ nu_t
        # Recompute the posterior from scratch once per sweep (R&W lines 10-12), for stability.
        S_half = np.sqrt(tau_t)
        L = np.linalg.cholesky(np.eye(n) + S_half[:, None] * K * S_half[None, :])
        V = np.linalg.solve(L, S_half[:, None] * K)
        Sigma = K - V.T @ V
        mu = Sigma @ nu_t
        if np.max(np.abs(np.concatenate([tau_t, nu_t]) - old)) < tol:
            break
    return _log_z(K, y, tau_t, nu_t, Sigma, mu, likelihood)


def _log_z(K, y, tau_t, nu_t, Sigma, mu, likelihood):
    """R&W eq. 3.65 term by term with dense matrices, cavities from the final posterior."""
    n = K.shape[0]
    tau_c = 1.0 / np.diag(Sigma) - tau_t
    nu_c = mu / np.diag(Sigma) - nu_t
    m_c = nu_c / tau_c
    log_zhat = _tilted(y, m_c, 1.0 / tau_c, likelihood)[0]
    S_half = np.sqrt(tau_t)
    B = np.eye(n) + S_half[:, None] * K * S_half[None, :]
    T = np.diag(tau_c)
    S = np.diag(tau_t)
    term1 = np.sum(log_zhat)
    term2 = 0.5 * np.sum(np.log1p(tau_t / tau_c)) - 0.5 * np.linalg.slogdet(B)[1]
    middle = K - K @ np.diag(S_half) @ np.linalg.solve(B, np.diag(S_half) @ K) - np.linalg.inv(T + S)
    term3 = 0.5 * nu_t @ middle @ nu_t
    term4 = 0.5 * m_c @ T @ np.linalg.solve(T + S, S @ m_c - 2.0 * nu_t)
    return term1 + term2 + term3 + term4
