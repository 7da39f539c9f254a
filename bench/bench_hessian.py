"""Hessian engine on an MLP 784-512-512-10, cross-entropy, 2,000 inputs in batches of 500, float32.

(a) one HVP and 16 batched HVPs against one forward+backward pass over the same data;
(b) trace with 100 Rademacher probes, and the exact trace, against each other (the peers' rows are in
    bench_peers.py);
(c) the top eigenvalue by Lanczos;
(d) on a small ReLU ResNet (BatchNorm in eval mode, pooling), the exact trace against 100-probe Hutchinson and
    against one forward+backward pass.
"""
import pytest
import torch

import flatfast

from conftest import PROBES, forward_backward as _forward_backward


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


# --- (d) the exact trace of a ReLU ResNet ----------------------------------------------------------------------

RESNET_N, RESNET_BATCH, RESNET_CLASSES = 256, 64, 10


class _BasicBlock(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(channels)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


@pytest.fixture(scope="module")
def resnet():
    """A small ReLU ResNet (stem conv, two basic blocks with BatchNorm in eval mode, max and adaptive average
    pooling, 10 classes; about 10k parameters) on 256 random 3x16x16 images in batches of 64, float32."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), _BasicBlock(16),
                                torch.nn.MaxPool2d(2), _BasicBlock(16), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(16, RESNET_CLASSES)).eval()
    X = torch.randn(RESNET_N, 3, 16, 16)
    y = torch.randint(0, RESNET_CLASSES, (RESNET_N,))
    return model, [(X[i:i + RESNET_BATCH], y[i:i + RESNET_BATCH]) for i in range(0, RESNET_N, RESNET_BATCH)]


def _resnet_forward_backward(model, loader):
    model.zero_grad()
    for x, y in loader:
        (torch.nn.functional.cross_entropy(model(x), y) * x.shape[0] / RESNET_N).backward()


resnet_results = {}


def test_resnet_forward_backward_floor(benchmark, resnet):
    benchmark.group = "resnet-trace"
    benchmark.name = "resnet-forward-backward"
    benchmark.pedantic(_resnet_forward_backward, args=resnet, rounds=5, iterations=1, warmup_rounds=1)


def test_resnet_trace_hutchinson(benchmark, resnet):
    model, loader = resnet
    benchmark.group = "resnet-trace"
    benchmark.name = "resnet-trace-hutchinson-100"
    benchmark.extra_info["baseline"] = ["resnet-forward-backward"]
    res = benchmark.pedantic(flatfast.hessian_trace, args=(model, loader),
                             kwargs=dict(probes=PROBES, method="hutchinson", block=25, progress=False),
                             rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["value"] = round(res.value, 4)
    benchmark.extra_info["stderr"] = round(res.stderr, 4)
    resnet_results["hutchinson"] = res


def test_resnet_trace_exact(benchmark, resnet):
    """About C = 10 backward passes with per-example gradient norms, against the floor and the estimate."""
    model, loader = resnet
    benchmark.group = "resnet-trace"
    benchmark.name = "resnet-trace-exact"
    benchmark.extra_info["baseline"] = ["resnet-forward-backward", "resnet-trace-hutchinson-100"]
    res = benchmark.pedantic(flatfast.hessian_trace, args=(model, loader), kwargs=dict(method="exact"),
                             rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["value"] = round(res.value, 4)
    estimate = resnet_results.get("hutchinson")
    if estimate is not None:  # the estimate must cover the exact value
        assert abs(estimate.value - res.value) < 4 * estimate.stderr


def _probe(model, loader):
    from flatfast.curvature.operator import HessianOperator

    return HessianOperator(model, loader).probe()


def test_resnet_behaviour_probe(benchmark, resnet):
    """What every curvature call now pays first: the first batch twice (the loss must be a function) and in two
    halves (may the examples be taken one at a time?), as a fraction of one trace and of one forward+backward."""
    model, loader = resnet
    benchmark.group = "resnet-trace"
    benchmark.name = "resnet-behaviour-probe"
    benchmark.extra_info["baseline"] = ["resnet-forward-backward", "resnet-trace-exact", "resnet-trace-hutchinson-100"]
    benchmark.pedantic(_probe, args=(model, loader), rounds=5, iterations=1, warmup_rounds=1)


def test_mlp_behaviour_probe(benchmark, setup):
    model, loader, _ = setup
    benchmark.group = "hessian-trace"
    benchmark.name = "mlp-behaviour-probe"
    benchmark.extra_info["baseline"] = ["trace-flatfast-exact", "trace-flatfast-hutchinson-100"]
    benchmark.pedantic(_probe, args=(model, loader), rounds=5, iterations=1, warmup_rounds=1)
