"""log P(f) by sequential Monte Carlo from EP's Gaussian to the orthant: method="smc" of flatfast.log_prior.

In the signed coordinates h = y g (the orthant is h >= 0) EP's sites are t_i(h) = exp(-tau_i h^2 / 2 + nu_i h)
and the prior times the sites is C q(h), q = N(mu, Sigma) EP's posterior and
log C = -1/2 log|I + S^1/2 K S^1/2| + 1/2 nu^T mu. The particles travel through hard-walled targets

    walls:    pi_c(h) ∝ q(h) 1[h >= -c s]                     (s the sds of q), c from above the particles to 0;
    sites:    pi_t(h) ∝ N(h; 0, K) prod_i t_i(h_i)^(1 - t) 1[h >= 0],   t from 0 to 1,

starting from exact draws of q and ending at the prior restricted to the orthant, whose mass is P(f). Every
target is a Gaussian restricted to a box of lower bounds (N(m_t, Sigma_t) with Sigma_t = (K^-1 + (1 - t) S)^-1,
m_t = (1 - t) Sigma_t nu on the sites' leg), so the moves are exact Hamiltonian trajectories with reflections at
the walls (Pakman & Paninski, J. Comput. Graph. Stat. 23, 2014): h(s) = m + u cos s + v sin s between walls,
the velocity v drawn from N(0, Sigma_t), reflected at a wall j by v -= 2 v_j / Sigma_jj Sigma[:, j]; each move
keeps the target invariant and needs no tuning. On the walls' leg the next level is the particles' median
distance outside (multilevel splitting: about half survive, and the estimate gains the fraction that does); on
the sites' leg the next t is chosen by bisection so that the effective sample size of the incremental weights
exp((t' - t) A(h)), A = sum_i (tau_i h_i^2 / 2 - nu_i h_i), is half the particles, and never beyond a quarter of
the largest step whose weights have finite variance (see _next_stage). After each stage the particles are
resampled (systematic) and moved. Both choices are made by a pilot run's particles only; the runs that count
follow the pilot's schedule, so that given the pilot each run's product of mean weights is an unbiased estimate
of P(f) / C (Del Moral 2004) and the runs are independent: the error bar comes from them (the log of the mean of
their estimates, and the delta-method standard error of that mean). All runs advance together (_lockstep_runs),
so that one Gaussian a stage serves them. On numpy the trajectories run in the C++ core, one particle per worker
(flatfast._C.orthant_trajectories_f64), and on cupy in the CUDA kernel, one warp per particle
(flatfast._C_cuda.orthant_trajectories); trajectories_reference is the same loop written against the array module,
all particles in lockstep, the oracle both are tested against and the fallback where neither is built. Each
stage's Gaussian is formed where K is (flatfast.prior.posterior.posterior_covariance: LAPACK on the host, cuSOLVER on the
device), so on a GPU no n x n array crosses to the host.
"""
from __future__ import annotations

import math
import time

import numpy as np

from flatfast.prior.posterior import posterior_covariance
from flatfast.backend.xp import to_host, xp_of

RUNS = 10  # independent runs behind the error bar (their spread is the standard error)
MOVES = 5  # reflected Hamiltonian trajectories per particle and stage
_DURATION = math.pi / 2  # of a trajectory: without walls, an independent draw; at most pi / 2 (_first_wall_hits)
_ESS_FRACTION = 0.5  # the incremental weights' effective sample size each stage aims at
_MAX_STAGES = 10_000
_SPREAD_WARN = 1.0  # nats of spread among the runs' log estimates beyond which the error bar is not backed
_STEP_SHARE = 0.25  # of the largest step with finite-variance weights (see _next_stage)
_BLOCK_ROWS = 2048  # particles moved together on the CPU: the moves' temporaries are a few blocks of this many rows
_DEVICE_BLOCK_ROWS = 1 << 16  # on a GPU, where one launch should hold every particle to fill the device
_GRAZE = 1e-9  # a wall hit this close to the one just reflected from is that one's rounding, not a new hit


