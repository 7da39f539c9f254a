"""method="smc": sequential Monte Carlo from EP's Gaussian to the orthant (flatfast._smc), against exact values."""
import math

import numpy as np
import pytest

import flatfast
from flatfast import _smc
from orthant_reference import equicorrelated_log_orthant


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
    assert _smc._next_stage(0.0, flat, flat, 1000.0, np) == pytest.approx(0.25 * (1e-3 + 1.0))
    assert _smc._next_stage(0.9, flat, flat, 1000.0, np) == pytest.approx(0.9 + 0.25 * (1e-3 + 0.1))
    assert _smc._next_stage(0.5, flat, flat, 0.1, np) == 1.0  # 1/m large: the last step is safe at once


def test_smc_warns_when_its_runs_disagree():
    K, y, _ = _equicorrelated(60, 0.99, 6)
    with pytest.warns(flatfast.UnreliableEstimateWarning, match="independent runs"):
        flatfast.ep_log_evidence(K, y, method="smc", n_samples=20, seed=0)


def test_smc_arguments():
    K, y, _ = _equicorrelated(10, 0.9, 0)
    with pytest.raises(ValueError, match="n_samples"):
        flatfast.ep_log_evidence(K, y, method="smc", n_samples=10)
    with pytest.raises(ValueError, match="correction"):
        flatfast.ep_log_evidence(K, y, method="smc", correction=True)
