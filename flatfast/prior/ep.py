"""Expectation Propagation for the orthant probability P(sign g = y), g ~ N(0, K + shift I): the parallel EP
loop, written once against an array module (numpy on the CPU, cupy on a GPU; flatfast.backend.xp holds what differs).

Per sweep one Cholesky of B = I + S^1/2 K S^1/2 in place in one n x n workspace; the posterior marginal
variances from diag(B^-1) (the inverse factor's column norms), the means from two triangular products. K and
that workspace are the only n x n arrays on either device: the probit likelihood's K + I is a diagonal shift
applied inside the passes, and mixed precision keeps its float32 K and workspace inside the same workspace.
"""
from __future__ import annotations

import math
import time

import numpy as np

from flatfast.kernel.checks import _scan_rows
from flatfast.backend.xp import linalg_for, to_host, xp_of
from flatfast.errors import ConvergenceWarning, NotPSDError, warn
from flatfast.results import EPResult


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


# Below this tau_i K_ii the variance formula (1 - (B^-1)_ii) / tau_i loses too many digits to cancellation;
# such sites take the column formula K_ii - |L^-1 S^1/2 K e_i|^2 instead (by itemsize: float64, float32).
_CANCELLATION_GUARD = {8: 1e-6, 4: 1e-2}


def _sweep_counter(enabled, n):
    """A counter of EP's sweeps without a total (None when not wanted; enabled=None: when stderr is a terminal)."""
    from flatfast._progress import progress_counter

    return progress_counter(None, f"flatfast EP (n = {n})", enabled)[1]


def expectation_propagation(K, y, *, tol=1e-6, max_sweeps=200, site_tol=None, init=None, precision="float64",
                            shift=0.0, work=None, linalg=None, progress=None):
    """Parallel EP for P(y_i g_i > 0 for all i), g ~ N(0, K + shift I). K: (n, n) float64, y: (n,) of +-1.
    ``work``: an n x n float64 workspace (made here when None); ``linalg``: K's array module's linear algebra.

    Sweep: cavities from the current posterior marginals; tilted moments of the truncated Gaussians (in log
    space: log Phi by log_ndtr, phi/Phi by erfcx, finite for every z); new sites; posterior refresh. Damping
    starts at 1 (none); :func:`next_damping` sets it from how the undamped proposals move (it damps an
    oscillating EP to the secant estimate 1 / (1 - lam) at once and lets it grow back, at most 2x per sweep),
    and a non-positive cavity precision halves it and retries the step from the previous sites. Convergence is
    judged on the undamped proposal, so a small damped step never stops the loop by itself. A run that has needed
    damping also takes secant (Anderson) steps near its fixed point, each undone if it overshoots (see
    _SecantSteps); undamped runs never do. ``init``: (tau, nu) to start from.

    Stopping rule, from the error left in log Z: EP's log Z converges linearly (measured ratio of successive
    changes ~0.09 on NNGP kernels), so after a change d with ratio r < 1 the distance to the fixed point is
    about |d| r / (1 - r); the loop stops when that estimate (|d| itself while r is unknown) is <= tol and the
    sites have settled to site_tol (default sqrt(tol): log Z is stationary, so its error is second order in the
    sites' error).

    ``precision="mixed"``: the sweeps run in float32 (half the LAPACK time) until the site changes stall at
    float32's rounding floor (see _stalled; two more sweeps when that floor is below 0.1, none above), or float32
    needs damping, or after _MAX_FLOAT32_SWEEPS; then float64 sweeps from those sites until the rule above holds
    in float64. The value is float64 EP's fixed point to within tol; float32 only shortens the way there. If a
    float32 sweep fails (B not positive definite in float32), EP restarts in float64. The float32 copy of K and
    the float32 workspace are the two halves of the float64 workspace: no memory beyond EP's two arrays.
    On cupy (GPU) it runs float64 only: on an H100 one sweep's cubic work in float32 took 0.91x the float64 time
    (FP64 runs on its tensor cores) and float32 sweeps stopped at a site change of 0.13.
    """
    t0 = time.perf_counter()
    xp = xp_of(K)
    la = linalg if linalg is not None else linalg_for(xp)
    n = K.shape[0]
    work = xp.empty_like(K) if work is None else work
    low_sweeps = 0
    # On cupy float32 saves ~9 % of a sweep on an H100 and its sweeps stop at site changes of ~0.13 (n = 10000),
    # so "mixed" runs float64 there; on the CPU float32 halves LAPACK's time and settles to ~0.02 in 7 sweeps.
    if precision == "mixed" and init is None and xp is np and K.dtype == np.float64:
        halves = work.reshape(-1).view(np.float32)
        work_low, K_low = halves[: n * n].reshape(n, n), halves[n * n:].reshape(n, n)
        K_low[...] = K
        try:
            rough = _ep_sweeps(K_low, y, tol=tol, max_sweeps=max_sweeps, site_tol=site_tol, init=None, rough=True,
                               shift=shift, work=work_low, la=la, progress=progress)
            init, low_sweeps = (rough.site_precision, rough.site_natural_mean), rough.sweeps
        except (NotPSDError, FloatingPointError):
            init = None
    res = _ep_sweeps(K, y, tol=tol, max_sweeps=max_sweeps, site_tol=site_tol, init=init, shift=shift, work=work,
                     la=la, progress=progress)
    res.sweeps += low_sweeps
    res.float32_sweeps = low_sweeps
    res.seconds = time.perf_counter() - t0
    return res


