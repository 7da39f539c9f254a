"""Hessian engine on an MLP 784-512-512-10, cross-entropy, 2,000 inputs in batches of 500, float32.

(a) one HVP and 16 batched HVPs against one forward+backward pass over the same data;
(b) trace with 100 Rademacher probes, and the exact trace, against each other (the peers' rows are in
    bench_peers.py);
(c) the top eigenvalue by Lanczos.
"""
import numpy as np
import pytest
import torch

import flatfast

from conftest import N, PROBES, forward_backward as _forward_backward


def test_forward_backward_floor(benchmark, setup):
    model, loader, _ = setup
    benchmark.group = "hessian"
    benchmark.name = "hessian-forward-backward"
    benchmark(_forward_backward, model, loader)


@pytest.mark.parametrize("backend", ["torch", "cpp", "generic"])
@pytest.mark.parametrize("k", [1, 16])
def test_hvp(benchmark, setup, k, backend):
    model, loader, P = setup
    V = torch.randn(k, P)
    benchmark.group = "hessian"
    benchmark.name = f"hessian-hvp-k{k}-{backend}"
    baselines = ["hessian-forward-backward"]
    if k > 1:
        baselines.append(f"hessian-hvp-k1-{backend}")
    benchmark.extra_info["baseline"] = baselines
    benchmark.pedantic(flatfast.hvp, args=(model, loader, V), kwargs=dict(backend=backend), rounds=3, iterations=1)


def test_trace_flatfast(benchmark, setup):
    model, loader, _ = setup
    benchmark.group = "hessian-trace"
    benchmark.name = "trace-flatfast-hutchinson-100"
    res = benchmark.pedantic(flatfast.hessian_trace, args=(model, loader),
                             kwargs=dict(probes=PROBES, method="hutchinson", block=25, progress=False),
                             rounds=1, iterations=1)
    benchmark.extra_info["value"] = round(res.value, 4)
    benchmark.extra_info["stderr"] = round(res.stderr, 4)
    setup_results["flatfast"] = res


setup_results = {}


def test_trace_exact(benchmark, setup):
    """Not a Rademacher estimate: the exact trace of a ReLU MLP (Hessian diagonal = Gauss-Newton diagonal)."""
    model, loader, _ = setup
    benchmark.group = "hessian-trace"
    benchmark.name = "trace-flatfast-exact"
    benchmark.extra_info["baseline"] = ["trace-flatfast-hutchinson-100"]
    res = benchmark.pedantic(flatfast.hessian_trace, args=(model, loader), kwargs=dict(method="exact"),
                             rounds=3, iterations=1)
    benchmark.extra_info["value"] = round(res.value, 4)
    ours = setup_results.get("flatfast")
    if ours is not None:
        assert abs(ours.value - res.value) < 4 * ours.stderr


def test_top_eigenvalue(benchmark, setup):
    model, loader, _ = setup
    benchmark.group = "hessian"
    benchmark.name = "hessian-top-eigenvalue"
    benchmark.extra_info["baseline"] = ["hessian-forward-backward"]
    res = benchmark.pedantic(flatfast.hessian_eigenvalues, args=(model, loader), kwargs=dict(k=1, tol=1e-3),
                             rounds=1, iterations=1)
    benchmark.extra_info["top_eigenvalue"] = float(res.values[0])
    benchmark.extra_info["lanczos_iterations"] = res.iterations
    benchmark.extra_info["residual"] = float(res.residuals[0])
