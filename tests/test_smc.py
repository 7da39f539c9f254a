"""method="smc": sequential Monte Carlo from EP's Gaussian to the orthant (flatfast.prior.smc), against exact values."""
import json
import math
import pathlib

import numpy as np
import pytest

import flatfast
from flatfast.prior import smc as _smc
from orthant_reference import equicorrelated_log_orthant, genz_log_orthant, low_rank_log_orthant, low_rank_problem


def _equicorrelated(n, rho, minority):
    K = rho * np.ones((n, n)) + (1 - rho) * np.eye(n)
    y = np.ones(n)
    y[:minority] = -1
    return K, y, equicorrelated_log_orthant(n, minority, rho)


@pytest.mark.parametrize("minority", [0, 3])
def test_smc_finds_the_exact_orthant_probability_where_ep_is_off(minority):
    K, y, exact = _equicorrelated(40, 0.9, minority)
    res = flatfast.ep_log_evidence(K, y, method="smc", n_samples=4000, seed=3, return_info=True)
    assert res.method == "smc" and res.n_samples == 4000 and len(res.smc_runs) == _smc.RUNS
    assert 0 < res.stderr < 0.06
    assert abs(res.log_z - exact) <= 4 * res.stderr, (res.log_z - exact, res.stderr)
    if minority == 0:  # EP is 0.14 nats low here: the estimate is much closer than EP
        assert res.ep_log_z - exact < -0.1 and abs(res.log_z - exact) < 0.05


def test_the_low_rank_reference_is_exact():
    """The diagonal-plus-low-rank reference (a 2-D integral on a whitened grid) against the equicorrelated 1-D
    integral (rank 1, and rank 2 with a zero column) and against Genz's algorithm on a small rank-2 problem."""
    n, rho, minority = 50, 0.9, 3
    y = np.ones(n)
    y[:minority] = -1
    exact = equicorrelated_log_orthant(n, minority, rho)
    U = np.full((n, 1), math.sqrt(rho))
    assert low_rank_log_orthant(np.full(n, 1 - rho), U, y) == pytest.approx(exact, abs=1e-9)
    U2 = np.concatenate([U, np.zeros((n, 1))], axis=1)
    assert low_rank_log_orthant(np.full(n, 1 - rho), U2, y, points=101) == pytest.approx(exact, abs=1e-9)
    diagonal, U, K, y = low_rank_problem(8, "rule", seed=2)
    assert low_rank_log_orthant(diagonal, U, y) == pytest.approx(genz_log_orthant(K, y), abs=2e-5)


def test_smc_on_a_diagonal_plus_low_rank_kernel():
    diagonal, U, K, y = low_rank_problem(60, "rule")
    exact = low_rank_log_orthant(diagonal, U, y, points=201)
    res = flatfast.ep_log_evidence(K, y, method="smc", n_samples=2000, seed=0, return_info=True)
    assert 0 < res.stderr < 0.15
    assert abs(res.log_z - exact) <= 4 * res.stderr, (res.log_z - exact, res.stderr)


def test_smc_under_the_probit_likelihood_agrees_with_tilting():
    rng = np.random.default_rng(4)
    X = rng.random((40, 20))
    y = np.where(X[:, 0] > 0.5, 1, -1)
    tilting = flatfast.log_prior(X, y, likelihood="probit", method="tilting", n_samples=100_000, return_info=True)
    smc = flatfast.log_prior(X, y, likelihood="probit", method="smc", n_samples=4000, seed=1, return_info=True)
    assert abs(smc.log_z - tilting.log_z) <= 4 * math.hypot(smc.stderr, tilting.stderr), (smc.log_z, tilting.log_z)


def test_smc_is_reproducible_by_seed():
    K, y, _ = _equicorrelated(20, 0.96, 2)
    first = flatfast.ep_log_evidence(K, y, method="smc", n_samples=400, seed=7, return_info=True)
    again = flatfast.ep_log_evidence(K, y, method="smc", n_samples=400, seed=7, return_info=True)
    other = flatfast.ep_log_evidence(K, y, method="smc", n_samples=400, seed=8, return_info=True)
    assert first.smc_runs == again.smc_runs and first.log_z == again.log_z
    assert first.smc_runs != other.smc_runs


def test_runs_combine_as_the_log_of_their_mean_with_the_delta_method_error():
    estimates = np.log([1.0, 2.0, 3.0, 6.0])
    log_mean, stderr = _smc.combine_runs(estimates)
    assert log_mean == pytest.approx(math.log(3.0))
    assert stderr == pytest.approx(np.std([1, 2, 3, 6], ddof=1) / 2 / 3.0)
    # the log of 1e-300-sized estimates does not underflow; runs that lost every particle count as zeros
    log_mean, _ = _smc.combine_runs(estimates - 800.0)
    assert log_mean == pytest.approx(math.log(3.0) - 800.0)
    assert _smc.combine_runs([-math.inf, math.log(4.0)])[0] == pytest.approx(math.log(2.0))
    assert _smc.combine_runs([-math.inf, -math.inf]) == (-math.inf, math.inf)


