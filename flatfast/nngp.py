"""The NNGP kernel of a deep fully connected ReLU network: public function and its backend adapters."""
from __future__ import annotations

import numpy as np

from flatfast import _native
from flatfast._dispatch import dispatch, register
from flatfast._validate import (as_float_matrix, check_float, check_int, device_of, float_dtype, is_torch,
                                same_kind, to_numpy)
from flatfast.reference.nngp import nngp_kernel_reference

# Below this many multiply-adds the threadpoolctl round trip (~1 ms) costs more than BLAS threads could.
_SINGLE_THREAD_BLAS_MIN_WORK = 2_000_000


def nngp_kernel(X, Z=None, *, depth=2, sigma_w2=2.0, sigma_b2=1.0, backend="auto", dtype=np.float64):
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


# --- backends -----------------------------------------------------------------------------------------------

def _probe_cpp():
    return _native.load_cpp()[1]


@register("nngp", "cpp", devices=("cpu",), priority=30, probe=_probe_cpp)
def _nngp_cpp(X, Z, depth, sigma_w2, sigma_b2, dtype):
    module = _native.load_cpp()[0]
    fn = module.nngp_f64 if dtype == np.float64 else module.nngp_f32
    Xn = np.ascontiguousarray(to_numpy(X), dtype=dtype)
    Zn = None if Z is None else np.ascontiguousarray(to_numpy(Z), dtype=dtype)
    m = Xn.shape[0] if Zn is None else Zn.shape[0]
    if Xn.shape[0] * m * Xn.shape[1] >= _SINGLE_THREAD_BLAS_MIN_WORK:
        with _native.single_threaded_blas():
            K = fn(Xn, Zn, depth, sigma_w2, sigma_b2)
    else:
        K = fn(Xn, Zn, depth, sigma_w2, sigma_b2)
    return same_kind(K, X)


def _probe_triton():
    module, reason = _native.load_triton()
    if module is None:
        return reason
    if not (_native.torch_cuda_available() or _native.triton_interpreted()):
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly, for testing)"
    return None


@register("nngp", "triton", devices=("cuda", "cpu"), priority=20, probe=_probe_triton,
          auto_devices=("cuda",))
def _nngp_triton(X, Z, depth, sigma_w2, sigma_b2, dtype):
    import torch

    if device_of(X) == "cpu" and not _native.triton_interpreted():
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    module = _native.load_triton()[0]
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    Xt = X if is_torch(X) else torch.from_numpy(np.asarray(X))
    Zt = None if Z is None else (Z if is_torch(Z) else torch.from_numpy(np.asarray(Z)))
    K = module.nngp_kernel_triton(Xt.to(tdtype), None if Zt is None else Zt.to(tdtype), depth, sigma_w2, sigma_b2)
    return K if is_torch(X) else K.numpy()


def _probe_cuda():
    return _native.load_cuda()[1]


@register("nngp", "cuda", devices=("cuda",), priority=25, probe=_probe_cuda)
def _nngp_cuda(X, Z, depth, sigma_w2, sigma_b2, dtype):
    import torch

    module = _native.load_cuda()[0]
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    Xc = X.to(tdtype).contiguous()
    Zc = None if Z is None else Z.to(tdtype).contiguous()
    m = Xc.shape[0] if Zc is None else Zc.shape[0]
    out = torch.empty((Xc.shape[0], m), dtype=tdtype, device=Xc.device)
    if out.numel():
        module.nngp(Xc.data_ptr(), 0 if Zc is None else Zc.data_ptr(), Xc.shape[0], m, Xc.shape[1], depth,
                    sigma_w2, sigma_b2, out.data_ptr(), tdtype == torch.float64,
                    torch.cuda.current_stream(Xc.device).cuda_stream)
    return out


@register("nngp", "reference", devices=("cpu", "cuda"), priority=0, reference=True)
def _nngp_reference(X, Z, depth, sigma_w2, sigma_b2, dtype):
    K = nngp_kernel_reference(to_numpy(X), None if Z is None else to_numpy(Z), depth, sigma_w2, sigma_b2)
    return same_kind(K.astype(dtype, copy=False), X)
