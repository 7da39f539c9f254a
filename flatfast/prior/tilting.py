"""Gaussian orthant probabilities P(Y > 0), Y ~ N(0, Sigma), by minimax exponential tilting (Botev 2017).

Z. I. Botev, "The normal law under linear restrictions: simulation and estimation via minimax tilting",
J. R. Stat. Soc. B 79 (2017). The estimator, in this module's notation:

1. Order the variables greedily (most constrained first, each conditioned on the previous ones at their
   truncated means) and factor the permuted Sigma = L L^T. Scaling row k of L by 1/L_kk gives a unit
   lower-triangular Lt; with Y = L Z, Z ~ N(0, I), the constraint Y_k > 0 reads Z_k > a_k(Z_<k) with
   a_k = -sum_{j<k} Lt_kj Z_j.
2. Proposal: Z_k | Z_<k ~ N(mu_k, 1) truncated to [a_k, inf). The weight of a draw is
   w = prod_k Phi(mu_k - a_k) exp(mu_k^2/2 - mu_k Z_k), and E[w] = P exactly, for every mu.
3. The tilt mu minimises the worst-case log weight
   psi(x, mu) = sum_k log Phi(mu_k - a_k(x)) + mu_k^2/2 - x_k mu_k  (min over mu, max over x). At the
   saddle point, with lambda(c) = phi(c)/Phi(-c) the inverse Mills ratio and c_k = a_k(x) - mu_k:
   mu = Lt_s^T lambda(c) and x = mu + lambda(c), Lt_s the strictly lower part. Substituting leaves n
   equations in c alone, G(c) = c + Lt Lt_s^T lambda(c) + Lt_s lambda(c) = 0, solved by damped Newton.
   If the saddle point x* satisfies the constraints, exp(psi*) is an upper bound on P (Botev's Theorem).

Everything here is float64 numpy on the CPU (the sampler is n sequential conditional draws; O(n^2) work per
sample, done as blocked GEMMs over a batch of samples).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import linalg as sla
from scipy import special

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
# A conditional variance below this fraction of the variable's own variance means the variable is (numerically)
# a linear function of the earlier ones: the factorisation is singular there.
_SINGULAR_PIVOT = 1e-12
PARETO_K_WARN = 0.7


def _mills(c):
    """lambda(c) = phi(c) / Phi(-c), accurate in both tails."""
    return np.exp(-0.5 * c * c - _LOG_SQRT_2PI - special.log_ndtr(-c))


def ordered_factor(Sigma):
    """Greedy variable ordering and the Cholesky factor of the permuted Sigma (step 1 of the module doc).

    Returns (order, L) with L L^T = Sigma[order][:, order]. Raises ValueError if Sigma is numerically singular.
    """
    n = Sigma.shape[0]
    order = np.arange(n)
    L = np.zeros((n, n))
    residual = Sigma.diagonal().astype(np.float64)  # conditional variances of the unplaced variables (a copy)
    shift = np.zeros(n)  # conditional means, sum_{j<k} L_ij z_j, of the unplaced variables
    original_diag = residual.copy()
    for k in range(n):
        rest = slice(k, n)
        sd = np.sqrt(np.maximum(residual[rest], 0.0))
        with np.errstate(divide="ignore", invalid="ignore"):
            log_p = np.where(sd > 0, special.log_ndtr(shift[rest] / np.where(sd > 0, sd, 1.0)), np.inf)
        pick = k + int(np.argmin(log_p))
        if pick != k:
            for arr in (order, residual, shift, original_diag):
                arr[[k, pick]] = arr[[pick, k]]
            L[[k, pick], :k] = L[[pick, k], :k]
        if residual[k] <= _SINGULAR_PIVOT * original_diag[k]:
            raise ValueError(
                f"K: is numerically singular (point {int(order[k])} is a linear combination of others), so the "
                "tilting estimator cannot factor it; use method='ep', or likelihood='probit' (K + I)")
        pivot = math.sqrt(residual[k])
        L[k, k] = pivot
        if k + 1 < n:
            below = order[k + 1:]
            column = Sigma[below, order[k]] - L[k + 1:, :k] @ L[k, :k]
            L[k + 1:, k] = column / pivot
            residual[k + 1:] -= L[k + 1:, k] ** 2
        if k + 1 < n:  # the placed variable at its truncated mean, E[Z_k | Z_k > -shift_k / pivot]
            shift[k + 1:] += L[k + 1:, k] * float(_mills(np.array(-shift[k] / pivot)))
    return order, L


def tilting_point(Lt, *, tol=1e-10, max_steps=100):
    """Solve G(c) = 0 (step 3 of the module doc) by damped Newton; returns (mu, x, psi, converged, steps)."""
    n = Lt.shape[0]
    # G(c) = c + A lambda(c), A = Lt S^T + S with S = Lt - I, Lt's strict lower triangle (Lt has a unit
    # diagonal), so A = Lt Lt^T - I: one n x n array besides Lt and the Newton matrix J.
    A = Lt @ Lt.T
    A[np.diag_indices(n)] -= 1.0
    J_transposed = np.empty_like(A)
    c = np.zeros(n)
    lam = _mills(c)
    residual = c + A @ lam
    norm = float(np.linalg.norm(residual))
    converged = False
    steps = 0
    for steps in range(1, max_steps + 1):
        if norm <= tol * max(1.0, float(np.linalg.norm(c))):
            converged = True
            break
        dlam = lam * (lam - c)  # lambda'(c)
        # J = I + A diag(dlam); A is symmetric, so the C-ordered diag(dlam) A + I is J in Fortran order, which
        # LAPACK overwrites without a copy
        np.multiply(A, dlam[:, None], out=J_transposed)  # one buffer for every step's J
        J_transposed[np.diag_indices(n)] += 1.0
        try:
            step = sla.solve(J_transposed.T, -residual, check_finite=False, overwrite_a=True)
        except (np.linalg.LinAlgError, sla.LinAlgError):
            break
        t = 1.0
        while True:
            c_new = c + t * step
            lam_new = _mills(c_new)
            res_new = c_new + A @ lam_new
            norm_new = float(np.linalg.norm(res_new))
            if np.isfinite(norm_new) and (norm_new <= (1.0 - 1e-4 * t) * norm or t < 1e-8):
                break
            t *= 0.5
        if not np.isfinite(norm_new):
            break
        c, lam, residual, norm = c_new, lam_new, res_new, norm_new
    mu = Lt.T @ lam - lam  # S^T lambda
    x = mu + lam
    psi = float(np.sum(special.log_ndtr(-c) + 0.5 * mu * mu - x * mu))
    return mu, x, psi, converged, steps


def sample_log_weights(Lt, mu, n_samples, rng, *, batch=2048, block=64):
    """log w for n_samples draws from the tilted sequential proposal (step 2 of the module doc)."""
    n = Lt.shape[0]
    out = np.empty(n_samples)
    half_mu2 = 0.5 * mu * mu
    for start in range(0, n_samples, batch):
        m = min(batch, n_samples - start)
        Z = np.empty((n, m))
        log_w = np.zeros(m)
        for b0 in range(0, n, block):
            b1 = min(n, b0 + block)
            # the lower limits of this block's rows from the rows already drawn, as one GEMM
            bound = -(Lt[b0:b1, :b0] @ Z[:b0]) if b0 else np.zeros((b1 - b0, m))
            for k in range(b0, b1):
                a = bound[k - b0] - Lt[k, b0:k] @ Z[b0:k]
                t = a - mu[k]
                log_mass = special.log_ndtr(-t)
                u = rng.random(m)
                # Z_k - mu_k ~ N(0, 1) truncated to [t, inf): inverse CDF in log space, exact deep in the tail
                draw = -special.ndtri_exp(log_mass + np.log(u))
                Z[k] = mu[k] + np.maximum(draw, t)
                log_w += log_mass + half_mu2[k] - mu[k] * Z[k]
        out[start:start + m] = log_w
    return out


def pareto_k(log_w):
    """The shape k of a generalized Pareto fit to the largest importance weights (Zhang & Stephens 2009, with
    the weak prior of Vehtari et al.'s Pareto-smoothed importance sampling). k < 0.5: the weights have finite
    variance; 0.5 < k < 0.7: finite mean, the stderr is unreliable but the estimate usable; k > 0.7: neither
    can be trusted. Returns nan with fewer than 5 tail weights."""
    w = np.exp(log_w - np.max(log_w))
    count = len(w)
    tail = int(min(0.2 * count, 3.0 * math.sqrt(count)))
    if tail < 5:
        return float("nan")
    top = np.sort(w)[-(tail + 1):]
    x = top[1:] - top[0]
    if x[-1] <= 0:
        return 0.0
    grid = 30 + int(math.sqrt(tail))
    j = np.arange(1, grid + 1)
    quartile = x[max(int(tail / 4 + 0.5) - 1, 0)]
    theta = 1.0 / x[-1] + (1.0 - np.sqrt(grid / (j - 0.5))) / (3.0 * max(quartile, 1e-300))
    k = -np.mean(np.log1p(-theta[:, None] * x[None, :]), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        profile = tail * (np.log(theta / k) + k - 1.0)
    profile = np.where(np.isfinite(profile), profile, -np.inf)
    weights = np.exp(profile - np.max(profile))
    theta_hat = float(np.sum(theta * weights) / np.sum(weights))
    shape = float(np.mean(np.log1p(-theta_hat * x)))  # xi = -k in Zhang & Stephens' sign convention
    return (tail * shape + 10 * 0.5) / (tail + 10)  # the weak prior: 10 pseudo-tail-points at xi = 0.5


def log_orthant_probability(Sigma, *, n_samples, seed):
    """log P(Y > 0), Y ~ N(0, Sigma), by minimax tilting. Returns a dict: log_p, stderr (of log_p, delta method),
    ess, pareto_k, log_upper_bound (nan when Botev's bound does not apply), newton_converged, n_samples."""
    order, Lt = ordered_factor(Sigma)
    Lt /= np.diagonal(Lt).copy()[:, None]  # in place: the unit-diagonal factor
    mu, x, psi, converged, _ = tilting_point(Lt)
    rng = np.random.default_rng(seed)
    log_w = sample_log_weights(Lt, mu, n_samples, rng)
    peak = float(np.max(log_w))
    w = np.exp(log_w - peak)
    mean_w = float(np.mean(w))
    stderr = float(np.std(w, ddof=1) / math.sqrt(n_samples) / mean_w)
    lower = -(Lt @ x - x)  # -(S x)
    feasible = bool(np.all(x >= lower - 1e-12))
    return dict(log_p=peak + math.log(mean_w), stderr=stderr, ess=float(np.sum(w) ** 2 / np.sum(w * w)),
                pareto_k=pareto_k(log_w), log_upper_bound=psi if feasible and converged else float("nan"),
                newton_converged=converged, n_samples=n_samples)


# --- log P(f) by tilting, from an EP run: the glue log_prior(method="tilting") calls ------------------------

def tilting_estimate(K, y, ep, *, n_samples, seed, shift=0.0):
    """P(f) by the minimax-tilting importance sampler above (log_orthant_probability) on
    Sigma = diag(y) (K + shift I) diag(y).

    Exact duplicates (correlation +1, equal labels; the impossible cases returned -inf earlier) carry one
    constraint twice and make Sigma singular, so all but one of each group are dropped first: P is unchanged.
    The sampler runs in float64 numpy on the CPU; a cupy K is copied to the host.
    """
    from flatfast.kernel.checks import _degenerate_pairs
    from flatfast.backend.xp import to_host, xp_of
    from flatfast.errors import UnreliableEstimateWarning, warn

    if xp_of(K) is not np:
        warn("method='tilting' runs on the CPU: the GPU kernel is copied to the host for the sampler",
             RuntimeWarning)
    K, y = to_host(K), to_host(y)
    if shift:
        K = K + shift * np.eye(len(K))
    first, second, _ = _degenerate_pairs(K, np)
    keep = np.ones(len(y), dtype=bool)
    keep[second] = False
    idx = np.nonzero(keep)[0]
    Sigma = K[np.ix_(idx, idx)] * y[idx, None] * y[None, idx] if not keep.all() else K * y[:, None] * y[None, :]
    est = log_orthant_probability(Sigma, n_samples=n_samples, seed=seed)
    del Sigma
    ep.method = "tilting"
    ep.log_z, ep.stderr, ep.ess, ep.n_samples = est["log_p"], est["stderr"], est["ess"], n_samples
    ep.pareto_k, ep.log_upper_bound = est["pareto_k"], est["log_upper_bound"]
    problems = []
    if not est["newton_converged"]:
        problems.append("the tilting parameters did not converge (the estimate stays unbiased, its variance may "
                        "be large)")
    if not est["pareto_k"] <= PARETO_K_WARN:
        problems.append(f"the importance weights are heavy-tailed (Pareto k = {est['pareto_k']:.2f} > "
                        f"{PARETO_K_WARN}; effective sample size {est['ess']:.0f} of {n_samples}), so "
                        "neither the estimate nor its standard error can be trusted")
    if problems:
        warn(f"log P(f) by tilting on {len(y)} points: " + "; ".join(problems) + ". More samples "
             "(n_samples=) may help; EP's value is in ep_log_z.", UnreliableEstimateWarning)
    return ep
