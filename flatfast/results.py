"""The records flatfast's functions return. Each carries its uncertainty or convergence information beside the
value, and prints as one line: the value, ± its standard error where it has one, and how it was obtained."""
from __future__ import annotations

import dataclasses
from typing import List, Optional

import numpy as np


def _mode_suffix(mode):
    return "" if mode is None else f", mode={mode!r}"


@dataclasses.dataclass
class TraceResult:
    """A trace of the Hessian (or of another operator), with its standard error.

    Returned by :func:`flatfast.hessian_trace` and :func:`flatfast.frobenius_norm`. The trace is a sum over all
    P parameters of the dataset-mean loss's second derivatives, so its scale grows with the network: compare
    traces of one architecture on one data set, never across sizes.

    Attributes
    ----------
    value : float
        The estimate (``float(result)`` gives it too).
    stderr : float
        Its standard error: 0 for the exact routes ("exact", "unit-vectors"); for the stochastic ones, the
        spread of the per-probe samples over the square root of their number.
    probes : int
        Operator products used (0 for the exact trace of a piecewise-linear network).
    method : str
        The route that ran: "exact", "unit-vectors", "hutch++", "hutchinson" (or "hutchinson-frobenius").
    samples : list of float
        The stochastic part's per-probe samples, for diagnostics (not printed).
    mode : str or None
        The model's mode during the passes ("eval" or "train"); None for a bare operator.
    reason : str
        Why this route ran: "asked for", or what ``method="auto"`` found (not printed).

    Examples
    --------
    >>> import torch, flatfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(64, 4), torch.randint(0, 3, (64,)))]
    >>> result = flatfast.hessian_trace(model, data)
    >>> result.method, result.stderr     # a ReLU network: the exact route, no error bar
    ('exact', 0.0)
    >>> float(result) == result.value
    True
    """

    value: float
    stderr: float
    probes: int
    method: str
    samples: List[float] = dataclasses.field(default_factory=list, repr=False)
    mode: Optional[str] = None
    reason: str = dataclasses.field(default="", repr=False)

    def __float__(self):
        return float(self.value)

    def __repr__(self):
        return (f"TraceResult({self.value:.6g} ± {self.stderr:.2g}, method={self.method!r}, probes={self.probes}"
                f"{_mode_suffix(self.mode)})")


@dataclasses.dataclass
class EigenResult:
    """The largest eigenvalues of the Hessian by Lanczos (:func:`flatfast.hessian_eigenvalues`).

    Attributes
    ----------
    values : numpy.ndarray (k,)
        Ritz values, largest first. Each is a lower bound of the eigenvalue it approximates.
    residuals : numpy.ndarray (k,)
        ``|H u - theta u|`` of each Ritz pair: a bound on the distance from ``values[i]`` to an eigenvalue.
    iterations : int
        Operator products (Lanczos iterations) used.
    vectors : torch.Tensor (k, P) or None
        The Ritz vectors, with ``return_vectors=True``.
    mode : str or None
        The model's mode during the passes.

    Examples
    --------
    >>> import torch, flatfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(64, 4), torch.randint(0, 3, (64,)))]
    >>> top = flatfast.hessian_eigenvalues(model, data, k=2)
    >>> bool(top.values[0] >= top.values[1]), bool((top.residuals <= 1e-5 * abs(top.values)).all())
    (True, True)
    """

    values: np.ndarray
    residuals: np.ndarray
    iterations: int
    vectors: Optional["torch.Tensor"] = dataclasses.field(default=None, repr=False)  # noqa: F821
    mode: Optional[str] = None

    def __repr__(self):
        values = np.array2string(np.asarray(self.values), precision=6, separator=", ")
        residuals = np.array2string(np.asarray(self.residuals), precision=2, separator=", ")
        return (f"EigenResult(values={values}, residuals={residuals}, iterations={self.iterations}"
                f"{_mode_suffix(self.mode)})")


