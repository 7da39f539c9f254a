"""The NNGP kernel in Triton, two ways.

* GEMM + epilogue (the default): the dot products by one cuBLAS GEMM (torch.matmul) into the output, then one
  in-place pass over it that runs the whole depth recursion in registers. For K(X, X) only the tiles on and above
  the diagonal are read; each writes its values and their mirror image, so K is exactly symmetric and the pass
  reads half the matrix. The GEMM is the floor; the pass adds one read of half and one write of all of K.
* One fused tile kernel (tl.dot at IEEE precision, then the recursion): used for float32 when torch allows TF32
  in its matmuls, whose ~1e-3 relative error the kernel must not inherit.
"""
from fractions import Fraction
from math import factorial

import torch
import triton
import triton.language as tl

# asin Maclaurin coefficients c_k = (2k)! / (4^k (k!)^2 (2k+1)), k = 0..24, padded to 28 with zeros: the same
# polynomial, in the same four interleaved Horner chains, as csrc/common/arccos_step.h.
_ASIN_COEFFS = [float(Fraction(factorial(2 * k), 4**k * factorial(k) ** 2 * (2 * k + 1))) for k in range(25)] + [0.0] * 3
_COEFF_CACHE = {}


def _coefficients(device):
    key = str(device)
    if key not in _COEFF_CACHE:
        _COEFF_CACHE[key] = torch.tensor(_ASIN_COEFFS, dtype=torch.float64, device=device)
    return _COEFF_CACHE[key]


@triton.jit
def _asin_series(t, COEF):
    x = t * t
    x2 = x * x
    x4 = x2 * x2
    acc0 = tl.zeros_like(t)
    acc1 = tl.zeros_like(t)
    acc2 = tl.zeros_like(t)
    acc3 = tl.zeros_like(t)
    for kk in tl.static_range(7):
        k = 6 - kk
        acc0 = acc0 * x4 + tl.load(COEF + 4 * k)
        acc1 = acc1 * x4 + tl.load(COEF + 4 * k + 1)
        acc2 = acc2 * x4 + tl.load(COEF + 4 * k + 2)
        acc3 = acc3 * x4 + tl.load(COEF + 4 * k + 3)
    return t * ((acc0 + x * acc1) + x2 * (acc2 + x * acc3))


@triton.jit
def _arccos_step(k, s, sw2, sb2, COEF):
    PI: tl.constexpr = 3.141592653589793
    HALF_PI: tl.constexpr = 1.5707963267948966
    INV_2PI: tl.constexpr = 0.15915494309189535
    degenerate = s <= 0.0
    c = k / tl.where(degenerate, 1.0, s)
    c = tl.where(degenerate, 0.0, tl.minimum(tl.maximum(c, -1.0), 1.0))
    a = tl.abs(c)
    far = a > 0.5
    t = tl.where(far, tl.sqrt(0.5 * (1.0 - a)), a)
    p = _asin_series(t, COEF)
    r = tl.where(far, 2.0 * p, HALF_PI - p)
    theta = tl.where(c < 0.0, PI - r, r)
    sin_theta = tl.sqrt((1.0 - c) * (1.0 + c))
    return sb2 + sw2 * INV_2PI * s * (sin_theta + (PI - theta) * c)


