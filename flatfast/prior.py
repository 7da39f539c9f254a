"""log P(f): the NNGP prior probability of a labelling, by Expectation Propagation.

The EP loop is plain Python over an array module (numpy on the CPU, cupy on a GPU): per sweep one Cholesky of
B = I + S^1/2 K S^1/2 and one triangular inverse (LAPACK or cuSOLVER POTRF + TRTRI, in place in one n x n
workspace), the posterior marginal variances from the inverse factor's column norms, the means from two
triangular matrix-vector products. K and that workspace are the only n x n arrays, on either device: the probit
likelihood's K + I is a diagonal shift applied inside the passes, the PSD check factors in the workspace, and
mixed precision keeps its float32 K and workspace inside the same workspace.
"""
from __future__ import annotations

import math
import time

import numpy as np

from flatfast._validate import check_float, check_int, memory_guard
from flatfast._xp import ep_array, free_bytes, linalg_for, xp_of
from flatfast.errors import ConvergenceWarning, NotPSDError, UnreliableEstimateWarning, warn
from flatfast.results import EPResult

_LIKELIHOODS = ("heaviside", "probit")
_PRECISIONS = ("float64", "mixed")
_METHODS = ("ep", "tilting")
_RETIRED_METHODS = {
    "ep-is": "method='ep-is' was removed: importance sampling from the EP posterior has infinite-variance weights "
             "under the Heaviside likelihood and collapses beyond a few dozen points, so its error bar could not "
             "be backed; method='tilting' replaces it"}
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
# Below this tau_i K_ii the variance formula (1 - (B^-1)_ii) / tau_i loses too many digits to cancellation;
# such sites take the column formula K_ii - |L^-1 S^1/2 K e_i|^2 instead (by itemsize: float64, float32).
_CANCELLATION_GUARD = {8: 1e-6, 4: 1e-2}