@dataclasses.dataclass
class SpectrumResult:
    """The Hessian's spectral density by stochastic Lanczos quadrature (:func:`flatfast.hessian_spectrum`).

    Attributes
    ----------
    nodes, weights : numpy.ndarray (probes, iterations)
        Per probe, the Ritz values and their weights (squared first components of the Ritz vectors; each probe's
        weights sum to 1): the quadrature rule :math:`v^\\top f(H) v \\approx \\sum_j w_j f(\\theta_j)`.
    grid, density : numpy.ndarray
        The Gaussian-smoothed density on a grid; it integrates to 1 (multiply by ``dimension`` for an
        eigenvalue count).
    sigma : float
        The smoothing width.
    dimension : int
        P, the number of measured parameters.
    mode : str or None
        The model's mode during the passes.

    Examples
    --------
    >>> import torch, flatfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(64, 4), torch.randint(0, 3, (64,)))]
    >>> spectrum = flatfast.hessian_spectrum(model, data, probes=2, iterations=20)
    >>> round(float(spectrum.weights.sum(axis=1).mean()), 6)      # each probe's weights sum to 1
    1.0
    >>> top = flatfast.hessian_eigenvalues(model, data).values[0]   # the largest node finds the top eigenvalue
    >>> bool(abs(spectrum.nodes.max() - top) <= 1e-3 * abs(top))
    True
    """

    nodes: np.ndarray
    weights: np.ndarray
    grid: np.ndarray
    density: np.ndarray
    sigma: float
    dimension: int
    mode: Optional[str] = None

    def __repr__(self):
        probes, nodes = self.nodes.shape
        return (f"SpectrumResult({probes} probes x {nodes} nodes, eigenvalues in [{self.nodes.min():.4g}, "
                f"{self.nodes.max():.4g}], dimension={self.dimension}{_mode_suffix(self.mode)})")

    def moment(self, j: int) -> float:
        """The SLQ estimate of :math:`\\mathrm{tr}(H^j) / P`."""
        return float(np.mean(np.sum(self.weights * self.nodes ** j, axis=1)))

    def plot(self, ax=None, **kwargs):
        """Draw the smoothed density on a log scale (matplotlib); returns the axes."""
        import matplotlib.pyplot as plt

        ax = ax or plt.gca()
        ax.semilogy(self.grid, np.maximum(self.density, 1e-12), **kwargs)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        return ax


@dataclasses.dataclass
class FlatnessReport:
    """Every local flatness measure of one model and data set (:func:`flatfast.flatness_report`).

    Every measure is of the dataset-mean loss in the model's measured parameters, so each changes when the
    network is rescaled without changing its function (:func:`flatfast.rescale`); compare reports of one
    architecture on one data set.

    Attributes
    ----------
    trace : TraceResult
        tr H, exact or estimated (its ``method`` says which).
    top_eigenvalue, top_eigenvalue_residual : float
        The largest eigenvalue of H (Lanczos) and the residual that bounds its error.
    frobenius : TraceResult
        :math:`\\lVert H \\rVert_F` with its standard error.
    sharpness : float
        Keskar et al.'s epsilon-sharpness, :math:`100\\,(\\max_z L(\\theta+z) - L(\\theta)) / (1 + L(\\theta))`:
        a percentage of ``1 + L``, 0 or more.
    log_volume, log_volume_stderr : float
        :math:`-\\frac12 \\sum_j \\log(|\\lambda_j| + \\delta)` by stochastic Lanczos quadrature, with its standard
        error over probes (nats; larger is flatter).
    mode : str
        The model's mode during the passes.

    Examples
    --------
    >>> import torch, flatfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(64, 4), torch.randint(0, 3, (64,)))]
    >>> report = flatfast.flatness_report(model, data)
    >>> report.trace.method, report.sharpness >= 0
    ('exact', True)
    >>> sorted(report.as_dict())[:3]
    ['frobenius', 'frobenius_stderr', 'log_volume']
    """

    trace: TraceResult
    top_eigenvalue: float
    top_eigenvalue_residual: float
    frobenius: TraceResult
    sharpness: float
    log_volume: float
    log_volume_stderr: float
    mode: str = "eval"

    def __repr__(self):
        return (f"FlatnessReport(trace={self.trace.value:.6g} ± {self.trace.stderr:.2g} ({self.trace.method}), "
                f"top_eigenvalue={self.top_eigenvalue:.6g}, frobenius={self.frobenius.value:.6g} ± "
                f"{self.frobenius.stderr:.2g}, sharpness={self.sharpness:.4g}, log_volume={self.log_volume:.6g} ± "
                f"{self.log_volume_stderr:.2g}{_mode_suffix(self.mode)})")

    def as_dict(self):
        """The measures as one flat mapping (a table row): values, standard errors, the residual and the mode."""
        return {"trace": self.trace.value, "trace_stderr": self.trace.stderr, "top_eigenvalue": self.top_eigenvalue,
                "top_eigenvalue_residual": self.top_eigenvalue_residual, "frobenius": self.frobenius.value,
                "frobenius_stderr": self.frobenius.stderr, "sharpness": self.sharpness,
                "log_volume": self.log_volume, "log_volume_stderr": self.log_volume_stderr, "mode": self.mode}


@dataclasses.dataclass
class MeasureResult:
    """One generalization predictor's value with its uncertainty (:func:`flatfast.adaptive_sharpness`,
    :func:`flatfast.relative_flatness`, :func:`flatfast.fisher_rao_norm`, :func:`flatfast.pac_bayes_flatness`,
    :func:`flatfast.path_norm`, :func:`flatfast.laplace_evidence`).

    Attributes
    ----------
    value : float
        The measure, in the unit its function's docstring gives (``float(result)`` gives it too).
    stderr : float
        Its Monte Carlo standard error; 0 for a deterministic value (a maximum found by ascent is a lower bound,
        and says so in ``method``).
    measure, method : str
        The measure's name and how it was computed.
    info : dict
        What else the computation found (the base loss, the bracket of a search, the log-determinant, ...).

    Examples
    --------
    >>> import torch, flatfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(64, 4), torch.randint(0, 3, (64,)))]
    >>> result = flatfast.fisher_rao_norm(model, data)
    >>> result.measure, result.stderr, float(result) > 0
    ('Fisher-Rao norm', 0.0, True)
    """

    value: float
    stderr: float
    measure: str
    method: str
    info: dict = dataclasses.field(default_factory=dict, repr=False)

    def __float__(self):
        return float(self.value)

    def __repr__(self):
        spread = f" ± {self.stderr:.2g}" if self.stderr else ""
        return f"MeasureResult({self.measure}: {self.value:.6g}{spread}, method={self.method!r})"


