"""The curvature of a model's loss: Hessian products (double backward, forward-over-reverse, the R-operator of
Linear/ReLU networks) as one operator, and what is estimated from it -- the trace (exact, unit vectors, Hutch++,
Hutchinson), the top eigenvalues (Lanczos) and the spectral density (stochastic Lanczos quadrature).

Public through ``flatfast``: :func:`flatfast.hvp`, :func:`flatfast.hessian_operator`,
:func:`flatfast.hessian_trace`, :func:`flatfast.hessian_eigenvalues`, :func:`flatfast.hessian_spectrum`."""