def smc_estimate(K, y, ep, *, n_samples, seed, shift=0.0, progress=None, runs=None, moves=None):
    """Fill ``ep`` (an EPResult of EP on K + shift I, y) with the SMC estimate of log P(f): log_z, stderr,
    n_samples (particles, all runs together), smc_runs (each run's log estimate), smc_stages (the number of
    stages: the pilot's schedule, which every run follows) and smc_bounces (wall reflections per trajectory,
    averaged over all moves). ``seed`` seeds the pilot and the runs together; ``progress``: a counter
    of the stages (None: when stderr is a terminal)."""
    from flatfast.errors import UnreliableEstimateWarning, warn
    from flatfast._progress import progress_counter

    t0 = time.perf_counter()
    runs, moves = runs or RUNS, moves or MOVES  # read at call time, so that a script may change them
    xp = xp_of(K)
    particles = n_samples // runs
    path = _Path(K, y, ep, shift, xp)
    update, bar = progress_counter(None, f"flatfast SMC stages (n = {K.shape[0]})", progress)
    try:
        log_ratios, stages, bounces, stopped = _lockstep_runs(path, runs, particles, xp.random.default_rng(seed),
                                                              moves, update)
    finally:
        if bar is not None:
            bar.close()
    estimates = [path.log_c + float(v) for v in log_ratios]
    log_p, stderr = combine_runs(estimates)
    ep.method = "smc"
    ep.log_z, ep.stderr, ep.n_samples = log_p, stderr, particles * runs
    ep.smc_runs, ep.smc_stages = estimates, stages
    ep.smc_bounces = float(np.mean(bounces)) if bounces else 0.0
    ep.seconds += time.perf_counter() - t0
    spread = float(np.std(estimates)) if all(math.isfinite(v) for v in estimates) else math.inf
    if stopped:
        warn(f"log P(f) by SMC on {K.shape[0]} points: {stopped} trajectories were stopped after "
             f"{_max_reflections(K.shape[0])} wall reflections, where they no longer sample the target exactly",
             UnreliableEstimateWarning)
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
    if not math.isfinite(peak):  # every run lost all its particles
        return -math.inf, math.inf
    scaled = np.exp(values - peak)
    mean = float(scaled.mean())
    return peak + math.log(mean), float(scaled.std(ddof=1) / math.sqrt(values.size) / mean)


class _Path:
    """The problem's fixed parts on K's array module: K, the labels y, EP's sites (tau, nu) and the signed
    y nu, log C, and the stiffness m = lambda_max(S^1/2 (K + shift I) S^1/2) that bounds the sites' steps."""

    def __init__(self, K, y, ep, shift, xp):
        self.xp, self.shift, self.K = xp, shift, K
        self.y = xp.asarray(to_host(y), dtype=xp.float64)
        self.tau = xp.asarray(ep.site_precision, dtype=xp.float64)
        self.site_nu = xp.asarray(ep.site_natural_mean, dtype=xp.float64)
        self.nu = self.y * self.site_nu
        self.log_c = None  # set by the first gaussian(0)
        self.stiffness = _largest_eigenvalue(K, shift, xp.sqrt(self.tau), xp)

    def gaussian(self, t):
        """N(m_t, Sigma_t) of the module doc in the signed coordinates, on K's array module (cupy's on the
        device): (mean, covariance, its lower Cholesky factor)."""
        keep = 1.0 - t
        cov, mean, half_log_det = posterior_covariance(self.K, keep * self.tau, keep * self.site_nu, self.shift)
        if t == 0.0:
            self.log_c = -half_log_det + 0.5 * float(self.site_nu @ mean)
        cov *= self.y[:, None]
        cov *= self.y[None, :]
        mean = self.y * mean
        return mean, cov, _cholesky(cov, self.xp)


