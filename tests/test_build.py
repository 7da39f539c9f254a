"""The build: the C++ module, its OpenMP threads, and the GPU kernels compiled for real GPU targets."""
import os

import numpy as np
import pytest

import flatfast

from conftest import native_module_or_skip


def test_cpp_extension_is_built_and_threaded():
    module = native_module_or_skip()
    assert module.threading() in ("openmp", "std::thread")
    assert module.blas_check() == 0.0
    if (os.cpu_count() or 1) > 1 and not {"OMP_NUM_THREADS", "FLATFAST_NUM_THREADS"} & set(os.environ):
        assert module.num_threads() > 1


_KERNELS_SCRIPT = """
import importlib.util, sys
import numpy as np
path, out = sys.argv[1], sys.argv[2]
if path == "installed":
    from flatfast._native import load_cpp, single_threaded_blas
    module = load_cpp()[0]
else:
    spec = importlib.util.spec_from_file_location("_C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from flatfast._native import single_threaded_blas
rng = np.random.default_rng(7)
X, Z = rng.random((600, 97)), rng.random((300, 97))
A, B = rng.standard_normal((700, 64)), rng.standard_normal((64, 50))
mask, C = (rng.random((7, 50)) > 0.5).astype(np.uint8), rng.standard_normal((700, 50))
with single_threaded_blas():
    results = [module.nngp_f64(X, None, 3, 2.0, 1.0), module.nngp_f64(X, Z, 2, 2.0, 0.5),
               module.nngp_f32(X.astype(np.float32), None, 2, 2.0, 1.0),
               module.masked_matmul_f64(A, B, False, mask, C), module.masked_matmul_f64(A, B.T.copy(), True, mask, None)]
np.savez(out, *results)
print(module.threading(), module.num_threads())
"""


def test_openmp_and_std_thread_builds_agree(tmp_path):
    """The C++ core threads its tiles with OpenMP or, without it (FLATFAST_OPENMP=OFF, Apple clang), with
    std::thread workers on the same schedule. Build the variant that is not installed and check that every
    entry equals the installed build's to rounding (1e-15 relative: the two builds vectorise the epilogue
    differently, which moves a few entries by one ulp). Each module runs in its own process: two copies of an
    extension named _C cannot live in one interpreter."""
    import shutil
    import subprocess
    import sys

    installed = native_module_or_skip().threading()
    pybind11 = pytest.importorskip("pybind11")
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not on PATH (pip install cmake)")
    other = "OFF" if installed == "openmp" else "ON"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    build, out = tmp_path / "build", tmp_path / "out"
    configure = subprocess.run(["cmake", "-S", root, "-B", str(build), f"-DFLATFAST_OPENMP={other}",
                                f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                                f"-DPython_EXECUTABLE={sys.executable}"], capture_output=True, text=True)
    if configure.returncode != 0 and other == "ON" and "OpenMP" in configure.stdout + configure.stderr:
        pytest.skip("the installed build uses std::thread and this compiler has no OpenMP to compare with")
    assert configure.returncode == 0, configure.stderr[-2000:]
    subprocess.run(["cmake", "--build", str(build), "-j", "2"], check=True, capture_output=True)
    (built,) = out.glob("_C*")
    runs = {}
    for path in ("installed", str(built)):
        proc = subprocess.run([sys.executable, "-c", _KERNELS_SCRIPT, path, str(tmp_path / f"{len(runs)}.npz")],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        threading, threads = proc.stdout.split()
        runs[threading] = np.load(tmp_path / f"{len(runs)}.npz")
        if (os.cpu_count() or 1) > 1 and not {"OMP_NUM_THREADS", "FLATFAST_NUM_THREADS"} & set(os.environ):
            assert int(threads) > 1
    assert set(runs) == {"openmp", "std::thread"}
    for key in runs["openmp"].files:
        np.testing.assert_allclose(runs["std::thread"][key], runs["openmp"][key], rtol=1e-15, atol=0, err_msg=key)


def test_pure_python_mode_runs_every_operation_on_the_reference():
    """FLATFAST_NO_NATIVE=1 (at install or run time): info says why the C++ backend is missing, each primitive
    falls back with one warning, and the results are the reference's."""
    import subprocess
    import sys

    script = """
import warnings
import numpy as np, torch, flatfast
from flatfast.reference.nngp import nngp_kernel_reference
X = np.random.default_rng(0).random((40, 5))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    K = flatfast.nngp_kernel(X)
    flatfast.nngp_kernel(X)
    y = np.where(X[:, 0] > 0.5, 1, -1)
    log_p = flatfast.log_prior(X, y)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).double()
    loader = [(torch.tensor(X), torch.tensor((y > 0).astype(np.int64)))]
    trace = flatfast.hessian_trace(net, loader, method="exact").value
fallbacks = [str(w.message) for w in caught if issubclass(w.category, flatfast.BackendFallbackWarning)]
assert len(fallbacks) == 1 and "FLATFAST_NO_NATIVE=1" in fallbacks[0], fallbacks
assert np.allclose(K, nngp_kernel_reference(X), rtol=1e-13, atol=0)
assert np.isfinite(log_p) and trace > 0
print("ok")
"""
    env = {**os.environ, "FLATFAST_NO_NATIVE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
    info = subprocess.run([sys.executable, "-m", "flatfast", "info"], env=env, capture_output=True, text=True,
                          check=True)
    assert "C++ core: not in use (turned off by FLATFAST_NO_NATIVE=1" in info.stdout
    assert "cpp        unavailable: turned off by FLATFAST_NO_NATIVE=1" in info.stdout


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
