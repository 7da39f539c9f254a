"""GPU rows, each against its GPU floor measured in the same run: the NNGP kernel against a cuBLAS GEMM
(X @ X.T), EP against a cuSOLVER Cholesky (cupy), one HVP and a 100-probe trace against a forward+backward pass.
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


@pytest.fixture(scope="module", params=[5000, 20000], ids=lambda n: f"n{n}")
def points(request):
    return torch.rand(request.param, D, dtype=torch.float64, device="cuda", generator=None)


def test_gpu_gemm_floor(benchmark, points):
    benchmark.group = f"gpu nngp n={points.shape[0]}"
    benchmark.name = f"gpu-gemm-floor-n{points.shape[0]}"
    benchmark.pedantic(_synced(torch.matmul, points, points.T), rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
def test_gpu_nngp(benchmark, points, backend):
    status = flatfast.backends()["nngp"].get(backend, "available") if backend != "auto" else "available"
    if status.startswith("unavailable"):
        pytest.skip(status)
    n = points.shape[0]
    benchmark.group = f"gpu nngp n={n}"
    benchmark.name = f"gpu-nngp-{backend}-n{n}"
    benchmark.extra_info["baseline"] = [f"gpu-gemm-floor-n{n}"]
    K = benchmark.pedantic(_synced(flatfast.nngp_kernel, points, depth=2, backend=backend), rounds=5, iterations=1,
                           warmup_rounds=1)
    ref = flatfast.nngp_kernel(points[:200].cpu().numpy(), depth=2, backend="reference")
    assert np.allclose(K[:200, :200].cpu().numpy(), ref, rtol=1e-10)


@pytest.mark.parametrize("precision", ["float64", "mixed"])
def test_gpu_ep_against_cholesky(benchmark, precision):
    cupy = pytest.importorskip("cupy")
    n = 10000
    X = np.random.default_rng(0).random((n, D))
    y = np.where(X[:, : D // 2].sum(1) > X[:, D // 2:].sum(1), 1, -1)
    K = cupy.asarray(flatfast.nngp_kernel(X))

    def cholesky():
        cupy.linalg.cholesky(K)
        cupy.cuda.Device().synchronize()

    def ep():
        res = flatfast.ep_log_evidence(K, y, check_psd=False, return_info=True, precision=precision)
        cupy.cuda.Device().synchronize()
        return res

    import time

    floor = []
    for _ in range(4):
        t0 = time.perf_counter()
        cholesky()
        floor.append(time.perf_counter() - t0)
    benchmark.group = "gpu ep"
    benchmark.name = f"gpu-ep-{precision}-n{n}"
    res = benchmark.pedantic(ep, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["cholesky_equivalents"] = round(benchmark.stats.stats.median / float(np.median(floor[1:])), 2)
    benchmark.extra_info["sweeps"] = f"{res.sweeps} ({res.float32_sweeps} in float32)"


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


def test_gpu_trace_100_probes(benchmark, mlp_setup):
    model, loader, _ = mlp_setup
    benchmark.group = "gpu hessian"
    benchmark.name = "gpu-trace-hutchinson-100"
    benchmark.extra_info["baseline"] = ["gpu-forward-backward"]
    res = benchmark.pedantic(_synced(flatfast.hessian_trace, model, loader, probes=100, method="hutchinson",
                                     block=25, progress=False), rounds=1, iterations=1, warmup_rounds=1)
    benchmark.extra_info["value"] = round(res.value, 4)
