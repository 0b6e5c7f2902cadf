"""DP building blocks: noise calibrated to the formula, bounded contributions, and totals
that agree with dp-accounting."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
import scipy.sparse as sp
from dp_accounting import pld

from engine.privacy.accountant import Accountant, calibrate_noise_multiplier, default_delta
from engine.privacy.mechanisms import (
    GaussianRelease,
    analytic_gaussian_delta,
    cap_cells_per_unit,
    clip_rows_l2,
    clipped_unit_sums,
    gaussian_sigma,
    laplace_scale,
)


def test_analytic_gaussian_sigma_meets_delta_exactly_and_beats_the_classic_bound() -> None:
    sigma = gaussian_sigma(1.0, 1e-5, sensitivity=1.0)
    assert analytic_gaussian_delta(sigma, 1.0) == pytest.approx(1e-5, rel=1e-6)
    assert analytic_gaussian_delta(sigma * 0.99, 1.0) > 1e-5  # the smallest such sigma
    classic = math.sqrt(2 * math.log(1.25 / 1e-5)) / 1.0
    assert 3.6 < sigma < 3.9 < classic  # 3.73 vs 4.84
    assert gaussian_sigma(1.0, 1e-5, sensitivity=3.0) == pytest.approx(3 * sigma, rel=1e-6)


def test_one_gaussian_release_is_what_dp_accounting_says() -> None:
    sigma = gaussian_sigma(2.0, 1e-6)
    accountant = pld.PLDAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(sigma))
    assert accountant.get_epsilon(1e-6) == pytest.approx(2.0, rel=0.01)


def test_laplace_scale_is_sensitivity_over_epsilon() -> None:
    assert laplace_scale(0.5, sensitivity=2.0) == 4.0
    accountant = Accountant()
    accountant.laplace("counts", noise_multiplier=laplace_scale(0.5))
    assert accountant.epsilon(1e-10) == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError):
        laplace_scale(0.0)


def test_clipped_unit_sums_move_by_at_most_the_bound_when_a_unit_is_removed() -> None:
    rng = np.random.default_rng(0)
    matrix = rng.poisson(3.0, size=(300, 20)).astype(float)
    units = rng.integers(0, 30, size=300)
    matrix[units == 7] *= 1000.0  # an outlier unit cannot move the sum past the bound
    bound = 5.0
    full = clipped_unit_sums(matrix, units, bound=bound)
    for unit in np.unique(units):
        keep = units != unit
        without = clipped_unit_sums(matrix[keep], units[keep], bound=bound)
        assert np.linalg.norm(full - without) <= bound + 1e-9
    sparse_sums = clipped_unit_sums(sp.csr_matrix(matrix), units, bound=bound)
    assert np.allclose(sparse_sums, full)


def test_row_clipping_and_cell_caps() -> None:
    rows = np.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    clipped = clip_rows_l2(rows, 1.0)
    assert np.allclose(np.linalg.norm(clipped, axis=1), [1.0, 0.5, 0.0])
    assert np.allclose(clip_rows_l2(sp.csr_matrix(rows), 1.0).toarray(), clipped)
    units = np.repeat(["a", "b", "c"], [50, 3, 10])
    kept = cap_cells_per_unit(units, max_cells=5, rng=np.random.default_rng(1))
    counts = {u: int((units[kept] == u).sum()) for u in "abc"}
    assert counts == {"a": 5, "b": 3, "c": 5}


def test_composition_matches_dp_accounting_on_known_events() -> None:
    # k Gaussian releases with multiplier s compose exactly like one with s / sqrt(k).
    accountant = Accountant()
    accountant.gaussian("nmf steps", noise_multiplier=8.0, count=16)
    single = Accountant()
    single.gaussian("one", noise_multiplier=2.0)
    assert accountant.epsilon(1e-5) == pytest.approx(single.epsilon(1e-5), rel=1e-3)
    # A mixed run against dp-accounting called directly.
    accountant.laplace("counts", noise_multiplier=10.0, count=3)
    accountant.gaussian("sampled", noise_multiplier=1.1, count=50, sampling_rate=0.01)
    direct = pld.PLDAccountant()
    direct.compose(dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(8.0), 16),
        dp_accounting.SelfComposedDpEvent(dp_accounting.LaplaceDpEvent(10.0), 3),
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1)), 50),
    ]))
    assert accountant.epsilon(1e-5) == pytest.approx(direct.get_epsilon(1e-5), rel=1e-6)
    rdp_total = Accountant(method="rdp", releases=accountant.releases).epsilon(1e-5)
    assert rdp_total >= accountant.epsilon(1e-5) * 0.99  # RDP is never tighter than PLD
    spend = accountant.spend(1e-5)
    assert spend["delta"] == 1e-5 and len(spend["releases"]) == 3
    assert Accountant().epsilon(1e-5) == 0.0


def test_total_budget_mode_splits_one_epsilon_across_mechanisms() -> None:
    releases = [("nmf", "gaussian", 20, None), ("kmeans", "gaussian", 10, None),
                ("summaries", "gaussian", 2, None)]
    multiplier = calibrate_noise_multiplier(epsilon=4.0, delta=1e-5, releases=releases)
    accountant = Accountant()
    for name, _, count, _ in releases:
        accountant.gaussian(name, noise_multiplier=multiplier, count=count)
    assert accountant.epsilon(1e-5) == pytest.approx(4.0, rel=0.01)
    assert accountant.epsilon(1e-5) <= 4.0 + 1e-9  # never over budget


def test_released_noise_has_the_calibrated_spread() -> None:
    release = GaussianRelease(sensitivity=2.0, sigma=gaussian_sigma(1.0, 1e-5, 2.0))
    draws = release.release(np.zeros(200_000), np.random.default_rng(0))
    assert np.std(draws) == pytest.approx(release.sigma, rel=0.01)
    assert abs(np.mean(draws)) < 0.01 * release.sigma * 10
    assert release.noise_multiplier == pytest.approx(release.sigma / 2.0)


def test_default_delta_is_at_most_one_over_ten_units() -> None:
    assert default_delta(200) == pytest.approx(1 / 2000)
    assert default_delta(0) == 0.1


def test_plain_gaussian_releases_compose_as_one_gaussian_exactly() -> None:
    accountant = Accountant()
    accountant.gaussian("profiles", noise_multiplier=3.0, count=4)
    accountant.gaussian("sizes", noise_multiplier=5.0)
    accountant.gaussian("libraries", noise_multiplier=1.5, count=2)
    assert len(accountant.events()) == 1
    merged = 1.0 / math.sqrt(4 / 9 + 1 / 25 + 2 / 1.5**2)
    epsilon = accountant.epsilon(1e-5)
    # PLD is pessimistic: at its ε the exact (analytic) δ is within budget, and 0.1 % less
    # ε is not: the merged total is the exact one up to the discretisation.
    assert analytic_gaussian_delta(merged, epsilon) <= 1e-5
    assert analytic_gaussian_delta(merged, epsilon * 0.999) > 1e-5
    accountant.gaussian("sampled", noise_multiplier=1.1, count=50, sampling_rate=0.01)
    accountant.laplace("counts", noise_multiplier=10.0)
    assert len(accountant.events()) == 3  # subsampled and Laplace releases stay apart
    direct = pld.PLDAccountant()
    direct.compose(dp_accounting.ComposedDpEvent([
        dp_accounting.GaussianDpEvent(3.0 / 2), dp_accounting.GaussianDpEvent(5.0),
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.5), 2),
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1)), 50),
        dp_accounting.LaplaceDpEvent(10.0)]))
    assert accountant.epsilon(1e-5) == pytest.approx(direct.get_epsilon(1e-5), rel=2e-3)
    assert accountant.epsilon(1e-5) <= direct.get_epsilon(1e-5) + 1e-9  # never looser


@pytest.mark.parametrize("epsilon", [1.0, 4.0, 10.0])
def test_calibration_of_plain_gaussians_is_analytic_and_spends_the_budget(
        epsilon: float) -> None:
    releases = [("profiles", "gaussian", 1, None, 1.0), ("sizes", "gaussian", 1, None, 3.0),
                ("libraries", "gaussian", 2, None, 3.0), ("pooled", "gaussian", 1, None)]
    multiplier = calibrate_noise_multiplier(epsilon=epsilon, delta=1e-5, releases=releases)
    weight = math.sqrt(1 + 1 / 9 + 2 / 9 + 1)  # Σ count / factor²
    assert multiplier == pytest.approx(gaussian_sigma(epsilon, 1e-5) * weight, rel=0.011)
    accountant = Accountant()
    for name, _, count, _, *factor in releases:
        accountant.gaussian(name, noise_multiplier=multiplier * (factor[0] if factor else 1),
                            count=count)
    assert 0.995 * epsilon <= accountant.epsilon(1e-5) <= epsilon + 1e-9