def _ep_sweeps(K, y, *, tol, max_sweeps, site_tol, init, shift, work, la, rough=False, progress=None):
    """The EP loop in K's precision, for the kernel K + shift I. rough=True: the float32 phase of
    precision="mixed", which stops as expectation_propagation's docstring says and never warns."""
    site_tol = math.sqrt(tol) if site_tol is None else site_tol
    t0 = time.perf_counter()
    xp = la.xp
    n = K.shape[0]
    diag_k = xp.diagonal(K).astype(xp.float64) + shift
    tau = xp.zeros(n)
    nu = xp.zeros(n)
    post_var, post_mean, half_log_det = diag_k.copy(), xp.zeros(n), 0.0
    if init is not None:
        tau, nu = xp.asarray(init[0], dtype=xp.float64).copy(), xp.asarray(init[1], dtype=xp.float64).copy()
        post_var, post_mean, half_log_det = _refresh_posterior(K, shift, diag_k, tau, nu, work, la, xp)
    damping, history, accepted, changes, steps = 1.0, [], [], [], 0
    saved = None  # sites, posterior and proposal before the last step, to go back to
    previous_step = None  # the last proposed (undamped) relative site step, for next_damping
    secant = _SecantSteps(xp, usable=not rough)  # mixed precision's float32 phase only needs to get close
    extrapolated = False  # whether this sweep's sites came from the secant extrapolation
    may_extrapolate = False  # only from an accepted sweep
    converged, change, plateau_at = False, float("inf"), None
    while True:
        tau_cav = 1.0 / post_var - tau
        cavities_lost = bool((tau_cav <= 0).any())
        if not cavities_lost:
            nu_cav = post_mean / post_var - nu
            cav_mean, cav_var = nu_cav / tau_cav, 1.0 / tau_cav
            log_zhat, tilt_mean, tilt_var = _tilted_moments(y, cav_mean, cav_var, la, xp)
            log_z = _log_z_ep(log_zhat, tau, nu, tau_cav, cav_mean, post_mean, half_log_det, xp)
            history.append(log_z)
            tau_new = xp.maximum(1.0 / tilt_var - tau_cav, 0.0)
            nu_new = tilt_mean / tilt_var - nu_cav
            step = _relative_step(tau, nu, tau_new, nu_new, diag_k, xp)
            change = float(xp.max(xp.abs(step)))
            if progress is not None:
                progress.update(1)
                progress.set_postfix(log_z=f"{log_z:.4f}", change=f"{change:.1e}", refresh=False)
        if extrapolated and (cavities_lost or not secant.improved(step)):
            # the extrapolation overshot: keep what it showed of the map, and take the damped step it replaced
            if not cavities_lost:
                secant.remember(tau, nu, tau_new, nu_new, step)
            tau, nu, post_var, post_mean, half_log_det, tau_new, nu_new, step, change = saved
            may_extrapolate = False
        elif cavities_lost:
            if saved is None or damping < 1e-6:
                raise FloatingPointError("EP: a cavity precision became non-positive and damping cannot fix it")
            tau, nu, post_var, post_mean, half_log_det, tau_new, nu_new, step, change = saved
            damping *= 0.5
            previous_step = None  # the proposal that led here is retried with half the step
            may_extrapolate = False
            secant.forget()
        else:
            accepted.append(log_z)
            changes.append(change)
            if previous_step is not None and not extrapolated:  # the secant damping assumes a damped step
                damping = next_damping(damping, step, previous_step, xp)
            previous_step = step
            if rough:
                if plateau_at is None and _stalled(changes):
                    plateau_at = steps if changes[-1] < 0.1 else steps - 2  # a high floor: hand over now
                # float32 that needs damping (cavities lost to rounding) hands over to float64 at once
                if change <= site_tol or damping < 1.0 or steps >= _MAX_FLOAT32_SWEEPS or \
                        (plateau_at is not None and steps >= plateau_at + 2):
                    converged = True
                    break
            elif len(accepted) >= 2 and _remaining_error(accepted) <= tol and change <= site_tol:
                converged = True
                break
            if steps >= max_sweeps:
                break
            secant.observe(tau, nu, tau_new, nu_new, step, damped=damping < 1.0)
            may_extrapolate = True
        saved = (tau, nu, post_var, post_mean, half_log_det, tau_new, nu_new, step, change)
        proposal = secant.extrapolate(diag_k) if may_extrapolate else None
        extrapolated = proposal is not None
        if extrapolated:
            tau, nu = proposal
        else:
            tau = (1.0 - damping) * tau + damping * tau_new
            nu = (1.0 - damping) * nu + damping * nu_new
        post_var, post_mean, half_log_det = _refresh_posterior(K, shift, diag_k, tau, nu, work, la, xp)
        steps += 1
    if not converged and not rough:
        warn(f"EP did not converge in {max_sweeps} sweeps (last |d log Z| = "
             f"{abs(accepted[-1] - accepted[-2]) if len(accepted) > 1 else float('nan'):.2e}, "
             f"site change {change:.2e}); the value may be off", ConvergenceWarning)
    return EPResult(log_z=float(accepted[-1]), sweeps=steps, converged=converged, damping=damping,
                    max_site_change=change, log_z_history=[float(v) for v in history],
                    seconds=time.perf_counter() - t0, likelihood="heaviside", ep_log_z=float(accepted[-1]),
                    site_precision=tau, site_natural_mean=nu)


