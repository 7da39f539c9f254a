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
    from flatfast.backend.native import load_cpp, single_threaded_blas
    module = load_cpp()[0]
else:
    spec = importlib.util.spec_from_file_location("_C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from flatfast.backend.native import single_threaded_blas
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


@pytest.mark.slow  # run by .ci/run after the default suite (pytest -m slow)
def test_openmp_and_std_thread_builds_agree(tmp_path):
    """The C++ core threads its tiles with OpenMP or, without it (FLATFAST_OPENMP=OFF, Apple clang), with
    std::thread workers on the same schedule. Build the variant that is not installed and check that every
    entry equals the installed build's to within 4 units in the last place of its own precision (float64 or
    float32): the two builds vectorise the epilogue differently (OpenMP's `omp simd` against -fopenmp-simd, in
    the AVX-512, AVX2 or baseline clone the CPU selects), which moves some entries by one or two ulps -- on an
    AVX-512 machine 7,912 of 360,000 float32 entries, every run. Each module runs in its own process: two copies
    of an extension named _C cannot live in one interpreter."""
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
    isa = _vector_isa()
    for key in runs["openmp"].files:
        ours, theirs = runs["std::thread"][key], runs["openmp"][key]
        assert ours.dtype == theirs.dtype
        differ = int(np.count_nonzero(ours != theirs))
        try:
            np.testing.assert_array_max_ulp(ours, theirs, maxulp=4, dtype=ours.dtype)
        except AssertionError as exc:
            raise AssertionError(f"{key} ({ours.dtype}): the std::thread and OpenMP builds differ by more than 4 "
                                 f"ulps on this {isa} CPU ({differ} of {ours.size} entries differ at all)") from exc
        print(f"{key} ({ours.dtype}, {isa} CPU): {differ} of {ours.size} entries differ, all within 4 ulps")


def _vector_isa():
    """The widest x86 vector extension the CPU reports: the clone of the kernels that it runs."""
    try:
        flags = open("/proc/cpuinfo").read().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return "unknown-ISA"
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "baseline x86-64"


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
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature
from flatfast.kernels.nngp_triton import _epilogue_launch, _nngp_epilogue_kernel, _nngp_launch, _nngp_tile_kernel
from flatfast.kernels.mlp_hvp_triton import _masked_matmul_launch, _masked_matmul_kernel

target = GPUTarget("cuda", int(sys.argv[1]), 32)
backend = make_backend(target)


def compile_as_launched(kernel, args, kwargs):
    # Triton's own launch-time specialisation of these very arguments: the signature a GPU launch would compile.
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    _, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target)
    assert compiled.asm["cubin"]
    return signature, len(compiled.asm["cubin"])


for dtype in (torch.float64, torch.float32):
    X = torch.rand(100, 30, dtype=dtype)
    for Z in (None, torch.rand(70, 30, dtype=dtype)):
        _, args, kwargs, _ = _nngp_launch(X, Z, 2, 2.0, 1.0)
        signature, size = compile_as_launched(_nngp_tile_kernel, args, kwargs)
        assert all(signature[name] == "fp64" for name in ("sw2_over_d", "sw2", "sb2")), signature
        print("nngp", dtype, "symmetric" if Z is None else "general", "cubin bytes", size)
        out = torch.empty(100, 100 if Z is None else 70, dtype=dtype)
        _, args, kwargs = _epilogue_launch(out, X, Z, 2, 2.0, 1.0)
        signature, size = compile_as_launched(_nngp_epilogue_kernel, args, kwargs)
        assert all(signature[name] == "fp64" for name in ("sw2_over_d", "sw2", "sb2")), signature
        print("nngp epilogue", dtype, "symmetric" if Z is None else "general", "cubin bytes", size)
    A, B = torch.rand(3, 50, 20, dtype=dtype), torch.rand(40, 20, dtype=dtype).T
    mask, C = torch.rand(50, 40) > 0.5, torch.rand(3, 50, 40, dtype=dtype)
    for addend in (C, None):
        _, args, kwargs, _ = _masked_matmul_launch(A, B, mask, addend)
        signature, size = compile_as_launched(_masked_matmul_kernel, args, kwargs)
        print("masked matmul", dtype, "with C" if addend is not None else "without C", "cubin bytes", size)
"""


@pytest.mark.parametrize("capability", [80, 90])
def test_triton_kernels_compile_for_gpu(capability):
    """The interpreter accepts code the GPU compiler rejects; compile real cubins for sm_80 / sm_90, with the
    signatures Triton's launcher derives from the arguments our launchers really pass (so a float scalar typed
    fp32 by the JIT is caught). This runs in a fresh process without TRITON_INTERPRET, which the test session
    sets and which turns kernels into interpreted functions that cannot be compiled."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, str(capability)], env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("cubin bytes") == 12, out.stdout


def test_command_line_info_and_demo():
    import subprocess
    import sys

    info = subprocess.run([sys.executable, "-m", "flatfast", "info"], capture_output=True, text=True, check=True)
    assert "nngp:" in info.stdout and "cpp" in info.stdout and "mlp_hvp:" in info.stdout
    demo = subprocess.run([sys.executable, "-m", "flatfast", "demo", "--n", "300"], capture_output=True, text=True,
                          check=True)
    assert "BLAS floor" in demo.stdout and "log P(f)" in demo.stdout