def log_prior(X, y, *, depth=2, sigma_w2=2.0, sigma_b2=1.0, likelihood="heaviside", method="ep", tol=1e-6,
              max_sweeps=200, backend="auto", return_info=False, n_samples=20000, seed=0, precision="float64",
              kernel=None, model=None, kernel_samples=None, samples=None, progress=None):
    r"""log P(f): the log probability that a random infinitely wide ReLU network labels X as y.

    The kernel is the arc-cosine NNGP kernel of a fully connected ReLU network by default; ``model=net,
    samples=M`` uses instead the Monte Carlo NNGP kernel of any PyTorch architecture
    (:func:`flatfast.empirical_nngp_kernel` with the same sigma_w2, sigma_b2 and ``seed``), and ``kernel=K``
    any precomputed n x n covariance of the n points of X.

    .. math::
        \log P(f) = \log P\big(\mathrm{sign}\, g(x_i) = y_i \ \forall i\big), \quad g \sim GP(0, K),
        \quad K = \texttt{nngp\_kernel}(X, \text{depth}, \sigma_w^2, \sigma_b^2),

    a Gaussian orthant probability, approximated by Expectation Propagation (EP) with the noise-free
    likelihood :math:`1[y g > 0]` (``likelihood="heaviside"``). ``likelihood="probit"`` uses
    :math:`\Phi(y g)` (GPy's default Bernoulli link, what the paper's published numbers used), which is the
    same computation on :math:`K + I`. Values are in nats. The Heaviside value is invariant to scaling K.
    In GPy, ``likelihood="probit"`` is ``GPy.core.GP(X, y01, kernel, likelihood=GPy.likelihoods.Bernoulli(),
    inference_method=GPy.inference.latent_function_inference.EP())`` (GPClassification's model, with EP), whose
    ``log_likelihood()`` is this value for the same K; GPy has no noise-free (Heaviside) likelihood.

    Parameters
    ----------
    X : array_like, shape (n, d) (or shaped as ``model`` takes them)
        Inputs: train and test points together: a numpy array, or a torch tensor on the CPU or a CUDA device.
        For a CUDA tensor the kernel and every EP sweep run on that device (EP through cupy, which shares the
        kernel's memory by DLPack; no n x n array is copied to the host); without cupy, EP runs on the CPU
        after one warning naming the package to install.
    y : array_like, shape (n,) or (m, n)
        Labels in {-1, +1} or {0, 1}; a 2-D array holds m labellings of the same X (one kernel, m values).
    depth, sigma_w2, sigma_b2 : the kernel's parameters (see :func:`flatfast.nngp_kernel`).
    likelihood : {"heaviside", "probit"}
    method : {"ep", "tilting"}
        ``"ep"``: plain EP, deterministic and fast (O(n^3) per sweep, about 11 sweeps), but an approximation
        whose error is not reported: see the measured tables in the README ("How far is EP from the truth?").
        On NNGP kernels of MNIST-like inputs it is within 0.007 nats of the truth up to n = 500. It is weakest
        on near-unanimous labels of strongly correlated points: on equicorrelated kernels (correlation rho) it
        underestimates unanimous labellings by 0.19 / 0.29 / 0.41 nats at rho = 0.9 / 0.96 / 0.99 (n = 100) and
        0.25 / 0.38 / 0.54 nats (n = 1500), and needs 12-65 sweeps there; with 1 % of the labels the other way
        the error is at most 0.03 nats.
        ``"tilting"``: Botev's minimax-tilting importance sampler (J. R. Stat. Soc. B 79, 2017) after EP, an
        unbiased Monte Carlo estimate of P(f) with, in the :class:`EPResult` (``return_info=True``), its standard
        error ``stderr``, effective sample size ``ess``, the Pareto tail shape ``pareto_k`` of its weights and
        Botev's upper bound ``log_upper_bound``; ``ep_log_z`` keeps EP's value. P(f) is estimated without bias;
        the returned log P(f) is the log of that estimate, so it is biased low by about stderr^2 / 2. When
        ``pareto_k > 0.7`` neither value nor stderr can be trusted and an :class:`UnreliableEstimateWarning` says
        so. On NNGP kernels of MNIST-like inputs it is reliable up to about n = 500 (see the README's table);
        beyond that its weights become heavy-tailed. Runs in float64 on the CPU (a cupy K is copied to the host).
    tol : float
        Stop when the estimated distance of log Z to EP's fixed point is at most ``tol`` nats (from the last
        changes, which shrink geometrically) and the sites have settled.
    precision : {"float64", "mixed"}
        ``"mixed"`` runs EP's early sweeps in float32 (LAPACK float32 is about twice as fast) and finishes in
        float64: the same fixed point within ``tol`` (tested to 1e-8 relative), in less time at large n. Needs
        K as float32 besides (half a float64 n x n array).
    max_sweeps : int
        Not converging by then warns (:class:`ConvergenceWarning`) and returns ``converged=False``.
    backend : str
        Backend of the kernel computation (see :func:`flatfast.nngp_kernel`).
    return_info : bool
        Return :class:`flatfast.results.EPResult` records (value, sweeps, convergence, damping, history, time)
        instead of floats.
    n_samples, seed : int
        Importance samples and their seed for ``method="tilting"`` (O(n^2) work each); ``seed`` also seeds the
        draws of ``model``'s kernel.
    progress : bool or None
        A counter of EP's sweeps with log Z and the site change (None: when stderr is a terminal); at n = 10,000
        a sweep takes seconds on a CPU.
    kernel : array_like (n, n), optional
        A precomputed prior covariance of the points (then depth, sigma_w2, sigma_b2, backend are unused): numpy,
        a torch tensor (CPU or CUDA) or a cupy array; EP runs where it is (see X).
    model, kernel_samples : torch.nn.Module and int, optional
        Use the empirical NNGP kernel of ``model``'s architecture from ``kernel_samples`` random
        initialisations M. Its Monte Carlo error moves log P(f): see the README ("Empirical kernels") for how
        much, by M. (``samples=`` is its former name, still accepted with a FutureWarning: one name, one meaning
        -- ``n_samples`` is the tilting sampler's.)

    Returns
    -------
    float, or numpy array of m floats for 2-D y (EPResult / list of EPResult with return_info).

    Examples
    --------
    >>> import numpy as np, flatfast
    >>> X = np.random.default_rng(0).random((200, 784))
    >>> y = np.where(X[:, 0] > 0.5, 1, -1)
    >>> flatfast.log_prior(X, y) < 0
    True
    """
    from flatfast.nngp import nngp_kernel
    from flatfast._validate import as_float_matrix

    if samples is not None:
        if kernel_samples is not None:
            raise ValueError("samples, kernel_samples: samples is kernel_samples' former name; give one")
        warn("log_prior: samples= is now kernel_samples= (the kernel's random draws; n_samples is the tilting "
             "sampler's)", FutureWarning)
        kernel_samples = samples
    if kernel is not None and model is not None:
        raise ValueError("kernel, model: give one of them (model's kernel is computed), not both")
    if (model is None) != (kernel_samples is None):
        raise ValueError("model, kernel_samples: the empirical kernel needs both (kernel_samples = number of "
                         "random draws M)")
    if model is None and kernel is None:
        X = as_float_matrix(X, "X", allow_empty=False)
    n = len(X)
    labels = _labels(y, n)
    _check_method(method)
    if kernel is not None:  # X only says how many points there are; it may have any shape
        shape = tuple(getattr(kernel, "shape", np.shape(kernel)))
        if shape != (n, n):
            raise ValueError(f"kernel: expected shape ({n}, {n}) for the {n} points of X, got {shape}")
        return ep_log_evidence(kernel, y, likelihood=likelihood, method=method, tol=tol, max_sweeps=max_sweeps,
                               return_info=return_info, n_samples=n_samples, seed=seed, precision=precision,
                               progress=progress)
    _guard_memory(n, likelihood, method, "log_prior", xp=_module_for_input(X), new_arrays=1, n_samples=n_samples)
    if model is not None:
        from flatfast.empirical import empirical_nngp_kernel

        K = empirical_nngp_kernel(model, X, kernel_samples, sigma_w2=sigma_w2, sigma_b2=sigma_b2, seed=seed)
    else:
        K = nngp_kernel(X, depth=depth, sigma_w2=sigma_w2, sigma_b2=sigma_b2, backend=backend)
    K = ep_array(K, "the kernel")
    return _evidence(K, labels, y_was_2d=np.ndim(y) == 2, likelihood=likelihood, method=method, tol=tol,
                     max_sweeps=max_sweeps, return_info=return_info, n_samples=n_samples, seed=seed,
                     precision=precision, progress=progress)


