"""log P(f): the NNGP prior probability of a labelling -- the public functions ``log_prior`` and
``ep_log_evidence`` and the run of an estimator over one or several labellings.

``log_prior`` reads as three steps: the kernel of the points (:func:`_prior_kernel`), the labels
(:func:`flatfast.prior.checks._labels`), the estimator (:func:`_evidence`: EP of :mod:`flatfast.prior.ep`, then
tilting or SMC where asked).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, List, Optional, Union

import numpy as np

from flatfast._validate import check_float, check_int
from flatfast.backend.xp import ep_array, linalg_for, xp_of
from flatfast.errors import NotPSDError, warn
from flatfast.kernel.checks import _check_finite_symmetric, _check_psd, _impossible_points
from flatfast.prior.checks import _check_correction, _check_method, _guard_memory, _labels, _module_for_input
from flatfast.prior.correction import second_order_correction
from flatfast.prior.ep import _sweep_counter, expectation_propagation
from flatfast.prior.smc import RUNS as SMC_RUNS
from flatfast.prior.smc import smc_estimate
from flatfast.prior.tilting import tilting_estimate
from flatfast.results import EPResult

if TYPE_CHECKING:  # pragma: no cover
    from flatfast._typing import ArrayLike, InputsLike, Model

_LIKELIHOODS = ("heaviside", "probit")
_PRECISIONS = ("float64", "mixed")


def log_prior(X: InputsLike, y: ArrayLike, *, depth: int = 2, sigma_w2: float = 2.0, sigma_b2: float = 1.0,
              likelihood: str = "heaviside", method: str = "ep", tol: float = 1e-6, max_sweeps: int = 200,
              backend: str = "auto", return_info: bool = False, n_samples: int = 20000, seed: int = 0,
              precision: str = "float64", kernel: Optional[ArrayLike] = None, model: Optional[Model] = None,
              kernel_samples: Optional[int] = None, samples: Optional[int] = None, progress: Optional[bool] = None,
              correction: bool = False) -> Union[float, np.ndarray, EPResult, List[EPResult]]:
    r"""log P(f): the log probability that a random infinitely wide ReLU network labels X as y.

    The kernel is the arc-cosine NNGP kernel of a fully connected ReLU network by default; ``model=net,
    kernel_samples=M`` uses instead the Monte Carlo NNGP kernel of any PyTorch architecture
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
    X : array_like, shape (n, d); with ``model``, the inputs as it takes them (a tensor, or a mapping of tensors
        such as a tokenizer's output, n examples first)
        Inputs: train and test points together: a numpy array, or a torch tensor on the CPU or a CUDA device.
        For a CUDA tensor the kernel and every EP sweep run on that device (EP through cupy, which shares the
        kernel's memory by DLPack; no n x n array is copied to the host); without cupy, EP runs on the CPU
        after one warning naming the package to install.
    y : array_like, shape (n,) or (m, n)
        Labels in {-1, +1} or {0, 1}; a 2-D array holds m labellings of the same X (one kernel, m values).
    depth, sigma_w2, sigma_b2 : the kernel's parameters (see :func:`flatfast.nngp_kernel`).
    likelihood : {"heaviside", "probit"}
    method : {"ep", "tilting", "smc"}
        ``"ep"``: plain EP, deterministic and fast (O(n^3) per sweep, about 11 sweeps), but an approximation
        whose error is not reported: see the measured tables in the documentation's results ("EP's accuracy").
        On NNGP kernels of MNIST-like inputs it is within 0.007 nats of the truth up to n = 500. It is weakest
        on near-unanimous labels of strongly correlated points: on equicorrelated kernels (correlation rho) it
        underestimates unanimous labellings by 0.19 / 0.29 / 0.41 nats at rho = 0.9 / 0.96 / 0.99 (n = 100) and
        0.25 / 0.38 / 0.54 nats (n = 1500), and needs 13-24 sweeps there; with 1 % of the labels the other way
        the error is at most 0.03 nats.
        ``"tilting"``: Botev's minimax-tilting importance sampler (J. R. Stat. Soc. B 79, 2017) after EP, an
        unbiased Monte Carlo estimate of P(f) with, in the :class:`EPResult` (``return_info=True``), its standard
        error ``stderr``, effective sample size ``ess``, the Pareto tail shape ``pareto_k`` of its weights and
        Botev's upper bound ``log_upper_bound``; ``ep_log_z`` keeps EP's value. P(f) is estimated without bias;
        the returned log P(f) is the log of that estimate, so it is biased low by about stderr^2 / 2. When
        ``pareto_k > 0.7`` neither value nor stderr can be trusted and an :class:`UnreliableEstimateWarning` says
        so. On NNGP kernels of MNIST-like inputs it is backed (k below 0.5) up to n = 500 and at the edge at n = 700
        (k 0.62-0.76); beyond, its weights are heavy-tailed (the same page). Runs in float64 on the CPU (a cupy K is
        copied to the host).
        ``"smc"``: sequential Monte Carlo after EP: particles drawn from EP's Gaussian travel to the prior
        restricted to the orthant through Gaussians restricted to boxes — walls moved in from outside the
        particles to the orthant's faces, then EP's sites removed in stages chosen by the particles' effective
        sample size — each stage followed by ``MOVES = 5`` exact Hamiltonian trajectories reflected at the walls
        (Pakman & Paninski 2014; by the C++ core, or for a CUDA X or kernel by a CUDA kernel, with every stage
        on the device). ``RUNS = 10`` independent runs of ``n_samples // 10`` particles follow the stages that
        an eleventh, pilot run picks, and each gives an unbiased estimate of P(f); ``log_z`` is the log of their
        mean, ``stderr`` its delta-method standard error, ``smc_runs`` the runs' own log estimates,
        ``smc_stages`` the number of stages and ``smc_bounces`` the wall reflections per trajectory;
        ``ep_log_z`` keeps EP's value. Like tilting it is biased low, being the log of an unbiased estimate:
        by about stderr^2 / 2 where the runs' estimates are near normal, and more where they are skewed (below).
        Measured with n_samples = 2000 (the documentation's results, "SMC coverage"): +-2 stderr held the exact value in
        0.90-1.00 of 50 seeds on equicorrelated kernels at n = 100 (unanimous, 1 % and 10 % minority labels), 0.92-0.94
        at n = 1500 (unanimous, rho = 0.9-0.99, where EP is 0.25-0.54 nats low; stderr 0.01, 11 s an estimate on 2
        cores), 0.90, 0.92 and 0.90 at n = 1500 with 1 % minority labels (rho = 0.9, 0.96 and 0.99, stderr 0.09, 156 s,
        116 s and 158 s, low by 0.36, 0.32 and 0.31 stderr on average, though the rho = 0.99 runs' estimates of P
        average 0.988 +- 0.013 of the exact value), and 0.88 of 50 on a diagonal-plus-rank-2 kernel with 1 % minority
        labels at n = 1500 (stderr 0.09, 128 s). On an NNGP kernel at n = 300 with a linear-rule labelling, where
        trajectories reflect about a hundred times, 28 of 30 seeds were within +-2 stderr of tilting's value, low by 0.4
        stderr (0.05 nats) on average. (Times but the 116 s and 158 s were measured before the C++ core ruled out walls
        by a bound, which halved them where trajectories reflect often.) With the error bar estimated from ten runs,
        about 0.92 is the nominal coverage of +-2 stderr (Student's t, 9 degrees of freedom).
        The default n_samples = 20,000 narrows the error bar about 3x at 10x the cost. Cost per stage:
        one O(n^3) Gaussian, 5 x (all particles) x (n^2 for the velocities + reflections x n); reflections are
        below one per trajectory on near-unanimous labels and hundreds on NNGP kernels with mixed labels, where
        ``"tilting"`` is much cheaper wherever it works (n <= 500). An :class:`UnreliableEstimateWarning` says
        when the runs disagree by more than a nat.
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
        Importance samples and their seed for ``method="tilting"`` (O(n^2) work each); for ``method="smc"``, the
        particles of all its independent runs together (at least 2 per run; the pilot run adds a tenth) and their
        seed. ``seed`` also seeds the draws of ``model``'s kernel.
    progress : bool or None
        A counter of EP's sweeps with log Z and the site change (None: when stderr is a terminal); at n = 10,000
        a sweep takes seconds on a CPU. ``method="smc"`` adds a counter of its stages.
    correction : bool
        Also compute the second-order correction of Opper, Paquet & Winther (``EPResult.correction``, and
        ``EPResult.corrected_log_z = log_z + correction``; method="ep" only): the pair terms of skewness and
        excess kurtosis that EP's Gaussian leaves out. It costs about ten Cholesky-equivalents and two n x n
        arrays beside K, on the CPU. A diagnostic: on equicorrelated kernels with 1-10 % minority labels it
        accounts for EP's whole error (0.0275 against 0.0269 nats at n = 100, rho = 0.9); with unanimous labels,
        where EP is weakest, it overshoots (0.34 against 0.19), so a correction of that size says EP's value is
        off by a comparable amount, not by exactly that much.
    kernel : array_like (n, n), optional
        A precomputed prior covariance of the points (then depth, sigma_w2, sigma_b2, backend are unused): numpy,
        a torch tensor (CPU or CUDA) or a cupy array; EP runs where it is (see X).
    model, kernel_samples : torch.nn.Module and int, optional
        Use the empirical NNGP kernel of ``model``'s architecture from ``kernel_samples`` random
        initialisations M. Its Monte Carlo error moves log P(f): see the documentation's results ("EP's
        accuracy") for how much, by M. (``samples=`` is its former name, still accepted with a FutureWarning:
        one name, one meaning -- ``n_samples`` is the Monte Carlo samples'.)

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
    kernel_samples = _kernel_samples_argument(samples, kernel_samples)
    X, n = _points(X, kernel=kernel, model=model, kernel_samples=kernel_samples)
    labels = _labels(y, n)
    _check_method(method)
    estimator = dict(likelihood=likelihood, method=method, tol=tol, max_sweeps=max_sweeps, return_info=return_info,
                     n_samples=n_samples, seed=seed, precision=precision, progress=progress, correction=correction)
    if kernel is not None:  # X only says how many points there are; it may have any shape
        shape = tuple(getattr(kernel, "shape", np.shape(kernel)))
        if shape != (n, n):
            raise ValueError(f"kernel: expected shape ({n}, {n}) for the {n} points of X, got {shape}")
        return ep_log_evidence(kernel, y, **estimator)
    _check_correction(correction, method)
    _guard_memory(n, likelihood, method, "log_prior", xp=_module_for_input(X), new_arrays=1, n_samples=n_samples,
                  correction=correction)
    K = _prior_kernel(X, model=model, kernel_samples=kernel_samples, depth=depth, sigma_w2=sigma_w2,
                      sigma_b2=sigma_b2, seed=seed, backend=backend)
    return _evidence(K, labels, y_was_2d=np.ndim(y) == 2, **estimator)


def _kernel_samples_argument(samples, kernel_samples):
    """``kernel_samples``, or ``samples``, its former name (with a FutureWarning)."""
    if samples is None:
        return kernel_samples
    if kernel_samples is not None:
        raise ValueError("samples, kernel_samples: samples is kernel_samples' former name; give one")
    warn("log_prior: samples= is now kernel_samples= (the kernel's random draws; n_samples is the tilting "
         "sampler's)", FutureWarning)
    return samples


def _points(X, *, kernel, model, kernel_samples):
    """(X checked, n): the points the prior is over. With ``model``, X is what the model takes (a tensor, or a
    mapping of tensors); with ``kernel``, X only says how many points there are."""
    from flatfast._validate import as_float_matrix

    if kernel is not None and model is not None:
        raise ValueError("kernel, model: give one of them (model's kernel is computed), not both")
    if (model is None) != (kernel_samples is None):
        raise ValueError("model, kernel_samples: the empirical kernel needs both (kernel_samples = number of "
                         "random draws M)")
    if model is not None or isinstance(X, Mapping):
        from flatfast.kernel.empirical import model_inputs

        return X, model_inputs(X).size
    if kernel is None:
        X = as_float_matrix(X, "X", allow_empty=False)
    return X, len(X)


def _prior_kernel(X, *, model, kernel_samples, depth, sigma_w2, sigma_b2, seed, backend):
    """The prior covariance of the points, as EP takes it: the empirical NNGP kernel of ``model``'s architecture,
    else the arc-cosine NNGP kernel of a ReLU network of ``depth`` hidden layers."""
    if model is not None:
        from flatfast.kernel.empirical import empirical_nngp_kernel

        K = empirical_nngp_kernel(model, X, kernel_samples, sigma_w2=sigma_w2, sigma_b2=sigma_b2, seed=seed)
    else:
        from flatfast.kernel.nngp import nngp_kernel

        K = nngp_kernel(X, depth=depth, sigma_w2=sigma_w2, sigma_b2=sigma_b2, backend=backend)
    return ep_array(K, "the kernel")


def ep_log_evidence(K: ArrayLike, y: ArrayLike, *, likelihood: str = "heaviside", method: str = "ep",
                    tol: float = 1e-6, max_sweeps: int = 200, return_info: bool = False, n_samples: int = 20000,
                    seed: int = 0, check_psd: bool = True, warm_start: Optional[EPResult] = None,
                    precision: str = "float64", progress: Optional[bool] = None,
                    correction: bool = False) -> Union[float, np.ndarray, EPResult, List[EPResult]]:
    r"""log P(f) for a precomputed prior covariance: :math:`\log P(\mathrm{sign}\, g = y)`, :math:`g \sim N(0, K)`.

    The estimator of :func:`log_prior` on a kernel you supply (an NNGP kernel of another architecture, a kernel
    computed once for many labellings). In nats; at most 0; n ln(1/2) for labels that ignore the inputs (K = I).

    Parameters
    ----------
    K : array_like (n, n)
        A symmetric positive semi-definite covariance: a numpy array, a torch tensor (CPU or CUDA) or a cupy
        array. EP runs where K is -- on a CUDA device through cupy and cuSOLVER (a CUDA tensor is shared with cupy
        by DLPack, not copied), on the CPU through LAPACK -- in two n x n arrays, K and one workspace, in
        float64 (a K of another dtype is converted once).
    y : array_like (n,) or (m, n)
        Labels in {-1, +1} or {0, 1}; a 2-D array holds m labellings, each after the first started from the fixed
        point of the nearest one already solved (the same values within ``tol``, fewer sweeps).
    likelihood, method, tol, max_sweeps, return_info, n_samples, seed, precision, progress, correction
        As for :func:`log_prior`.
    check_psd : bool
        Verify that K is positive semi-definite with one Cholesky of K + 1e-10 mean(diag K) I (in EP's
        workspace); :class:`flatfast.NotPSDError` if not.
    warm_start : EPResult, optional
        An earlier result on the same K and likelihood (the previous epoch's labelling of the same inputs, say):
        EP starts from its sites, with nu negated where the labels differ (the site of -y_i mirrors that of
        y_i). The fixed point, and so the value within ``tol``, is the same; nearby labellings need fewer sweeps.
        1-D y only.

    Returns
    -------
    float, or numpy array of m floats for 2-D y (EPResult / list of EPResult with ``return_info``).

    Under the Heaviside likelihood some labellings have probability exactly 0: a point with K_ii = 0, or two
    points with correlation +1 (duplicate inputs) given different labels. Those return -inf with a warning
    naming the points, instead of running EP into a NaN.

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
    _check_correction(correction, method)
    _guard_memory(K.shape[0], likelihood, method, "ep_log_evidence", xp=xp,
                  new_arrays=0 if K.dtype == xp.float64 else 1, n_samples=n_samples, correction=correction)
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
                     precision=precision, check_psd=check_psd, progress=progress, correction=correction)


def _evidence(K, labels, *, y_was_2d, likelihood, method, tol, max_sweeps, return_info, n_samples, seed, init=None,
              precision="float64", check_psd=False, progress=None, correction=False):
    if likelihood not in _LIKELIHOODS:
        raise ValueError(f"likelihood: expected one of {_LIKELIHOODS}, got {likelihood!r}")
    _check_method(method)
    if precision not in _PRECISIONS:
        raise ValueError(f"precision: expected one of {_PRECISIONS}, got {precision!r}")
    tol = check_float(tol, "tol", positive=True)
    max_sweeps = check_int(max_sweeps, "max_sweeps", minimum=1)
    n_samples = check_int(n_samples, "n_samples", minimum=2 * SMC_RUNS if method == "smc" else 2)
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
            res = tilting_estimate(K, y, res, n_samples=n_samples, seed=seed, shift=shift)
        elif method == "smc":
            res = smc_estimate(K, y, res, n_samples=n_samples, seed=seed, shift=shift, progress=progress)
        if correction:
            res.correction = second_order_correction(K, y, res, shift=shift)
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
