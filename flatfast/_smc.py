"""log P(f) by sequential Monte Carlo from EP's Gaussian to the orthant: method="smc" of flatfast.log_prior.

With EP's sites t_i(g) = exp(-tau_i g^2 / 2 + nu_i g), the prior times the sites is C q(g), q = N(mu, Sigma) the
EP posterior and log C = -1/2 log|I + S^1/2 K S^1/2| + 1/2 nu^T mu. So

    P(f) = int N(g; 0, K) 1[y g > 0] dg = C E_q[ prod_i 1[y_i g_i > 0] / t_i(g_i) ],

and the particles travel from q to the orthant through

    pi_t(g) ∝ q(g) exp(t A(g) - lambda(t) V(g)),  A(g) = sum_i (tau_i g_i^2 / 2 - nu_i g_i),
    V(g) = sum_i relu(-y_i g_i / s_i)^2 / 2 (s_i the posterior sd),  lambda(t) = (t / (1 - t))^2,

from t = 0 (q itself, sampled exactly) to t = 1 (the sites removed and the soft wall made hard: pi_1 is the prior
restricted to the orthant). Each stage picks the next t by bisection so that the effective sample size of the
incremental weights is half the particles, multiplies the running estimate of P(f) / C by the mean incremental
weight, resamples (systematic) and moves every particle by elliptical slice sampling (Murray, Adams & MacKay,
2010) with q as the Gaussian "prior" and exp(t A - lambda V) as the "likelihood": each move keeps pi_t invariant,
and one draw from q for all particles is one matrix product. No step goes beyond a quarter of the largest one
whose incremental weights have finite variance (see _next_stage). The product of the mean weights is an unbiased
estimate of P(f) / C (Del Moral 2004) whatever the moves' mixing; the error bar comes from independent runs
(the log of the mean of their unbiased estimates, and the delta-method standard error of that mean). Unbiased is
not enough: when the moves mix slowly the runs' estimates are right-skewed, most runs land low and their spread
understates the error (measured: 3 moves a stage left unanimous labels 1 stderr low on average, 10 do not), so
the error bar is only as honest as the coverage measured for the kind of kernel (README).
EP's posterior covariance is formed on the host, as for the second-order correction (flatfast._ep.posterior_covariance);
the particles are written against K's array module (numpy or cupy) like EP; so far run on numpy only.
"""
from __future__ import annotations

import math
import time

import numpy as np

from flatfast._ep import posterior_covariance
from flatfast._xp import to_host, xp_of

RUNS = 10  # independent runs behind the error bar (their spread is the standard error)
MOVES = 10  # elliptical slice moves per particle and stage (3 left unanimous labels 1 stderr low on average)
_ESS_FRACTION = 0.5  # the incremental weights' effective sample size each stage aims at
_MAX_SHRINKS = 100  # bracket shrinks of one slice move; a particle still unplaced then stays where it is
_MAX_STAGES = 10_000
_SPREAD_WARN = 1.0  # nats of spread among the runs' log estimates beyond which the error bar is not backed
_STEP_SHARE = 0.25  # of the largest step with finite-variance weights (see _next_stage)


def smc_estimate(K, y, ep, *, n_samples, seed, shift=0.0, progress=None, runs=RUNS, moves=MOVES):
    """Fill ``ep`` (an EPResult of EP on K + shift I, y) with the SMC estimate of log P(f): log_z, stderr,
    n_samples (particles, all runs together), smc_runs (each run's log estimate) and smc_stages (their mean
    number of stages). ``seed`` seeds every run (numpy.random.SeedSequence(seed).spawn(runs)); ``progress``: a
    bar over the runs (None: when stderr is a terminal)."""
    from flatfast.errors import UnreliableEstimateWarning, warn
    from flatfast.hessian import _progress_counter

    t0 = time.perf_counter()
    xp = xp_of(K)
    particles = n_samples // runs
    posterior = _ep_posterior(K, y, ep, shift, xp)
    update, bar = _progress_counter(runs, f"flatfast SMC (n = {K.shape[0]})", progress)
    estimates, stages = [], []
    try:
        for child in np.random.SeedSequence(seed).spawn(runs):
            log_ratio, count = _smc_run(posterior, particles, _generator(xp, child), moves, xp)
            estimates.append(posterior["log_c"] + log_ratio)
            stages.append(count)
            if update is not None:
                update(len(estimates))
    finally:
        if bar is not None:
            bar.close()
    log_p, stderr = combine_runs(estimates)
    ep.method = "smc"
    ep.log_z, ep.stderr, ep.n_samples = log_p, stderr, particles * runs
    ep.smc_runs, ep.smc_stages = [float(v) for v in estimates], float(np.mean(stages))
    ep.seconds += time.perf_counter() - t0
    spread = float(np.std(estimates)) if all(math.isfinite(v) for v in estimates) else math.inf
    if not spread <= _SPREAD_WARN:
        warn(f"log P(f) by SMC on {K.shape[0]} points: the {runs} independent runs' log estimates spread by "
             f"{spread:.2f} nats (> {_SPREAD_WARN}), so their mean is carried by a few runs and neither the value "
             f"nor its standard error can be trusted; more particles (n_samples=, now {n_samples}) narrow it. "
             "EP's value is in ep_log_z.", UnreliableEstimateWarning)
    return ep