def _stalled(changes):
    """Site changes past their peak that failed to halve twice in a row: float32's rounding floor."""
    return len(changes) >= 3 and changes[-1] < 0.1 * max(changes) and \
        changes[-1] > 0.5 * changes[-2] and changes[-2] > 0.5 * changes[-3]


def _remaining_error(history):
    """Estimated |log Z_k - log Z_fixed point| under linear convergence: |d| r / (1 - r), r the ratio of the
    last two changes; |d| when r is not yet known (two values), and 10 |d| while r >= 1 (not contracting, or at
    the rounding floor, where changes of 1e-10 jitter)."""
    delta = abs(history[-1] - history[-2])
    if len(history) < 3:
        return delta
    previous = abs(history[-2] - history[-3])
    if previous == 0.0:
        return delta
    ratio = delta / previous
    return delta * ratio / (1.0 - ratio) if ratio < 1.0 else 10.0 * delta


# float64 EP from zero takes 9-11 sweeps on NNGP kernels (n = 2000-10000); float32 sweeps beyond this many
# would no longer save anything, so float64 takes over.
_MAX_FLOAT32_SWEEPS = 20


_DAMPING_FLOOR = 1e-3  # what next_damping goes down to; only cavity retries go lower (to 1e-6, then EP gives up)
_DAMPING_GROWTH = 2.0  # the most damping may grow in one sweep
_OSCILLATING = -0.5  # below this eigenvalue undamped EP contracts by less than half a sweep, or diverges


def next_damping(damping, step, previous_step, xp=np):
    """Damping for the next sweep, from how the undamped proposals moved (a secant estimate of EP's fixed-point
    map along its dominant direction).

    With x the sites and F the undamped update, step = F(x) - x. Near the fixed point, along one dominant mode with
    eigenvalue lam of F, a step damped by d makes the next proposal step (1 - d + d lam) times the last, so the
    measured ratio r = <step, previous_step> / |previous_step|^2 gives lam = (r - 1 + d) / d, and d = 1 / (1 - lam)
    would land on the fixed point. When lam < -0.5 (EP oscillates: unanimous labels on strongly correlated points,
    where undamped parallel EP falls into a two-cycle and never converges) the damping goes to that value at once;
    otherwise it grows back towards 1, at most 2x per sweep (a damped step is too short to trust a jump to 1:
    measured, that threw EP back into the oscillation). Never below 1e-3 from here."""
    denom = float(xp.dot(previous_step, previous_step))
    if denom == 0.0:
        return damping
    ratio = float(xp.dot(step, previous_step)) / denom
    eigenvalue = (ratio - 1.0 + damping) / damping
    target = 1.0 / (1.0 - eigenvalue) if eigenvalue < _OSCILLATING else 1.0
    return max(_DAMPING_FLOOR, min(target, _DAMPING_GROWTH * damping, 1.0))


