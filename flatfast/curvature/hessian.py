"""Curvature of the dataset-mean loss of any PyTorch model.

Convention (the one PyHessian uses): L(theta) = (1/N) sum_i l(f_theta(x_i), y_i), the mean over all N examples the
loader yields; curvlinops' HessianLinearOperator with ``num_data=N`` is the same operator, and BackPACK's
DiagHessian on one batch is that batch's mean. A ``loss_fn(outputs, targets)`` must return the *batch mean* of the
per-example losses (as ``nn.CrossEntropyLoss()`` does); each batch is weighted by its size, so a short last batch
counts correctly. ``loss_fn`` is keyword-only everywhere. Without it the loss is cross-entropy, and only for integer
class targets (B,) with C >= 2 outputs; any other data must name its loss (a one-logit classifier with float 0/1
targets: ``loss_fn=torch.nn.BCEWithLogitsLoss()``; regression: ``torch.nn.MSELoss()``), and the error says which
losses fit -- flatfast never guesses a loss from the targets' dtype.

Batches: ``(inputs, targets)`` with inputs a tensor (``model(x)``), a tuple (``model(*x)``) or a mapping
(``model(**x)``); a mapping with the targets under ``"labels"`` (a Hugging Face batch; ``"label"`` too); or any
batch that ``batch_fn`` maps to ``(inputs, targets)``. The model may return a tensor, a tuple (its first element
is the output) or an object or mapping with ``logits`` (a Hugging Face ``ModelOutput``). Floating-point inputs are
cast to the parameters' dtype and device; integer inputs (token ids, masks) keep their dtype.

Parameters: ``params=`` restricts the Hessian to some parameters -- parameters, their names, (name, parameter)
pairs or modules -- and holds the others fixed; the default is every parameter with ``requires_grad`` (frozen ones
left out, as PyHessian and curvlinops do). Vectors are laid out in ``model.named_parameters()`` order.

Modes: the model is measured in eval mode by default (BatchNorm's running statistics, no dropout; what PyHessian
does); ``mode="train"`` uses BatchNorm's batch statistics without updating them and refuses a model with active
dropout. The modules' modes are restored afterwards, and results record the mode. During every pass attention runs
on torch's math kernel and recurrent layers on their composite implementation, which torch can differentiate
twice; the fused kernels cannot. Under torch.distributed each rank passes its own shard of the data and the
products are all-reduced.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, List, Optional, Union

import numpy as np

from flatfast._progress import with_progress
from flatfast._typing import BatchFn, Loader, LossFn
from flatfast._validate import check_int
from flatfast.curvature.estimators import lanczos_eigenvalues, lanczos_iterations, slq
from flatfast.curvature.operator import HessianOperator
from flatfast.results import EigenResult, SpectrumResult

if TYPE_CHECKING:  # pragma: no cover
    import scipy.sparse.linalg

    from flatfast._typing import Model, ParamsLike, Tensor


def _as_matrix(op, vectors):
    import torch

    if isinstance(vectors, (list, tuple)):
        if len(vectors) != len(op.params):
            raise ValueError(f"vectors: a list must hold one tensor per measured parameter ({len(op.params)}), "
                             f"got {len(vectors)}")
        for v, (name, p) in zip(vectors, op.params):
            if tuple(v.shape) != tuple(p.shape):
                raise ValueError(f"vectors: the entry for {name} has shape {tuple(v.shape)}, expected {tuple(p.shape)}")
        return torch.cat([v.reshape(-1) for v in vectors])[None], "list"
    if not isinstance(vectors, torch.Tensor):
        raise TypeError("vectors: expected a (k, P) tensor or a list of parameter-shaped tensors")
    if vectors.dim() == 1:
        return vectors[None], "vector"
    if vectors.dim() != 2:
        raise ValueError(f"vectors: expected a (k, P) tensor, got shape {tuple(vectors.shape)}")
    return vectors, "matrix"


def hvp(model: Model, loader: Loader, vectors: Union[Tensor, List[Tensor]], *, loss_fn: Optional[LossFn] = None,
        params: Optional[ParamsLike] = None, batch_fn: Optional[BatchFn] = None, mode: str = "eval",
        backend: str = "auto", progress: bool = False) -> Union[Tensor, List[Tensor]]:
    r"""Hessian-vector products of the dataset-mean loss :math:`L(\theta) = \frac1N\sum_i \ell(f_\theta(x_i), y_i)`.

    The convention every curvature function of flatfast shares (PyHessian's; curvlinops' HessianLinearOperator
    with ``num_data=N`` is the same operator): the mean over all N examples the loader yields, each batch weighted
    by its size. A ``loss_fn(outputs, targets)`` returns the batch mean of the per-example losses (as
    ``nn.CrossEntropyLoss()`` does). The Hessian is in the measured parameters, laid out in
    ``model.named_parameters()`` order; the others are held fixed.

    All k products come from ONE pass over the data: per batch, one forward and backward pass builds the gradient
    with its graph, then one backward pass through it per vector (double backward, as PyHessian does); a model
    with an operation torch cannot differentiate twice takes torch.func's forward-over-reverse products instead,
    vmapped over the k vectors, and nn.Sequential Linear/ReLU models with the default loss a batched R-operator.
    Before the first product the first batch runs three times (about one forward+backward pass): a model that
    draws random numbers is refused, and whether examples are independent is recorded (see the user guide,
    "What is checked before any curvature").

    Parameters
    ----------
    model : torch.nn.Module
        Evaluated in ``mode``; its modes are restored afterwards and its parameters never change.
    loader : iterable of batches
        A DataLoader or a list of batches: ``(inputs, targets)`` with inputs a tensor (``model(x)``), a tuple
        (``model(*x)``) or a mapping (``model(**x)``); or a mapping with the targets under ``"labels"`` (a
        Hugging Face batch). Floating-point inputs are cast to the parameters' dtype and device. A batch of more
        than two elements is refused (see ``batch_fn``). The model may return a tensor, a tuple (its first
        element) or an object with ``logits``.
    vectors : torch.Tensor (k, P) or (P,), or a list of parameter-shaped tensors (one vector)
        Directions in the space of the measured parameters, in ``model.named_parameters()`` order.
    loss_fn : callable, optional
        ``loss_fn(outputs, targets)`` returning the batch mean; default cross-entropy, for integer class targets
        (B,) and two or more outputs only: other data must name its loss (a one-logit classifier with 0/1 float
        targets ``torch.nn.BCEWithLogitsLoss()``, a regression ``torch.nn.MSELoss()``); no loss is guessed.
    params : parameters, names, (name, parameter) pairs or modules, optional
        The parameters the Hessian is taken in (P of them); the others are held fixed. Default: every parameter
        with ``requires_grad``.
    batch_fn : callable, optional
        ``batch_fn(batch) -> (inputs, targets)`` for batches of any other form (sample weights go beside the
        targets, with a ``loss_fn`` that weights each example: the user guide shows one).
    mode : {"eval", "train"}
        The modules' mode during the passes: "eval" (default: BatchNorm's running statistics, no dropout) or
        "train" (BatchNorm's batch statistics, not updated); a model that draws random numbers in that mode is
        refused. Modes are restored afterwards, and results record the mode.
    backend : {"auto", "reference", "torch", "cpp", "triton", "cuda"}
        "auto" takes the R-operator fast path when the model is a plain Linear/ReLU MLP and the loss is the
        default, ``nn.CrossEntropyLoss()`` or ``nn.MSELoss()`` (its masked GEMMs on the fastest backend here);
        "reference" is the pure torch.func path for any model, the same name as :func:`flatfast.nngp_kernel`'s
        pure fallback ("generic", its former name here, is accepted too).
    progress : bool
        Show a progress bar over the batches.

    Returns
    -------
    H V in the same layout as ``vectors``: a (k, P) or (P,) tensor, or a list of parameter-shaped tensors.

    Examples
    --------
    >>> import torch, flatfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
    >>> P = sum(p.numel() for p in model.parameters())
    >>> flatfast.hvp(model, data, torch.randn(2, P)).shape
    torch.Size([2, 67])
    """
    op = HessianOperator(model, loader, loss_fn, params=params, batch_fn=batch_fn, mode=mode, backend=backend,
                        progress=progress)
    V, layout = _as_matrix(op, vectors)
    HV = op.matmat(V)
    if layout == "list":
        return [t.view(s) for t, s in zip(HV[0].split(op.sizes), op.shapes)]
    return HV[0] if layout == "vector" else HV


def hessian_eigenvalues(model: Model, loader: Loader, k: int = 1, *, loss_fn: Optional[LossFn] = None,
                        params: Optional[ParamsLike] = None, batch_fn: Optional[BatchFn] = None, mode: str = "eval",
                        max_iter: Optional[int] = None, tol: float = 1e-6, seed: int = 0, backend: str = "auto",
                        return_vectors: bool = False, progress: Optional[bool] = None) -> EigenResult:
    """Top-k eigenvalues (largest first) of the Hessian of the dataset-mean loss (see :func:`hvp` for the
    convention), by Lanczos with full reorthogonalisation and thick restarts (one data pass per iteration).

    Each Ritz value theta comes with its residual ``|H u - theta u|``, a bound on its distance to an eigenvalue; the
    run stops when every residual is at most ``tol * |theta|``. The basis holds at most 8k vectors of P
    (:func:`flatfast.curvature.estimators.lanczos_basis`), whatever the number of iterations. A repeated eigenvalue is
    found once (the top k *distinct* values are returned), and Ritz values are lower bounds of the eigenvalues
    they approximate; a ConvergenceWarning says when max_iter ran out first.

    Parameters
    ----------
    model, loader, loss_fn, params, batch_fn, mode : as for :func:`hvp`.
    k : int
        How many of the largest eigenvalues.
    max_iter : int, optional
        The most operator products (default max(4k + 40, 60), at most P).
    tol : float
        Relative residual at which a Ritz pair counts as converged.
    seed : int
        Seeds the start vector.
    backend : str
        The R-operator's backend for plain Linear/ReLU MLPs (see :func:`hvp`).
    return_vectors : bool
        Also return the Ritz vectors (k, P) in ``.vectors``.
    progress : bool or None
        A bar over the iterations (None: when stderr is a terminal).

    Returns
    -------
    EigenResult with ``.values`` (largest first), ``.residuals``, ``.iterations`` (operator products) and
    ``.mode``.

    Examples
    --------
    >>> import torch, flatfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(64, 4), torch.randint(0, 3, (64,)))]
    >>> flatfast.hessian_eigenvalues(model, data, k=2).values.shape
    (2,)
    """
    k = check_int(k, "k", minimum=1)
    op = HessianOperator(model, loader, loss_fn, params=params, batch_fn=batch_fn, mode=mode, backend=backend)
    if k > op.dimension:
        raise ValueError(f"k: asks for {k} eigenvalues of a {op.dimension}-dimensional Hessian")
    iterations = lanczos_iterations(op.dimension, k, max_iter)
    result = with_progress(iterations, "flatfast Lanczos", progress, lambda update: lanczos_eigenvalues(
        op.matmat, op.dimension, k=k, max_iter=max_iter, tol=tol, seed=seed, dtype=op.dtype, device=op.device,
        keep_vectors=return_vectors, progress=update))
    return dataclasses.replace(result, mode=op.mode)


def hessian_spectrum(model: Model, loader: Loader, *, loss_fn: Optional[LossFn] = None,
                     params: Optional[ParamsLike] = None, batch_fn: Optional[BatchFn] = None, mode: str = "eval",
                     probes: int = 4, iterations: int = 64, seed: int = 0, sigma: Optional[float] = None,
                     grid_size: int = 1000, backend: str = "auto", progress: Optional[bool] = None) -> SpectrumResult:
    r"""Spectral density of the Hessian of the dataset-mean loss (see :func:`hvp`) by stochastic Lanczos quadrature
    (Ubaru, Chen & Saad 2017; Ghorbani et al. 2019): for each random unit probe v, ``iterations`` Lanczos steps
    give nodes :math:`\theta_j` and weights :math:`w_j` with :math:`v^\top f(H) v \approx \sum_j w_j f(\theta_j)`
    (exact for polynomials of degree < 2 x iterations); the density is their Gaussian-smoothed average on a grid
    (integrating to 1; multiply by P for an eigenvalue count), ``result.plot()`` draws it. The probes' runs advance
    together, one data pass per iteration, each fully reorthogonalised (probes x iterations vectors of P).

    Parameters
    ----------
    model, loader, loss_fn, params, batch_fn, mode : as for :func:`hvp`.
    probes : int
        Random start vectors (their spread is the estimate's).
    iterations : int
        Lanczos steps per probe (at most P).
    seed : int
        Seeds the probes.
    sigma : float, optional
        The smoothing width (default: the nodes' span / 200).
    grid_size : int
        Points of the density's grid.
    backend : str
        The R-operator's backend for plain Linear/ReLU MLPs (see :func:`hvp`).
    progress : bool or None
        A bar over the iterations (None: when stderr is a terminal).

    Returns
    -------
    SpectrumResult with ``.nodes`` and ``.weights`` (probes, iterations), ``.grid``, ``.density``, ``.moment(j)``
    and ``.mode``.

    Examples
    --------
    >>> import torch, flatfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(64, 4), torch.randint(0, 3, (64,)))]
    >>> spec = flatfast.hessian_spectrum(model, data, probes=2, iterations=10)
    >>> spec.nodes.shape
    (2, 10)
    """
    probes = check_int(probes, "probes", minimum=1)
    iterations = check_int(iterations, "iterations", minimum=1)
    op = HessianOperator(model, loader, loss_fn, params=params, batch_fn=batch_fn, mode=mode, backend=backend)
    result = with_progress(iterations, "flatfast SLQ", progress, lambda update: slq(
        op.matmat, op.dimension, probes=probes, iterations=iterations, seed=seed, sigma=sigma, grid_size=grid_size,
        dtype=op.dtype, device=op.device, progress=update))
    return dataclasses.replace(result, mode=op.mode)


def hessian_operator(model: Model, loader: Loader, *, loss_fn: Optional[LossFn] = None,
                     params: Optional[ParamsLike] = None, batch_fn: Optional[BatchFn] = None, mode: str = "eval",
                     backend: str = "auto") -> "scipy.sparse.linalg.LinearOperator":
    """The Hessian of the dataset-mean loss (see :func:`hvp`) as a ``scipy.sparse.linalg.LinearOperator``: matvec
    and matmat on numpy arrays in the parameters' dtype, one data pass per call, for scipy's eigsh, cg, etc. (the
    counterpart of curvlinops' HessianLinearOperator). The model is measured in ``mode`` during each call; a
    loader that is a list of one batch keeps that batch's gradient graph while the operator lives.

    Parameters
    ----------
    model, loader, loss_fn, params, batch_fn, mode : as for :func:`hvp`.
    backend : str
        The R-operator's backend for plain Linear/ReLU MLPs (see :func:`hvp`).

    Returns
    -------
    scipy.sparse.linalg.LinearOperator of shape (P, P), P the number of measured parameters.

    Examples
    --------
    >>> import torch, flatfast
    >>> from scipy.sparse.linalg import eigsh
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).double()
    >>> data = [(torch.randn(64, 4, dtype=torch.float64), torch.randint(0, 3, (64,)))]
    >>> H = flatfast.hessian_operator(model, data)
    >>> eigsh(H, k=1, which="LA", return_eigenvectors=False).shape
    (1,)
    """
    import torch
    from scipy.sparse.linalg import LinearOperator

    op = HessianOperator(model, loader, loss_fn, params=params, batch_fn=batch_fn, mode=mode, backend=backend)
    np_dtype = np.float64 if op.dtype == torch.float64 else np.float32

    def matmat(M):
        M = np.asarray(M)
        V = torch.from_numpy(np.ascontiguousarray(M.T, dtype=np_dtype))
        return op.matmat(V).cpu().numpy().T

    return LinearOperator((op.dimension, op.dimension), matvec=lambda v: matmat(np.reshape(v, (-1, 1)))[:, 0],
                          matmat=matmat, rmatvec=lambda v: matmat(np.reshape(v, (-1, 1)))[:, 0], dtype=np_dtype)


__all__ = ["hessian_eigenvalues", "hessian_operator", "hessian_spectrum", "hvp"]
