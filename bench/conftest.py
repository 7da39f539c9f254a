"""Benchmark reporting: every claim is a ratio against a floor measured in the same run.

A benchmark declares its group and, for each comparison, ``benchmark.extra_info["baseline"] = name`` of the
benchmark it is measured against (same group). The terminal summary prints median(this) / median(baseline).
"""
import os
import platform

import pytest

N, BATCH, PROBES = 2000, 500, 100


@pytest.fixture(scope="module")
def setup():
    """The benchmarks' model and data: MLP 784-512-512-10, cross-entropy, 2,000 inputs in batches of 500,
    float32 (returns model, loader, number of parameters)."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                                torch.nn.ReLU(), torch.nn.Linear(512, 10))
    X = torch.rand(N, 784)
    y = torch.randint(0, 10, (N,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=BATCH)
    P = sum(p.numel() for p in model.parameters())
    return model, loader, P


def forward_backward(model, loader):
    """One forward+backward pass of the dataset-mean loss: the floor the Hessian rows are measured against."""
    import torch

    model.zero_grad()
    for x, y in loader:
        (torch.nn.functional.cross_entropy(model(x), y) * x.shape[0] / N).backward()


def pytest_benchmark_update_machine_info(config, machine_info):
    import numpy as np

    machine_info["flatfast_numpy"] = np.__version__
    machine_info["flatfast_cpus"] = os.cpu_count()
    machine_info["flatfast_platform"] = platform.platform()


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    medians = {}
    for bench in session.benchmarks:
        if bench.stats is None or not getattr(bench.stats, "rounds", 0):
            continue
        medians[bench.name] = bench.stats.median
    lines = []
    for bench in session.benchmarks:
        base = bench.extra_info.get("baseline")
        if bench.name not in medians:
            continue
        for name in ([base] if isinstance(base, str) else list(base or [])):
            if name in medians:
                lines.append(f"{bench.name:<55} {medians[bench.name] / medians[name]:8.3f} x  {name}")
        for key, value in sorted(bench.extra_info.items()):
            if key != "baseline":
                lines.append(f"{bench.name:<55} {key} = {value}")
    if lines:
        terminalreporter.write_sep("=", "flatfast ratios (median / median of the named baseline, same run)")
        for line in lines:
            terminalreporter.write_line(line)