def ep_log_evidence(K, y, *, likelihood="heaviside", method="ep", tol=1e-6, max_sweeps=200, return_info=False,
                    n_samples=20000, seed=0, check_psd=True, warm_start=None, precision="float64", progress=None):
    r"""log P(sign g = y) for g ~ N(0, K), by EP, for a precomputed covariance matrix K.

    The same estimator as :func:`log_prior` (see there for ``likelihood``, ``method``, ``tol``, ``max_sweeps``,
    ``return_info``, ``n_samples``, ``seed``, ``precision``, ``progress``). For 2-D y every labelling after the
    first starts from the fixed point of the nearest one already solved (same values within ``tol``, fewer sweeps).
    K must be symmetric positive semi-definite; ``check_psd=True`` verifies that with one Cholesky of
    K + 1e-10 mean(diag K) I (in EP's workspace), and raises :class:`flatfast.NotPSDError`.
    K may be a numpy array, a torch tensor (CPU or CUDA) or a cupy array; EP runs where K is: on a CUDA device
    through cupy and cuSOLVER (a CUDA tensor is shared with cupy by DLPack, not copied), on the CPU through
    LAPACK. Either way EP holds two n x n arrays, K and one workspace, and returns the same float / EPResult.
    EP runs in float64: a K of another dtype is converted once (one copy of K).

    Under the Heaviside likelihood some labellings have probability exactly 0: a point with K_ii = 0, or two
    points with correlation +1 (duplicate inputs) given different labels. Those return -inf with a warning
    naming the points, instead of running EP into a NaN.

    ``warm_start``: an :class:`flatfast.EPResult` of an earlier call on the same K and likelihood (e.g. the
    previous epoch's labelling of the same inputs); EP starts from its sites instead of from zero, with nu
    negated where the labels differ (a site of -y_i is the mirror image of that of y_i). The fixed point, and so
    the value within ``tol``, is the same; nearby labellings need fewer sweeps. 1-D y only.

    Examples
    --------
    >>> import numpy as np, flatfast
    >>> round(flatfast.ep_log_evidence(np.eye(3), [1, -1, 1]), 10)   # three independent fair signs: 3 log(1/2)
    -2.0794415417
    """
    K = ep_array(K, "K")
    xp = xp_of(K)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"K: expected a square 2-D matrix, got shape {tuple(K.shape)}")
    if K.shape[0] == 0:
        raise ValueError("K: is empty (n = 0)")
    if K.dtype.kind != "f" and K.dtype.kind not in "iub":
        raise TypeError(f"K: expected a real floating-point matrix, got dtype {K.dtype}")
    _guard_memory(K.shape[0], likelihood, method, "ep_log_evidence", xp=xp,
                  new_arrays=0 if K.dtype == xp.float64 else 1, n_samples=n_samples)
    if K.dtype != xp.float64:
        # EP runs in float64 (the standard for EP and the oracles); convert once, here, rather than let LAPACK
        # copy a float32 K silently on every sweep.
        K = K.astype(xp.float64)
    n = K.shape[0]
    _check_method(method)
    _check_finite_symmetric(K, xp)
    if bool((xp.diagonal(K) < 0).any()):
        raise NotPSDError("K: has negative diagonal entries, so it is not positive semi-definite")
    labels = _labels(y, n)
    init = None
    if warm_start is not None:
        if np.ndim(y) != 1:
            raise ValueError("warm_start: is for one labelling (1-D y)")
        sites = (getattr(warm_start, "site_precision", None), getattr(warm_start, "site_natural_mean", None))
        if any(v is None or tuple(v.shape) != (n,) for v in sites):
            raise ValueError(f"warm_start: expected an EPResult of an earlier EP run on {n} points")
        if getattr(warm_start, "likelihood", likelihood) != likelihood:
            raise ValueError(f"warm_start: comes from a {warm_start.likelihood} run, not {likelihood}")
        init = sites
        earlier = getattr(warm_start, "labels", None)
        if earlier is not None and np.shape(earlier) == (n,):
            # the Heaviside site of -y_i is the mirror image of that of y_i: negate nu where the label flipped
            init = (sites[0], sites[1] * xp_of(sites[1]).asarray(labels[0] * np.asarray(earlier)))
    return _evidence(K, labels, y_was_2d=np.ndim(y) == 2, likelihood=likelihood, method=method, tol=tol,
                     max_sweeps=max_sweeps, return_info=return_info, n_samples=n_samples, seed=seed, init=init,
                     precision=precision, check_psd=check_psd, progress=progress)


