"""log P(f) by EP: against an independent sequential-EP oracle, against exact orthant probabilities,
against random finite-width networks; invariances; bad input."""

import numpy as np
import pytest

import flatfast
from flatfast import ep_log_evidence, log_prior

from ep_oracle import sequential_ep_log_z
from orthant_reference import STORED, genz_log_orthant, problems
from flatfast.testing import sample_relu_network_outputs


def _problem(n, d, rng, labels="random"):
    X = rng.random((n, d))
    K = flatfast.nngp_kernel(X, depth=2)
    if labels == "random":
        y = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    else:  # a linear rule: the kind of function a trained network expresses
        y = np.where(X[:, : d // 2].sum(1) > X[:, d // 2:].sum(1) - 0.0, 1.0, -1.0)
    return X, K, y


# n up to 200: the pure-numpy sequential oracle costs ~n^3 per sweep (35 s for the two cases at n = 300 on 2
# cores), and nothing in the solver changes with the size (the blocked passes are checked at larger n against the
# LAPACK solver in tests/test_prior_device.py).
@pytest.mark.parametrize("n", [50, pytest.param(200, marks=pytest.mark.slow)])  # n = 200: 10 s each, -m slow
@pytest.mark.parametrize("labels", ["random", "structured"])
def test_fast_solver_matches_sequential_oracle(n, labels):
    rng = np.random.default_rng(n)
    X, K, y = _problem(n, 20, rng, labels)
    oracle = sequential_ep_log_z(K, y)
    res = ep_log_evidence(K, y, tol=1e-9, return_info=True)
    assert res.converged
    assert abs(res.log_z - oracle) <= 1e-8 * abs(oracle), (res.log_z, oracle)


def _exact_log_orthant(K, y):
    """log P(y g > 0), g ~ N(0, K), by Genz's quasi-Monte Carlo algorithm (scipy), relative error ~1e-6."""
    return genz_log_orthant(K, y)


def _random_problems():
    for name, X, y in problems():
        yield pytest.param(name, X, y, id=name)


def test_stored_genz_values_are_what_scipy_computes():
    """The stored references (tests/orthant_reference.py) against a live Genz run at abseps 1e-7, releps 1e-4
    (under a second instead of 8-10 s; within 5e-4 nats of the stored values), on the two problems whose EP error
    is largest."""
    for name, X, y in problems():
        if name in ("n10-d2-4", "n11-d2-3"):
            K = flatfast.nngp_kernel(X, depth=2)
            heaviside, probit = STORED[name]
            assert genz_log_orthant(K, y, releps=1e-4, abseps=1e-7) == pytest.approx(heaviside, abs=2e-3)
            assert genz_log_orthant(K + np.eye(len(y)), y, releps=1e-4, abseps=1e-7) == pytest.approx(probit,
                                                                                                     abs=2e-3)


@pytest.mark.parametrize("name,X,y", list(_random_problems()))
def test_ep_and_tilting_against_exact_orthant_probability(name, X, y):
    K = flatfast.nngp_kernel(X, depth=2)
    exact = STORED[name][0]
    ep = ep_log_evidence(K, y, tol=1e-9)
    # EP is an approximation: the largest gap measured on these 12 problems is 0.105 nats (n = 10, d = 2).
    assert abs(ep - exact) < 0.15, (ep, exact)
    res = ep_log_evidence(K, y, method="tilting", n_samples=40000, seed=1, return_info=True)
    assert abs(res.log_z - exact) < 4 * res.stderr + 1e-5, (res.log_z, res.stderr, exact)
    assert res.pareto_k < 0.5 and exact <= res.log_upper_bound
    assert res.ep_log_z == pytest.approx(ep, abs=1e-6)


def test_one_dimensional_near_singular_kernel():
    """9 points on a line: K is nearly singular and plain EP is measurably off; tilting corrects it."""
    x = np.linspace(-2, 2, 9)[:, None]
    y = np.array([1, 1, -1, -1, 1, 1, -1, 1, 1.0])
    K = flatfast.nngp_kernel(x, depth=2)
    exact = _exact_log_orthant(K, y)
    res = ep_log_evidence(K, y, method="tilting", n_samples=20000, seed=3, return_info=True)
    assert abs(res.log_z - exact) < 4 * res.stderr + 1e-5, (res.log_z, res.stderr, exact)
    assert abs(res.ep_log_z - exact) > 8 * res.stderr  # EP's error here is far outside the error bar
    assert abs(res.ep_log_z - exact) < 0.2  # plain EP: 0.07 nats off here


def test_against_plain_monte_carlo_of_gp_draws():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((6, 3))
    y = np.array([1, -1, 1, 1, -1, 1.0])
    K = flatfast.nngp_kernel(X, depth=2)
    L = np.linalg.cholesky(K + 1e-12 * np.eye(6))
    draws = 2_000_000
    hits = 0
    for _ in range(4):
        g = rng.standard_normal((draws // 4, 6)) @ L.T
        hits += int(np.all(g * y > 0, axis=1).sum())
    p = hits / draws
    se = np.sqrt(p * (1 - p) / draws) / p
    res = ep_log_evidence(K, y, method="tilting", n_samples=50000, seed=0, return_info=True)
    assert abs(res.log_z - np.log(p)) < 4 * np.hypot(se, res.stderr)
    assert abs(res.ep_log_z - np.log(p)) < 0.1


def _finite_width_log_p(X, y, width, draws, rng):
    """P(sign f(X) = y) over random depth-2 ReLU networks of the given width, by simulation."""
    f = sample_relu_network_outputs(X, 2, width, draws, rng)
    p = float(np.mean(np.all(f * y > 0, axis=1)))
    return np.log(p), np.sqrt(p * (1 - p) / draws) / p


@pytest.mark.slow
def test_tiny_inputs_against_random_finite_width_networks():
    rng = np.random.default_rng(11)
    X = rng.standard_normal((6, 2))
    y = np.array([1, 1, -1, 1, -1, -1.0])
    log_p_nets, se_nets = _finite_width_log_p(X, y, width=1024, draws=100_000, rng=rng)
    ep = log_prior(X, y)
    res = log_prior(X, y, method="tilting", n_samples=50000, seed=2, return_info=True)
    se = np.hypot(se_nets, res.stderr)
    assert abs(res.log_z - log_p_nets) < 4 * se, (res.log_z, log_p_nets, se)
    assert abs(ep - log_p_nets) < 4 * se + 0.05, (ep, log_p_nets, se)


def test_heaviside_is_invariant_to_kernel_scale():
    rng = np.random.default_rng(1)
    X, K, y = _problem(150, 10, rng, "structured")
    base = ep_log_evidence(K, y, tol=1e-12)
    for c in (1e-3, 0.5, 7.0, 1e4):
        assert ep_log_evidence(c * K, y, tol=1e-12) == pytest.approx(base, rel=1e-10, abs=1e-10)


def test_probit_equals_heaviside_on_k_plus_identity():
    rng = np.random.default_rng(2)
    X, K, y = _problem(120, 10, rng, "random")
    probit = ep_log_evidence(K, y, likelihood="probit", tol=1e-12)
    heaviside = ep_log_evidence(K + np.eye(120), y, tol=1e-12)
    assert probit == pytest.approx(heaviside, rel=1e-10, abs=1e-10)
    assert log_prior(X, y, likelihood="probit", tol=1e-12) == pytest.approx(probit, rel=1e-10)


def test_independent_signs_closed_form():
    # K = I: the signs are independent fair coins, P = 2^-n exactly, and EP is exact.
    for n in (1, 5, 40):
        assert ep_log_evidence(np.eye(n), np.ones(n)) == pytest.approx(n * np.log(0.5), rel=1e-12)


def test_many_labellings_share_one_kernel():
    rng = np.random.default_rng(3)
    X = rng.random((80, 12))
    Y = np.where(rng.random((3, 80)) < 0.5, 0, 1)  # 0/1 labels
    values = log_prior(X, Y)
    assert values.shape == (3,)
    for row, value in zip(Y, values):  # later rows start from the nearest solved one: equal within 2 tol
        assert log_prior(X, 2 * row - 1) == pytest.approx(value, abs=2e-6)
    infos = log_prior(X, Y, return_info=True)
    assert len(infos) == 3 and all(i.converged for i in infos)


def test_result_record():
    rng = np.random.default_rng(4)
    X = rng.random((60, 5))
    res = log_prior(X, np.sign(X[:, 0] - 0.5), return_info=True)
    assert res.converged and res.sweeps >= 2 and res.damping == 1.0
    assert res.likelihood == "heaviside" and res.method == "ep"
    assert len(res.log_z_history) == res.sweeps + 1 and res.log_z == res.log_z_history[-1]
    assert res.seconds > 0 and res.max_site_change <= 1e-3


def test_not_converging_warns_and_says_so():
    rng = np.random.default_rng(5)
    X = rng.random((60, 5))
    with pytest.warns(flatfast.ConvergenceWarning, match="did not converge in 2 sweeps"):
        res = log_prior(X, np.sign(X[:, 0] - 0.5), max_sweeps=2, return_info=True)
    assert not res.converged


@pytest.mark.parametrize("call,exc,match", [
    (lambda: log_prior(np.ones((3, 2)), [1, 2, 1]), ValueError, r"y: labels must be in"),
    (lambda: log_prior(np.ones((3, 2)), [1, -1]), ValueError, "y: has 2 labels per labelling but there are 3"),
    (lambda: log_prior(np.ones((3, 2)), np.ones((2, 2, 3))), ValueError, "y: expected a 1-D labelling"),
    (lambda: log_prior(np.array([[np.nan, 1.0]]), [1]), ValueError, "X: contains NaN"),
    (lambda: log_prior(np.ones((0, 2)), []), ValueError, "X: has no rows"),
    (lambda: log_prior(np.ones((3, 2)), "abc"), TypeError, "y: expected labels"),
    (lambda: log_prior(np.ones((3, 2)), [1, 1, 1], likelihood="logit"), ValueError, "likelihood: expected one of"),
    (lambda: log_prior(np.ones((3, 2)), [1, 1, 1], method="mcmc"), ValueError, "method: expected one of"),
    (lambda: log_prior(np.ones((3, 2)), [1, 1, 1], tol=0), ValueError, "tol: must be > 0"),
    (lambda: ep_log_evidence(np.array([[1.0, np.inf], [np.inf, 1.0]]), [1, 1]), ValueError, "K: contains NaN"),
    (lambda: ep_log_evidence(np.ones((2, 3)), [1, 1]), ValueError, "K: expected a square"),
    (lambda: ep_log_evidence(np.zeros((0, 0)), []), ValueError, r"K: is empty"),
    (lambda: ep_log_evidence(np.array([[1.0, 0.5], [0.2, 1.0]]), [1, 1]), flatfast.NotPSDError, "K: is not symmetric"),
    (lambda: ep_log_evidence(np.array([[1.0, 2.0], [2.0, 1.0]]), [1, 1]), flatfast.NotPSDError,
     "K: is not positive semi-definite"),
    (lambda: ep_log_evidence(np.eye(2), [1, 0.5]), ValueError, "y: labels must be in"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_too_large_fails_early_with_the_size(monkeypatch):
    import flatfast._validate as v

    monkeypatch.setattr(v, "_available_bytes", lambda: 10 * 2**20)
    with pytest.raises(MemoryError, match=r"needs [0-9.]+ (MiB|GiB)"):
        log_prior(np.ones((2000, 2)), np.ones(2000))


def test_non_positive_cavity_is_retried_with_damping(monkeypatch):
    import flatfast.prior.ep as P

    rng = np.random.default_rng(6)
    X, K, y = _problem(60, 5, rng, "structured")
    base = ep_log_evidence(K, y, tol=1e-9)
    real = P._refresh_posterior
    calls = {"n": 0}

    def corrupt_second_refresh(*args):
        calls["n"] += 1
        var, mean, half_log_det = real(*args)
        if calls["n"] == 2:
            var = var * 1e6  # cavity precisions 1/var - tau turn negative
        return var, mean, half_log_det

    monkeypatch.setattr(P, "_refresh_posterior", corrupt_second_refresh)
    used = []
    real_damping = P.next_damping
    monkeypatch.setattr(P, "next_damping", lambda d, *rest: used.append(d) or real_damping(d, *rest))
    res = ep_log_evidence(K, y, tol=1e-9, return_info=True)
    assert 0.5 in used and res.converged  # the step was retried at half size, and damping grew back after
    assert res.log_z == pytest.approx(base, rel=1e-8)


def test_warm_start_reaches_the_same_value_in_fewer_sweeps(rng):
    X = rng.random((300, 20))
    K = flatfast.nngp_kernel(X)
    y = np.where(X[:, :10].sum(1) > X[:, 10:].sum(1), 1, -1)
    nearby = y.copy()
    nearby[:6] *= -1
    for likelihood in ("heaviside", "probit"):
        first = flatfast.ep_log_evidence(K, y, likelihood=likelihood, return_info=True)
        cold = flatfast.ep_log_evidence(K, nearby, likelihood=likelihood, return_info=True)
        warm = flatfast.ep_log_evidence(K, nearby, likelihood=likelihood, return_info=True, warm_start=first)
        assert warm.converged and abs(warm.log_z - cold.log_z) <= 1e-6
        assert warm.sweeps < cold.sweeps
    with pytest.raises(ValueError, match="warm_start: comes from a probit run"):
        flatfast.ep_log_evidence(K, y, warm_start=flatfast.ep_log_evidence(K, y, likelihood="probit",
                                                                            return_info=True))
    with pytest.raises(ValueError, match="warm_start: expected an EPResult"):
        flatfast.ep_log_evidence(K[:10, :10], y[:10], warm_start=first)


def test_ep_on_cupy_matches_numpy(rng):
    """The same EP solver over cupy (the GPU array module) as over numpy; runs wherever cupy sees a device."""
    cupy = pytest.importorskip("cupy")
    if not cupy.cuda.is_available():
        pytest.skip("cupy is installed but sees no CUDA device")
    X = rng.random((400, 30))
    K = flatfast.nngp_kernel(X)
    y = np.where(X[:, :15].sum(1) > X[:, 15:].sum(1), 1, -1)
    for likelihood in ("heaviside", "probit"):
        ref = ep_log_evidence(K, y, likelihood=likelihood, return_info=True)
        for precision in ("float64", "mixed"):
            got = ep_log_evidence(cupy.asarray(K), y, likelihood=likelihood, return_info=True, precision=precision)
            assert got.converged and abs(got.log_z - ref.log_z) <= 1e-8 * abs(ref.log_z), (precision, got.log_z)
    Y = np.array([y, -y, np.where(rng.random(400) < 0.05, -y, y)])  # warm starts between labellings on cupy
    np.testing.assert_allclose(ep_log_evidence(cupy.asarray(K), Y), ep_log_evidence(K, Y), rtol=1e-8)


# --- probit, checked independently of the "Heaviside on K + I" identity ----------------------------------------

@pytest.mark.parametrize("n", [50, 200])
@pytest.mark.parametrize("labels", ["random", "structured"])
def test_probit_matches_the_oracles_own_probit_update(n, labels):
    rng = np.random.default_rng(n + 7)
    X, K, y = _problem(n, 20, rng, labels)
    oracle = sequential_ep_log_z(K, y, likelihood="probit")
    res = ep_log_evidence(K, y, likelihood="probit", tol=1e-9, return_info=True)
    assert res.converged and abs(res.log_z - oracle) <= 1e-8 * abs(oracle), (res.log_z, oracle)


@pytest.mark.parametrize("name,X,y", list(_random_problems()))
def test_probit_against_genz_on_k_plus_identity(name, X, y):
    K = flatfast.nngp_kernel(X, depth=2)
    exact = STORED[name][1]
    # measured on these 12 problems: EP within 0.009 nats (probit is smoother than Heaviside, EP closer)
    assert abs(ep_log_evidence(K, y, likelihood="probit", tol=1e-9) - exact) < 0.02


def _probit_by_quadrature(K, y, order=80):
    """log of the integral of prod_i Phi(y_i g_i) N(g; 0, K) dg by tensor Gauss-Hermite quadrature (n <= 3)."""
    from scipy.stats import norm

    n = len(y)
    L = np.linalg.cholesky(K)
    nodes, weights = np.polynomial.hermite_e.hermegauss(order)
    weights = weights / np.sqrt(2 * np.pi)
    U = np.stack([g.ravel() for g in np.meshgrid(*([nodes] * n), indexing="ij")])
    W = np.prod(np.stack([g.ravel() for g in np.meshgrid(*([weights] * n), indexing="ij")]), axis=0)
    return float(np.log(np.sum(W * np.prod(norm.cdf(y[:, None] * (L @ U)), axis=0))))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_probit_against_direct_quadrature(n):
    rng = np.random.default_rng(30 + n)
    X = rng.standard_normal((n, 3))
    y = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    K = flatfast.nngp_kernel(X)
    exact = _probit_by_quadrature(K, y)
    # the identity probit(K) = Heaviside(K + I), checked by two exact methods that share nothing
    assert exact == pytest.approx(_exact_log_orthant(K + np.eye(n), y), abs=1e-6)
    if n == 1:
        assert exact == pytest.approx(np.log(0.5), abs=1e-12)
    # EP's own error: 0 at n = 1, measured 0.005 and 0.013 nats at n = 2, 3
    assert abs(ep_log_evidence(K, y, likelihood="probit", tol=1e-10) - exact) < 0.03


# --- robustness -------------------------------------------------------------------------------------------------

def test_zero_prior_variance_point_gives_minus_infinity_with_a_reason():
    X = np.array([[0.0, 0.0], [1.0, 2.0], [-1.0, 0.5]])  # a blank input and sigma_b2 = 0: K_00 = 0
    with pytest.warns(RuntimeWarning, match=r"point\(s\) \[0\] have zero prior variance"):
        assert log_prior(X, [1, 1, -1], sigma_b2=0.0) == -np.inf
    assert np.isfinite(log_prior(X, [1, 1, -1], sigma_b2=0.0, likelihood="probit"))  # the noise makes it possible
    K = flatfast.nngp_kernel(X, sigma_b2=0.0)
    with pytest.warns(RuntimeWarning, match="zero prior variance"):
        res = ep_log_evidence(K, [1, 1, -1], return_info=True)
    assert res.log_z == -np.inf and res.sweeps == 0


def test_duplicates_with_contradicting_labels_give_minus_infinity():
    X = np.array([[0.3, 0.2], [1.0, 2.0], [0.3, 0.2], [0.5, -0.1]])
    with pytest.warns(RuntimeWarning, match="points 0 and 2 are duplicates"):
        values = log_prior(X, np.array([[1, -1, -1, 1], [1, -1, 1, 1]]))
    assert values[0] == -np.inf and np.isfinite(values[1])  # per labelling: the consistent one is computed
    assert np.isfinite(log_prior(X, [1, -1, -1, 1], likelihood="probit"))


def test_float32_kernel_is_converted_to_float64(rng):
    X = rng.random((80, 6))
    K = flatfast.nngp_kernel(X)
    y = np.where(X[:, 0] > 0.5, 1, -1)
    K32 = K.astype(np.float32)
    # EP on the float32-rounded K, in float64: the same as on that K cast by hand
    assert ep_log_evidence(K32, y) == ep_log_evidence(K32.astype(np.float64), y)
    assert ep_log_evidence(K32, y) == pytest.approx(ep_log_evidence(K, y), rel=1e-5)


@pytest.mark.parametrize("n", [300, 800])
def test_mixed_precision_reaches_the_float64_fixed_point(n):
    rng = np.random.default_rng(n)
    X, K, y = _problem(n, 784, rng, "structured")
    reference = ep_log_evidence(K, y, return_info=True)
    mixed = ep_log_evidence(K, y, precision="mixed", return_info=True)
    assert mixed.converged and mixed.float32_sweeps > 0 and reference.float32_sweeps == 0
    assert abs(mixed.log_z - reference.log_z) <= 1e-8 * abs(reference.log_z)
    assert log_prior(X, y, precision="mixed") == pytest.approx(reference.log_z, rel=1e-8)


@pytest.mark.parametrize("labels", ["random", "structured"])
def test_stopping_rule_leaves_at_most_tol_in_log_z(labels):
    rng = np.random.default_rng(7)
    X, K, y = _problem(600, 50, rng, labels)
    exact_fixed_point = ep_log_evidence(K, y, tol=1e-13, max_sweeps=60)
    for tol in (1e-4, 1e-6):
        assert abs(ep_log_evidence(K, y, tol=tol) - exact_fixed_point) <= tol


def test_labellings_of_the_same_inputs_start_from_the_nearest_solved_one():
    rng = np.random.default_rng(3)
    X, K, y = _problem(400, 784, rng, "structured")
    Y = np.array([y] + [np.where(rng.random(400) < 0.05, -y, y) for _ in range(3)])
    together = ep_log_evidence(K, Y, tol=1e-10, return_info=True)
    alone = [ep_log_evidence(K, row, tol=1e-10, return_info=True) for row in Y]
    np.testing.assert_allclose([r.log_z for r in together], [r.log_z for r in alone], rtol=1e-10)
    assert sum(r.sweeps for r in together[1:]) < sum(r.sweeps for r in alone[1:])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fused_ep_passes_match_numpy(dtype):
    from conftest import native_module_or_skip

    native = native_module_or_skip()
    kind = "f64" if dtype == np.float64 else "f32"
    rng = np.random.default_rng(0)
    A = rng.standard_normal((37, 37))
    K = (A @ A.T).astype(dtype)
    s = rng.random(37)
    out = np.full((37, 37), 7.0, dtype=dtype)
    getattr(native, f"ep_scaled_system_{kind}")(K, s, out)
    expected = (s[:, None] * K.astype(np.float64) * s[None, :]) + np.eye(37)
    upper = np.triu_indices(37)
    np.testing.assert_allclose(out[upper], expected[upper], rtol=1e-6 if kind == "f32" else 1e-14)
    assert np.all(out[np.tril_indices(37, -1)] == 7.0)  # POTRF reads the upper triangle only: nothing else is touched
    W = np.asfortranarray(np.tril(rng.standard_normal((37, 37))).astype(dtype))
    norms = getattr(native, f"ep_factor_column_norms_{kind}")(W.T)
    np.testing.assert_allclose(norms, (W.astype(np.float64) ** 2).sum(axis=0), rtol=1e-13)
    with pytest.raises(ValueError, match="out"):
        getattr(native, f"ep_scaled_system_{kind}")(K, s, np.zeros((36, 37), dtype=dtype))


def test_precision_must_be_named():
    with pytest.raises(ValueError, match="precision"):
        ep_log_evidence(np.eye(2), [1, 1], precision="half")


def test_any_memory_layout_of_k_gives_the_same_value():
    rng = np.random.default_rng(9)
    X, K, y = _problem(120, 30, rng, "structured")
    base = ep_log_evidence(K, y)
    big = np.zeros((130, 130))
    big[:120, :120] = K
    for layout in (np.asfortranarray(K), big[:120, :120], K[::-1, ::-1][::-1, ::-1]):
        assert ep_log_evidence(layout, y) == base


# --- where EP is weakest: near-unanimous labels on strongly correlated points ---------------------------------
# K = rho 11^T + (1 - rho) I, labels all +1 but `minority` of them, against the exact 1-D integral. Measured with
# this flatfast (2 cores): (log Z_EP - log P, sweeps). EP underestimates unanimous labellings by 0.19-0.54 nats;
# with 1 % or 10 % minority labels it is within 0.03 nats. Unanimous rows before the secant step of _SecantSteps:
# 25, 12, 35 (n = 100) and 30, 47, 65 (n = 1500) sweeps; before the secant damping of next_damping 37, 62, 109 and
# 48, 103, 160; the other rows 17-52 before the secant damping.
EQUICORRELATED = {
    (100, 0.9, 0): (-0.1880, 14), (100, 0.9, 1): (-0.0269, 10), (100, 0.9, 10): (-0.0012, 7),
    (100, 0.96, 0): (-0.2892, 13), (100, 0.96, 1): (-0.0288, 11), (100, 0.96, 10): (-0.0013, 7),
    (100, 0.99, 0): (-0.4140, 16), (100, 0.99, 1): (-0.0298, 11), (100, 0.99, 10): (-0.0013, 7),
    (1500, 0.9, 0): (-0.2498, 17), (1500, 0.9, 15): (-0.0022, 9), (1500, 0.9, 150): (-0.0001, 6),
    (1500, 0.96, 0): (-0.3801, 24), (1500, 0.96, 15): (-0.0022, 9), (1500, 0.96, 150): (-0.0001, 6),
    (1500, 0.99, 0): (-0.5422, 24), (1500, 0.99, 15): (-0.0022, 9), (1500, 0.99, 150): (-0.0001, 6),
}


@pytest.mark.parametrize("n,rho,minority", list(EQUICORRELATED))
def test_ep_on_equicorrelated_kernels_against_the_exact_integral(n, rho, minority):
    from orthant_reference import equicorrelated_log_orthant

    K = rho * np.ones((n, n)) + (1 - rho) * np.eye(n)
    y = np.ones(n)
    y[:minority] = -1
    exact = equicorrelated_log_orthant(n, minority, rho)
    res = ep_log_evidence(K, y, return_info=True)
    bias, sweeps = EQUICORRELATED[n, rho, minority]
    assert res.converged
    assert res.log_z - exact == pytest.approx(bias, abs=2e-3), res.log_z - exact
    assert res.log_z < exact  # EP underestimates every labelling of this family
    assert res.sweeps <= sweeps + 3, res.sweeps  # no regression of the damping schedule


def test_damping_follows_the_secant_estimate_and_grows_back_slowly():
    from flatfast.prior.ep import next_damping

    step = np.array([1.0, -2.0, 0.5])
    # a two-cycle of undamped EP (each proposal the negative of the last): lam = -1, damping 1 / (1 - lam) = 1/2
    assert next_damping(1.0, -step, step) == pytest.approx(0.5)
    # a diverging oscillation under damping 0.5: ratio 1 - d + d lam = -1.5 -> lam = -4 -> 1/5
    assert next_damping(0.5, -1.5 * step, step) == pytest.approx(0.2)
    # a mild oscillation (lam = -0.3) or a contracting mode: no damping needed, grow back at most 2x
    assert next_damping(1.0, -0.3 * step, step) == 1.0
    assert next_damping(0.1, 0.5 * step, step) == pytest.approx(0.2)
    assert next_damping(0.7, 0.5 * step, step) == 1.0
    # never below the floor from here (cavity retries halve further), and a zero step changes nothing
    assert next_damping(0.01, -1e6 * step, step) == 1e-3
    assert next_damping(0.3, step, 0 * step) == 0.3


def test_warm_start_mirrors_the_sites_of_flipped_labels(rng):
    """A warm start from another labelling negates nu where the labels differ: with 30 % of the labels flipped it
    still saves a sweep over a cold start, and over the unmirrored sites (which is what the warm start was)."""
    X = rng.random((400, 30))
    K = flatfast.nngp_kernel(X)
    y = np.where(X[:, :15].sum(1) > X[:, 15:].sum(1), 1.0, -1.0)
    flipped = np.where(rng.random(400) < 0.3, -y, y)
    first = ep_log_evidence(K, y, return_info=True)
    cold = ep_log_evidence(K, flipped, return_info=True)
    warm = ep_log_evidence(K, flipped, return_info=True, warm_start=first)
    np.testing.assert_array_equal(first.labels, y)
    assert warm.converged and abs(warm.log_z - cold.log_z) <= 1e-6
    unmirrored = flatfast.prior.ep.expectation_propagation(
        K, flipped, init=(first.site_precision, first.site_natural_mean))
    assert warm.sweeps < min(cold.sweeps, unmirrored.sweeps), (warm.sweeps, cold.sweeps, unmirrored.sweeps)


# --- the second-order correction (Opper, Paquet & Winther) ------------------------------------------------------

def test_second_order_correction_recovers_a_trivariate_orthant():
    """P(g1 > 0, g2 > 0, g3 < 0) for unit variances and correlations 1/2 is 1/8 + sum asin(rho_ij) / (4 pi) with
    rho = (1/2, -1/2, -1/2) for (g1, g2, -g3): 1/12 exactly. EP is off by 2.32e-4 nats; the correction takes
    97 % of that away."""
    K = 0.5 * np.eye(3) + 0.5
    exact = np.log(1.0 / 12.0)
    res = ep_log_evidence(K, [1, 1, -1], return_info=True, correction=True, tol=1e-12)
    assert res.log_z - exact == pytest.approx(2.32e-4, abs=2e-6)
    assert abs(res.corrected_log_z - exact) < 0.05 * abs(res.log_z - exact)


@pytest.mark.parametrize("rho,minority", [(0.9, 1), (0.9, 10), (0.99, 1), (0.9, 0), (0.99, 0)])
def test_second_order_correction_on_equicorrelated_kernels(rho, minority):
    """With minority labels the pair terms account for EP's whole error (within 10 %); with unanimous labels,
    where EP is weakest, they overshoot it (the expansion in the posterior correlations is not converging there),
    so a correction that large flags EP's value as off by as much -- which the docstring says."""
    from orthant_reference import equicorrelated_log_orthant

    n = 100
    K = rho * np.ones((n, n)) + (1 - rho) * np.eye(n)
    y = np.ones(n)
    y[:minority] = -1
    error = ep_log_evidence(K, y) - equicorrelated_log_orthant(n, minority, rho)
    res = ep_log_evidence(K, y, return_info=True, correction=True)
    if minority:
        assert res.correction == pytest.approx(-error, rel=0.1), (res.correction, error)
    else:
        assert res.correction > 1.5 * abs(error), (res.correction, error)


def test_second_order_correction_of_probit_is_heaviside_on_k_plus_i(rng):
    X = rng.random((150, 20))
    K = flatfast.nngp_kernel(X)
    y = np.where(X[:, 0] > 0.5, 1, -1)
    probit = ep_log_evidence(K, y, likelihood="probit", return_info=True, correction=True)
    shifted = ep_log_evidence(K + np.eye(150), y, return_info=True, correction=True)
    assert probit.correction == pytest.approx(shifted.correction, rel=1e-6, abs=1e-10)
    assert ep_log_evidence(K, y, return_info=True).correction is None  # only when asked for
    with pytest.raises(ValueError, match="correction: is EP's second-order correction, for method='ep' only"):
        ep_log_evidence(K, y, method="tilting", correction=True)
    with pytest.raises(TypeError, match="correction: expected True or False"):
        ep_log_evidence(K, y, correction="yes")


def test_secant_step_lands_on_the_fixed_point_of_a_linear_map_with_two_bad_modes():
    """EP's map on unanimous labels has an oscillating mode (-5.8) and a slow one (+0.87): no damping serves both
    (the best, 0.29, contracts 0.96 a sweep), but on a linear map three sweeps fix the Anderson step exactly."""
    from flatfast.prior.ep import _SecantSteps

    modes = np.array([[1.0, 1.0], [1.88, 1.0]]).T
    A = modes @ np.diag([-5.8, 0.87]) @ np.linalg.inv(modes)
    fixed_point = np.array([0.3, 0.7])
    secant = _SecantSteps(np)
    x = fixed_point + np.array([4e-4, -3e-4])
    for _ in range(3):
        f = A @ (x - fixed_point) + fixed_point - x  # F(x) - x
        secant.remember(x[:1], x[1:], x[:1] + f[:1], x[1:] + f[1:], step=f)
        x = x + 0.1 * f  # near the secant damping 1 / (1 + 5.8) = 0.15
    tau, nu = secant.extrapolate(diag_k=np.ones(1))
    np.testing.assert_allclose([tau[0], nu[0]], fixed_point, atol=1e-7)  # from 4e-4 away; the fit is regularised
    damped = x
    for _ in range(3):
        damped = damped + 0.1 * (A @ (damped - fixed_point) + fixed_point - damped)
    assert np.abs(damped - fixed_point).max() > 1e-5  # the damped steps are still far


def test_secant_step_declines_when_the_sweeps_proposed_the_same_step():
    from flatfast.prior.ep import _SecantSteps

    secant = _SecantSteps(np)
    for x in (0.1, 0.2, 0.3):  # a constant residual: the differences are zero and fit nothing
        secant.remember(np.array([x]), np.array([x]), np.array([x + 0.001]), np.array([x + 0.001]),
                        step=np.array([0.001, 0.001]))
    assert secant.extrapolate(diag_k=np.ones(1)) is None
