"""The NNGP kernel on each backend: C++ (CPU), Triton and CUDA C++ (CUDA tensors), and the numpy reference, each
registered with its rank. Arguments arrive validated by :func:`flatfast.nngp_kernel`.

Ranks: ``auto`` takes the highest-ranked backend that can run on the data's device. On the CPU the C++ kernel
(1.2-1.5x a bare GEMM, ~9x the numpy reference). On CUDA, Triton (a cuBLAS GEMM and one fused in-place epilogue
over the upper tiles) over the CUDA C++ kernel, which computes its own dot products: measured on one H100 80GB
(bench/bench_gpu.py, 2026-11-27, two runs), each against the cuBLAS GEMM of the same X at n = 5000 / 20000, GEMM +
epilogue 3.4-3.6x / 3.2x in float64 and 4.5-4.7x / 4.0x in float32; Triton's fused tile kernel 5.0-5.2x / 5.4x and
5.4-5.5x / 6.4x; CUDA C++ 12.4-13.0x / 13.2x and 7.6x / 8.2-8.3x.
"""
from __future__ import annotations

import numpy as np

from flatfast.backend import native
from flatfast.backend.dispatch import register
from flatfast._validate import device_of, is_torch, same_kind, to_numpy
from flatfast.reference.nngp import nngp_kernel_reference



def nngp_cpp(X, Z, depth, sigma_w2, sigma_b2, dtype):
    module = native.load_cpp()[0]
    fn = module.nngp_f64 if dtype == np.float64 else module.nngp_f32
    Xn = np.ascontiguousarray(to_numpy(X), dtype=dtype)
    Zn = None if Z is None else np.ascontiguousarray(to_numpy(Z), dtype=dtype)
    m = Xn.shape[0] if Zn is None else Zn.shape[0]
    K = native.run_with_blas_limited(Xn.shape[0] * m * Xn.shape[1], fn, Xn, Zn, depth, sigma_w2, sigma_b2)
    return same_kind(K, X)


def nngp_triton(X, Z, depth, sigma_w2, sigma_b2, dtype):
    import torch

    native.require_triton_device(device_of(X))
    module = native.load_triton()[0]
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    Xt = X if is_torch(X) else torch.from_numpy(np.asarray(X))
    Zt = None if Z is None else (Z if is_torch(Z) else torch.from_numpy(np.asarray(Z)))
    K = module.nngp_kernel_triton(Xt.to(tdtype), None if Zt is None else Zt.to(tdtype), depth, sigma_w2, sigma_b2)
    return K if is_torch(X) else K.numpy()


def nngp_cuda(X, Z, depth, sigma_w2, sigma_b2, dtype):
    import torch

    module = native.load_cuda()[0]
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


def nngp_reference(X, Z, depth, sigma_w2, sigma_b2, dtype):
    K = nngp_kernel_reference(to_numpy(X), None if Z is None else to_numpy(Z), depth, sigma_w2, sigma_b2)
    return same_kind(K.astype(dtype, copy=False), X)


register("nngp", "cpp", nngp_cpp, devices=("cpu",), priority=30, probe=native.cpp_unavailable)
register("nngp", "triton", nngp_triton, devices=native.triton_devices(), priority=20, probe=native.triton_unavailable,
         auto_devices=("cuda",))
register("nngp", "cuda", nngp_cuda, devices=("cuda",), priority=15, probe=native.cuda_unavailable)
register("nngp", "reference", nngp_reference, devices=("cpu", "cuda"), priority=0, reference=True)
