"""The NNGP kernel: the arc-cosine kernel of an infinitely wide ReLU network on every backend, the empirical
(Monte Carlo) kernel of any PyTorch architecture, and the checks a kernel must pass before EP.

Public through ``flatfast``: :func:`flatfast.nngp_kernel`, :func:`flatfast.empirical_nngp_kernel`."""