def _blas_threads():
    from threadpoolctl import threadpool_info

    return sorted({pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"})


def test_blas_thread_limit_is_restored_after_overlapping_callers():
    """The limit is process-wide: with two overlapping users (two Python threads calling the kernels) the one
    that leaves first must not lift it, and the last one out must restore the original count."""
    import threading

    pytest.importorskip("threadpoolctl")
    from flatfast.backend.native import single_threaded_blas

    original = _blas_threads()
    first, second = single_threaded_blas(), single_threaded_blas()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert _blas_threads() == [1]  # the second user is still inside
    second.__exit__(None, None, None)
    assert _blas_threads() == original

    X = np.random.default_rng(0).random((700, 300))  # above the size at which the kernels limit BLAS
    errors = []

    def work():
        try:
            for _ in range(5):
                flatfast.nngp_kernel(X)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and _blas_threads() == original


def test_set_num_threads():
    module = native_module_or_skip()
    default = module.num_threads()
    try:
        assert flatfast.set_num_threads(1) == default and module.num_threads() == 1
        K1 = flatfast.nngp_kernel(np.random.default_rng(1).random((600, 50)))
    finally:
        flatfast.set_num_threads(None)
    assert module.num_threads() == default
    np.testing.assert_allclose(flatfast.nngp_kernel(np.random.default_rng(1).random((600, 50))), K1, rtol=1e-15)
    with pytest.raises(ValueError, match="threads: expected a positive integer"):
        flatfast.set_num_threads(0)


_BLAS_IN_PARALLEL_SCRIPT = """
import sys
import torch  # loads an OpenMP runtime first, as a user's script would
import numpy as np
import flatfast
from flatfast.backend import native
if sys.argv[1] == "no-threadpoolctl":  # a process where no BLAS can be limited to one thread
    native._blas_controller.cache_clear()
    native._blas_controller = lambda: None
rng = np.random.default_rng(0)
for n, d in ((200, 30), (700, 300)):  # below and above the work at which BLAS is limited
    flatfast.nngp_kernel(rng.random((n, d)))
    flatfast.nngp_kernel(rng.random((n, d)), rng.random((n // 2, d)), dtype=np.float32)
model = torch.nn.Sequential(torch.nn.Linear(30, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3)).double()
data = [(torch.randn(256, 30, dtype=torch.float64), torch.randint(0, 3, (256,)))]
P = sum(p.numel() for p in model.parameters())
flatfast.hvp(model, data, torch.randn(4, P, dtype=torch.float64), backend="cpp")
print("ran")
"""


@pytest.mark.parametrize("blas_limit", ["threadpoolctl", "no-threadpoolctl"])
def test_no_threaded_blas_is_called_inside_a_parallel_region(blas_limit):
    """A threaded BLAS called from inside an OpenMP region oversubscribes the cores, and OpenBLAS prints 'Detect
    OpenMP Loop and this application may hang'. The C++ kernels that call BLAS from their workers run their tiles
    in parallel only while BLAS is limited to one thread, and serially on the caller's thread otherwise --
    whatever was imported first, and whether or not threadpoolctl can limit it."""
    import subprocess
    import sys

    native_module_or_skip()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "FLATFAST_NUM_THREADS",
                                                            "OPENBLAS_NUM_THREADS")}
    env["FLATFAST_NUM_THREADS"] = "2"  # a parallel region even on a one-core machine
    env["OPENBLAS_NUM_THREADS"] = "2"
    done = subprocess.run([sys.executable, "-c", _BLAS_IN_PARALLEL_SCRIPT, blas_limit], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0 and "ran" in done.stdout, done.stderr
    assert "OpenMP Loop" not in done.stderr + done.stdout, done.stderr


def test_no_folder_of_the_repository_root_hides_an_installed_package():
    """Python run from the repository root (a script there, ``python -m pytest``) has the root on sys.path, so a
    package folder there would hide an installed package of the same name: the Triton kernels' former
    ``kernels/__init__.py`` hid Hugging Face's ``kernels``, and transformers failed to import. They live in
    kernels/triton/ now (installed as flatfast.kernels), and a root folder without __init__.py never wins over an
    installed package."""
    import importlib.util
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(flatfast.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").exists():
        pytest.skip("not a source checkout")
    packages = sorted(p.name for p in root.iterdir() if (p / "__init__.py").exists() and p.name != "flatfast")
    assert not packages, f"package folders in the repository root: {packages}"
    assert importlib.util.find_spec("flatfast.kernels") is not None  # the Triton kernels still ship under this name

    pytest.importorskip("transformers")
    script = ("import transformers, importlib.util\n"
              "from transformers import BertConfig, BertForSequenceClassification\n"
              "BertForSequenceClassification(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,"
              " intermediate_size=8, vocab_size=20))\n"
              "spec = importlib.util.find_spec('kernels')\n"
              "print('kernels from', None if spec is None else spec.origin)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert str(root / "kernels") not in done.stdout, done.stdout
