"""The exceptions and warnings flatfast raises: when each is raised, and what to do about it."""


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here.

    Raised by any function with ``backend=`` (:func:`flatfast.nngp_kernel`, :func:`flatfast.log_prior`, the
    curvature functions) when the named backend is not built, needs a device the data is not on, or lacks its
    package; the message gives the reason.

    What to do: pass ``backend="auto"``, which takes the fastest backend that can run and falls back to the
    reference with one :class:`BackendFallbackWarning`; ``flatfast.backends()`` (or ``flatfast info``) lists what
    can run here and why not.
    """


class BackendFallbackWarning(UserWarning):
    """``backend="auto"`` runs the slower pure numpy/torch reference because no native backend can run.

    Issued once per reason: the C++ core is not built, or a CUDA array met a missing cupy, CUDA module or Triton.
    The result is right (the reference is the oracle every backend is tested against), only slower.

    What to do: build the native core (``pip install -e .`` with a C++ compiler; ``flatfast info`` says what is
    missing), or install the package the message names.
    """


class NotPSDError(ValueError):
    """A covariance matrix is not symmetric positive semi-definite, so it is no Gaussian prior.

    Raised by :func:`flatfast.ep_log_evidence` and :func:`flatfast.log_prior` with a ``kernel=`` that is not
    symmetric, has a negative diagonal, or fails a Cholesky of K + 1e-10 mean(diag K) I; and by EP when its
    system I + S^1/2 K S^1/2 stops being positive definite.

    What to do: check how K was built (a kernel of float32 features, or an estimate from too few draws, can be
    slightly indefinite); add a small multiple of the identity, or compute it in float64.
    """


class NotPiecewiseLinearError(ValueError):
    """The exact trace does not apply: the network is not piecewise linear in each single parameter.

    Raised by :func:`flatfast.hessian_trace` with ``method="exact"`` when one watched forward pass finds a smooth
    nonlinearity on parameter-dependent values (tanh, GELU, softmax, LayerNorm), batch statistics, or a product of
    two values that depend on the same parameter (a weight used twice, gating, attention); the message names the
    module. For such a network the Hessian's diagonal is not the Gauss-Newton diagonal.

    What to do: use ``method="auto"`` (which picks Hutch++ or the unit vectors for such a model) or
    ``method="hutch++"``; or restrict ``params=`` to parameters in which the network is piecewise linear (its
    classifier head, say).
    """


class ConvergenceWarning(UserWarning):
    """An iterative method stopped at its limit before meeting its tolerance; the result is returned anyway.

    Issued by EP (``max_sweeps``; the result has ``converged=False``), by Lanczos (``max_iter``, with the
    residuals that bound each Ritz value's error) and by the adaptive trace estimators (``max_probes``, with the
    standard error reached).

    What to do: read the numbers the message gives; raise the limit it names, or loosen the tolerance.
    """


class UnreliableEstimateWarning(RuntimeWarning):
    """A Monte Carlo estimate of log P(f) whose own diagnostics say that neither the value nor its standard error
    can be trusted.

    Issued by ``log_prior(method="tilting")`` when the weights' Pareto tail shape exceeds 0.7, and by
    ``method="smc"`` when its independent runs disagree by more than a nat.

    What to do: EP's value stays in ``ep_log_z``; more samples (``n_samples=``) may help; beyond n of about 500
    on NNGP kernels tilting fails by design, and ``method="smc"`` is the estimator that scales.
    """


def warn(message, category):
    """``warnings.warn`` attributed to the caller's line: the first frame outside the flatfast package, however
    deep the call (a fixed stacklevel pointed into flatfast whenever one public function called another)."""
    import os
    import sys
    import warnings

    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 2  # stacklevel 1 is this function, 2 its caller
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