@dataclasses.dataclass
class EPResult:
    """log P(f) with how it was obtained (:func:`flatfast.log_prior` and :func:`flatfast.ep_log_evidence` with
    ``return_info=True``).

    How to read it: P(f) is a probability, so ``log_z`` is at most 0 (nats; divide by ln 10 for the paper's
    log10 units). A labelling that ignores the inputs -- independent fair coins -- scores n ln ½ ≈ -0.693 n on n
    points; a labelling the prior finds natural scores far above that. Values compare only on the same inputs.

    Attributes
    ----------
    log_z : float
        The estimate of log P(f) in nats (``float(result)`` gives it too). For method="tilting" or "smc", the log
        of an unbiased Monte Carlo estimate of P(f), so biased low by about ``stderr**2 / 2``.
    stderr : float
        Standard error of ``log_z``: 0 for plain EP, which is deterministic but not exact (compare ``ep_log_z``).
    method, likelihood : str
        "ep", "tilting" or "smc"; "heaviside" or "probit".
    ep_log_z : float or None
        Plain EP's value, kept beside a Monte Carlo ``log_z``.
    sweeps, converged, damping, max_site_change : int, bool, float, float
        EP's sweeps over the sites, whether it met ``tol``, its final damping factor (1 = undamped) and the last
        proposed relative change of the site parameters.
    log_z_history : list of float
        log Z after each EP sweep.
    seconds : float
        Wall time.
    float32_sweeps : int
        Of ``sweeps``, those run in float32 (``precision="mixed"``).
    correction, corrected_log_z : float or None
        Opper, Paquet & Winther's second-order correction (``correction=True``) and ``log_z + correction``.
    ess, n_samples, pareto_k, log_upper_bound : float, int, float, float
        Tilting: effective sample size, samples drawn, the Pareto tail shape of the weights (below 0.5 the
        stderr is backed; above 0.7 neither value nor stderr, and a warning says so) and Botev's upper bound.
    smc_runs, smc_stages, smc_bounces : list of float, int, float
        SMC: each independent run's log estimate, the number of stages, and the wall reflections per trajectory.
    site_precision, site_natural_mean, labels : numpy arrays
        EP's sites and the labels they were fitted to (a warm start for a nearby labelling; not printed).

    Examples
    --------
    >>> import numpy as np, flatfast
    >>> result = flatfast.ep_log_evidence(np.eye(4), [1, -1, 1, 1], return_info=True)
    >>> round(result.log_z, 6), result.converged     # four independent fair signs: 4 ln(1/2)
    (-2.772589, True)
    >>> float(result) == result.log_z
    True
    """

    log_z: float
    sweeps: int
    converged: bool
    damping: float
    max_site_change: float
    log_z_history: List[float]
    seconds: float
    likelihood: str
    method: str = "ep"
    stderr: float = 0.0
    ep_log_z: Optional[float] = None
    ess: Optional[float] = None
    n_samples: int = 0
    float32_sweeps: int = 0
    pareto_k: Optional[float] = None
    log_upper_bound: Optional[float] = None
    site_precision: Optional[np.ndarray] = dataclasses.field(default=None, repr=False)
    site_natural_mean: Optional[np.ndarray] = dataclasses.field(default=None, repr=False)
    labels: Optional[np.ndarray] = dataclasses.field(default=None, repr=False)
    correction: Optional[float] = None
    smc_runs: Optional[List[float]] = None
    smc_stages: Optional[int] = None
    smc_bounces: Optional[float] = None

    @property
    def corrected_log_z(self):
        """log_z plus the second-order correction (None unless it was asked for with ``correction=True``)."""
        return None if self.correction is None else self.log_z + self.correction

    def __float__(self):
        return float(self.log_z)

    def __repr__(self):
        value = f"{self.log_z:.6g}" if self.method == "ep" else f"{self.log_z:.6g} ± {self.stderr:.2g}"
        parts = [value, f"method={self.method!r}", f"likelihood={self.likelihood!r}",
                 f"sweeps={self.sweeps}", f"converged={self.converged}"]
        if self.method != "ep" and self.ep_log_z is not None:
            parts.append(f"ep_log_z={self.ep_log_z:.6g}")
        if self.correction is not None:
            parts.append(f"correction={self.correction:+.4g}")
        if self.pareto_k is not None:
            parts.append(f"pareto_k={self.pareto_k:.2f}")
        if self.smc_stages is not None:
            parts.append(f"smc_stages={self.smc_stages}")
        return f"EPResult({', '.join(parts)})"
