"""NNGP kernel: the native CPU kernel against the numpy reference and against the bare X X^T GEMM (the floor)."""
import numpy as np
import pytest

import flatfast
from flatfast.backend.native import load_cpp
from flatfast.reference.nngp import nngp_kernel_reference

D = 784


@pytest.fixture(scope="module", params=[2000, 5000], ids=lambda n: f"n{n}")
def inputs(request):
    return np.random.default_rng(0).random((request.param, D))


def _name(inputs, what):
    return f"nngp-{what}-n{inputs.shape[0]}"


def test_gemm_floor(benchmark, inputs):
    benchmark.group = f"nngp n={inputs.shape[0]}"
    benchmark.name = _name(inputs, "gemm-floor")
    benchmark(lambda: inputs @ inputs.T)


def test_reference(benchmark, inputs):
    benchmark.group = f"nngp n={inputs.shape[0]}"
    benchmark.name = _name(inputs, "reference")
    benchmark.extra_info["baseline"] = [_name(inputs, "gemm-floor")]
    benchmark.pedantic(nngp_kernel_reference, args=(inputs, None, 2), rounds=2, iterations=1)


def test_cpp(benchmark, inputs):
    benchmark.group = f"nngp n={inputs.shape[0]}"
    benchmark.name = _name(inputs, "cpp")
    benchmark.extra_info["baseline"] = [_name(inputs, "gemm-floor"), _name(inputs, "reference")]
    module = load_cpp()[0]
    if module is not None:  # which build ran: OpenMP or std::thread workers (FLATFAST_OPENMP=OFF), and threads
        benchmark.extra_info["threading"] = f"{module.threading()} x {module.num_threads()}"
    K = benchmark(flatfast.nngp_kernel, inputs, depth=2, backend="cpp")
    assert np.allclose(K[:50, :50], nngp_kernel_reference(inputs[:50], None, 2), rtol=1e-12)


def test_cpp_float32(benchmark, inputs):
    X32 = inputs.astype(np.float32)
    benchmark.group = f"nngp n={inputs.shape[0]}"
    benchmark.name = _name(inputs, "cpp-float32")
    benchmark.extra_info["baseline"] = [_name(inputs, "cpp")]
    benchmark(flatfast.nngp_kernel, X32, depth=2, backend="cpp", dtype=np.float32)