# --- validation -------------------------------------------------------------------------------------------

def _labels(y, n):
    if isinstance(y, (str, bytes)) or y is None:
        raise TypeError(f"y: expected labels in {{-1, +1}} or {{0, 1}}, got {type(y).__name__}")
    from flatfast._validate import to_numpy

    arr = to_numpy(y)
    if arr.ndim not in (1, 2):
        raise ValueError(f"y: expected a 1-D labelling or a 2-D array of labellings, got {arr.ndim}-D")
    if arr.shape[-1] != n:
        raise ValueError(f"y: has {arr.shape[-1]} labels per labelling but there are {n} points")
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"y: expected numeric labels, got dtype {arr.dtype}")
    values = np.unique(arr)
    if np.all(np.isin(values, (-1, 1))):
        signs = arr.astype(np.float64)
    elif np.all(np.isin(values, (0, 1))):
        signs = np.where(arr > 0, 1.0, -1.0)
    else:
        raise ValueError(f"y: labels must be in {{-1, +1}} or {{0, 1}}; found {values[:5].tolist()}")
    return np.atleast_2d(signs)


def _check_method(method):
    if method in _RETIRED_METHODS:
        raise ValueError(f"method: {_RETIRED_METHODS[method]}")
    if method not in _METHODS:
        raise ValueError(f"method: expected one of {_METHODS}, got {method!r}")