def combine_runs(log_estimates):
    """log of the mean of independent unbiased estimates exp(log_estimates), and the delta-method standard error
    of that log: sd(estimates) / (sqrt(R) mean(estimates))."""
    values = np.asarray(log_estimates, dtype=np.float64)
    peak = float(values.max())
    if not math.isfinite(peak):  # every run lost all its particles at the hard wall
        return -math.inf, math.inf
    scaled = np.exp(values - peak)
    mean = float(scaled.mean())
    return peak + math.log(mean), float(scaled.std(ddof=1) / math.sqrt(values.size) / mean)


def _generator(xp, seed_sequence):
    if xp is np:
        return np.random.default_rng(seed_sequence)
    return xp.random.default_rng(int(seed_sequence.generate_state(1, np.uint64)[0]))  # pragma: no cover


def _ep_posterior(K, y, ep, shift, xp):
    """EP's Gaussian in the signed coordinates h = y g (the orthant is h > 0): mean, lower Cholesky factor of the
    covariance, marginal sds, the sites (tau, y nu) and log C of the module doc. The covariance is formed on the
    host (flatfast._ep.posterior_covariance) and the particles' arrays live on K's array module."""
    n = K.shape[0]
    tau, nu = to_host(ep.site_precision).astype(np.float64), to_host(ep.site_natural_mean).astype(np.float64)
    cov, mean, half_log_det = posterior_covariance(to_host(K), tau, nu, shift)
    log_c = -half_log_det + 0.5 * float(nu @ mean)
    cov = xp.asarray(cov)  # on numpy the same array; on cupy its copy on the device, the host one freed here
    mean, tau, nu, y = (xp.asarray(a, dtype=xp.float64) for a in (mean, tau, nu, y))
    cov *= y[:, None]
    cov *= y[None, :]
    sd = xp.sqrt(xp.diagonal(cov).copy())
    try:
        factor = xp.linalg.cholesky(cov)
    except Exception:  # numpy's LinAlgError, cupy's NaNs below: a jitter of 1e-10 of the scale
        factor = None
    if factor is None or not bool(xp.isfinite(factor).all()):
        cov[xp.diag_indices(n)] += 1e-10 * float(xp.mean(sd * sd))
        factor = xp.linalg.cholesky(cov)
    return dict(mean=y * mean, factor=factor, sd=sd, tau=tau, nu=y * nu, log_c=log_c,
                stiffness=_largest_eigenvalue(K, shift, xp.sqrt(tau), xp))


def _largest_eigenvalue(K, shift, sqrt_tau, xp, iterations=50):
    """lambda_max(S^1/2 (K + shift I) S^1/2) by power iteration from the all-ones vector (an overestimate by up to
    a few per cent is harmless: it only shortens steps)."""
    v = sqrt_tau / max(float(xp.linalg.norm(sqrt_tau)), 1e-300)
    value = 0.0
    for _ in range(iterations):
        w = sqrt_tau * (K @ (sqrt_tau * v) + shift * sqrt_tau * v)
        value = float(xp.linalg.norm(w))
        if value == 0.0:
            return 1e-300
        v = w / value
    return 1.05 * value


def _wall(t):
    """lambda(t) of the module doc: 0 at t = 0, infinite at t = 1."""
    return math.inf if t >= 1.0 else (t / (1.0 - t)) ** 2


def _log_likelihood(H, post, t, xp):
    """log of pi_t / q for each particle (rows of H), and its two parts A and V."""
    A = xp.sum((0.5 * post["tau"] * H - post["nu"]) * H, axis=1)
    violation = xp.minimum(H, 0.0) / post["sd"]
    V = 0.5 * xp.sum(violation * violation, axis=-1)
    if t >= 1.0:
        return xp.where(V > 0, -xp.inf, A), A, V
    return t * A - _wall(t) * V, A, V


def _log_mean_exp(values, xp):
    peak = float(xp.max(values))
    if not math.isfinite(peak):
        return -math.inf
    return peak + math.log(float(xp.mean(xp.exp(values - peak))))