def test_stages_stay_within_the_step_that_keeps_the_weights_variance_finite():
    """exp((t' - t) A) has infinite variance under pi_t beyond t' - t = (1/m + 1 - t) / 2 (m the stiffness), where
    a finite set of particles still shows equal weights: the step is capped at a quarter of (1/m + 1 - t)."""
    flat = np.zeros(100)
    assert _smc._next_stage(0.0, flat, 1000.0, np) == pytest.approx(0.25 * (1e-3 + 1.0))
    assert _smc._next_stage(0.9, flat, 1000.0, np) == pytest.approx(0.9 + 0.25 * (1e-3 + 0.1))
    assert _smc._next_stage(0.5, flat, 0.1, np) == 1.0  # 1/m large: the last step is safe at once


def test_smc_warns_when_its_runs_disagree():
    K, y, _ = _equicorrelated(200, 0.9, 20)  # two particles a run: spread 1.4 nats
    with pytest.warns(flatfast.UnreliableEstimateWarning, match="independent runs"):
        flatfast.ep_log_evidence(K, y, method="smc", n_samples=20, seed=0)


def test_smc_arguments():
    K, y, _ = _equicorrelated(10, 0.9, 0)
    with pytest.raises(ValueError, match="n_samples"):
        flatfast.ep_log_evidence(K, y, method="smc", n_samples=10)
    with pytest.raises(ValueError, match="correction"):
        flatfast.ep_log_evidence(K, y, method="smc", correction=True)


def _truncated_gaussian_moves(reference):
    """Particles of N(0, [[1, r], [r, 1]]) restricted to the positive quadrant, moved by reflected trajectories
    from one start: the moves must leave the restricted Gaussian invariant, so the sample mean converges to
    E[h_1 | h > 0] = (1 + r) / (2 sqrt(2 pi) P) with P = 1/4 + asin(r) / (2 pi)."""
    r = 0.8
    cov = np.array([[1.0, r], [r, 1.0]])
    factor = np.linalg.cholesky(cov)
    H = np.full((4000, 2), 0.05)
    generator = np.random.default_rng(0)
    samples = []
    for _ in range(30):
        U = H.copy()
        V = generator.standard_normal(H.shape) @ factor.T
        if reference:
            _smc.trajectories_reference(U, V, np.zeros(2), cov, math.pi / 2, _smc._GRAZE, 10**6)
        else:
            _native_module().orthant_trajectories_f64(U, V, np.zeros(2), cov, math.pi / 2, _smc._GRAZE, 10**6)
        H = U
        samples.append(H.copy())
    assert H.min() >= 0.0
    mass = 0.25 + math.asin(r) / (2 * math.pi)
    return np.concatenate(samples[10:]).mean(axis=0), (1 + r) / (2 * math.sqrt(2 * math.pi) * mass)


def _native_module():
    from flatfast.backend import native as _native

    module, reason = _native.load_cpp()
    if module is None:
        pytest.skip(f"the C++ core is not built: {reason}")
    return module


@pytest.mark.parametrize("reference", [True, False], ids=["reference", "native"])
def test_reflected_trajectories_keep_the_truncated_gaussian(reference):
    mean, exact = _truncated_gaussian_moves(reference)
    assert mean == pytest.approx([exact, exact], abs=0.02)  # sd of the mean about 0.005 (correlated draws)


def test_native_trajectories_equal_the_reference():
    """Same start, same velocities: the C++ loop and the numpy lockstep loop take the same reflections, on the
    Gaussian of a stage near the prior of an NNGP kernel, where a trajectory is reflected about 250 times."""
    native = _native_module()
    mean, cov, start, velocity = _reflecting_problem()
    U1, V1, U2, V2 = start.copy(), velocity.copy(), start.copy(), velocity.copy()
    count1, stopped1 = _smc.trajectories_reference(U1, V1, mean.copy(), cov, math.pi / 2, _smc._GRAZE, 10**6)
    count2, stopped2 = native.orthant_trajectories_f64(U2, V2, mean.copy(), cov, math.pi / 2, _smc._GRAZE, 10**6)
    assert count1.mean() > 20 and stopped1 == stopped2 == 0
    np.testing.assert_array_equal(count1, count2)
    np.testing.assert_allclose(U1, U2, rtol=0, atol=1e-9)
    np.testing.assert_allclose(V1, V2, rtol=0, atol=1e-9)
    assert (U2 + mean).min() >= 0.0
    # the reflection cap stops a row where it is and is reported
    U3, V3 = start.copy(), velocity.copy()
    count3, stopped3 = native.orthant_trajectories_f64(U3, V3, mean.copy(), cov, math.pi / 2, _smc._GRAZE, 3)
    assert count3.max() == 3 and stopped3 == int(np.sum(count1 >= 3))


