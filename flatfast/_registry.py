"""Every backend of every primitive, registered in one place with its rank.

Import ``dispatch`` from here (not from flatfast._dispatch): doing so guarantees the registrations exist. The
dispatcher itself knows nothing of its clients, and this module imports only the backend adapters, so imports
run one way: public modules -> _registry -> adapters -> _native/_dispatch.

Ranks. ``auto`` takes the highest-ranked backend that can run on the data's device. On the CPU the measured
order holds: the C++ NNGP kernel (1.2-1.5x a bare GEMM, ~9x the numpy reference), and for the R-operator torch
ops first (the C++ fused GEMM measured equal to torch there, so it is selectable but not preferred). On CUDA
tensors nothing has been measured yet -- no GPU has run this code -- so the safe choice ranks first: torch
(cuBLAS) for the R-operator, Triton (tl.dot, tested under the interpreter and compiled for sm_80/sm_90) for the
NNGP kernel; the hand-written 16x16-tile CUDA C++ kernels rank below them until a GPU benchmark says otherwise.
"""
from __future__ import annotations

import functools
from typing import Dict

from flatfast import _native
from flatfast._dispatch import dispatch, register, report
from flatfast._generic_hvp import generic_batch, generic_quadratic
from flatfast._masked_matmul import cpp_masked_matmul, cuda_masked_matmul, torch_masked_matmul, triton_masked_matmul
from flatfast._mlp_rop import mlp_rop, mlp_vhv
from flatfast._nngp_backends import nngp_cpp, nngp_cuda, nngp_reference, nngp_triton

__all__ = ["backends", "dispatch"]

# Triton runs CPU tensors only under its interpreter, which is chosen before triton is imported.
_TRITON_DEVICES = ("cuda", "cpu") if _native.triton_interpreted() else ("cuda",)

# --- nngp ----------------------------------------------------------------------------------------------------
# On CUDA "auto" takes Triton (a cuBLAS GEMM and one fused in-place epilogue over the upper tiles) over the CUDA
# C++ kernel, which computes its own dot products. Measured on one H100 80GB (bench/bench_gpu.py, 2026-11-27, two
# runs), each against the cuBLAS GEMM of the same X at n = 5000 / 20000: GEMM + epilogue 3.4-3.6x / 3.2x in
# float64 and 4.5-4.7x / 4.0x in float32; Triton's fused tile kernel 5.0-5.2x / 5.4x and 5.4-5.5x / 6.4x; CUDA C++
# 12.4-13.0x / 13.2x and 7.6x / 8.2-8.3x.
register("nngp", "cpp", nngp_cpp, devices=("cpu",), priority=30, probe=_native.cpp_unavailable)
register("nngp", "triton", nngp_triton, devices=_TRITON_DEVICES, priority=20, probe=_native.triton_unavailable,
         auto_devices=("cuda",))
register("nngp", "cuda", nngp_cuda, devices=("cuda",), priority=15, probe=_native.cuda_unavailable)
register("nngp", "reference", nngp_reference, devices=("cpu", "cuda"), priority=0, reference=True)

# --- mlp_hvp (H V) and mlp_vhv (v^T H v): one R-operator / second-order forward over each masked matmul --------
# The R-operator's masked products. On one H100 80GB (bench/bench_gpu.py, 2026-11-27, two runs), one HVP of an MLP
# 784-512-512-10 on 20,000 inputs cost 1.75-2.30x a forward+backward with torch (cuBLAS), 1.67-2.20x with Triton
# (4-5 % less), 2.52-2.82x with the CUDA C++ kernel: cuBLAS stays first on CUDA, the one path any torch has.
_MASKED_MATMUL = [  # name, implementation, devices, rank, probe, where "auto" may pick it
    ("torch", torch_masked_matmul, ("cpu", "cuda"), 10, None, None),
    ("triton", triton_masked_matmul, _TRITON_DEVICES, 8, _native.triton_unavailable, ("cuda",)),
    ("cuda", cuda_masked_matmul, ("cuda",), 7, _native.cuda_unavailable, None),
    ("cpp", cpp_masked_matmul, ("cpu",), 5, _native.cpp_unavailable, None),
]
for _name, _matmul, _devices, _rank, _probe, _auto in _MASKED_MATMUL:
    for _op, _pass in (("mlp_hvp", mlp_rop), ("mlp_vhv", mlp_vhv)):
        register(_op, _name, functools.partial(_pass, masked_matmul=_matmul), devices=_devices, priority=_rank,
                 probe=_probe or (lambda: None), auto_devices=_auto)
register("mlp_hvp", "reference", generic_batch, devices=("cpu", "cuda"), priority=0, reference=True)
register("mlp_vhv", "reference", generic_quadratic, devices=("cpu", "cuda"), priority=0, reference=True)


def backends() -> Dict[str, Dict[str, str]]:
    """What can run here: ``{op: {backend: "available (devices)" | "unavailable: reason"}}``.

    Examples
    --------
    >>> import flatfast
    >>> flatfast.backends()["nngp"]["reference"]
    'available (cpu/cuda)'
    """
    return report()
