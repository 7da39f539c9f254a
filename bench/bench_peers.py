"""flatfast against the libraries users would otherwise pick, on the same model, data and probe budget as
bench_hessian.py (MLP 784-512-512-10, cross-entropy, 2,000 inputs in batches of 500, float32):

* trace with 100 Rademacher probes: PyHessian ``hessian(...).trace(maxIter=100, tol=-inf)`` (its stop test
  divides by the running mean without abs(), so tol=-inf forces the full budget), curvlinops
  ``hutchinson_trace(HessianLinearOperator(...), 100)``, flatfast ``hessian_trace(method="hutchinson", probes=100)``;
* the exact trace: BackPACK's ``DiagHessian`` (the exact Hessian diagonal) against flatfast ``method="exact"``;
* the top eigenvalue: scipy ``eigsh`` on curvlinops' operator against flatfast's Lanczos, both to tol 1e-3;
* one Hessian-vector product: curvlinops' operator against ``flatfast.hvp``.

Each flatfast row prints its ratio to the peer's time (below 1: flatfast is faster). The peers come with
``pip install torch==2.13.0 -e ".[bench]"``; a row whose package is missing is skipped, saying which.
"""
import copy

import numpy as np
import pytest
import torch

import flatfast

from conftest import N, PROBES

RESULTS = {}


def _curvlinops_operator(model, loader):
    curvlinops = pytest.importorskip("curvlinops", reason="curvlinops-for-pytorch is not installed")
    params = [p for p in model.parameters() if p.requires_grad]
    return curvlinops, curvlinops.HessianLinearOperator(model, torch.nn.CrossEntropyLoss(), params, loader,
                                                        check_deterministic=False, num_data=N)


# --- trace, 100 Rademacher probes ---------------------------------------------------------------------------

def test_trace_pyhessian(benchmark, setup):
    pyhessian = pytest.importorskip("pyhessian", reason="pyhessian is not installed")
    model, loader, _ = setup
    benchmark.group = "peers trace-100"
    benchmark.name = "peer-trace-pyhessian-100"
    model.eval()

    def run():
        h = pyhessian.hessian(model, torch.nn.CrossEntropyLoss(), dataloader=loader, cuda=False)
        return h.trace(maxIter=PROBES, tol=float("-inf"))

    samples = benchmark.pedantic(run, rounds=1, iterations=1)
    assert len(samples) == PROBES
    RESULTS["pyhessian"] = (float(np.mean(samples)), float(np.std(samples, ddof=1) / np.sqrt(len(samples))))
    benchmark.extra_info["value"] = round(RESULTS["pyhessian"][0], 4)


def test_trace_curvlinops(benchmark, setup):
    model, loader, _ = setup
    curvlinops, H = _curvlinops_operator(model, loader)
    benchmark.group = "peers trace-100"
    benchmark.name = "peer-trace-curvlinops-100"
    torch.manual_seed(0)
    value = benchmark.pedantic(lambda: float(curvlinops.hutchinson_trace(H, PROBES)), rounds=1, iterations=1)
    RESULTS["curvlinops"] = value
    benchmark.extra_info["value"] = round(value, 4)


def test_trace_flatfast(benchmark, setup):
    model, loader, _ = setup
    benchmark.group = "peers trace-100"
    benchmark.name = "peer-trace-flatfast-100"
    benchmark.extra_info["baseline"] = ["peer-trace-pyhessian-100", "peer-trace-curvlinops-100"]
    res = benchmark.pedantic(flatfast.hessian_trace, args=(model, loader),
                             kwargs=dict(probes=PROBES, method="hutchinson", block=25, progress=False),
                             rounds=1, iterations=1)
    benchmark.extra_info["value"] = f"{res.value:.4f} +- {res.stderr:.4f}"
    if "pyhessian" in RESULTS:  # independent estimates of one trace agree within their errors
        value, stderr = RESULTS["pyhessian"]
        assert abs(res.value - value) < 4 * np.hypot(res.stderr, stderr)
    if "curvlinops" in RESULTS:
        assert abs(res.value - RESULTS["curvlinops"]) < 4 * np.sqrt(2) * res.stderr


# --- exact trace ---------------------------------------------------------------------------------------------

def test_exact_trace_backpack(benchmark, setup):
    backpack = pytest.importorskip("backpack", reason="backpack-for-pytorch is not installed")
    from backpack.extensions import DiagHessian

    model, loader, _ = setup
    extended = backpack.extend(copy.deepcopy(model))  # BackPACK adds hooks; keep them off the shared model
    loss_fn = backpack.extend(torch.nn.CrossEntropyLoss())
    benchmark.group = "peers exact-trace"
    benchmark.name = "peer-exact-trace-backpack"

    def run():
        total = 0.0
        for x, y in loader:
            extended.zero_grad()
            with backpack.backpack(DiagHessian()):
                loss_fn(extended(x), y).backward()
            total += sum(float(p.diag_h.sum()) for p in extended.parameters()) * x.shape[0] / N
        return total

    RESULTS["backpack"] = benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info["value"] = round(RESULTS["backpack"], 4)


def test_exact_trace_flatfast(benchmark, setup):
    model, loader, _ = setup
    benchmark.group = "peers exact-trace"
    benchmark.name = "peer-exact-trace-flatfast"
    benchmark.extra_info["baseline"] = ["peer-exact-trace-backpack"]
    res = benchmark.pedantic(flatfast.hessian_trace, args=(model, loader), kwargs=dict(method="exact"), rounds=3,
                             iterations=1)
    benchmark.extra_info["value"] = round(res.value, 4)
    if "backpack" in RESULTS:  # both exact: float32 rounding only
        assert res.value == pytest.approx(RESULTS["backpack"], rel=1e-4)


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