def test_native_trajectories_equal_the_reference_on_crowded_walls_and_successive_moves():
    """The C++ core rules out walls that cannot be crossed before the earliest crossing found so far (a bound, not
    the roots); it must still take the reference's reflections where that bound is tightest: particles crowding
    their walls, a fifth of the coordinates exactly on theirs (moving out or in), and three trajectories in a row
    with fresh velocities, so that a difference would carry over."""
    native = _native_module()
    mean, cov, start, velocity = _reflecting_problem()
    rng = np.random.default_rng(3)
    on_wall = rng.random(start.shape) < 0.2
    start = np.where(on_wall, -mean, start)
    U1, U2 = start.copy(), start.copy()
    factor = np.linalg.cholesky(cov)
    for move in range(3):
        V = velocity if move == 0 else rng.standard_normal(start.shape) @ factor.T
        V1, V2 = V.copy(), V.copy()
        count1, _ = _smc.trajectories_reference(U1, V1, mean.copy(), cov, math.pi / 2, _smc._GRAZE, 10**6)
        count2, _ = native.orthant_trajectories_f64(U2, V2, mean.copy(), cov, math.pi / 2, _smc._GRAZE, 10**6)
        assert count1.mean() > 20
        np.testing.assert_array_equal(count1, count2)
        np.testing.assert_allclose(U1, U2, rtol=0, atol=1e-9)
        np.testing.assert_allclose(V1, V2, rtol=0, atol=1e-9)
        assert (U2 + mean).min() >= 0.0


def test_native_trajectories_check_their_arguments():
    native = _native_module()
    U, V, cov = np.zeros((3, 2)), np.ones((3, 2)), np.eye(2)
    with pytest.raises(ValueError, match="duration"):
        native.orthant_trajectories_f64(U, V, np.ones(2), cov, 2.0, 1e-9, 10)
    with pytest.raises(ValueError, match="V"):
        native.orthant_trajectories_f64(U, np.ones((3, 3)), np.ones(2), cov, 1.0, 1e-9, 10)
    with pytest.raises(ValueError, match="gap"):
        native.orthant_trajectories_f64(U, V, np.ones(3), cov, 1.0, 1e-9, 10)
    with pytest.raises(ValueError, match="cov"):
        native.orthant_trajectories_f64(U, V, np.ones(2), -np.eye(2), 1.0, 1e-9, 10)


def test_resampling_stays_within_each_run():
    weights = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    log_w = np.where(weights > 0, 0.0, -np.inf)
    picks = _smc._resample_rows(log_w, np.random.default_rng(0), np)
    rows = picks.reshape(3, 4)
    assert (rows[0] == 0).all()
    assert set(rows[1].tolist()) == {6, 7}
    assert sorted(rows[2].tolist()) == [8, 9, 10, 11]  # a run that lost every particle keeps them


def _cupy_with_a_device():
    cupy = pytest.importorskip("cupy")
    if not cupy.cuda.is_available():
        pytest.skip("cupy is installed but sees no CUDA device")
    return cupy


def _reflecting_problem(rows=60, n=120):
    """A stage's Gaussian near the prior of an NNGP kernel with mixed labels, where a trajectory is reflected
    about 250 times, and (start, velocity) rows inside its orthant."""
    rng = np.random.default_rng(0)
    X = rng.random((n, 50))
    K = flatfast.nngp_kernel(X)
    y = np.where(X[:, :25].sum(1) > X[:, 25:].sum(1), 1.0, -1.0)
    ep = flatfast.ep_log_evidence(K, y, return_info=True)
    mean, cov, factor = _smc._Path(K, y, ep, 0.0, np).gaussian(0.99)  # EP's sites at 1 % of their strength
    start = np.maximum(mean + rng.standard_normal((rows, n)) @ factor.T, 1e-3) - mean
    return mean, cov, start, rng.standard_normal((rows, n)) @ factor.T


