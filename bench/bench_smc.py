"""method="smc"'s moves: the C++ core's reflected trajectories against the numpy reference loop (the same
particles, velocities and Gaussian; tests/test_smc.py checks that they take the same reflections).

The problem is a stage of SMC near its end on an NNGP kernel (n = 300 uniform inputs in [0, 1)^784, the linear
rule, EP's sites at 1 % of their strength), where trajectories are reflected about 250 times each and the moves
dominate SMC's time: 220 particles (20,000 particles over ten runs and the pilot would be 100x this), one
trajectory each. Median of 3 after a warm-up; the summary prints native / reference.

On a GPU (cupy with a device, and flatfast._C_cuda built): the same stage with GPU_PARTICLES = 22,000 particles
(n_samples = 20,000, the default, over ten runs and the pilot), the CUDA kernel (one warp a particle) against the
C++ core on the same machine's CPU cores and against the lockstep reference on cupy arrays."""
import math

import numpy as np
import pytest

import flatfast
from flatfast.backend import native as _native
from flatfast.prior import smc as _smc

N_POINTS, PARTICLES, GPU_PARTICLES = 300, 220, 22_000


def _stage(particles):
    X = np.random.default_rng(0).random((N_POINTS, 784))
    K = flatfast.nngp_kernel(X)
    y = np.where(X[:, :392].sum(1) > X[:, 392:].sum(1), 1.0, -1.0)
    ep = flatfast.ep_log_evidence(K, y, return_info=True)
    mean, cov, factor = _smc._Path(K, y, ep, 0.0, np).gaussian(0.99)  # EP's sites at 1 % of their strength
    rng = np.random.default_rng(1)
    start = np.maximum(mean + rng.standard_normal((particles, N_POINTS)) @ factor.T, 1e-3) - mean
    velocity = rng.standard_normal((particles, N_POINTS)) @ factor.T
    return start, velocity, mean, cov


@pytest.fixture(scope="module")
def stage():
    return _stage(PARTICLES)


@pytest.fixture(scope="module")
def gpu_stage():
    """GPU_PARTICLES on the host and the same on the device (cupy), or a skip without a GPU path."""
    cupy = pytest.importorskip("cupy")
    if not cupy.cuda.is_available():
        pytest.skip("cupy sees no CUDA device")
    if _native.load_cuda()[0] is None:
        pytest.skip(_native.load_cuda()[1])
    host = _stage(GPU_PARTICLES)
    return host, tuple(cupy.asarray(a) for a in host)


def _run(trajectories, stage, synchronize=None):
    start, velocity, mean, cov = stage
    U, V = start.copy(), velocity.copy()
    result = trajectories(U, V, mean.copy(), cov, math.pi / 2, _smc._GRAZE, 10**6)
    if synchronize is not None:
        synchronize()
    return result


def _time(benchmark, group, name, trajectories, stage, baseline=(), synchronize=None):
    benchmark.group, benchmark.name = group, name
    if baseline:
        benchmark.extra_info["baseline"] = list(baseline)
    count, _ = benchmark.pedantic(_run, args=(trajectories, stage, synchronize), rounds=3, iterations=1,
                                  warmup_rounds=1)
    benchmark.extra_info["reflections per trajectory"] = float(count.mean())


def _cpp_core():
    module, reason = _native.load_cpp()
    if module is None:
        pytest.skip(reason)
    return module.orthant_trajectories_f64


def test_trajectories_reference(benchmark, stage):
    _time(benchmark, "smc trajectories", "smc-trajectories-reference", _smc.trajectories_reference, stage)


def test_trajectories_native(benchmark, stage):
    _time(benchmark, "smc trajectories", "smc-trajectories-native", _cpp_core(), stage,
          baseline=["smc-trajectories-reference"])


def test_trajectories_cuda_cpp_core(benchmark, gpu_stage):
    _time(benchmark, "smc trajectories, GPU-sized", "smc-trajectories-cpp-22k", _cpp_core(), gpu_stage[0])


@pytest.mark.parametrize("route", ["cuda", "cupy-reference"])
def test_trajectories_cuda(benchmark, gpu_stage, route):
    import cupy

    if route == "cuda":
        trajectories = _smc._native_trajectories(cupy)
        baseline = ["smc-trajectories-cpp-22k", "smc-trajectories-cupy-reference-22k"]
    else:
        def trajectories(*args):
            return _smc.trajectories_reference(*args, xp=cupy)
        baseline = ["smc-trajectories-cpp-22k"]
    _time(benchmark, "smc trajectories, GPU-sized", f"smc-trajectories-{route}-22k", trajectories, gpu_stage[1],
          baseline=baseline, synchronize=cupy.cuda.Device().synchronize)
