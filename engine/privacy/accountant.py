"""One accountant per run: it composes every release into the total (epsilon, delta).

Built on Google's ``dp-accounting`` (privacy-loss distributions by default, Rényi DP as an
option). Each release is recorded as a JSON-able event, so the spend is stored with the run
and the UI shows the accountant's own total, before training (from the settings) and after.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dp_accounting
from absl import logging as absl_logging
from dp_accounting import pld, rdp

# RDP orders that fail to converge are excluded from the bound (it stays valid, slightly
# looser); dp-accounting logs each one as a warning, which only floods the job logs.
absl_logging.set_verbosity(absl_logging.ERROR)


def default_delta(n_units: int) -> float:
    """Return the default delta: at most 1 / (10 · number of privacy units)."""
    return 1.0 / (10.0 * max(1, n_units))


@dataclass
class Release:
    """One recorded release: a Gaussian or Laplace mechanism with its noise multiplier
    (noise scale / sensitivity), repeated ``count`` times, optionally Poisson-subsampled."""

    name: str
    mechanism: str  # "gaussian" | "laplace"
    noise_multiplier: float
    count: int = 1
    sampling_rate: float | None = None

    def event(self) -> dp_accounting.DpEvent:
        """Return the dp-accounting event of this release."""
        if self.mechanism == "gaussian":
            single: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        elif self.mechanism == "laplace":
            single = dp_accounting.LaplaceDpEvent(self.noise_multiplier)
        else:
            raise ValueError(f"unknown mechanism {self.mechanism!r}")
        if self.sampling_rate is not None and self.sampling_rate < 1.0:
            single = dp_accounting.PoissonSampledDpEvent(self.sampling_rate, single)
        return dp_accounting.SelfComposedDpEvent(single, self.count) if self.count > 1 else single


@dataclass
class Accountant:
    """Records releases and returns their composed (epsilon, delta).

    ``method`` is ``"pld"`` (tight; default) or ``"rdp"`` (Rényi DP, looser, faster for very
    many subsampled steps). The neighbouring relation is add-or-remove one privacy unit.
    """

    method: str = "pld"
    releases: list[Release] = field(default_factory=list)

    @classmethod
    def from_releases(cls, releases: Sequence[dict[str, Any]], method: str = "pld"
                      ) -> Accountant:
        """Rebuild an accountant from stored releases (``Release.__dict__`` each)."""
        accountant = cls(method=method)
        accountant.releases = [Release(**r) for r in releases]
        return accountant

    def gaussian(self, name: str, *, noise_multiplier: float, count: int = 1,
                 sampling_rate: float | None = None) -> None:
        """Record ``count`` Gaussian releases with noise std = multiplier × L2 sensitivity."""
        self.releases.append(Release(name, "gaussian", float(noise_multiplier), int(count),
                                     sampling_rate))

    def laplace(self, name: str, *, noise_multiplier: float, count: int = 1) -> None:
        """Record ``count`` Laplace releases with scale = multiplier × L1 sensitivity."""
        self.releases.append(Release(name, "laplace", float(noise_multiplier), int(count)))

    def _accountant(self) -> dp_accounting.PrivacyAccountant:
        if self.method == "pld":
            accountant = pld.PLDAccountant()
        elif self.method == "rdp":
            accountant = rdp.RdpAccountant()
        else:
            raise ValueError(f"method must be 'pld' or 'rdp', not {self.method!r}")
        if self.releases:
            accountant.compose(dp_accounting.ComposedDpEvent([r.event() for r in self.releases]))
        return accountant

    def epsilon(self, delta: float) -> float:
        """Return the total epsilon of every recorded release at ``delta`` (0 if none)."""
        if not self.releases:
            return 0.0
        return float(self._accountant().get_epsilon(delta))

    def spend(self, delta: float) -> dict[str, Any]:
        """Return the total and the releases as a JSON-able dict (stored with a run)."""
        return {
            "epsilon": self.epsilon(delta),
            "delta": delta,
            "accountant": f"dp-accounting {self.method.upper()}, add-or-remove one unit",
            "releases": [r.__dict__ for r in self.releases],
        }


def calibrate_noise_multiplier(
    *,
    epsilon: float,
    delta: float,
    releases: Sequence[tuple[Any, ...]],
    method: str = "pld",
) -> float:
    """Return the one noise multiplier that, used by every release in ``releases`` (name,
    mechanism, count, sampling rate, and optionally a factor: that release's multiplier is
    the answer times the factor), makes their composition at most (``epsilon``,
    ``delta``)-DP, as close to it as the search allows: the total-budget mode that splits
    one epsilon across mechanisms.

    The search runs on Rényi DP first (cheap at any noise level; its epsilon is never below
    the PLD one, so its answer is always within budget), then, for ``method="pld"``,
    narrows down with the tighter PLD accountant between 0.6× and 1× that answer. PLD is
    never evaluated at tiny multipliers, where its discretised loss distribution would need
    gigabytes.
    """

    def total(multiplier: float, how: str) -> float:
        accountant = Accountant(method=how)
        for name, mechanism, count, rate, *factor in releases:
            accountant.releases.append(Release(name, mechanism,
                                               multiplier * (factor[0] if factor else 1.0),
                                               count, rate))
        return accountant.epsilon(delta)

    def bisect(low: float, high: float, how: str) -> float:
        for _ in range(60):
            mid = math.sqrt(low * high)
            if total(mid, how) > epsilon:
                low = mid
            else:
                high = mid
            if high / low < 1 + 1e-4:
                break
        return high

    high = 1.0
    while total(high, "rdp") > epsilon:
        high *= 2.0
        if high > 1e6:
            raise ValueError("This budget is too small for these releases.")
    low = high / 2.0
    while total(low, "rdp") <= epsilon and low > 1e-3:
        high, low = low, low / 2.0
    answer = bisect(low, high, "rdp")
    if method != "pld" or answer * 0.6 < PLD_MIN_MULTIPLIER:
        return answer
    low = answer * 0.6
    if total(low, "pld") <= epsilon:
        return low
    return bisect(low, answer, "pld")


# Below this noise multiplier the PLD accountant's discretised loss gets very large; the
# calibration keeps to RDP there (a slightly larger, still valid, multiplier).
PLD_MIN_MULTIPLIER = 0.3
