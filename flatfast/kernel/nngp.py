"""The NNGP kernel of a deep fully connected ReLU network: validation and dispatch (the backends, and their ranks,
are in :mod:`flatfast.kernel.nngp_backends`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from flatfast._validate import as_float_matrix, check_float, check_int, device_of, float_dtype, is_torch
from flatfast.backend.dispatch import dispatch
from flatfast.kernel import nngp_backends  # noqa: F401  (registers the kernel's backends with the dispatcher)

if TYPE_CHECKING:  # pragma: no cover
    from flatfast._typing import ArrayLike


def nngp_kernel(X: ArrayLike, Z: Optional[ArrayLike] = None, *, depth: int = 2, sigma_w2: float = 2.0,
                sigma_b2: float = 1.0, backend: str = "auto", dtype: Any = np.float64) -> ArrayLike:
    r"""Covariance of the output of an infinitely wide ReLU network between the rows of X and Z.

    The network has ``depth`` hidden ReLU layers, weights :math:`N(0, \sigma_w^2/\text{fan\_in})` and biases
    :math:`N(0, \sigma_b^2)`. With :math:`d` input features,

    .. math::
        K_0(x, x') = \sigma_w^2\, x \cdot x' / d + \sigma_b^2, \qquad q_0(x) = K_0(x, x)

    and for each hidden layer, with :math:`c = \mathrm{clamp}(K/\sqrt{q q'}, -1, 1)`, :math:`\theta = \arccos c`,

    .. math::
        K \leftarrow \sigma_b^2 + \frac{\sigma_w^2}{2\pi}\sqrt{q q'}\,(\sin\theta + (\pi - \theta) c), \qquad
        q \leftarrow \sigma_b^2 + \tfrac{\sigma_w^2}{2} q.

    :math:`\sin\theta` is computed as :math:`\sqrt{(1-c)(1+c)}`; the diagonal of ``nngp_kernel(X)`` is the
    exact :math:`q_{depth}`. ``depth=0`` is the linear (input-layer) kernel.

    The same kernel in neural-tangents: ``stax.serial(*[stax.Dense(1, W_std, b_std), stax.Relu()] * depth,
    stax.Dense(1, W_std, b_std))`` with ``W_std ** 2 = sigma_w2`` and ``b_std ** 2 = sigma_b2`` (its
    ``kernel_fn(X, X, "nngp")``); "depth" here counts the hidden ReLU layers.

    Parameters
    ----------
    X : array_like or torch.Tensor, shape (n, d)
        Inputs, one point per row. numpy arrays and torch tensors (CPU or CUDA) are accepted.
    Z : same kind as X, shape (m, d), optional
        Second set of inputs; ``None`` means ``Z = X`` (symmetric, half the work).
    depth : int, default 2
        Number of hidden ReLU layers (>= 0).
    sigma_w2, sigma_b2 : float, default 2.0 and 1.0
        Weight and bias variances (sigma_w2 > 0, sigma_b2 >= 0). The defaults are the He-initialised
        network of the paper (arXiv 2103.06219).
    backend : {"auto", "cpp", "triton", "cuda", "reference"}
        ``"auto"`` takes the C++ kernel for CPU data and CUDA/Triton for CUDA tensors, and the numpy reference
        where none can run (with a one-time warning). :func:`flatfast.backends` says what is available.
    dtype : float64 (default) or float32
        Precision of the computation and the result. float32 differs from float64 by about 1e-6 relative
        (tested to 2e-5); log P(f) needs float64.

    Returns
    -------
    K : numpy.ndarray or torch.Tensor, shape (n, m)
        The same kind as X (a tensor on X's device).

    Examples
    --------
    >>> import numpy as np, flatfast
    >>> X = np.random.default_rng(0).random((5, 784))
    >>> K = flatfast.nngp_kernel(X, depth=2)
    >>> K.shape, bool(np.allclose(K, K.T))
    ((5, 5), True)
    """
    X = as_float_matrix(X, "X")
    if Z is not None:
        Z = as_float_matrix(Z, "Z")
        if is_torch(X) != is_torch(Z):
            raise TypeError("Z: must be the same kind of array as X (both numpy or both torch)")
        if Z.shape[1] != X.shape[1]:
            raise ValueError(f"Z: has {Z.shape[1]} features but X has {X.shape[1]}")
        if device_of(Z) != device_of(X):
            raise ValueError(f"Z: is on {device_of(Z)} but X is on {device_of(X)}")
    depth = check_int(depth, "depth", minimum=0)
    sigma_w2 = check_float(sigma_w2, "sigma_w2", positive=True)
    sigma_b2 = check_float(sigma_b2, "sigma_b2", nonnegative=True)
    dtype = float_dtype(dtype)
    impl = dispatch("nngp", backend, device_of(X))
    return impl.fn(X, Z, depth, sigma_w2, sigma_b2, dtype)