@triton.jit
def _nngp_tile_kernel(X, Z, SQX, SQZ, QDIAG, OUT, COEF, n, m, d, stride_x, stride_z, stride_o,
                      # Annotated: Triton's JIT would type a bare Python float as fp32 (a ~6e-8 relative error in
                      # K_0 against the documented 1e-12); tl.float64 makes the launch pass all 64 bits.
                      sw2_over_d: tl.float64, sw2: tl.float64, sb2: tl.float64,
                      DEPTH: tl.constexpr, SYMMETRIC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # 64-bit indices: row * stride passes 2^31 once n > 46,340 (a 32-bit offset wrapped and wrote out of bounds
    # at n = 60,000 on an H100)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < n
    col_ok = cols < m
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=X.dtype.element_ty)
    for k0 in range(0, d, BLOCK_K):
        k_ok = (k0 + ks) < d
        x = tl.load(X + rows[:, None] * stride_x + (k0 + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        z = tl.load(Z + cols[:, None] * stride_z + (k0 + ks)[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(z), input_precision="ieee")
    k = acc.to(tl.float64) * sw2_over_d + sb2
    for layer in tl.static_range(DEPTH):
        sx = tl.load(SQX + layer * n + rows, mask=row_ok, other=1.0)
        sz = tl.load(SQZ + layer * m + cols, mask=col_ok, other=1.0)
        k = _arccos_step(k, sx[:, None] * sz[None, :], sw2, sb2, COEF)
    if SYMMETRIC:
        qd = tl.load(QDIAG + rows, mask=row_ok, other=0.0)
        k = tl.where(rows[:, None] == cols[None, :], qd[:, None], k)
    tl.store(OUT + rows[:, None] * stride_o + cols[None, :], k.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _nngp_epilogue_kernel(OUT, SQX, SQZ, QDIAG, COEF, n, m, stride_o,
                          sw2_over_d: tl.float64, sw2: tl.float64, sb2: tl.float64,
                          DEPTH: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK: tl.constexpr):
    """OUT holds x.z (the GEMM); overwrite it with K. SYMMETRIC: tile (i, j) with i <= j writes itself and its
    transpose at (j, i); tiles below the diagonal do nothing. On a diagonal tile only entries with row <= col are
    stored directly and row < col mirrored, so every address is written exactly once, and the lower entries
    such a tile loads (possibly after another thread overwrote them) are never stored."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if SYMMETRIC and pid_m > pid_n:
        return
    rows = pid_m.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # 64-bit, as in _nngp_tile_kernel
    cols = pid_n.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < n
    col_ok = cols < m
    valid = row_ok[:, None] & col_ok[None, :]
    dot = tl.load(OUT + rows[:, None] * stride_o + cols[None, :], mask=valid, other=0.0)
    k = dot.to(tl.float64) * sw2_over_d + sb2
    for layer in tl.static_range(DEPTH):
        sx = tl.load(SQX + layer * n + rows, mask=row_ok, other=1.0)
        sz = tl.load(SQZ + layer * m + cols, mask=col_ok, other=1.0)
        k = _arccos_step(k, sx[:, None] * sz[None, :], sw2, sb2, COEF)
    value = k.to(OUT.dtype.element_ty)
    if SYMMETRIC:
        qd = tl.load(QDIAG + rows, mask=row_ok, other=0.0)
        on_diagonal = rows[:, None] == cols[None, :]
        value = tl.where(on_diagonal, qd[:, None].to(OUT.dtype.element_ty), value)
        off_tile = pid_m < pid_n
        upper = rows[:, None] <= cols[None, :]
        strictly_upper = rows[:, None] < cols[None, :]
        tl.store(OUT + rows[:, None] * stride_o + cols[None, :], value, mask=valid & (upper | off_tile))
        tl.store(OUT + cols[None, :] * stride_o + rows[:, None], value, mask=valid & (strictly_upper | off_tile))
    else:
        tl.store(OUT + rows[:, None] * stride_o + cols[None, :], value, mask=valid)


def _point_variances(A, depth, sw2, sb2):
    """sqrt(q_l) per point for l < depth (depth x n, float64) and the exact final diagonal q_depth."""
    q = sw2 * (A.to(torch.float64) ** 2).sum(dim=1) / A.shape[1] + sb2
    layers = []
    for _ in range(depth):
        layers.append(torch.sqrt(q))
        q = sb2 + 0.5 * sw2 * q
    sq = torch.stack(layers) if layers else torch.zeros((1, A.shape[0]), dtype=torch.float64, device=A.device)
    return sq.contiguous(), q.contiguous()


def _nngp_launch(X, Z, depth, sigma_w2, sigma_b2, block=64):
    """(grid, args, kwargs, out) of the tile kernel's launch: what nngp_kernel_triton runs, and what the build
    test hands to Triton's own launch-time specialisation to compile for real GPU targets."""
    symmetric = Z is None
    X = X.contiguous()
    Z = X if symmetric else Z.contiguous()
    n, d = X.shape
    m = Z.shape[0]
    out = torch.empty((n, m), dtype=X.dtype, device=X.device)
    sqx, qdiag = _point_variances(X, depth, sigma_w2, sigma_b2)
    sqz = sqx if symmetric else _point_variances(Z, depth, sigma_w2, sigma_b2)[0]
    grid = (triton.cdiv(n, block), triton.cdiv(m, block))
    args = (X, Z, sqx, sqz, qdiag, out, _coefficients(X.device), n, m, d, X.stride(0), Z.stride(0), out.stride(0),
            sigma_w2 / d, sigma_w2, sigma_b2)
    kwargs = dict(DEPTH=depth, SYMMETRIC=symmetric, BLOCK_M=block, BLOCK_N=block, BLOCK_K=32)
    return grid, args, kwargs, out


def _epilogue_launch(out, X, Z, depth, sigma_w2, sigma_b2, block=64):
    """(grid, args, kwargs) of the epilogue over ``out``, which holds X Z^T (Z None: X X^T)."""
    symmetric = Z is None
    n, d = X.shape
    m = out.shape[1]
    sqx, qdiag = _point_variances(X, depth, sigma_w2, sigma_b2)
    sqz = sqx if symmetric else _point_variances(Z, depth, sigma_w2, sigma_b2)[0]
    grid = (triton.cdiv(n, block), triton.cdiv(m, block))
    args = (out, sqx, sqz, qdiag, _coefficients(X.device), n, m, out.stride(0), sigma_w2 / d, sigma_w2, sigma_b2)
    return grid, args, dict(DEPTH=depth, SYMMETRIC=symmetric, BLOCK=block)


def _gemm_may_use_tf32(dtype):
    return dtype == torch.float32 and bool(torch.backends.cuda.matmul.allow_tf32)


def nngp_kernel_triton(X, Z, depth, sigma_w2, sigma_b2, block=64, fused=None):
    """K(X, Z) for torch tensors X (n, d) and Z (m, d) of one float dtype on one device: a GEMM and the epilogue,
    or (``fused=True``, and by default for float32 while torch allows TF32) the single fused tile kernel."""
    if X.shape[0] == 0 or (Z is not None and Z.shape[0] == 0):
        return torch.empty((X.shape[0], X.shape[0] if Z is None else Z.shape[0]), dtype=X.dtype, device=X.device)
    if fused is None:
        fused = _gemm_may_use_tf32(X.dtype)
    if fused:
        grid, args, kwargs, out = _nngp_launch(X, Z, depth, sigma_w2, sigma_b2, block)
        _nngp_tile_kernel[grid](*args, **kwargs)
        return out
    X = X.contiguous()
    Zc = None if Z is None else Z.contiguous()
    out = torch.matmul(X, (X if Zc is None else Zc).T)
    grid, args, kwargs = _epilogue_launch(out, X, Zc, depth, sigma_w2, sigma_b2, block)
    _nngp_epilogue_kernel[grid](*args, **kwargs)
    return out
