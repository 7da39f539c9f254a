"""method="smc"'s moves: the C++ core's reflected trajectories against the numpy reference loop (the same
particles, velocities and Gaussian; tests/test_smc.py checks that they take the same reflections).

The problem is a stage of SMC near its end on an NNGP kernel (n = 300 uniform inputs in [0, 1)^784, the linear
rule, EP's sites at 1 % of their strength), where trajectories are reflected about 250 times each and the moves
dominate SMC's time: 220 particles (20,000 particles over ten runs and the pilot would be 100x this), one
trajectory each. Median of 3 after a warm-up; the summary prints native / reference."""
import math

import numpy as np
import pytest

import flatfast
from flatfast import _native, _smc

N_POINTS, PARTICLES = 300, 220


@pytest.fixture(scope="module")
def stage():
    X = np.random.default_rng(0).random((N_POINTS, 784))
    K = flatfast.nngp_kernel(X)
    y = np.where(X[:, :392].sum(1) > X[:, 392:].sum(1), 1.0, -1.0)
    ep = flatfast.ep_log_evidence(K, y, return_info=True)
    mean, cov, factor = _smc._Path(K, y, ep, 0.0, np).gaussian(0.99)  # EP's sites at 1 % of their strength
    rng = np.random.default_rng(1)
    start = np.maximum(mean + rng.standard_normal((PARTICLES, N_POINTS)) @ factor.T, 1e-3) - mean
    velocity = rng.standard_normal((PARTICLES, N_POINTS)) @ factor.T
    return start, velocity, mean, cov


def _run(trajectories, stage):
    start, velocity, mean, cov = stage
    U, V = start.copy(), velocity.copy()
    return trajectories(U, V, mean.copy(), cov, math.pi / 2, _smc._GRAZE, 10**6)


def test_trajectories_reference(benchmark, stage):
    benchmark.group = "smc trajectories"
    benchmark.name = "smc-trajectories-reference"
    count, _ = benchmark.pedantic(_run, args=(_smc.trajectories_reference, stage), rounds=3, iterations=1,
                                  warmup_rounds=1)
    benchmark.extra_info["reflections per trajectory"] = float(count.mean())


def test_trajectories_native(benchmark, stage):
    module, reason = _native.load_cpp()
    if module is None:
        pytest.skip(reason)
    benchmark.group = "smc trajectories"
    benchmark.name = "smc-trajectories-native"
    benchmark.extra_info["baseline"] = ["smc-trajectories-reference"]
    count, _ = benchmark.pedantic(_run, args=(module.orthant_trajectories_f64, stage), rounds=3, iterations=1,
                                  warmup_rounds=1)
    benchmark.extra_info["reflections per trajectory"] = float(count.mean())