def _ess_fraction(log_w, xp):
    peak = float(xp.max(log_w))
    if not math.isfinite(peak):
        return 0.0
    w = xp.exp(log_w - peak)
    return float(xp.sum(w) ** 2 / xp.sum(w * w)) / log_w.shape[0]


def _increment(t, t_next, A, V, xp):
    """log pi_t_next / pi_t at each particle."""
    if t_next >= 1.0:
        return xp.where(V > 0, -xp.inf, (1.0 - t) * A)
    return (t_next - t) * A - (_wall(t_next) - _wall(t)) * V


def _next_stage(t, A, V, stiffness, xp):
    """The largest t' in (t, 1] whose incremental weights keep _ESS_FRACTION of the particles, within the step
    that keeps their variance finite: under pi_t the Gaussian part has precision P_t = K^-1 + (1 - t) S, and
    exp((t' - t) A) has a finite second moment only while P_t - 2 (t' - t) S is positive definite, i.e.
    t' - t < (1 / m + 1 - t) / 2 with m = lambda_max(S^1/2 K S^1/2) (``stiffness``). An infinite-variance weight
    keeps a high effective sample size on every finite set of particles and biases the log estimate low
    (measured: -0.023 nats at n = 100, with a particle ESS above half), so steps stay within half that bound."""
    limit = t + _STEP_SHARE * (1.0 / stiffness + 1.0 - t)
    if limit >= 1.0 and _ess_fraction(_increment(t, 1.0, A, V, xp), xp) >= _ESS_FRACTION:
        return 1.0
    low, high = t, min(limit, 1.0)
    if high < 1.0 and _ess_fraction(_increment(t, high, A, V, xp), xp) >= _ESS_FRACTION:
        return high
    for _ in range(60):
        middle = 0.5 * (low + high)
        if _ess_fraction(_increment(t, middle, A, V, xp), xp) >= _ESS_FRACTION:
            low = middle
        else:
            high = middle
    return low if low > t else 0.5 * (t + high)  # never stall: a tiny step loses particles but moves on


def _resample(H, log_w, generator, xp):
    """Systematic resampling of the rows of H by the weights exp(log_w)."""
    N = H.shape[0]
    w = xp.exp(log_w - xp.max(log_w))
    cumulative = xp.cumsum(w / xp.sum(w))
    cumulative[-1] = 1.0
    positions = (generator.random() + xp.arange(N)) / N
    return H[xp.searchsorted(cumulative, positions)]


def _slice_moves(H, post, t, generator, moves, xp):
    """Elliptical slice sampling of every particle under pi_t, with q as the Gaussian part."""
    N, n = H.shape
    mean, factor = post["mean"], post["factor"]
    for _ in range(moves):
        offset = H - mean
        direction = generator.standard_normal((N, n)) @ factor.T
        level = _log_likelihood(H, post, t, xp)[0] + xp.log(generator.random(N))
        angle = generator.random(N) * (2.0 * math.pi)
        low, high = angle - 2.0 * math.pi, angle.copy()
        pending = xp.arange(N)
        for _ in range(_MAX_SHRINKS):
            a = angle[pending]
            proposal = mean + offset[pending] * xp.cos(a)[:, None] + direction[pending] * xp.sin(a)[:, None]
            accept = _log_likelihood(proposal, post, t, xp)[0] > level[pending]
            H[pending[accept]] = proposal[accept]
            rejected = pending[~accept]
            if rejected.size == 0:
                break
            a = angle[rejected]
            below = a < 0
            low[rejected] = xp.where(below, a, low[rejected])
            high[rejected] = xp.where(below, high[rejected], a)
            angle[rejected] = low[rejected] + generator.random(rejected.size) * (high[rejected] - low[rejected])
            pending = rejected
    return H


def _smc_run(post, particles, generator, moves, xp):
    """One SMC run: (log of its estimate of P(f) / C, number of stages)."""
    n = post["mean"].shape[0]
    H = post["mean"] + generator.standard_normal((particles, n)) @ post["factor"].T
    t, log_ratio, stages = 0.0, 0.0, 0
    while t < 1.0:
        if stages >= _MAX_STAGES:
            raise RuntimeError(f"method='smc': no path to the orthant in {_MAX_STAGES} stages")
        _, A, V = _log_likelihood(H, post, t, xp)
        t_next = _next_stage(t, A, V, post["stiffness"], xp)
        log_w = _increment(t, t_next, A, V, xp)
        log_ratio += _log_mean_exp(log_w, xp)
        if not math.isfinite(log_ratio):
            return -math.inf, stages + 1
        t = t_next
        stages += 1
        if t < 1.0:
            H = _resample(H, log_w, generator, xp)
            H = _slice_moves(H, post, t, generator, moves, xp)
    return log_ratio, stages

