"""flatfast against the libraries users would otherwise pick, on the same model, data and probe budget as
bench_hessian.py (MLP 784-512-512-10, cross-entropy, 2,000 inputs in batches of 500, float32):

* trace with 100 Rademacher probes: PyHessian ``hessian(...).trace(maxIter=100, tol=-inf)`` (its stop test
  divides by the running mean without abs(), so tol=-inf forces the full budget), curvlinops
  ``hutchinson_trace(HessianLinearOperator(...), 100)``, flatfast ``hessian_trace(method="hutchinson", probes=100)``;
* the exact trace: BackPACK's ``DiagHessian`` (the exact Hessian diagonal) against flatfast ``method="exact"``;
* the top eigenvalue: scipy ``eigsh`` on curvlinops' operator against flatfast's Lanczos, both to tol 1e-3;
* one Hessian-vector product: curvlinops' operator against ``flatfast.hvp``.

Each flatfast row prints its ratio to the peer's time (below 1: flatfast is faster), on the CPU and, where a CUDA
device is present, on it too (rows end in -cpu / -cuda; the model and batches live on that device). The trace
rows also print flatfast's 100-probe trace against ``flatfast.hvp`` with 100 vectors. Median of 3 rounds after a
warm-up, except PyHessian (one round: it is the slowest by far). The peers come with
``pip install torch==2.13.0 -e ".[bench]"``; a row whose package is missing is skipped, saying which.
"""
import copy

import numpy as np
import pytest
import torch

import flatfast

from conftest import N, PROBES

RESULTS = {}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=DEVICES)
def peer(request, setup):
    """(device, model, batches, P): bench_hessian's model and data on each device present."""
    model, loader, P = setup
    device = request.param
    if device == "cpu":
        return device, model, loader, P
    moved = copy.deepcopy(model).to(device)
    return device, moved, [(x.to(device), y.to(device)) for x, y in loader], P


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(device, fn, *args, **kwargs):
    def run():
        out = fn(*args, **kwargs)
        _sync(device)
        return out

    return run


def _curvlinops_operator(model, loader):
    curvlinops = pytest.importorskip("curvlinops", reason="curvlinops-for-pytorch is not installed")
    params = [p for p in model.parameters() if p.requires_grad]
    return curvlinops, curvlinops.HessianLinearOperator(model, torch.nn.CrossEntropyLoss(), params, loader,
                                                        check_deterministic=False, num_data=N)


# --- trace, 100 Rademacher probes ---------------------------------------------------------------------------

def test_trace_pyhessian(benchmark, peer):
    pyhessian = pytest.importorskip("pyhessian", reason="pyhessian is not installed")
    device, model, loader, _ = peer
    benchmark.group = f"peers trace-100 {device}"
    benchmark.name = f"peer-trace-pyhessian-100-{device}"
    model.eval()

    def run():
        h = pyhessian.hessian(model, torch.nn.CrossEntropyLoss(), dataloader=loader, cuda=device == "cuda")
        return h.trace(maxIter=PROBES, tol=float("-inf"))

    samples = benchmark.pedantic(_timed(device, run), rounds=1, iterations=1)
    assert len(samples) == PROBES
    RESULTS["pyhessian", device] = (float(np.mean(samples)), float(np.std(samples, ddof=1) / np.sqrt(PROBES)))
    benchmark.extra_info["value"] = round(RESULTS["pyhessian", device][0], 4)


def test_trace_curvlinops(benchmark, peer):
    device, model, loader, _ = peer
    curvlinops, H = _curvlinops_operator(model, loader)
    benchmark.group = f"peers trace-100 {device}"
    benchmark.name = f"peer-trace-curvlinops-100-{device}"
    torch.manual_seed(0)
    value = benchmark.pedantic(_timed(device, lambda: float(curvlinops.hutchinson_trace(H, PROBES))), rounds=3,
                               iterations=1, warmup_rounds=1)
    RESULTS["curvlinops", device] = value
    benchmark.extra_info["value"] = round(value, 4)


def test_hvp_100_vectors_flatfast(benchmark, peer):
    """The floor of a 100-probe trace: flatfast.hvp with the same 100 vectors in one call."""
    device, model, loader, P = peer
    V = torch.randn(PROBES, P, generator=torch.Generator().manual_seed(1)).to(device)
    benchmark.group = f"peers trace-100 {device}"
    benchmark.name = f"peer-hvp-100-vectors-flatfast-{device}"
    benchmark.pedantic(_timed(device, flatfast.hvp, model, loader, V), rounds=3, iterations=1, warmup_rounds=1)