@pytest.mark.parametrize("kernel", ["cuda", "cupy_reference"])
def test_gpu_trajectories_equal_the_cpp_core(kernel):
    """The CUDA kernel (one warp a particle) and the lockstep reference on cupy arrays take the C++ core's
    reflections from the same start and velocities, to 1e-9 (GPU only)."""
    cupy = _cupy_with_a_device()
    mean, cov, start, velocity = _reflecting_problem()
    U1, V1 = start.copy(), velocity.copy()
    count1, stopped1 = _native_module().orthant_trajectories_f64(U1, V1, mean.copy(), cov, math.pi / 2,
                                                                 _smc._GRAZE, 10**6)
    U2, V2, gap, cov_d = (cupy.asarray(a) for a in (start, velocity, mean, cov))
    if kernel == "cuda":
        trajectories = _smc._native_trajectories(cupy)
        assert trajectories is not None, "flatfast._C_cuda is not built (FLATFAST_CUDA=1)"
    else:
        def trajectories(*args):
            return _smc.trajectories_reference(*args, xp=cupy)
    count2, stopped2 = trajectories(U2, V2, gap, cov_d, math.pi / 2, _smc._GRAZE, 10**6)
    assert count1.mean() > 20 and stopped1 == stopped2 == 0
    np.testing.assert_array_equal(count1, cupy.asnumpy(count2))
    np.testing.assert_allclose(U1, cupy.asnumpy(U2), rtol=0, atol=1e-9)
    np.testing.assert_allclose(V1, cupy.asnumpy(V2), rtol=0, atol=1e-9)
    U3, V3 = cupy.asarray(start), cupy.asarray(velocity)  # the reflection cap, as on the CPU
    count3, stopped3 = trajectories(U3, V3, gap, cov_d, math.pi / 2, _smc._GRAZE, 3)
    assert int(count3.max()) == 3 and stopped3 == int(np.sum(count1 >= 3))
    if kernel == "cuda":
        with pytest.raises(ValueError, match="cov: expected shape"):
            trajectories(U3, V3, gap, cupy.ascontiguousarray(cov_d[:5, :5]), math.pi / 2, _smc._GRAZE, 3)
        with pytest.raises(TypeError, match="U: expected a C-contiguous float64 cupy array"):
            trajectories(U3.astype(cupy.float32), V3, gap, cov_d, math.pi / 2, _smc._GRAZE, 3)


def test_smc_on_a_cupy_kernel_finds_the_exact_value():
    """method="smc" on a kernel on the GPU (every stage's Gaussian, the particles and their moves on the device)
    against the exact equicorrelated value, and the stage Gaussians against the host's (GPU only)."""
    cupy = _cupy_with_a_device()
    K, y, exact = _equicorrelated(40, 0.9, 3)
    ep = flatfast.ep_log_evidence(K, y, return_info=True)
    host = _smc._Path(K, y, ep, 0.0, np)
    device = _smc._Path(cupy.asarray(K), y, ep, 0.0, cupy)
    for t in (0.0, 0.5):
        for a, b in zip(host.gaussian(t), device.gaussian(t)):
            np.testing.assert_allclose(a, cupy.asnumpy(b), rtol=0, atol=1e-10)
    assert device.log_c == pytest.approx(host.log_c, abs=1e-10)
    res = flatfast.ep_log_evidence(cupy.asarray(K), y, method="smc", n_samples=4000, seed=3, return_info=True)
    assert res.method == "smc" and 0 < res.stderr < 0.06
    assert abs(res.log_z - exact) <= 4 * res.stderr, (res.log_z - exact, res.stderr)


def test_coverage_runs_of_disjoint_seeds_pool_to_one_run(tmp_path, capsys, monkeypatch):
    """bench/smc_coverage.py --out/--pool: coverage rows gathered over several sessions equal one long run's."""
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parents[1] / "bench"))
    import smc_coverage

    case = ["--n", "20", "--particles", "40", "--only", "rho=0.9 minority=0$"]
    smc_coverage.main(case + ["--seeds", "4"])
    one_run = capsys.readouterr().out.splitlines()[-1]
    estimates = tmp_path / "estimates.jsonl"
    smc_coverage.main(case + ["--seeds", "2", "--out", str(estimates)])
    smc_coverage.main(case + ["--seeds", "2", "--first-seed", "2", "--out", str(estimates)])
    capsys.readouterr()
    smc_coverage.main(["--pool", str(estimates)])
    pooled = capsys.readouterr().out.splitlines()
    assert "4 seeds" in pooled[-2] and "their 40 runs' P / exact" in pooled[-2]
    assert pooled[-1].split()[:-1] == one_run.split()[:-1]  # all but the seconds
    for line in estimates.read_text().splitlines():  # each estimate keeps its runs, for other ways to combine them
        record = json.loads(line)
        assert len(record["runs"]) == _smc.RUNS
        assert _smc.combine_runs(record["runs"]) == pytest.approx((record["log_z"], record["stderr"]), rel=1e-12)