def _cholesky(cov, xp):
    """Lower factor of cov; with a jitter of 1e-10 of the mean variance where it is singular to rounding."""
    try:
        factor = xp.linalg.cholesky(cov)
    except Exception:  # numpy's LinAlgError; cupy returns NaNs instead
        factor = None
    if factor is None or not bool(xp.isfinite(factor).all()):
        jittered = cov + (1e-10 * float(xp.mean(xp.diagonal(cov)))) * xp.eye(cov.shape[0])
        factor = xp.linalg.cholesky(jittered)
    return factor


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


def _ess_fraction(log_w, xp):
    peak = float(xp.max(log_w))
    if not math.isfinite(peak):
        return 0.0
    w = xp.exp(log_w - peak)
    return float(xp.sum(w) ** 2 / xp.sum(w * w)) / log_w.shape[0]


def _next_stage(t, A, stiffness, xp):
    """The largest t' in (t, 1] whose incremental weights exp((t' - t) A) keep _ESS_FRACTION of the particles,
    within the step that keeps their variance finite: under pi_t the Gaussian part has precision
    P_t = K^-1 + (1 - t) S, and exp((t' - t) A) has a finite second moment only while P_t - 2 (t' - t) S is
    positive definite, i.e. t' - t < (1 / m + 1 - t) / 2 with m = lambda_max(S^1/2 K S^1/2) (``stiffness``). An
    infinite-variance weight keeps a high effective sample size on every finite set of particles and biases the
    log estimate low (measured: -0.023 nats at n = 100, with a particle ESS above half), so steps stay within
    half that bound."""
    limit = t + _STEP_SHARE * (1.0 / stiffness + 1.0 - t)
    if limit >= 1.0 and _ess_fraction((1.0 - t) * A, xp) >= _ESS_FRACTION:
        return 1.0
    low, high = t, min(limit, 1.0)
    if high < 1.0 and _ess_fraction((high - t) * A, xp) >= _ESS_FRACTION:
        return high
    for _ in range(60):
        middle = 0.5 * (low + high)
        if _ess_fraction((middle - t) * A, xp) >= _ESS_FRACTION:
            low = middle
        else:
            high = middle
    return low if low > t else 0.5 * (t + high)  # never stall: a tiny step loses particles but moves on


def _resample_rows(log_w, generator, xp):
    """Systematic resampling within each row of the weights exp(log_w) (rows x particles): indices into the rows
    flattened. A row without weight (a run that lost every particle at a wall) keeps its particles."""
    rows, N = log_w.shape
    peak = xp.max(log_w, axis=1, keepdims=True)
    w = xp.exp(log_w - xp.where(xp.isfinite(peak), peak, 0.0))
    total = xp.sum(w, axis=1, keepdims=True)
    w = xp.where(total > 0, w / xp.where(total > 0, total, 1.0), 1.0 / N)
    cumulative = xp.cumsum(w, axis=1)
    cumulative[:, -1] = 1.0
    cumulative += xp.arange(rows)[:, None]  # rows side by side on one increasing scale
    positions = (generator.random() + xp.arange(N))[None, :] / N + xp.arange(rows)[:, None]
    return xp.minimum(xp.searchsorted(cumulative.ravel(), positions.ravel()), rows * N - 1)


def _log_mean_exp_rows(values, xp):
    peak = xp.max(values, axis=1, keepdims=True)
    safe = xp.where(xp.isfinite(peak), peak, 0.0)
    return (safe + xp.log(xp.mean(xp.exp(values - safe), axis=1, keepdims=True)))[:, 0]


def _max_reflections(n):
    """Reflections after which a trajectory stops where it is (a guard against a particle trapped in a corner;
    the most measured is 5,019 = 3.3 n, on the equicorrelated orthant with rho = 0.99, n = 1500 and 10 % minority
    labels)."""
    return 100 * n + 10_000


