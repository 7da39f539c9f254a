"""The build: the C++ module, its OpenMP threads, and the GPU kernels compiled for real GPU targets."""
import os

import pytest

import flatfast


def test_cpp_extension_is_built_and_threaded():
    from flatfast._native import load_cpp

    module, reason = load_cpp()
    assert module is not None, reason
    assert module.omp_max_threads() >= 1
    if (os.cpu_count() or 1) > 1 and "OMP_NUM_THREADS" not in os.environ:
        assert module.omp_max_threads() > 1


def test_import_reports_without_gpu():
    report = flatfast.backends()
    assert "nngp" in report


_COMPILE_SCRIPT = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from flatfast.kernels.nngp_triton import _nngp_tile_kernel

pointers = {name: "*fp64" for name in ("X", "Z", "SQX", "SQZ", "QDIAG", "OUT", "COEF")}
ints = {name: "i32" for name in ("n", "m", "d", "stride_x", "stride_z", "stride_o")}
floats = {name: "fp64" for name in ("sw2_over_d", "sw2", "sb2")}
consts = {"DEPTH": 2, "SYMMETRIC": True, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}
signature = {**pointers, **ints, **floats, **{k: "constexpr" for k in consts}}
compiled = triton.compile(ASTSource(fn=_nngp_tile_kernel, signature=signature, constexprs=consts),
                          target=GPUTarget("cuda", int(sys.argv[1]), 32))
assert compiled.asm["cubin"]
print("cubin bytes", len(compiled.asm["cubin"]))

from flatfast.kernels.mlp_hvp_triton import _masked_matmul_kernel

for dtype in ("fp32", "fp64"):
    signature = {"A": "*" + dtype, "B": "*" + dtype, "C": "*" + dtype, "MASK": "*u8", "OUT": "*" + dtype,
                 **{name: "i32" for name in ("M", "N", "K", "mask_rows", "stride_am", "stride_bk", "stride_bn")},
                 "HAS_C": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    consts = {"HAS_C": True, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}
    compiled = triton.compile(ASTSource(fn=_masked_matmul_kernel, signature=signature, constexprs=consts),
                              target=GPUTarget("cuda", int(sys.argv[1]), 32))
    assert compiled.asm["cubin"]
    print("masked matmul", dtype, "cubin bytes", len(compiled.asm["cubin"]))
"""


@pytest.mark.parametrize("capability", [80, 90])
def test_triton_kernels_compile_for_gpu(capability):
    """The interpreter accepts code the GPU compiler rejects; compile a real cubin for sm_80 / sm_90. This runs in
    a fresh process without TRITON_INTERPRET, which the test session sets and which turns kernels into
    interpreted functions that cannot be compiled."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, str(capability)], env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cubin bytes" in out.stdout and "masked matmul fp64" in out.stdout


def test_command_line_info_and_demo():
    import subprocess
    import sys

    info = subprocess.run([sys.executable, "-m", "flatfast", "info"], capture_output=True, text=True, check=True)
    assert "nngp:" in info.stdout and "cpp" in info.stdout and "mlp_hvp:" in info.stdout
    demo = subprocess.run([sys.executable, "-m", "flatfast", "demo", "--n", "300"], capture_output=True, text=True,
                          check=True)
    assert "BLAS floor" in demo.stdout and "log P(f)" in demo.stdout