def test_trace_flatfast(benchmark, peer):
    device, model, loader, _ = peer
    benchmark.group = f"peers trace-100 {device}"
    benchmark.name = f"peer-trace-flatfast-100-{device}"
    benchmark.extra_info["baseline"] = [f"peer-hvp-100-vectors-flatfast-{device}",
                                        f"peer-trace-pyhessian-100-{device}", f"peer-trace-curvlinops-100-{device}"]
    res = benchmark.pedantic(_timed(device, flatfast.hessian_trace, model, loader, probes=PROBES,
                                    method="hutchinson", progress=False), rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["value"] = f"{res.value:.4f} +- {res.stderr:.4f}"
    if ("pyhessian", device) in RESULTS:  # independent estimates of one trace agree within their errors
        value, stderr = RESULTS["pyhessian", device]
        assert abs(res.value - value) < 4 * np.hypot(res.stderr, stderr)
    if ("curvlinops", device) in RESULTS:
        assert abs(res.value - RESULTS["curvlinops", device]) < 4 * np.sqrt(2) * res.stderr


# --- exact trace ---------------------------------------------------------------------------------------------

def test_exact_trace_backpack(benchmark, peer):
    backpack = pytest.importorskip("backpack", reason="backpack-for-pytorch is not installed")
    from backpack.extensions import DiagHessian

    device, model, loader, _ = peer
    extended = backpack.extend(copy.deepcopy(model))  # BackPACK adds hooks; keep them off the shared model
    loss_fn = backpack.extend(torch.nn.CrossEntropyLoss())
    benchmark.group = f"peers exact-trace {device}"
    benchmark.name = f"peer-exact-trace-backpack-{device}"

    def run():
        total = 0.0
        for x, y in loader:
            extended.zero_grad()
            with backpack.backpack(DiagHessian()):
                loss_fn(extended(x), y).backward()
            total += sum(float(p.diag_h.sum()) for p in extended.parameters()) * x.shape[0] / N
        return total

    RESULTS["backpack", device] = benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info["value"] = round(RESULTS["backpack", device], 4)


def test_exact_trace_flatfast(benchmark, peer):
    device, model, loader, _ = peer
    benchmark.group = f"peers exact-trace {device}"
    benchmark.name = f"peer-exact-trace-flatfast-{device}"
    benchmark.extra_info["baseline"] = [f"peer-exact-trace-backpack-{device}"]
    res = benchmark.pedantic(_timed(device, flatfast.hessian_trace, model, loader), rounds=3, iterations=1)
    assert res.method == "exact"  # the default route for this ReLU MLP
    benchmark.extra_info["value"] = round(res.value, 4)
    if ("backpack", device) in RESULTS:  # both exact: float32 rounding only
        assert res.value == pytest.approx(RESULTS["backpack", device], rel=1e-4)


# --- top eigenvalue and one product ------------------------------------------------------------------------

def test_top_eigenvalue_curvlinops(benchmark, setup):
    from scipy.sparse.linalg import eigsh

    model, loader, _ = setup
    _, H = _curvlinops_operator(model, loader)
    benchmark.group = "peers top-eigenvalue"
    benchmark.name = "peer-top-eigenvalue-curvlinops-eigsh"
    value = benchmark.pedantic(lambda: float(eigsh(H.to_scipy(), k=1, which="LA", tol=1e-3,
                                                   return_eigenvectors=False)[0]), rounds=1, iterations=1)
    RESULTS["eigsh"] = value
    benchmark.extra_info["value"] = round(value, 4)


def test_top_eigenvalue_flatfast(benchmark, setup):
    model, loader, _ = setup
    benchmark.group = "peers top-eigenvalue"
    benchmark.name = "peer-top-eigenvalue-flatfast"
    benchmark.extra_info["baseline"] = ["peer-top-eigenvalue-curvlinops-eigsh"]
    res = benchmark.pedantic(flatfast.hessian_eigenvalues, args=(model, loader), kwargs=dict(k=1, tol=1e-3),
                             rounds=1, iterations=1)
    benchmark.extra_info["value"] = round(float(res.values[0]), 4)
    if "eigsh" in RESULTS:
        assert float(res.values[0]) == pytest.approx(RESULTS["eigsh"], rel=1e-2)


def test_hvp_curvlinops(benchmark, setup):
    model, loader, P = setup
    _, H = _curvlinops_operator(model, loader)
    v = torch.randn(P, generator=torch.Generator().manual_seed(5))
    benchmark.group = "peers hvp"
    benchmark.name = "peer-hvp-curvlinops"
    RESULTS["hv"] = benchmark.pedantic(lambda: H @ v, rounds=3, iterations=1, warmup_rounds=1)


def test_hvp_flatfast(benchmark, setup):
    model, loader, P = setup
    v = torch.randn(P, generator=torch.Generator().manual_seed(5))
    benchmark.group = "peers hvp"
    benchmark.name = "peer-hvp-flatfast"
    benchmark.extra_info["baseline"] = ["peer-hvp-curvlinops"]
    hv = benchmark.pedantic(flatfast.hvp, args=(model, loader, v), rounds=3, iterations=1, warmup_rounds=1)
    if "hv" in RESULTS:
        ref = RESULTS["hv"].reshape(-1)
        assert float(torch.linalg.norm(hv - ref) / torch.linalg.norm(ref)) < 1e-4
