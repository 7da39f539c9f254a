"""log P(f) by EP at n = 1000, 2000, 5000, 10000 (d = 784, depth 2, linear-rule labels), in units of one
Cholesky of the same-size matrix K + I measured in the same run: scipy.linalg.cholesky(lower=True,
check_finite=False), warmed up, median of 5. One EP sweep needs one POTRF and one TRTRI of that size.

Rows: log_prior in float64 (the default) and with precision="mixed" (float32 early sweeps), each the median of 3
after a warm-up (n = 10000: one round, no warm-up, ~2 minutes each); extra_info prints the sweeps (of them in
float32), EP's own time in Cholesky-equivalents (the total includes the kernel), and log Z. A further row solves
six labellings of the same inputs (each 5 % away from the first) as one 2-D y, where each starts from the
nearest solved one, against six separate calls. Agreement with the sequential-EP oracle to 1e-8 relative is a
test (n <= 500), and mixed against float64 to 1e-8 relative is asserted here."""
import statistics

import numpy as np
import pytest
import scipy.linalg

import flatfast

D = 784
FLOORS = {}


@pytest.fixture(scope="module", params=[1000, 2000, 5000, 10000], ids=lambda n: f"n{n}")
def problem(request):
    n = request.param
    X = np.random.default_rng(0).random((n, D))
    y = np.where(X[:, : D // 2].sum(1) > X[:, D // 2:].sum(1), 1, -1)  # a linear-rule labelling
    return X, y


def test_cholesky_floor(benchmark, problem):
    X, _ = problem
    n = X.shape[0]
    K_plus_I = flatfast.nngp_kernel(X) + np.eye(n)
    benchmark.group = f"log_prior n={n}"
    benchmark.name = f"prior-cholesky-n{n}"
    benchmark.pedantic(scipy.linalg.cholesky, args=(K_plus_I,), kwargs=dict(lower=True, check_finite=False),
                       rounds=5, iterations=1, warmup_rounds=1)
    FLOORS[n] = benchmark.stats.stats.median


@pytest.mark.parametrize("precision", ["float64", "mixed"])
def test_log_prior(benchmark, problem, precision):
    X, y = problem
    n = X.shape[0]
    benchmark.group = f"log_prior n={n}"
    benchmark.name = f"prior-log_prior-{precision}-n{n}"
    benchmark.extra_info["baseline"] = [f"prior-cholesky-n{n}"]
    ep_seconds = []

    def run():
        res = flatfast.log_prior(X, y, return_info=True, precision=precision)
        ep_seconds.append(res.seconds)
        return res

    big = n >= 10000
    res = benchmark.pedantic(run, rounds=1 if big else 3, iterations=1, warmup_rounds=0 if big else 1)
    assert res.converged
    benchmark.extra_info["sweeps"] = f"{res.sweeps} ({res.float32_sweeps} in float32)"
    if n in FLOORS:
        benchmark.extra_info["ep_only_cholesky_equivalents"] = round(statistics.median(ep_seconds) / FLOORS[n], 2)
    benchmark.extra_info["log_z"] = round(res.log_z, 6)
    if precision == "mixed":
        reference = flatfast.log_prior(X, y)
        assert abs(res.log_z - reference) <= 1e-8 * abs(reference), (res.log_z, reference)


@pytest.fixture(scope="module")
def six_labellings():
    n = 2000
    rng = np.random.default_rng(1)
    X = rng.random((n, D))
    y = np.where(X[:, : D // 2].sum(1) > X[:, D // 2:].sum(1), 1, -1)
    Y = np.array([y] + [np.where(rng.random(n) < 0.05, -y, y) for _ in range(5)])
    return flatfast.nngp_kernel(X), Y


def test_six_labellings_separately(benchmark, six_labellings):
    K, Y = six_labellings
    benchmark.group = "log_prior six labellings n=2000"
    benchmark.name = "prior-six-separate-calls"
    results = benchmark.pedantic(lambda: [flatfast.ep_log_evidence(K, y, return_info=True, check_psd=False)
                                          for y in Y], rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["sweeps"] = sum(r.sweeps for r in results)


def test_six_labellings_warm_started(benchmark, six_labellings):
    K, Y = six_labellings
    benchmark.group = "log_prior six labellings n=2000"
    benchmark.name = "prior-six-as-2d-y"
    benchmark.extra_info["baseline"] = ["prior-six-separate-calls"]
    results = benchmark.pedantic(lambda: flatfast.ep_log_evidence(K, Y, return_info=True, check_psd=False),
                                 rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["sweeps"] = sum(r.sweeps for r in results)
    separate = [flatfast.ep_log_evidence(K, y, check_psd=False) for y in Y]
    np.testing.assert_allclose([r.log_z for r in results], separate, rtol=1e-8)
