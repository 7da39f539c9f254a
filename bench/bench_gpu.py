"""GPU rows, each against its GPU floor measured in the same run: the NNGP kernel against a cuBLAS GEMM
(X @ X.T) of the same dtype, EP against a cuSOLVER Cholesky of the same K (and its peak memory), log P(f) of
60,000 points, one HVP and a 100-probe trace against a forward+backward pass.
Without a CUDA device the whole module is skipped, saying so; first run on an H100 with `.ci/gpu`."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device: GPU benchmark rows skipped", allow_module_level=True)

import flatfast  # noqa: E402

D = 784


def _synced(fn, *args, **kwargs):
    def run():
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out

    return run


@pytest.fixture(scope="module", params=[(5000, "float64"), (20000, "float64"), (5000, "float32"),
                                        (20000, "float32")], ids=lambda p: f"n{p[0]}-{p[1]}")
def points(request):
    n, dtype = request.param
    generator = torch.Generator("cuda").manual_seed(0)
    return torch.rand(n, D, dtype=getattr(torch, dtype), device="cuda", generator=generator)


def _kernel_group(points):
    return f"gpu nngp {str(points.dtype).replace('torch.', '')} n={points.shape[0]}"


def test_gpu_gemm_floor(benchmark, points):
    benchmark.group = _kernel_group(points)
    benchmark.name = f"gpu-gemm-floor-{benchmark.group.split()[2]}-n{points.shape[0]}"
    benchmark.pedantic(_synced(torch.matmul, points, points.T), rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("route", ["auto", "triton-fused", "cuda"])
def test_gpu_nngp(benchmark, points, route):
    """auto = Triton's GEMM + in-place epilogue; triton-fused = the single tile kernel; cuda = CUDA C++."""
    from flatfast.kernels.nngp_triton import nngp_kernel_triton

    backend = "triton" if route == "triton-fused" else route
    status = flatfast.backends()["nngp"].get(backend, "available") if backend != "auto" else "available"
    if status.startswith("unavailable"):
        pytest.skip(status)
    n, kind = points.shape[0], str(points.dtype).replace("torch.", "")
    benchmark.group = _kernel_group(points)
    benchmark.name = f"gpu-nngp-{route}-{kind}-n{n}"
    benchmark.extra_info["baseline"] = [f"gpu-gemm-floor-{kind}-n{n}"]
    if route == "triton-fused":
        run = _synced(nngp_kernel_triton, points, None, 2, 2.0, 1.0, fused=True)
    else:
        run = _synced(flatfast.nngp_kernel, points, depth=2, backend=backend, dtype=points.dtype)
    K = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    ref = flatfast.nngp_kernel(points[:200].double().cpu().numpy(), depth=2, backend="reference")
    assert np.allclose(K[:200, :200].double().cpu().numpy(), ref, rtol=1e-10 if kind == "float64" else 2e-5)
    del K


