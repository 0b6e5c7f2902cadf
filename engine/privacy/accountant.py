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

from engine.privacy.mechanisms import gaussian_sigma

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

    def events(self) -> list[dp_accounting.DpEvent]:
        """The dp-accounting events of every release, the Gaussian releases without
        subsampling merged into one Gaussian of multiplier ``(Σ count / multiplier²)^-1/2``.

        The merge is exact, not a bound: Gaussian mechanisms compose, adaptively too, like
        one Gaussian whose sensitivity-to-noise ratio is the root sum of squares of theirs
        (Dong, Roth & Su 2019, Gaussian differential privacy, Corollary 3.3). It makes the
        PLD accountant discretise one event instead of a dozen (a DP-NMF plan at ε = 10 took
        21 s of calibration, the Privacy page's total lagged its sliders by as much) and
        loses nothing to the discretisation of each of them."""
        inverse_square = 0.0
        events: list[dp_accounting.DpEvent] = []
        for release in self.releases:
            plain = release.sampling_rate is None or release.sampling_rate >= 1.0
            if release.mechanism == "gaussian" and plain:
                inverse_square += release.count / release.noise_multiplier**2
            else:
                events.append(release.event())
        if inverse_square > 0:
            events.insert(0, dp_accounting.GaussianDpEvent(1.0 / math.sqrt(inverse_square)))
        return events

    def _accountant(self) -> dp_accounting.PrivacyAccountant:
        if self.method == "pld":
            accountant = pld.PLDAccountant()
        elif self.method == "rdp":
            accountant = rdp.RdpAccountant()
        else:
            raise ValueError(f"method must be 'pld' or 'rdp', not {self.method!r}")
        if self.releases:
            accountant.compose(dp_accounting.ComposedDpEvent(self.events()))
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
    gigabytes. When every release is a Gaussian without subsampling they compose exactly
    like one Gaussian (:meth:`Accountant.events`), whose multiplier for (ε, δ) is known
    analytically (:func:`gaussian_sigma`): the answer is that, raised by the least of 0.01,
    0.1 or 1 % that brings the PLD accountant's (pessimistic) total within budget.
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

    if method == "pld" and all(mechanism == "gaussian" and (rate is None or rate >= 1.0)
                               for _, mechanism, _, rate, *_ in releases):
        weight = math.sqrt(sum(count / (factor[0] if factor else 1.0) ** 2
                               for _, _, count, _, *factor in releases))
        exact = gaussian_sigma(epsilon, delta) * weight
        if exact >= PLD_MIN_MULTIPLIER:
            for margin in (1.0001, 1.001, 1.01):
                if total(exact * margin, "pld") <= epsilon:
                    return exact * margin
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