def _module_for_input(X):
    """The array module EP will run on for inputs like X (cupy for CUDA tensors when it can run there)."""
    from flatfast._xp import device_ep_unavailable, is_cuda_tensor

    if (is_cuda_tensor(X) or type(X).__module__.startswith("cupy")) and device_ep_unavailable() is None:
        import cupy

        return cupy
    return np


def _guard_memory(n, likelihood, method, caller, *, xp=np, new_arrays=0, n_samples=0):
    """Fail before allocating, against the memory of the device EP runs on. ``new_arrays``: n x n float64 arrays
    the caller makes before EP (the kernel, or a float64 copy of K); then EP's workspace (its row-block scans add
    0.1 n^2 at large n, up to 0.25 n^2 at n of a few hundred). Tilting (on the host) adds four (the signed K, its
    ordered factor, the Newton system and its Jacobian), a block of n x min(2048, n_samples) samples, and for
    probit its own K + I. The counts are what tracemalloc measures (tests/test_prior_device.py)."""
    arrays = new_arrays + 1.25
    what = "EP's workspace"
    extra = 0.0
    if method == "tilting":
        arrays += 4 + (likelihood == "probit")
        samples = n_samples if isinstance(n_samples, int) else 2048  # validated later, with the other arguments
        extra = 8.0 * n * min(2048, max(samples, 1))
        what += ", the tilting estimator's four and its sample block" + (" and K + I" if likelihood == "probit"
                                                                        else "")
    where = "" if xp is np else " on the GPU"
    memory_guard(arrays * 8.0 * n * n + extra, f"{caller} on n = {n} points{where} ({arrays:g} new float64 n x n "
                 "arrays: " + ("the kernel, " if new_arrays else "") + what + ")", available=free_bytes(xp))


def _impossible_points(K, labels, xp):
    """For each labelling, why its Heaviside orthant probability is exactly 0, or None.

    A point with K_ii = 0 (a blank input with sigma_b2 = 0) has g_i = 0, whose sign is never strictly positive
    or negative; two points with correlation +1 (duplicates) carry one g between them and cannot take different
    labels, nor points with correlation -1 the same label.
    """
    diag = xp.diagonal(K)
    scale = float(xp.max(diag)) if diag.size else 0.0
    zero = xp.nonzero(diag <= 1e-14 * scale)[0]
    if zero.size:
        listed = [int(i) for i in zero[:10]]
        reason = (f"point(s) {listed}{' ...' if zero.size > 10 else ''} have zero prior variance (K_ii = 0, e.g. a "
                  "blank input with sigma_b2 = 0): g_i = 0 there, so no labelling of them has positive probability")
        return [reason] * len(labels)
    first, second, positive = _degenerate_pairs(K, xp)
    if first.size == 0:
        return [None] * len(labels)
    reasons = []
    for row in labels:
        y = xp.asarray(row)
        clash = xp.nonzero((y[first] == y[second]) != positive)[0]  # +1 with different labels, -1 with equal
        if clash.size == 0:
            reasons.append(None)
            continue
        k = int(clash[0])
        i, j = int(first[k]), int(second[k])
        kind = "duplicates (correlation +1) with different" if bool(positive[k]) else \
            "antipodal (correlation -1) with equal"
        reasons.append(f"points {i} and {j} are {kind} labels, which no function drawn from the prior can give "
                       f"them ({clash.size} such pair(s) in all)")
    return reasons


