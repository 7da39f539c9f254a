"""Exceptions and warnings raised by flatfast."""


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


class BackendFallbackWarning(UserWarning):
    """``backend="auto"`` fell back to the slower reference implementation (issued once per reason)."""


class NotPSDError(ValueError):
    """A kernel matrix is not symmetric positive (semi-)definite."""


class NotPiecewiseLinearError(ValueError):
    """``hessian_trace(method="exact")`` met a network that is not piecewise linear in each single parameter (a
    smooth nonlinearity, batch statistics, a product of two values depending on one parameter), so its Hessian
    diagonal is not the Gauss-Newton diagonal; the message names the module."""


class ConvergenceWarning(UserWarning):
    """An iterative method stopped at its iteration limit before meeting its tolerance."""


class UnreliableEstimateWarning(RuntimeWarning):
    """A Monte Carlo estimate's own diagnostics (Pareto k, effective sample size) say that neither the value nor
    its standard error can be trusted."""


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