class _SecantSteps:
    """Anderson mixing of depth 2 on the undamped EP map F, for where one scalar damping cannot help.

    Unanimous labels on strongly correlated points give F two collective modes: one oscillating (eigenvalue
    -5.8 at n = 1500, rho = 0.99), one slow and monotone (+0.87). The damping that tames the first leaves the
    second at ~0.98 a sweep. From the last depth + 1 points x_j (the sites) and residuals f_j = F(x_j) - x_j, the
    step x + f - (dX + dF) gamma, gamma the least-squares fit of f by the residual differences dF (weighted by
    the relative scale of _relative_step), is Newton's step on the subspace those points span. Used only once the
    site change is below _SECANT_FROM (far from the fixed point the map is too far from linear) in a run that has
    needed damping (where it has not, EP contracts ~10x a sweep and the extrapolation only costs sweeps), and
    judged by the next sweep: a step whose proposal is more than _SECANT_GROWTH times the last is undone, and the
    damped step taken instead.
    """

    def __init__(self, xp, depth=2, usable=True):
        self.xp, self.depth, self.usable = xp, depth, usable
        self.points, self.residuals, self.last_size = [], [], float("inf")
        self.engaged = False  # from the first damped sweep on: undamped EP converges fast without help

    def forget(self):
        self.points, self.residuals = [], []

    def observe(self, tau, nu, tau_new, nu_new, step, damped):
        """An accepted sweep: remembered once the run has been damped (and only where the secant is usable)."""
        self.engaged = self.usable and (self.engaged or damped)
        if self.engaged:
            self.remember(tau, nu, tau_new, nu_new, step)

    def remember(self, tau, nu, tau_new, nu_new, step):
        """Add the sweep at sites (tau, nu) with proposal (tau_new, nu_new) and relative step ``step``."""
        xp = self.xp
        self.last_size = float(xp.linalg.norm(step))
        if float(xp.max(xp.abs(step))) >= _SECANT_FROM:
            self.forget()
            return
        self.points.append(xp.concatenate([tau, nu]))
        self.residuals.append(xp.concatenate([tau_new - tau, nu_new - nu]))
        del self.points[:-self.depth - 1], self.residuals[:-self.depth - 1]

    def improved(self, step):
        return float(self.xp.linalg.norm(step)) <= _SECANT_GROWTH * self.last_size

    def extrapolate(self, diag_k):
        """The sites after the Anderson step from the newest point, or None while fewer than two are known."""
        if len(self.points) < 2:
            return None
        xp = self.xp
        x, f = self.points[-1], self.residuals[-1]
        n = diag_k.shape[0]
        weight = 1.0 / xp.concatenate([x[:n] + 1.0 / diag_k, xp.abs(x[n:]) + 1.0 / xp.sqrt(diag_k)])
        d_points = xp.stack([b - a for a, b in zip(self.points, self.points[1:])], axis=1)
        d_residuals = xp.stack([b - a for a, b in zip(self.residuals, self.residuals[1:])], axis=1)
        scaled = d_residuals * weight[:, None]
        gram = to_host(scaled.T @ scaled)
        rhs = to_host(scaled.T @ (f * weight))
        if not np.trace(gram) > 0:  # the last sweeps proposed the same step: nothing to fit
            return None
        gram += 1e-13 * np.trace(gram) * np.eye(gram.shape[0])  # parallel residual differences: stay finite
        gamma = xp.asarray(np.linalg.solve(gram, rhs))
        new = x + f - (d_points + d_residuals) @ gamma
        return xp.maximum(new[:n], 0.0), new[n:]


_SECANT_FROM = 0.02  # site change below which EP's map is near enough to linear for the secant step
_SECANT_GROWTH = 1.5  # a secant step is undone when the next proposal is larger than this times the last