def _native_trajectories(xp):
    """The native trajectories for K's array module, or None: the C++ core (flatfast._C.orthant_trajectories_f64)
    for numpy particles, the CUDA kernel (flatfast._C_cuda.orthant_trajectories, _cuda_trajectories) for cupy's;
    where that extension is missing, trajectories_reference runs instead, after one BackendFallbackWarning."""
    from flatfast.backend import native as _native
    from flatfast.backend.xp import _warn_once

    module, reason = _native.load_cpp() if xp is np else _native.load_cuda()
    if module is None:
        _warn_once(("smc-moves", reason), "flatfast: method='smc' moves its particles with the array-module "
                   f"reference loop, 10-100x slower than the native kernel: {reason}")
        return None
    if xp is np:
        return module.orthant_trajectories_f64
    return lambda *args: _cuda_trajectories(module, *args)  # pragma: no cover - GPU only


def _cuda_trajectories(module, U, V, gap, cov, duration, graze, max_events):  # pragma: no cover - GPU only
    """flatfast._C_cuda.orthant_trajectories on cupy arrays, with the C++ binding's checks (the kernel sees raw
    device pointers): the same arguments and results as flatfast._C.orthant_trajectories_f64."""
    import cupy

    rows, n = U.shape
    for name, array, shape in (("U", U, (rows, n)), ("V", V, (rows, n)), ("gap", gap, (n,)), ("cov", cov, (n, n))):
        if not isinstance(array, cupy.ndarray) or array.dtype != cupy.float64 or not array.flags.c_contiguous:
            raise TypeError(f"{name}: expected a C-contiguous float64 cupy array")
        if array.shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {array.shape}")
    if not bool((cupy.diagonal(cov) > 0).all()):
        raise ValueError("cov: must have a positive diagonal")
    reflections = cupy.empty(rows, dtype=cupy.int64)
    module.orthant_trajectories(U.data.ptr, V.data.ptr, rows, n, gap.data.ptr, cov.data.ptr, float(duration),
                                float(graze), int(max_events), reflections.data.ptr,
                                cupy.cuda.get_current_stream().ptr)
    return reflections, int((reflections >= max_events).sum())


def _correlated_normals(factor, count, generator, xp):
    """``count`` rows drawn from N(0, factor factor^T): Z factor^T, on numpy as one triangular BLAS-3 product
    (TRMM, half the flops of a general one) computed in place as (factor Z^T)^T."""
    Z = generator.standard_normal((count, factor.shape[0]))
    if xp is not np:
        return Z @ factor.T  # pragma: no cover
    from scipy.linalg.blas import dtrmm

    return dtrmm(1.0, factor.T, Z.T, lower=0, trans_a=1, overwrite_b=1).T


def _first_wall_hits(u, v, gap, gap2, last, graze, xp):
    """Per row of (u, v): the time of its first outward wall crossing within a quarter period (inf if none) and
    that wall. Wall j is crossed where u_j cos s + v_j sin s + gap_j = 0; in t = tan(s / 2) that is the quadratic
    (gap_j - u_j) t^2 + 2 v_j t + (gap_j + u_j) = 0 with discriminant D = u_j^2 + v_j^2 - gap_j^2, solved in the
    stable form q = -(v_j + sign(v_j) sqrt(D)), roots q / (gap_j - u_j) and (gap_j + u_j) / q. A row starts inside
    (gap_j + u_j >= 0), so its first positive root is an outward crossing, and s = 2 atan(t) is monotone: rows
    compare t, and only the winner's is turned into a time. Only walls that may be crossed for s in [0, pi / 2]
    are solved: D > 0 and, as cos s and sin s lie in [0, 1] there, min(u, 0) + min(v, 0) + gap < 0. The root
    t <= ``graze`` of the wall a row was just reflected from (``last``) is that reflection itself."""
    may_cross = u * u + v * v > gap2
    may_cross &= xp.minimum(u, 0.0) + xp.minimum(v, 0.0) + gap < 0.0
    rows, cols = xp.nonzero(may_cross)
    first, face = xp.full(u.shape[0], xp.inf), xp.full(u.shape[0], -1, dtype=xp.int64)
    if rows.size == 0:
        return first, face
    uu, vv, gg = u[rows, cols], v[rows, cols], gap[cols]
    q = -(vv + xp.copysign(xp.sqrt(uu * uu + vv * vv - gg * gg), vv))
    floor = xp.where(cols == last[rows], graze, 0.0)
    t = xp.full(rows.shape, xp.inf)
    for numerator, denominator in ((q, gg - uu), (gg + uu, q)):
        root = numerator / xp.where(denominator != 0, denominator, 1.0)
        t = xp.where((denominator != 0) & (root > floor) & (root < t), root, t)
    order = xp.lexsort(xp.stack([t, rows.astype(t.dtype)]))  # by row, then by root
    rows, cols, t = rows[order], cols[order], t[order]
    lead = xp.ones(rows.size, dtype=bool)
    lead[1:] = rows[1:] != rows[:-1]
    first[rows[lead]], face[rows[lead]] = 2.0 * xp.arctan(t[lead]), cols[lead]
    return first, face


