"""Calibrated noise mechanisms with data-independent bounds (DESIGN section 4).

Every number released from private data goes through one of these: its contribution per
privacy unit is clipped to a bound fixed *before* looking at the data, and noise is scaled
to that bound. Noise on a fitted NMF basis or on final k-means centroids has unbounded
sensitivity and is not differential privacy; nothing here offers it.

- :func:`gaussian_sigma`: the analytic Gaussian mechanism (Balle & Wang 2018), the smallest
  sigma giving (epsilon, delta)-DP for one release of L2 sensitivity ``sensitivity``.
- :func:`laplace_scale`: the Laplace mechanism, scale = L1 sensitivity / epsilon.
- :func:`cap_cells_per_unit`, :func:`clip_rows_l2`, :func:`clipped_unit_sums`: how a unit's
  contribution is bounded (at most ``max_cells`` cells, each row clipped in L2 norm, or
  the unit's summed row clipped), so adding or removing one unit moves a sum by at most the
  bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.stats import norm


def analytic_gaussian_delta(sigma: float, epsilon: float, sensitivity: float = 1.0) -> float:
    """Return the smallest delta for which N(0, sigma²) noise on a query of L2 sensitivity
    ``sensitivity`` is (epsilon, delta)-DP (Balle & Wang 2018, Theorem 8)."""
    if sigma <= 0:
        return 1.0
    a = sensitivity / (2.0 * sigma)
    b = epsilon * sigma / sensitivity
    # e^eps * Phi(-a - b), computed in log space so large epsilon does not overflow.
    tail = norm.logcdf(-a - b) + epsilon
    return float(norm.cdf(a - b) - math.exp(tail))


def gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """Return the smallest noise standard deviation for which one Gaussian release of L2
    sensitivity ``sensitivity`` is (epsilon, delta)-DP (analytic calibration, bisection)."""
    if epsilon <= 0 or not 0 < delta < 1:
        raise ValueError("epsilon must be > 0 and delta in (0, 1).")
    low, high = 1e-6 * sensitivity, sensitivity
    while analytic_gaussian_delta(high, epsilon, sensitivity) > delta:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if analytic_gaussian_delta(mid, epsilon, sensitivity) > delta:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * high:
            break
    return high


def laplace_scale(epsilon: float, sensitivity: float = 1.0) -> float:
    """Return the Laplace scale b = L1 sensitivity / epsilon for an epsilon-DP release."""
    if epsilon <= 0:
        raise ValueError("epsilon must be > 0.")
    return sensitivity / epsilon


def cap_cells_per_unit(
    units: np.ndarray, *, max_cells: int, rng: np.random.Generator
) -> np.ndarray:
    """Return sorted row positions keeping at most ``max_cells`` random cells per unit, so
    no privacy unit (donor) contributes more than ``max_cells`` rows to any statistic."""
    units = np.asarray(units)
    keep = []
    for unit in np.unique(units):
        rows = np.flatnonzero(units == unit)
        if len(rows) > max_cells:
            rows = rng.choice(rows, size=max_cells, replace=False)
        keep.append(rows)
    return np.sort(np.concatenate(keep)) if keep else np.empty(0, dtype=int)


def clip_rows_l2(matrix: np.ndarray | sp.spmatrix, bound: float) -> np.ndarray | sp.csr_matrix:
    """Return the rows scaled down so each has L2 norm at most ``bound`` (others unchanged)."""
    if sp.issparse(matrix):
        matrix = sp.csr_matrix(matrix, dtype=np.float64)
        norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
        factors = np.minimum(1.0, bound / np.maximum(norms, 1e-300))
        return sp.csr_matrix(sp.diags(factors) @ matrix)
    matrix = np.asarray(matrix, dtype=np.float64)
    norms = np.linalg.norm(matrix, axis=1)
    factors = np.minimum(1.0, bound / np.maximum(norms, 1e-300))
    return matrix * factors[:, None]


def clipped_unit_sums(
    matrix: np.ndarray | sp.spmatrix, units: np.ndarray, *, bound: float
) -> np.ndarray:
    """Return the sum over units of each unit's summed rows clipped to L2 norm ``bound``.

    Adding or removing one unit changes the result by a vector of norm at most ``bound``:
    the L2 sensitivity of this sum is ``bound`` whatever the data.
    """
    units = np.asarray(units)
    labels, codes = np.unique(units, return_inverse=True)
    indicator = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))),
                              shape=(len(labels), len(codes)))
    per_unit = indicator @ (matrix if sp.issparse(matrix) else np.asarray(matrix))
    per_unit = per_unit.toarray() if sp.issparse(per_unit) else np.asarray(per_unit)
    return np.asarray(clip_rows_l2(per_unit, bound)).sum(axis=0)


@dataclass(frozen=True)
class GaussianRelease:
    """One Gaussian release: its L2 sensitivity and noise standard deviation."""

    sensitivity: float
    sigma: float

    @property
    def noise_multiplier(self) -> float:
        """sigma / sensitivity: what the accountant needs."""
        return self.sigma / self.sensitivity

    def release(self, value: np.ndarray | float, rng: np.random.Generator) -> np.ndarray:
        """Return ``value`` plus N(0, sigma²) noise of the same shape."""
        value = np.asarray(value, dtype=np.float64)
        return value + rng.normal(0.0, self.sigma, size=value.shape)
