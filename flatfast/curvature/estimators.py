"""Randomised and Krylov estimators over a symmetric linear operator given by its block product.

``matmat(V)`` maps a (k, P) torch tensor of k vectors to the (k, P) tensor of their products. Nothing here knows
about models or data: the Hessian of a loss is one such operator (see :func:`flatfast.hvp`), an explicit
matrix is another (the tests use both). Every estimate carries its uncertainty.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from flatfast.results import EigenResult, SpectrumResult, TraceResult

MatMat = Callable[["torch.Tensor"], "torch.Tensor"]  # noqa: F821


def rademacher(k, P, generator, dtype, device):
    """k Rademacher vectors of length P, drawn where ``generator`` lives (on the operator's device: no host draw
    and copy per block; a CUDA generator gives other, equally reproducible, draws than the CPU's)."""
    import torch

    draw = torch.randint(0, 2, (k, P), generator=generator, dtype=torch.int8, device=generator.device)
    return draw.to(dtype).mul_(2).sub_(1).to(device)


def _generator(seed, device="cpu"):
    import torch

    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(seed))
    return g


def probe_block(dimension, itemsize, device, requested=None, *, cap=64):
    """Probes per operator pass: ``requested`` when given; else as many as fit in a memory budget -- 256 MiB on
    the CPU, an eighth of the free memory on a CUDA device -- at four P-vectors per probe (the probe, its product,
    and the parameter-sized gradients of the pass), between 1 and ``cap``."""
    if requested is not None:
        return requested
    import torch

    budget = 256 * 2**20
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        budget = free // 8
    return int(max(1, min(cap, budget // max(1, 4 * dimension * itemsize))))


def unit_vector_trace(matmat: MatMat, dimension: int, *, quadratic=None, block=16, dtype=None, device="cpu",
                      progress=None) -> TraceResult:
    """tr(H) = sum_j e_j^T H e_j, exactly, from ``dimension`` products with unit vectors in blocks of ``block``:
    cheaper than an estimator whenever the estimator would need more probes than there are parameters."""
    import torch

    dtype = dtype or torch.float64
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, dimension, block):
        stop = min(dimension, start + block)
        V = torch.zeros((stop - start, dimension), dtype=dtype, device=device)
        V[torch.arange(stop - start, device=device), torch.arange(start, stop, device=device)] = 1.0
        values = quadratic(V) if quadratic is not None else (V * matmat(V)).sum(dim=1)
        total += values.double().sum()
        if progress is not None:
            progress(stop)
    return TraceResult(float(total), 0.0, dimension, "unit-vectors")


def hutchinson(matmat: MatMat, dimension: int, *, quadratic=None, probes=None, rtol=0.01, seed=0, block=16, max_probes=2000,
               dtype=None, device="cpu", deflate=None, progress=None, offset=0.0) -> TraceResult:
    """Hutchinson's estimator tr(H) ~ mean of v^T H v over Rademacher v, drawn in blocks of ``block`` (one
    operator pass per block). Stops after exactly ``probes`` samples when given (>= 2, so that the standard
    error exists), else when stderr <= rtol |offset + value| (at least 2 blocks; ``offset`` is the exactly known
    part of a larger trace, e.g. Hutch++'s sketch), warning if ``max_probes`` comes first.
    ``deflate`` (a (r, P) orthonormal basis Q) estimates tr((I - QQ^T) H (I - QQ^T)) instead (used by Hutch++).
    ``quadratic(V)``, when given, returns the row-wise v^T H v directly (cheaper than H V for some operators).
    """
    import torch

    if probes is not None and probes < 2:
        raise ValueError(f"probes: Hutchinson needs at least 2 probes for a standard error, got {probes}")
    gen = _generator(seed, device)
    dtype = dtype or torch.float64
    blocks = []  # per-block v^T H v on the device: read back only when the stopping rule needs them
    drawn = 0
    target = probes if probes is not None else max_probes

    def summary():
        values = torch.cat(blocks)
        return float(values.mean()), float(values.std() / math.sqrt(values.numel()))

    while drawn < target:
        k = min(block, target - drawn)
        V = rademacher(k, dimension, gen, dtype, device)
        if deflate is not None:
            V = V - (V @ deflate.T) @ deflate
        blocks.append(_quadratic_forms(matmat, quadratic, V))
        drawn += k
        if progress is not None:
            progress(drawn)
        if probes is None and drawn >= 2 * block:
            mean, se = summary()
            if se <= rtol * abs(offset + mean):
                break
    mean, se = summary()
    samples = torch.cat(blocks).cpu().tolist()
    if probes is None and se > rtol * abs(offset + mean):
        _warn_budget(len(samples), se, offset + mean, rtol)
    return TraceResult(mean, se, drawn, "hutchinson", samples)


def _warn_budget(used, se, mean, rtol):
    from flatfast.errors import ConvergenceWarning, warn

    warn(f"trace: stopped at max_probes={used} with stderr {se:.3g} > rtol * |value| = "
         f"{rtol * abs(mean):.3g}; raise max_probes or rtol", ConvergenceWarning)


def _quadratic_forms(matmat, quadratic, V):
    values = quadratic(V) if quadratic is not None else (V * matmat(V)).sum(dim=1)
    return values.double()


def hutchpp(matmat: MatMat, dimension: int, *, quadratic=None, probes=None, rtol=0.01, seed=0, block=16, sketch=None,
            max_probes=2000, dtype=None, device="cpu", progress=None) -> TraceResult:
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021): tr(H) = tr(Q^T H Q) + tr((I-QQ^T) H (I-QQ^T)), Q an
    orthonormal basis of H S for a Rademacher sketch S. The first term is exact; Hutchinson on the deflated
    operator supplies the rest and the whole standard error. With ``probes`` (>= 6) the budget is split as in the
    paper (a third each for S, Q and the residual, which keeps at least 2 probes); otherwise the sketch has
    ``sketch`` (default ``block``) columns and the residual part stops adaptively on rtol.
    """
    import torch

    if probes is not None and probes < 6:
        raise ValueError(f"probes: Hutch++ needs at least 6 operator products (2 each for the sketch, its "
                         f"products and the residual's standard error), got {probes}")
    dtype = dtype or torch.float64
    gen = _generator(seed, device)
    r = max(2, probes // 3) if probes is not None else (sketch or block)
    S = rademacher(r, dimension, gen, dtype, device)
    HS = matmat(S)
    Q, _ = torch.linalg.qr(HS.T.double())
    Q = Q.T.to(dtype)  # (r, P) orthonormal rows
    HQ = matmat(Q)
    exact = float((Q * HQ).sum().double())
    rest = hutchinson(matmat, dimension, quadratic=quadratic, probes=None if probes is None else probes - 2 * r,
                      rtol=rtol, seed=seed + 1, block=block, max_probes=max_probes, dtype=dtype, device=device,
                      deflate=Q, progress=progress, offset=exact)
    return TraceResult(exact + rest.value, rest.stderr, 2 * r + rest.probes, "hutch++", rest.samples)


_BASIS_BLOCK = 16  # Lanczos vectors allocated per block: no copy of the basis as it grows, no over-allocation


def _lanczos_runs(matmat: MatMat, V0, iterations, should_stop=None, progress=None):
    """``b`` Lanczos runs from the unit rows of V0 (b, P), advanced together (one block product per iteration),
    each fully reorthogonalised (classical Gram-Schmidt, twice) against its own basis. The basis is written in
    place into blocks of ``_BASIS_BLOCK`` vectors allocated as needed.

    ``should_stop(alphas, betas)`` is asked after every iteration with the coefficients so far (b, m); runs also
    stop at ``iterations`` or when a residual vanishes (the Krylov space is exhausted). Returns (alphas, betas,
    basis blocks), with betas[:, -1] the coupling to the next, unbuilt, vector."""
    import torch

    b, P = V0.shape
    alphas, betas = np.zeros((b, iterations)), np.zeros((b, iterations))
    blocks = [torch.empty((b, min(_BASIS_BLOCK, iterations), P), dtype=V0.dtype, device=V0.device)]
    blocks[0][:, 0] = V0
    steps = 0
    for it in range(iterations):
        blk, pos = divmod(it, _BASIS_BLOCK)
        q = blocks[blk][:, pos]
        W = matmat(q)
        alphas[:, it] = (W * q).sum(dim=1).double().cpu().numpy()
        for _ in range(2):
            for j, B in enumerate(blocks):
                used = B[:, : (pos + 1 if j == blk else _BASIS_BLOCK)]
                W = W - torch.einsum("bj,bjd->bd", torch.einsum("bjd,bd->bj", used, W), used)
        norms = torch.linalg.norm(W, dim=1)
        betas[:, it] = norms.double().cpu().numpy()
        steps = it + 1
        if progress is not None:
            progress(steps)
        scale = max(1.0, float(np.abs(alphas[:, :steps]).max()))
        if steps == iterations or float(norms.min()) <= 1e-10 * scale or \
                (should_stop is not None and should_stop(alphas[:, :steps], betas[:, :steps])):
            break
        if pos + 1 == _BASIS_BLOCK:
            blocks.append(torch.empty((b, min(_BASIS_BLOCK, iterations - steps), P), dtype=V0.dtype,
                                      device=V0.device))
            blocks[-1][:, 0] = W / norms[:, None]
        else:
            blocks[blk][:, pos + 1] = W / norms[:, None]
    basis_blocks = [B[:, : max(0, min(_BASIS_BLOCK, steps - j * _BASIS_BLOCK))] for j, B in enumerate(blocks)]
    return alphas[:, :steps], betas[:, :steps], basis_blocks


def _tridiagonal_eigh(alphas, betas):
    """Eigenpairs of the Lanczos tridiagonal matrix of one run (betas[:-1] off the diagonal)."""
    T = np.diag(alphas) + np.diag(betas[:-1], 1) + np.diag(betas[:-1], -1)
    return np.linalg.eigh(T)


def lanczos_iterations(dimension, k, max_iter=None):
    """The most Lanczos iterations (operator products) lanczos_eigenvalues runs: max_iter, by default
    max(4k + 40, 60), and never more than the dimension."""
    return min(dimension, max_iter or max(4 * k + 40, 60))


def lanczos_basis(dimension, k):
    """The most vectors lanczos_eigenvalues keeps: 8k (thick restart keeps half of them), or the dimension.

    Measured on the Hessians of a small BERT, ViT, ResNet with BatchNorm and LSTM (tests/test_architectures.py's
    instances, tol 1e-6): with 8 vectors k = 1 took at most one product more than Lanczos keeping every vector
    (20, 12, 16, 20 against 19, 11, 15, 19); with 16 and 24, k = 2 and 3 took at most 8 % more (39 against 36 on
    BERT); smaller bases cost up to 8x more products where the wanted eigenvalues sit in a cluster."""
    return min(dimension, 8 * k)


def lanczos_eigenvalues(matmat: MatMat, dimension: int, *, k=1, max_iter=None, tol=1e-6, seed=0, dtype=None,
                        device="cpu", keep_vectors=False, progress=None, basis=None) -> EigenResult:
    """Top-k (largest algebraic) eigenvalues by thick-restart Lanczos (Wu & Simon 2000) with full
    reorthogonalisation within its basis. Stops when every wanted Ritz pair has residual
    ``|H u - theta u| <= tol |theta|``, or after max_iter operator products (default min(dimension, max(4k + 40,
    60))), or when the Krylov space is exhausted.

    Memory: the basis holds at most 8k vectors of the operator's dimension P (``basis``, default
    :func:`lanczos_basis`); when it is full, the best half of its Ritz vectors are kept, followed by the residual
    direction, and Lanczos continues from them (the projected matrix becomes an arrowhead; H Q = Q T + r e^T still
    holds, so the residuals stay exact). Lanczos itself then holds 8k + 1 vectors of P whatever max_iter is (the
    restart combines the vectors in place, column block by column block), where keeping every Lanczos vector
    would hold max_iter of them.

    Limits, as for any single-vector Krylov method: a repeated eigenvalue is found once (the Krylov space of one
    start vector holds one vector of each eigenspace), so with k > 1 the values returned are the top k
    *distinct* ones; and if the space is exhausted first, fewer than k come back. Both cases, and Ritz pairs
    still above the tolerance at max_iter, are reported by a ConvergenceWarning; Ritz values are lower bounds of
    the eigenvalues they approximate.
    """
    import torch

    from flatfast.errors import ConvergenceWarning, warn

    dtype = dtype or torch.float64
    max_iter = lanczos_iterations(dimension, k, max_iter)
    size = min(dimension, basis) if basis else lanczos_basis(dimension, k)
    keep = min(max(k + 1, size // 2), size - 1)
    columns = max(1, (1 << 22) // size)  # the restart's column blocks: size x columns numbers at a time
    gen = _generator(seed)
    basis = torch.empty((size, dimension), dtype=dtype, device=device)
    q = torch.randn(dimension, generator=gen, dtype=torch.float64).to(dtype).to(device)
    basis[0] = q / torch.linalg.norm(q)
    T = np.zeros((size, size))  # the projected matrix Q^T H Q of the vectors held
    held, products, beta = 1, 0, 0.0

    def ritz(m, beta):
        theta_all, S = np.linalg.eigh(0.5 * (T[:m, :m] + T[:m, :m].T))
        order = np.argsort(theta_all)[::-1]
        return theta_all[order], S[:, order], np.abs(beta * S[m - 1, order])

    while True:
        Q = basis[:held]
        w = matmat(Q[held - 1: held])[0].to(dtype)
        products += 1
        coefficients = Q @ w
        w.addmv_(Q.T, coefficients, alpha=-1.0)
        again = Q @ w  # classical Gram-Schmidt twice keeps the basis orthonormal in float32 too
        w.addmv_(Q.T, again, alpha=-1.0)
        column = (coefficients + again).double().cpu().numpy()
        T[:held, held - 1] = column
        T[held - 1, :held] = column
        beta = float(torch.linalg.norm(w))
        if progress is not None:
            progress(products)
        theta, S, resid = ritz(held, beta)
        scale = max(1.0, float(np.abs(theta).max()))
        exhausted = beta <= 1e-10 * scale
        wanted = min(k, held)
        converged = held >= k and bool(np.all(resid[:k] <= tol * np.maximum(np.abs(theta[:k]), 1e-30)))
        if converged or exhausted or products >= max_iter:
            break
        if held == size:  # thick restart: the `keep` best Ritz vectors, then the residual direction
            combine = torch.from_numpy(S[:, :keep].T.copy()).to(dtype=dtype, device=device)
            for start in range(0, dimension, columns):
                block = slice(start, start + columns)
                basis[:keep, block] = combine @ Q[:, block]
            T[:] = 0.0
            T[np.arange(keep), np.arange(keep)] = theta[:keep]
            held = keep
        torch.div(w, beta, out=basis[held])
        held += 1
    theta, S, resid = theta[:wanted], S[:, :wanted], resid[:wanted]
    if len(theta) < k:
        warn(f"Lanczos: the Krylov space is exhausted after {products} steps; {len(theta)} of the {k} "
             "eigenvalues asked are returned (a repeated eigenvalue is found once)", ConvergenceWarning)
    else:
        loose = int(np.sum(resid > tol * np.maximum(np.abs(theta), 1e-30)))
        if loose and not exhausted:
            warn(f"Lanczos: {loose} of the {k} Ritz values have residuals above tol after max_iter = "
                 f"{products} iterations (largest {resid.max():.3g}); they are lower bounds. Raise max_iter",
                 ConvergenceWarning)
    ritz_vectors = None
    if keep_vectors:
        ritz_vectors = torch.from_numpy(S.T.copy()).to(basis.device) @ basis[:held].double()
    return EigenResult(np.asarray(theta), np.asarray(resid), products, ritz_vectors)


def slq(matmat: MatMat, dimension: int, *, probes=4, iterations=64, seed=0, sigma=None, grid_size=1000,
        dtype=None, device="cpu", progress=None) -> SpectrumResult:
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
    alphas, betas, _ = _lanczos_runs(matmat, V, iterations, progress=progress)
    steps = alphas.shape[1]
    nodes = np.zeros((probes, steps))
    weights = np.zeros((probes, steps))
    for p in range(probes):
        theta, S = _tridiagonal_eigh(alphas[p], betas[p])
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