def block_rows(xp):
    """Particles moved together (_move) on this array module."""
    return _BLOCK_ROWS if xp is np else _DEVICE_BLOCK_ROWS


def _move(H, gaussian, wall, generator, moves, xp):
    """_reflected_trajectories on blocks of block_rows(xp) particles, in place: their temporaries stay a few blocks
    whatever the number of particles. Returns (H, wall reflections per trajectory, one mean per move, and the
    number of trajectories stopped by _max_reflections)."""
    total, stopped = [0.0] * moves, 0
    size = block_rows(xp)
    for start in range(0, H.shape[0], size):
        block = H[start:start + size]
        H[start:start + size], per_move, cut = _reflected_trajectories(block, gaussian, wall, generator,
                                                                              moves, xp)
        total = [a + b * block.shape[0] for a, b in zip(total, per_move)]
        stopped += cut
    return H, [a / H.shape[0] for a in total], stopped


def _reflected_trajectories(H, gaussian, wall, generator, moves, xp):
    """``moves`` exact Hamiltonian trajectories of duration _DURATION for every row of H under N(mean, cov)
    restricted to H >= wall (each row starts inside), by the C++ core on numpy (trajectories_reference
    otherwise). Returns (H, wall reflections per trajectory, one mean per move, trajectories stopped by
    _max_reflections)."""
    mean, cov, factor = gaussian
    N, n = H.shape
    gap = xp.ascontiguousarray(mean - wall)  # h >= wall  <=>  u + gap >= 0, u = h - mean
    trajectories = _native_trajectories(xp) or (lambda *args: trajectories_reference(*args, xp=xp))
    per_move, stopped = [], 0
    for _ in range(moves):
        U = H - mean
        V = _correlated_normals(factor, N, generator, xp)
        reflections, cut = trajectories(U, V, gap, cov, _DURATION, _GRAZE, _max_reflections(n))
        H = U + mean
        per_move.append(float(reflections.mean()))
        stopped += int(cut)
    return H, per_move, stopped


