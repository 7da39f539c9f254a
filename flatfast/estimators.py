"""Randomised and Krylov estimators over a symmetric linear operator given by its block product.

``matmat(V)`` maps a (k, P) torch tensor of k vectors to the (k, P) tensor of their products. Nothing here knows
about models or data: the Hessian of a loss is one such operator (see :mod:`flatfast.hessian`), an explicit
matrix is another (the tests use both). Every estimate carries its uncertainty.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, List, Optional

import numpy as np

MatMat = Callable[["torch.Tensor"], "torch.Tensor"]  # noqa: F821


@dataclasses.dataclass
class TraceResult:
    """A trace estimate: value, its standard error, the operator products it used (probes), and the
    per-probe samples of the stochastic part (for diagnostics)."""

    value: float
    stderr: float
    probes: int
    method: str
    samples: List[float] = dataclasses.field(default_factory=list, repr=False)

    def __float__(self):
        return float(self.value)


@dataclasses.dataclass
class EigenResult:
    """Extreme eigenvalues by Lanczos: values (largest first), residual norms |H u - theta u| of the Ritz pairs,
    the Ritz vectors (k, P) when kept, and the Lanczos iterations used."""

    values: np.ndarray
    residuals: np.ndarray
    iterations: int
    vectors: Optional["torch.Tensor"] = dataclasses.field(default=None, repr=False)  # noqa: F821


@dataclasses.dataclass
class SpectrumResult:
    """Stochastic Lanczos quadrature: per probe, Ritz values (nodes) and weights (squared first components of the
    Ritz vectors; each probe's weights sum to 1). ``grid``/``density`` is the Gaussian-smoothed spectral density
    (integrates to 1; multiply by the dimension for an eigenvalue count)."""

    nodes: np.ndarray  # (probes, iterations)
    weights: np.ndarray  # (probes, iterations)
    grid: np.ndarray
    density: np.ndarray
    sigma: float
    dimension: int

    def moment(self, j: int) -> float:
        """SLQ estimate of tr(H^j) / dimension."""
        return float(np.mean(np.sum(self.weights * self.nodes ** j, axis=1)))

    def plot(self, ax=None, **kwargs):
        """Plot the smoothed density on a log scale (matplotlib)."""
        import matplotlib.pyplot as plt

        ax = ax or plt.gca()
        ax.semilogy(self.grid, np.maximum(self.density, 1e-12), **kwargs)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        return ax


def rademacher(k, P, generator, dtype, device):
    import torch

    return (torch.randint(0, 2, (k, P), generator=generator, dtype=torch.int8).to(dtype) * 2 - 1).to(device)


def _generator(seed):
    import torch

    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def hutchinson(matmat: MatMat, dimension: int, *, quadratic=None, probes=None, rtol=0.01, seed=0, block=16, max_probes=2000,
               dtype=None, device="cpu", deflate=None, progress=None) -> TraceResult:
    """Hutchinson's estimator tr(H) ~ mean of v^T H v over Rademacher v, drawn in blocks of ``block`` (one
    operator pass per block). Stops when stderr <= rtol |value| (at least 2 blocks), or after exactly ``probes``.
    ``deflate`` (a (r, P) orthonormal basis Q) estimates tr((I - QQ^T) H (I - QQ^T)) instead (used by Hutch++).
    ``quadratic(V)``, when given, returns the row-wise v^T H v directly (cheaper than H V for some operators).
    """
    import torch

    gen = _generator(seed)
    dtype = dtype or torch.float64
    samples: List[float] = []
    target = probes if probes is not None else max_probes
    while len(samples) < target:
        k = min(block, target - len(samples))
        V = rademacher(k, dimension, gen, dtype, device)
        if deflate is not None:
            V = V - (V @ deflate.T) @ deflate
        samples.extend(_quadratic_forms(matmat, quadratic, V))
        if progress is not None:
            progress(len(samples))
        if probes is None and len(samples) >= 2 * block:
            mean = float(np.mean(samples))
            se = float(np.std(samples, ddof=1) / math.sqrt(len(samples)))
            if se <= rtol * abs(mean):
                break
    mean = float(np.mean(samples))
    se = float(np.std(samples, ddof=1) / math.sqrt(len(samples))) if len(samples) > 1 else float("inf")
    if probes is None and se > rtol * abs(mean):
        _warn_budget(len(samples), se, mean, rtol)
    return TraceResult(mean, se, len(samples), "hutchinson", samples)


def _warn_budget(used, se, mean, rtol):
    import warnings

    from flatfast.errors import ConvergenceWarning

    warnings.warn(f"trace: stopped at max_probes={used} with stderr {se:.3g} > rtol * |value| = "
                  f"{rtol * abs(mean):.3g}; raise max_probes or rtol", ConvergenceWarning, stacklevel=4)


def _quadratic_forms(matmat, quadratic, V):
    values = quadratic(V) if quadratic is not None else (V * matmat(V)).sum(dim=1)
    return values.double().cpu().tolist()


def hutchpp(matmat: MatMat, dimension: int, *, quadratic=None, probes=None, rtol=0.01, seed=0, block=16, sketch=None,
            max_probes=2000, dtype=None, device="cpu", progress=None) -> TraceResult:
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021): tr(H) = tr(Q^T H Q) + tr((I-QQ^T) H (I-QQ^T)), Q an
    orthonormal basis of H S for a Rademacher sketch S. The first term is exact; Hutchinson on the deflated
    operator supplies the rest and the whole standard error. With ``probes`` the budget is split as in the paper
    (a third each for S, Q and the residual); otherwise the sketch has ``sketch`` (default ``block``) columns
    and the residual part stops adaptively on rtol, as :func:`hutchinson` does.
    """
    import torch

    dtype = dtype or torch.float64
    gen = _generator(seed)
    if probes is not None:
        r = max(1, probes // 3)
        residual = max(1, probes - 2 * r)
    else:
        r, residual = (sketch or block), None
    S = rademacher(r, dimension, gen, dtype, device)
    HS = matmat(S)
    Q, _ = torch.linalg.qr(HS.T.double())
    Q = Q.T.to(dtype)  # (r, P) orthonormal rows
    HQ = matmat(Q)
    exact = float((Q * HQ).sum().double())
    rest = hutchinson(matmat, dimension, quadratic=quadratic, probes=residual, rtol=0.0, seed=seed + 1, block=block,
                      max_probes=max_probes, dtype=dtype, device=device, deflate=Q, progress=progress) \
        if residual is not None else _adaptive_residual(matmat, dimension, exact, rtol, seed, block, max_probes,
                                                        dtype, device, Q, progress, quadratic)
    return TraceResult(exact + rest.value, rest.stderr, 2 * r + rest.probes, "hutch++", rest.samples)


def _adaptive_residual(matmat, dimension, exact, rtol, seed, block, max_probes, dtype, device, Q, progress,
                       quadratic):
    """Deflated Hutchinson that stops when its standard error is below rtol |exact + residual|."""
    gen = _generator(seed + 1)
    samples: List[float] = []
    while len(samples) < max_probes:
        V = rademacher(block, dimension, gen, dtype, device)
        V = V - (V @ Q.T) @ Q
        samples.extend(_quadratic_forms(matmat, quadratic, V))
        if progress is not None:
            progress(len(samples))
        if len(samples) >= 2 * block:
            mean = float(np.mean(samples))
            se = float(np.std(samples, ddof=1) / math.sqrt(len(samples)))
            if se <= rtol * abs(exact + mean):
                break
    mean = float(np.mean(samples))
    se = float(np.std(samples, ddof=1) / math.sqrt(len(samples)))
    if se > rtol * abs(exact + mean):
        _warn_budget(len(samples), se, exact + mean, rtol)
    return TraceResult(mean, se, len(samples), "hutchinson", samples)


def lanczos_eigenvalues(matmat: MatMat, dimension: int, *, k=1, max_iter=None, tol=1e-6, seed=0, dtype=None,
                        device="cpu", keep_vectors=False) -> EigenResult:
    """Top-k (largest algebraic) eigenvalues by Lanczos with full reorthogonalisation (twice, classical
    Gram-Schmidt). Stops when every wanted Ritz pair has residual |beta_m s_m| <= tol |theta|, or at max_iter
    (default min(dimension, max(4k + 40, 60))), or when the Krylov space is exhausted."""
    import torch

    dtype = dtype or torch.float64
    max_iter = min(dimension, max_iter or max(4 * k + 40, 60))
    gen = _generator(seed)
    q = torch.randn(dimension, generator=gen, dtype=torch.float64).to(dtype).to(device)
    q = q / torch.linalg.norm(q)
    basis = [q]
    alphas, betas = [], []
    theta = resid = vecs = None
    for it in range(max_iter):
        w = matmat(basis[-1][None, :])[0]
        alpha = float(torch.dot(w, basis[-1]))
        Qm = torch.stack(basis)
        for _ in range(2):
            w = w - Qm.T @ (Qm @ w)
        beta = float(torch.linalg.norm(w))
        alphas.append(alpha)
        T = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        theta_all, S = np.linalg.eigh(T)
        order = np.argsort(theta_all)[::-1][:k]
        theta, vecs = theta_all[order], S[:, order]
        resid = np.abs(beta * vecs[-1, :])
        done = len(alphas) >= k and np.all(resid <= tol * np.maximum(np.abs(theta), 1e-30))
        if done or beta <= 1e-12 * max(1.0, abs(alpha)) or it == max_iter - 1:
            break
        betas.append(beta)
        basis.append(w / beta)
    ritz = None
    if keep_vectors:
        Qm = torch.stack(basis[: len(alphas)]).double()
        ritz = (torch.from_numpy(vecs).T.to(Qm.device) @ Qm)
    return EigenResult(np.asarray(theta), np.asarray(resid), len(alphas), ritz)


def slq(matmat: MatMat, dimension: int, *, probes=4, iterations=64, seed=0, sigma=None, grid_size=1000,
        dtype=None, device="cpu") -> SpectrumResult:
    """Stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017; Ghorbani et al. 2019): ``probes`` Lanczos runs
    from random unit vectors, advanced together (one block product per iteration), each with full
    reorthogonalisation against its own basis. For a probe v the Gauss quadrature reproduces v^T H^j v exactly
    for j < 2 * iterations."""
    import torch

    dtype = dtype or torch.float64
    iterations = min(iterations, dimension)
    gen = _generator(seed)
    V = torch.randn(probes, dimension, generator=gen, dtype=torch.float64).to(dtype).to(device)
    V = V / torch.linalg.norm(V, dim=1, keepdim=True)
    basis = [V]
    alphas = np.zeros((probes, iterations))
    betas = np.zeros((probes, iterations))
    steps = iterations
    for it in range(iterations):
        W = matmat(basis[-1])
        alphas[:, it] = (W * basis[-1]).sum(dim=1).double().cpu().numpy()
        Qm = torch.stack(basis, dim=1)  # (probes, it+1, P)
        for _ in range(2):
            W = W - torch.einsum("pj,pjd->pd", torch.einsum("pjd,pd->pj", Qm, W), Qm)
        norms = torch.linalg.norm(W, dim=1)
        betas[:, it] = norms.double().cpu().numpy()
        if it == iterations - 1:
            break
        if float(norms.min()) <= 1e-10 * max(1.0, float(np.abs(alphas[:, : it + 1]).max())):
            steps = it + 1
            break
        basis.append(W / norms[:, None])
    nodes = np.zeros((probes, steps))
    weights = np.zeros((probes, steps))
    for p in range(probes):
        T = np.diag(alphas[p, :steps]) + np.diag(betas[p, : steps - 1], 1) + np.diag(betas[p, : steps - 1], -1)
        theta, S = np.linalg.eigh(T)
        nodes[p], weights[p] = theta, S[0, :] ** 2
    lo, hi = nodes.min(), nodes.max()
    span = max(hi - lo, 1e-12 * max(1.0, abs(hi)))
    sigma = sigma or span / 200.0
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, grid_size)
    density = np.zeros_like(grid)
    for p in range(probes):
        density += (weights[p][None, :] * np.exp(-0.5 * ((grid[:, None] - nodes[p][None, :]) / sigma) ** 2)).sum(1)
    density /= probes * sigma * math.sqrt(2 * math.pi)
    return SpectrumResult(nodes, weights, grid, density, sigma, dimension)
