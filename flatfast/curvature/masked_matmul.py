"""``masked_matmul(A, B, mask, C) = (A @ B + C) * mask``, the one fused GEMM-plus-mask primitive of the R-operator,
on each backend: torch ops, the C++ kernel (CPU), the CUDA C++ kernel and the Triton kernel (CUDA tensors, or
CPU tensors under TRITON_INTERPRET=1)."""
from __future__ import annotations


def torch_masked_matmul(A, B, mask, C=None):
    """(A @ B + C) * mask with torch ops; A may carry a leading batch dimension, mask broadcasts over it."""
    import torch

    out = torch.matmul(A, B)
    if C is not None:
        out += C
    return out * mask


def _flat_operands(A, B, mask, C):
    """The 2-D, contiguous operands the C++ and CUDA kernels take: A as (rows, K); B as itself, or as W when it
    is a transposed weight W.T (no copy); C as (rows, N) or None; the mask as uint8 bytes."""
    import torch

    K, N = A.shape[-1], B.shape[1]
    if B.T.is_contiguous():
        b, transposed = B.T, True
    else:
        b, transposed = B.contiguous(), False
    a = A.reshape(-1, K).contiguous()
    c = None if C is None else C.reshape(-1, N).contiguous()
    return a, b, transposed, mask.contiguous().view(torch.uint8), c


def cpp_masked_matmul(A, B, mask, C=None):
    """(A @ B + C) * mask by the C++ kernel on numpy views of the CPU tensors (no copies for contiguous ones)."""
    import torch

    from flatfast.backend import native as _native

    module = _native.load_cpp()[0]
    a, b, transposed, keep, c = _flat_operands(A, B, mask, C)
    fn = module.masked_matmul_f64 if A.dtype == torch.float64 else module.masked_matmul_f32
    out = _native.run_with_blas_limited(a.shape[0] * b.numel(), fn, a.numpy(), b.numpy(), transposed, keep.numpy(),
                                        None if c is None else c.numpy())
    return torch.from_numpy(out).reshape(*A.shape[:-1], B.shape[1])


def cuda_masked_matmul(A, B, mask, C=None):
    """(A @ B + C) * mask by the CUDA C++ kernel on the tensors' device memory."""
    import torch

    from flatfast.backend import native as _native

    module = _native.load_cuda()[0]
    a, b, transposed, keep, c = _flat_operands(A, B, mask, C)
    N = B.shape[1]
    out = torch.empty((a.shape[0], N), dtype=A.dtype, device=A.device)
    module.masked_matmul(a.data_ptr(), a.shape[0], a.shape[1], b.data_ptr(), N, transposed, keep.data_ptr(),
                         mask.shape[0], 0 if c is None else c.data_ptr(), out.data_ptr(), A.dtype == torch.float64,
                         torch.cuda.current_stream(A.device).cuda_stream)
    return out.reshape(*A.shape[:-1], N)


def triton_masked_matmul(A, B, mask, C=None):
    from flatfast.backend import native as _native

    _native.require_triton_device(A.device.type)
    return _native.load_triton()[0].masked_matmul_triton(A, B, mask, C)