def trajectories_reference(U, V, gap, cov, duration, graze, max_events, xp=np):
    """The reference of flatfast._C.orthant_trajectories_f64, on any array module: each row of (U, V), a
    particle's offset u = h - mean and velocity v under N(mean, cov) restricted to u + gap >= 0, follows
    u(s) = u cos s + v sin s, v(s) = v cos s - u sin s for ``duration`` (<= pi / 2), reflected at the first outward
    crossing of wall j (_first_wall_hits) by v -= 2 v_j / cov[j, j] cov[j, :]; a row stops after ``max_events``
    reflections. All rows advance in lockstep, one event (the next wall hit, or the end) each per step. Updates U
    and V in place; returns (reflections per row, rows stopped by max_events)."""
    N = U.shape[0]
    gap2 = gap * gap
    variance = xp.diagonal(cov).copy()
    count = xp.zeros(N, dtype=xp.int64)
    remaining = xp.full(N, float(duration))
    last = xp.full(N, -1, dtype=xp.int64)
    active = xp.arange(N)
    while active.size:
        u, v = U[active], V[active]
        first, face = _first_wall_hits(u, v, gap, gap2, last[active], graze, xp)
        left = remaining[active]
        bounce = first < left
        step = xp.where(bounce, first, left)
        c, s = xp.cos(step)[:, None], xp.sin(step)[:, None]
        u, v = u * c + v * s, v * c - u * s
        at = xp.nonzero(bounce)[0]
        wall_hit = face[at]
        v[at] -= (2.0 * v[at, wall_hit] / variance[wall_hit])[:, None] * cov[wall_hit]
        U[active] = xp.maximum(u, -gap)  # rounding may leave a coordinate a hair outside its wall
        V[active] = v
        remaining[active] = left - step
        last[active] = face
        count[active[at]] += 1
        active = active[at]
        active = active[count[active] < max_events]
    return count, int(xp.sum(count >= max_events))


def _lockstep_runs(path, runs, particles, generator, moves, update=None):
    """``runs`` SMC runs of ``particles`` each, advanced together behind a pilot run that picks every stage's wall
    level or t from its own particles: the runs share each stage's Gaussian (one factorisation a stage, whatever
    the number of runs) and, given the pilot, follow a fixed schedule and are independent of each other.
    Returns (log of each run's estimate of P(f) / C, number of stages, wall reflections per trajectory of each
    move, trajectories stopped by _max_reflections)."""
    xp = path.xp
    gaussian = path.gaussian(0.0)
    n, rows = gaussian[0].shape[0], runs + 1  # row 0: the pilot
    H = _correlated_normals(gaussian[2], rows * particles, generator, xp)
    H += gaussian[0]
    log_ratio, stages, bounces, stopped = xp.zeros(rows), 0, [], 0

    scale = xp.sqrt(xp.diagonal(gaussian[1]))
    level = math.inf
    while level > 0.0:  # the walls' leg: h >= -level * scale, down to the orthant
        if stages >= _MAX_STAGES:
            raise RuntimeError(f"method='smc': no path to the orthant in {_MAX_STAGES} stages")
        outside = xp.max(-H / scale, axis=1).reshape(rows, particles)  # lowest level each particle is inside of
        level = max(0.0, float(xp.sort(outside[0])[(particles - 1) // 2]))
        inside = outside <= level
        fraction = xp.count_nonzero(inside, axis=1) / particles
        log_ratio += xp.where(fraction > 0, xp.log(xp.where(fraction > 0, fraction, 1.0)), -xp.inf)
        H = H[_resample_rows(xp.where(inside, 0.0, -xp.inf), generator, xp)]
        H, per_move, cut = _move(H, gaussian, -level * scale, generator, moves, xp)
        bounces, stopped = bounces + per_move, stopped + cut
        stages += 1
        if update is not None:
            update(stages)

    t, floor = 0.0, xp.zeros(n)
    while t < 1.0:  # the sites' leg
        if stages >= _MAX_STAGES:
            raise RuntimeError(f"method='smc': no path to the orthant in {_MAX_STAGES} stages")
        A = ((H * H) @ (0.5 * path.tau) - H @ path.nu).reshape(rows, particles)
        t_next = _next_stage(t, A[0], path.stiffness, xp)
        log_w = (t_next - t) * A
        log_ratio += _log_mean_exp_rows(log_w, xp)
        t = t_next
        stages += 1
        if t < 1.0:
            H = H[_resample_rows(log_w, generator, xp)]
            gaussian = None  # the last stage's arrays go before the next are made
            gaussian = path.gaussian(t)
            H, per_move, cut = _move(H, gaussian, floor, generator, moves, xp)
            bounces, stopped = bounces + per_move, stopped + cut
        if update is not None:
            update(stages)
    return to_host(log_ratio[1:]), stages, bounces, stopped
