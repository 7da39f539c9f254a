"""flatfast: what predicts generalization in deep nets.

Local flatness of the loss (Hessian trace, eigenvalues, spectral density, sharpness) against the Bayesian
prior of the function, log P(f), under the NNGP of an infinitely wide ReLU network.

The package is grouped by part, and every public name is ``flatfast.NAME``:

* ``flatfast.curvature`` -- Hessian products of any model and what is estimated from them;
* ``flatfast.kernel`` -- the NNGP kernel, analytic and empirical;
* ``flatfast.prior`` -- log P(f) by EP, tilting and SMC;
* ``flatfast.measures`` -- every generalization predictor on one footing (flatness, reparametrization-invariant
  measures, the Laplace evidence), the alpha-rescaling, the PAC-Bayes bound, and the ranking metrics;
* beneath them ``flatfast.models`` (how a user's model and batches are read) and ``flatfast.backend`` (array
  modules, native loading, dispatch); beside them the shared ``errors``, ``results`` and ``experiments``.

Importing flatfast never needs torch, Triton, CUDA or the compiled extension; :func:`backends` reports what
can run here and why not.
"""
from flatfast.backend.dispatch import backends
from flatfast.backend.native import set_num_threads
from flatfast.curvature.hessian import hessian_eigenvalues, hessian_operator, hessian_spectrum, hvp
from flatfast.curvature.trace import hessian_trace
from flatfast.errors import (BackendFallbackWarning, BackendUnavailableError, ConvergenceWarning,
                             NotPiecewiseLinearError, NotPSDError, UnreliableEstimateWarning)
from flatfast.kernel.empirical import empirical_nngp_kernel
from flatfast.kernel.nngp import nngp_kernel
from flatfast.measures.bounds import pac_bayes_bound
from flatfast.measures.flatness import flatness_report, frobenius_norm, function_of, rescale, sharpness
from flatfast.measures.adaptive import adaptive_sharpness
from flatfast.measures.invariant import fisher_rao_norm, path_norm, relative_flatness
from flatfast.measures.pac_bayes import pac_bayes_flatness
from flatfast.measures.laplace import laplace_evidence
from flatfast.measures.ranking import (RankingResult, conditional_mutual_information, granulated_kendall,
                                       kendall_tau, robust_sign_error)
from flatfast.prior.evidence import ep_log_evidence, log_prior
from flatfast.results import EigenResult, EPResult, FlatnessReport, MeasureResult, SpectrumResult, TraceResult

__version__ = "0.1.0"


def __getattr__(name):
    # EntropySGD subclasses torch.optim.Optimizer; importing it lazily keeps `import flatfast` free of torch.
    if name == "EntropySGD":
        from flatfast.optim import EntropySGD

        return EntropySGD
    raise AttributeError(f"module 'flatfast' has no attribute {name!r}")


__all__ = [
    "BackendFallbackWarning",
    "BackendUnavailableError",
    "ConvergenceWarning",
    "EPResult",
    "EigenResult",
    "EntropySGD",
    "FlatnessReport",
    "MeasureResult",
    "NotPiecewiseLinearError",
    "NotPSDError",
    "RankingResult",
    "SpectrumResult",
    "TraceResult",
    "UnreliableEstimateWarning",
    "adaptive_sharpness",
    "backends",
    "conditional_mutual_information",
    "empirical_nngp_kernel",
    "ep_log_evidence",
    "fisher_rao_norm",
    "flatness_report",
    "frobenius_norm",
    "function_of",
    "granulated_kendall",
    "hessian_eigenvalues",
    "hessian_operator",
    "hessian_spectrum",
    "hessian_trace",
    "hvp",
    "kendall_tau",
    "laplace_evidence",
    "log_prior",
    "nngp_kernel",
    "pac_bayes_bound",
    "pac_bayes_flatness",
    "path_norm",
    "relative_flatness",
    "rescale",
    "robust_sign_error",
    "set_num_threads",
    "sharpness",
]