def _problem_on_gpu(n):
    generator = torch.Generator("cuda").manual_seed(n)
    X = torch.rand(n, D, dtype=torch.float64, device="cuda", generator=generator)
    y = torch.where(X[:, : D // 2].sum(1) > X[:, D // 2:].sum(1), 1, -1).cpu().numpy()
    return X, y


@pytest.mark.parametrize("n", [10000, 20000, 30000, 40000])
def test_gpu_ep_against_cholesky(benchmark, n):
    """EP in Cholesky-equivalents (torch.linalg.cholesky_ex, cuSOLVER POTRF, of the same K) and its peak memory
    in n x n float64 arrays (K and cupy's peak for EP, watched by a memory hook)."""
    cupy = pytest.importorskip("cupy")
    X, y = _problem_on_gpu(n)
    K = flatfast.nngp_kernel(X)
    del X
    import time

    floor = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        L, _ = torch.linalg.cholesky_ex(K)
        torch.cuda.synchronize()
        floor.append(time.perf_counter() - t0)
        del L
    torch.cuda.empty_cache()
    shared = {"K": cupy.from_dlpack(K)}  # the same memory as K

    def ep():
        res = flatfast.ep_log_evidence(shared["K"], y, check_psd=False, return_info=True)
        cupy.cuda.Device().synchronize()
        return res

    from flatfast.testing import cupy_peak_memory

    peak = cupy_peak_memory(cupy)
    with peak.hook:
        res = benchmark.pedantic(ep, rounds=3 if n <= 20000 else 1, iterations=1, warmup_rounds=1 if n <= 20000
                                 else 0)
    benchmark.group = "gpu ep"
    benchmark.name = f"gpu-ep-n{n}"
    benchmark.extra_info["cholesky_equivalents"] = round(benchmark.stats.stats.median / float(np.median(floor)), 2)
    benchmark.extra_info["cholesky_ms"] = round(1e3 * float(np.median(floor)), 1)
    benchmark.extra_info["sweeps"] = res.sweeps
    benchmark.extra_info["peak_arrays"] = round((K.numel() * 8 + peak.peak) / (8.0 * n * n), 3)
    shared.clear()
    del K
    cupy.get_default_memory_pool().free_all_blocks()
    torch.cuda.empty_cache()


def test_gpu_log_prior_all_of_mnist(benchmark):
    """log P(f) of n = 60,000 points (MNIST's training set size), kernel included, from a CUDA tensor: the
    seconds (one run; the issue's target is under 60 s on an 80 GB H100)."""
    pytest.importorskip("cupy")
    n = 60000
    free, total = torch.cuda.mem_get_info()
    if free < 2.05 * 8 * n * n:
        pytest.skip(f"needs {2.05 * 8 * n * n / 2**30:.0f} GiB free on the device, has {free / 2**30:.0f}")
    X, y = _problem_on_gpu(n)
    benchmark.group = "gpu log_prior"
    benchmark.name = f"gpu-log-prior-n{n}"
    res = benchmark.pedantic(_synced(flatfast.log_prior, X, y, return_info=True), rounds=1, iterations=1)
    benchmark.extra_info["seconds"] = round(benchmark.stats.stats.median, 1)
    benchmark.extra_info["sweeps"] = res.sweeps
    benchmark.extra_info["log_z"] = round(res.log_z, 3)
    # past n = 46,340 an entry's offset needs 64 bits: the far corners of K against the reference kernel
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()
    K = flatfast.nngp_kernel(X)
    corner = torch.as_tensor(np.r_[0:100, n - 100:n], device="cuda")
    reference = flatfast.nngp_kernel(X[corner].cpu().numpy(), backend="reference")
    error = float(np.max(np.abs(K[corner][:, corner].cpu().numpy() - reference)))
    benchmark.extra_info["corner_max_abs_error"] = float(f"{error:.2g}")
    assert error <= 1e-12, error


def test_gpu_mixed_precision_sweeps(benchmark):
    """Whether float32 pays on the GPU: float32 EP's site changes per sweep on cupy at n = 10000, and one sweep's
    cubic work (POTRF, then diag(B^-1) by triangular solves) timed in float32 against float64 on the same K."""
    cupy = pytest.importorskip("cupy")
    from flatfast.prior import ep as _ep
    from flatfast.backend.xp import linalg_for, scaled_system_blocked

    n = 10000
    X, y = _problem_on_gpu(n)
    K = flatfast.nngp_kernel(X)
    K32 = cupy.from_dlpack(K).astype(cupy.float32)
    work32 = cupy.empty_like(K32)
    la = linalg_for(cupy)
    res = _ep._ep_sweeps(K32, cupy.asarray(y * 1.0), tol=1e-6, max_sweeps=25, site_tol=None, init=None, shift=0.0,
                         work=work32, la=la, rough=True)
    print(f"\ncupy float32 EP at n={n}: {res.sweeps} sweeps, last site change {res.max_site_change:.3g}, "
          f"log Z history {[round(v, 2) for v in res.log_z_history]}")

    def cubic_work(source, B):
        scaled_system_blocked(cupy, source, cupy.full(n, 0.5), B)
        W, _ = la.inverse_cholesky_inplace(B)
        la.column_norms_sq(W)
        cupy.cuda.Device().synchronize()

    import time

    K64 = cupy.from_dlpack(K)
    seconds = {}
    for source, B in ((K64, cupy.empty_like(K64)), (K32, work32)):
        cubic_work(source, B)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            cubic_work(source, B)
            times.append(time.perf_counter() - t0)
        seconds[B.dtype.name] = float(np.median(times))
        del B
    print(f"cupy float32 EP: one sweep's POTRF + diag(B^-1) at n={n}: float64 {1e3 * seconds['float64']:.1f} ms, "
          f"float32 {1e3 * seconds['float32']:.1f} ms (float32 / float64 = "
          f"{seconds['float32'] / seconds['float64']:.2f})")
    benchmark.group = "gpu ep"
    benchmark.name = "gpu-ep-sweep-cubic-float32-n10000"
    benchmark.extra_info["float64_ms"] = round(1e3 * seconds["float64"], 1)
    benchmark.extra_info["float32_sweeps"] = res.sweeps
    benchmark.extra_info["float32_last_site_change"] = round(res.max_site_change, 4)
    benchmark.pedantic(cubic_work, args=(K32, work32), rounds=3, iterations=1)


@pytest.fixture(scope="module")
def mlp_setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                                torch.nn.ReLU(), torch.nn.Linear(512, 10)).cuda()
    X = torch.rand(20000, 784, device="cuda")
    y = torch.randint(0, 10, (20000,), device="cuda")
    loader = [(X[i: i + 5000], y[i: i + 5000]) for i in range(0, 20000, 5000)]
    return model, loader, sum(p.numel() for p in model.parameters())


def _forward_backward(model, loader):
    model.zero_grad()
    for x, y in loader:
        (torch.nn.functional.cross_entropy(model(x), y) * x.shape[0] / 20000).backward()
    torch.cuda.synchronize()


def test_gpu_forward_backward_floor(benchmark, mlp_setup):
    model, loader, _ = mlp_setup
    benchmark.group = "gpu hessian"
    benchmark.name = "gpu-forward-backward"
    benchmark.pedantic(_forward_backward, args=(model, loader), rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda", "generic"])
def test_gpu_hvp(benchmark, mlp_setup, backend):
    status = flatfast.backends()["mlp_hvp"].get(backend, "available")
    if status.startswith("unavailable"):
        pytest.skip(status)
    model, loader, P = mlp_setup
    V = torch.randn(1, P, device="cuda")
    benchmark.group = "gpu hessian"
    benchmark.name = f"gpu-hvp-{backend}"
    benchmark.extra_info["baseline"] = ["gpu-forward-backward"]
    benchmark.pedantic(_synced(flatfast.hvp, model, loader, V, backend=backend), rounds=3, iterations=1,
                       warmup_rounds=1)


def test_gpu_hvp_100_vectors(benchmark, mlp_setup):
    """The products a 100-probe trace is made of, as one call: the trace's floor."""
    model, loader, P = mlp_setup
    V = torch.randn(100, P, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    benchmark.group = "gpu hessian"
    benchmark.name = "gpu-hvp-100-vectors"
    benchmark.extra_info["baseline"] = ["gpu-forward-backward"]
    benchmark.pedantic(_synced(flatfast.hvp, model, loader, V), rounds=3, iterations=1, warmup_rounds=1)


def test_gpu_trace_100_probes(benchmark, mlp_setup):
    model, loader, _ = mlp_setup
    benchmark.group = "gpu hessian"
    benchmark.name = "gpu-trace-hutchinson-100"
    benchmark.extra_info["baseline"] = ["gpu-forward-backward", "gpu-hvp-100-vectors"]
    res = benchmark.pedantic(_synced(flatfast.hessian_trace, model, loader, probes=100, method="hutchinson",
                                     progress=False), rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["value"] = round(res.value, 4)
