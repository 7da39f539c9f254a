"""flatfast: what predicts generalization in deep nets.

Local flatness of the loss (Hessian trace, eigenvalues, spectral density, sharpness) against the Bayesian
prior of the function, log P(f), under the NNGP of an infinitely wide ReLU network.

Importing flatfast never needs torch, Triton, CUDA or the compiled extension; :func:`backends` reports what
can run here and why not.
"""
from flatfast._native import set_num_threads
from flatfast._registry import backends
from flatfast.bounds import pac_bayes_bound
from flatfast.errors import (BackendFallbackWarning, BackendUnavailableError, ConvergenceWarning,
                             NotPiecewiseLinearError, NotPSDError, UnreliableEstimateWarning)
from flatfast.empirical import empirical_nngp_kernel
from flatfast.hessian import hessian_eigenvalues, hessian_operator, hessian_spectrum, hessian_trace, hvp
from flatfast.measures import FlatnessReport, flatness_report, frobenius_norm, function_of, rescale, sharpness
from flatfast.nngp import nngp_kernel
from flatfast.prior import ep_log_evidence, log_prior
from flatfast.results import EPResult

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
    "EntropySGD",
    "FlatnessReport",
    "NotPiecewiseLinearError",
    "NotPSDError",
    "UnreliableEstimateWarning",
    "backends",
    "empirical_nngp_kernel",
    "ep_log_evidence",
    "flatness_report",
    "frobenius_norm",
    "function_of",
    "hessian_eigenvalues",
    "hessian_operator",
    "hessian_spectrum",
    "hessian_trace",
    "hvp",
    "log_prior",
    "nngp_kernel",
    "pac_bayes_bound",
    "rescale",
    "set_num_threads",
    "sharpness",
]