def _relative_step(tau, nu, tau_new, nu_new, diag_k, xp):
    """The proposed change of every site, relative to its scale: (tau_new - tau) / (tau + 1/K_ii) and
    (nu_new - nu) / (|nu| + 1/sqrt(K_ii)), so that sites of every precision are judged on the same footing; its
    largest entry is the site change of the stopping rule."""
    return xp.concatenate([(tau_new - tau) / (tau + 1.0 / diag_k),
                           (nu_new - nu) / (xp.abs(nu) + 1.0 / xp.sqrt(diag_k))])


def _tilted_moments(y, cav_mean, cav_var, la, xp):
    """Moments of N(g; m, v) 1[y g > 0]: log Z_i = log Phi(z), z = y m / sqrt(v); r = phi(z)/Phi(z)."""
    sd = xp.sqrt(cav_var)
    z = y * cav_mean / sd
    log_zhat = la.log_ndtr(z)
    r = _SQRT_2_OVER_PI / la.erfcx(-z / math.sqrt(2.0))
    mean = cav_mean + y * sd * r
    var = cav_var * (1.0 - r * (z + r))
    # 1 - r (z + r) underflows to 0 or below only for z << 0 with |z| ~ 1e8; keep a positive variance.
    var = xp.maximum(var, cav_var * 1e-300 + 1e-300)
    return log_zhat, mean, var


def _refresh_posterior(K, shift, diag_k, tau, nu, work, la, xp):
    """Posterior marginals of N(mu, Sigma), Sigma = (C^-1 + S)^-1, mu = Sigma nu, S = diag(tau), for the prior
    covariance C = K + shift I, via B = I + S^1/2 C S^1/2 = L L^T (eigenvalues >= 1) and W = L^-1:
    Sigma_ii = (1 - (B^-1)_ii) / tau_i with (B^-1)_ii = sum_k W_ki^2, and mu = a - C S^1/2 B^-1 S^1/2 a, a = C nu.
    diag_k is diag(C).
    """
    low = K.dtype  # float64, or float32 in mixed precision's early sweeps: the n^2 and n^3 work runs in it
    sqrt_tau = xp.sqrt(tau)

    def prior_matvec(x):
        return la.sym_matvec(K, x).astype(xp.float64) + shift * x

    factored = la.inverse_cholesky_inplace(la.scaled_system(K, sqrt_tau, work, shift))
    if factored is None:
        raise NotPSDError("K: B = I + S^1/2 K S^1/2 is not positive definite, so K is not positive semi-definite")
    W, half_log_det = factored
    b_inv_diag = la.column_norms_sq(W)
    scaled = tau * diag_k
    safe = scaled >= _CANCELLATION_GUARD[low.itemsize]
    post_var = xp.where(safe, (1.0 - b_inv_diag) / xp.where(safe, tau, 1.0), diag_k)
    guarded = xp.nonzero(~safe)[0]
    # in chunks of columns: early float32 sweeps guard most sites, and n x n temporaries would double EP's memory
    chunk = _scan_rows(K.shape[0])
    for start in range(0, int(guarded.size), chunk):
        part = guarded[start:start + chunk]
        columns = K[:, part].astype(xp.float64)
        columns[part, xp.arange(part.size)] += shift
        columns *= sqrt_tau[:, None]
        V = la.tri_matmul(W, columns.astype(low, copy=False)).astype(xp.float64, copy=False)
        post_var[part] = diag_k[part] - xp.einsum("ij,ij->j", V, V)
    a = prior_matvec(nu)
    c = la.tri_matvec(W, la.tri_matvec(W, sqrt_tau * a), transpose=True).astype(xp.float64)
    post_mean = a - prior_matvec(sqrt_tau * c)
    return post_var, post_mean, half_log_det


def _log_z_ep(log_zhat, tau, nu, tau_cav, cav_mean, post_mean, half_log_det, xp):
    """Rasmussen & Williams eq. 3.65 in its stable form, with nu^T Sigma nu = nu^T mu:
    sum log Zhat + 1/2 sum log(1 + tau/tau_cav) - sum log L_ii + 1/2 nu^T (Sigma - (T + S)^-1) nu
    + 1/2 m^T T (T + S)^-1 (S m - 2 nu), T = diag(tau_cav), m = cavity means."""
    total_prec = tau_cav + tau
    return float(xp.sum(log_zhat)
                 + 0.5 * xp.sum(xp.log1p(tau / tau_cav))
                 - half_log_det
                 + 0.5 * (nu @ post_mean - xp.sum(nu * nu / total_prec))
                 + 0.5 * xp.sum(cav_mean * tau_cav / total_prec * (tau * cav_mean - 2.0 * nu)))
