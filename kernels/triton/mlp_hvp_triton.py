"""The fused GEMM-plus-mask primitive of the MLP R-operator in Triton: out = (A @ B + C) * mask, with the ReLU
mask of the B-sized activations broadcast over the k stacked directions. One program per output tile; the mask
and the addend are applied in registers before the single store (no separate elementwise passes)."""
import torch
import triton
import triton.language as tl


@triton.jit
def _masked_matmul_kernel(A, B, C, MASK, OUT, M, N, K, mask_rows, stride_am, stride_bk, stride_bn,
                          HAS_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=OUT.dtype.element_ty)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        a = tl.load(A + rows[:, None] * stride_am + (k0 + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        b = tl.load(B + (k0 + ks)[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(a, b, input_precision="ieee")
    tile = row_ok[:, None] & col_ok[None, :]
    if HAS_C:
        acc += tl.load(C + rows[:, None] * N + cols[None, :], mask=tile, other=0.0)
    keep = tl.load(MASK + (rows % mask_rows)[:, None] * N + cols[None, :], mask=tile, other=0)
    acc = tl.where(keep != 0, acc, 0.0)
    tl.store(OUT + rows[:, None] * N + cols[None, :], acc, mask=tile)


def _masked_matmul_launch(A, B, mask, C=None, block_m=64, block_n=64, block_k=32):
    """(grid, args, kwargs, out) of the kernel's launch for (A @ B + C) * mask (see masked_matmul_triton)."""
    K = A.shape[-1]
    N = B.shape[1]
    A2 = A.reshape(-1, K).contiguous()
    M = A2.shape[0]
    out = torch.empty((M, N), dtype=A.dtype, device=A.device)
    C2 = C.reshape(M, N).contiguous() if C is not None else out
    mask_u8 = mask.contiguous().view(torch.uint8)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    args = (A2, B, C2, mask_u8, out, M, N, K, mask.shape[0], A2.stride(0), B.stride(0), B.stride(1))
    kwargs = dict(HAS_C=C is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return grid, args, kwargs, out


def masked_matmul_triton(A, B, mask, C=None, block_m=64, block_n=64, block_k=32):
    """(A @ B + C) * mask. A: (..., R, K) (leading dimensions are stacked directions), B: (K, N) (any strides),
    mask: (R, N) bool, broadcast over A's leading dimensions; C: A @ B's shape or None."""
    lead, R, N = A.shape[:-2], A.shape[-2], B.shape[1]
    grid, args, kwargs, out = _masked_matmul_launch(A, B, mask, C, block_m, block_n, block_k)
    _masked_matmul_kernel[grid](*args, **kwargs)
    return out.reshape(*lead, R, N)