def _scan_rows(n):
    """Rows per block of the O(n^2) checks: each of their few temporaries holds 1/32 of an n x n array at most,
    so they add ~0.1 n^2 to EP's two arrays at any n."""
    return max(16, -(-n // 32))


def _degenerate_pairs(K, xp):
    """Pairs i < j with correlation +-1 (duplicate or antipodal inputs): (first, second, positive) index arrays.
    K is scanned in blocks of rows, so no n x n temporary is allocated beside the counted ones."""
    block = _scan_rows(K.shape[0])
    root = xp.sqrt(xp.diagonal(K))
    first, second, positive = [], [], []
    for start in range(0, K.shape[0], block):
        corr = K[start: start + block] / root[start: start + block, None] / root[None, :]
        i, j = xp.nonzero(xp.abs(corr) >= 1.0 - 1e-12)
        upper = j > i + start
        first.append(i[upper] + start)
        second.append(j[upper])
        positive.append(corr[i[upper], j[upper]] > 0)
    return xp.concatenate(first), xp.concatenate(second), xp.concatenate(positive)


def _check_finite_symmetric(K, xp):
    """NaN/inf and asymmetry checks in row blocks: no n x n temporaries (at n = 5000 the whole-matrix version
    cost more than one Cholesky)."""
    block = _scan_rows(K.shape[0])
    scale = 0.0
    asymmetry = 0.0
    for start in range(0, K.shape[0], block):
        rows = K[start: start + block]
        if not bool(xp.isfinite(rows).all()):
            raise ValueError("K: contains NaN or infinite values")
        scale = max(scale, float(xp.max(xp.abs(rows))))
        asymmetry = max(asymmetry, float(xp.max(xp.abs(rows - K[:, start: start + block].T))))
    if asymmetry > 1e-10 * max(scale, 1e-300):
        raise NotPSDError("K: is not symmetric")


def _check_psd(K, la, work):
    """One Cholesky of K + 1e-10 mean(diag K) I, in EP's workspace (no third n x n array), on K's device; a
    failure (LAPACK's or cuSOLVER's info > 0) raises NotPSDError."""
    xp = la.xp
    jitter = 1e-10 * float(xp.mean(xp.diagonal(K)))
    la.scaled_system(K, xp.ones(K.shape[0]), work, shift=jitter - 1.0)  # K + (1 + jitter - 1) I
    if not la.cholesky_inplace(work):
        raise NotPSDError("K: is not positive semi-definite (Cholesky of K + 1e-10 mean(diag K) I failed)")


def _evidence(K, labels, *, y_was_2d, likelihood, method, tol, max_sweeps, return_info, n_samples, seed, init=None,
              precision="float64", check_psd=False, progress=None):
    if likelihood not in _LIKELIHOODS:
        raise ValueError(f"likelihood: expected one of {_LIKELIHOODS}, got {likelihood!r}")
    _check_method(method)
    if precision not in _PRECISIONS:
        raise ValueError(f"precision: expected one of {_PRECISIONS}, got {precision!r}")
    tol = check_float(tol, "tol", positive=True)
    max_sweeps = check_int(max_sweeps, "max_sweeps", minimum=1)
    n_samples = check_int(n_samples, "n_samples", minimum=2)
    seed = check_int(seed, "seed", minimum=0)
    xp = xp_of(K)
    if not K.flags.c_contiguous:  # EP's LAPACK and fused passes work on C-ordered K; symmetric, so K.T is K
        K = K.T if K.flags.f_contiguous else xp.ascontiguousarray(K)
    # Phi(y g) = P(y (g + e) > 0), e ~ N(0, 1): the Heaviside problem for the kernel K + I, applied as a shift.
    shift = 1.0 if likelihood == "probit" else 0.0
    la = linalg_for(xp)
    work = xp.empty_like(K)
    if check_psd:
        _check_psd(K, la, work)
    results, solved = [], []
    impossible = _impossible_points(K, labels, xp) if likelihood == "heaviside" else [None] * len(labels)
    for row, reason in zip(labels, impossible):
        y = xp.asarray(row)
        if reason is not None:
            warn(f"log P(f) = -inf: {reason}", RuntimeWarning)
            results.append(EPResult(log_z=-math.inf, sweeps=0, converged=True, damping=1.0, max_site_change=0.0,
                                    log_z_history=[], seconds=0.0, likelihood=likelihood, method=method,
                                    ep_log_z=-math.inf))
            continue
        start = init if init is not None else _nearest_fixed_point(row, solved)
        bar = _sweep_counter(progress, K.shape[0])
        try:
            res = expectation_propagation(K, y, tol=tol, max_sweeps=max_sweeps, init=start, precision=precision,
                                          shift=shift, work=work, linalg=la, progress=bar)
        finally:
            if bar is not None:
                bar.close()
        res.likelihood = likelihood
        res.labels = row
        solved.append((row, res))
        if method == "tilting":
            res = _tilting_estimate(K, y, res, n_samples=n_samples, seed=seed, shift=shift)
        results.append(res)
    if return_info:
        return results if y_was_2d else results[0]
    values = np.array([r.log_z for r in results])
    return values if y_was_2d else float(values[0])


def _nearest_fixed_point(labels, solved):
    """Warm start for one of several labellings of the same inputs: the sites of the solved labelling that
    differs in the fewest points, with nu_i negated where the label flips (the Heaviside site of -y_i is the
    mirror image of that of y_i). EP's fixed point does not depend on where it starts; the sweeps do."""
    if not solved:
        return None
    distances = [int(np.sum(labels != other)) for other, _ in solved]
    other, res = solved[int(np.argmin(distances))]
    flip = xp_of(res.site_natural_mean).asarray(labels * other)
    return res.site_precision, res.site_natural_mean * flip


# --- the solver --------------------------------------------------------------------------------------------

def _sweep_counter(enabled, n):
    """A counter of EP's sweeps without a total (None when not wanted; enabled=None: when stderr is a terminal)."""
    from flatfast.hessian import _progress_counter

    return _progress_counter(None, f"flatfast EP (n = {n})", enabled)[1]


def expectation_propagation(K, y, *, tol=1e-6, max_sweeps=200, site_tol=None, init=None, precision="float64",
                            shift=0.0, work=None, linalg=None, progress=None):
    """Parallel EP for P(y_i g_i > 0 for all i), g ~ N(0, K + shift I). K: (n, n) float64, y: (n,) of +-1.
    ``work``: an n x n float64 workspace (made here when None); ``linalg``: K's array module's linear algebra.

    Sweep: cavities from the current posterior marginals; tilted moments of the truncated Gaussians (in log
    space: log Phi by log_ndtr, phi/Phi by erfcx, finite for every z); new sites; posterior refresh. Damping
    starts at 1 (none); :func:`next_damping` sets it from how the undamped proposals move (it damps an
    oscillating EP to the secant estimate 1 / (1 - lam) at once and lets it grow back, at most 2x per sweep),
    and a non-positive cavity precision halves it and retries the step from the previous sites. Convergence is
    judged on the undamped proposal, so a small damped step never stops the loop by itself. ``init``: (tau, nu)
    to start from.

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
    damping, history, changes, steps = 1.0, [], [], 0
    saved = None  # sites and posterior before the last step, to retry from with more damping
    previous_step = None  # the last proposed (undamped) relative site step, for next_damping
    converged, change, plateau_at = False, float("inf"), None
    while True:
        tau_cav = 1.0 / post_var - tau
        if bool((tau_cav <= 0).any()):
            if saved is None or damping < 1e-6:
                raise FloatingPointError("EP: a cavity precision became non-positive and damping cannot fix it")
            tau, nu, post_var, post_mean, half_log_det = saved
            damping *= 0.5
            saved = previous_step = None  # the proposal that led here is retried with half the step
        else:
            nu_cav = post_mean / post_var - nu
            cav_mean, cav_var = nu_cav / tau_cav, 1.0 / tau_cav
            log_zhat, tilt_mean, tilt_var = _tilted_moments(y, cav_mean, cav_var, la, xp)
            log_z = _log_z_ep(log_zhat, tau, nu, tau_cav, cav_mean, post_mean, half_log_det, xp)
            history.append(log_z)
            tau_new = xp.maximum(1.0 / tilt_var - tau_cav, 0.0)
            nu_new = tilt_mean / tilt_var - nu_cav
            step = _relative_step(tau, nu, tau_new, nu_new, diag_k, xp)
            change = float(xp.max(xp.abs(step)))
            changes.append(change)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(log_z=f"{log_z:.4f}", change=f"{change:.1e}", refresh=False)
            if previous_step is not None:
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
            elif len(history) >= 2 and _remaining_error(history) <= tol and change <= site_tol:
                converged = True
                break
            if steps >= max_sweeps:
                break
        saved = (tau, nu, post_var, post_mean, half_log_det)
        tau = (1.0 - damping) * tau + damping * tau_new
        nu = (1.0 - damping) * nu + damping * nu_new
        post_var, post_mean, half_log_det = _refresh_posterior(K, shift, diag_k, tau, nu, work, la, xp)
        steps += 1
    if not converged and not rough:
        warn(f"EP did not converge in {max_sweeps} sweeps (last |d log Z| = "
             f"{abs(history[-1] - history[-2]) if len(history) > 1 else float('nan'):.2e}, "
             f"site change {change:.2e}); the value may be off", ConvergenceWarning)
    return EPResult(log_z=float(history[-1]), sweeps=steps, converged=converged, damping=damping,
                    max_site_change=change, log_z_history=[float(v) for v in history],
                    seconds=time.perf_counter() - t0, likelihood="heaviside", ep_log_z=float(history[-1]),
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


# --- minimax tilting ---------------------------------------------------------------------------------------

def _tilting_estimate(K, y, ep, *, n_samples, seed, shift=0.0):
    """P(f) by Botev's minimax-tilting importance sampler (flatfast._tilting) on Sigma = diag(y) (K + shift I) diag(y).

    Exact duplicates (correlation +1, equal labels; the impossible cases returned -inf earlier) carry one
    constraint twice and make Sigma singular, so all but one of each group are dropped first: P is unchanged.
    The sampler runs in float64 numpy on the CPU; a cupy K is copied to the host.
    """
    from flatfast import _tilting
    from flatfast._validate import to_numpy

    if xp_of(K) is not np:
        warn("method='tilting' runs on the CPU: the GPU kernel is copied to the host for the sampler",
             RuntimeWarning)
        K = K.get()
        y = y.get()
    K = to_numpy(K)
    y = to_numpy(y)
    if shift:
        K = K + shift * np.eye(len(K))
    first, second, _ = _degenerate_pairs(K, np)
    keep = np.ones(len(y), dtype=bool)
    keep[second] = False
    idx = np.nonzero(keep)[0]
    Sigma = K[np.ix_(idx, idx)] * y[idx, None] * y[None, idx] if not keep.all() else K * y[:, None] * y[None, :]
    est = _tilting.log_orthant_probability(Sigma, n_samples=n_samples, seed=seed)
    del Sigma
    ep.method = "tilting"
    ep.log_z, ep.stderr, ep.ess, ep.n_samples = est["log_p"], est["stderr"], est["ess"], n_samples
    ep.pareto_k, ep.log_upper_bound = est["pareto_k"], est["log_upper_bound"]
    problems = []
    if not est["newton_converged"]:
        problems.append("the tilting parameters did not converge (the estimate stays unbiased, its variance may "
                        "be large)")
    if not est["pareto_k"] <= _tilting.PARETO_K_WARN:
        problems.append(f"the importance weights are heavy-tailed (Pareto k = {est['pareto_k']:.2f} > "
                        f"{_tilting.PARETO_K_WARN}; effective sample size {est['ess']:.0f} of {n_samples}), so "
                        "neither the estimate nor its standard error can be trusted")
    if problems:
        warn(f"log P(f) by tilting on {len(y)} points: " + "; ".join(problems) + ". More samples "
             "(n_samples=) may help; EP's value is in ep_log_z.", UnreliableEstimateWarning)
    return ep
