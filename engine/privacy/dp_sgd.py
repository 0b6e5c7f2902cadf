"""DP-SGD shared by the torch generators: privacy units, Poisson sampling, per-unit clipping.

Each step, every privacy unit (a donor, or a cell) joins the batch with probability ``rate``
(Poisson sampling); per-cell gradients of the summed loss (Opacus' ``GradSampleModule``) are
summed per unit (a unit holds at most ``cap`` cells, chosen at random once), each unit's
gradient is clipped to L2 norm ``clip``, Gaussian noise of std ``sigma · clip`` is added to the
sum, which is divided by the expected number of units. The optimiser steps on that, which is
post-processing. ``sigma`` is calibrated so the accountant's total over all steps (and any
other releases of the run) is the configured ε at δ.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd


@dataclass
class DPSGDPlan:
    """Which cells take part, the units they belong to, and the calibrated noise."""

    kept: np.ndarray  # positions (into the training cells) of the cells that take part
    units: np.ndarray  # unit index (0..n_units-1) of each kept cell
    n_units: int
    rate: float  # Poisson sampling probability of a unit per step
    steps: int
    sigma: float  # noise multiplier of the gradient sum
    delta: float
    unit_name: str

    @property
    def expected_units(self) -> float:
        """Expected number of units per step (the denominator of the noisy mean)."""
        return self.rate * self.n_units


def units_of_cells(donors: Sequence[Any] | None, n_cells: int, *, cap: int,
                   donor_key: str, rng: np.random.Generator,
                   usable: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Return (kept cell positions, their unit index, the unit's name): each donor keeps at
    most ``cap`` random cells; without donors every cell is its own unit. ``usable`` (a
    boolean mask) drops cells before the cap is applied (e.g. cells without counts)."""
    usable = np.ones(n_cells, dtype=bool) if usable is None else np.asarray(usable, bool)
    if donors is not None:
        unit_of_cell = pd.factorize(np.asarray(donors).astype(str))[0]
        name = f"donor ({donor_key})"
    else:
        unit_of_cell = np.arange(n_cells)
        name = "cell"
        cap = 1
    keep = np.zeros(n_cells, dtype=bool)
    candidates = np.flatnonzero(usable)
    for cells in pd.Series(candidates).groupby(unit_of_cell[candidates]).indices.values():
        keep[candidates[rng.permutation(cells)[:cap]]] = True
    kept = np.flatnonzero(keep)
    return kept, pd.factorize(unit_of_cell[kept])[0], name


def plan_dp_sgd(*, kept: np.ndarray, units: np.ndarray, unit_name: str, batch_size: int,
                epochs: float, epsilon: float, delta: float,
                other_releases: Sequence[tuple[Any, ...]] = ()) -> DPSGDPlan:
    """Return the plan: a sampling rate giving ``batch_size`` cells per step on average,
    ``epochs`` passes worth of steps, and the one noise multiplier that makes these steps
    plus ``other_releases`` (tuples for :func:`calibrate_noise_multiplier`, whose factor
    scales their multiplier relative to the DP-SGD one) total (``epsilon``, ``delta``)."""
    from engine.privacy.accountant import calibrate_noise_multiplier

    n_units = int(units.max()) + 1 if units.size else 0
    if n_units == 0:
        raise ValueError("no privacy units to train on")
    cells_per_unit = len(kept) / n_units
    rate = min(1.0, batch_size / cells_per_unit / n_units)
    steps = max(1, round(epochs / rate))
    sigma = calibrate_noise_multiplier(
        epsilon=epsilon, delta=delta,
        releases=[*other_releases, ("dp-sgd", "gaussian", steps, rate)])
    return DPSGDPlan(kept=kept, units=units, n_units=n_units, rate=rate, steps=steps,
                     sigma=sigma, delta=delta, unit_name=unit_name)


def draw_step(plan: DPSGDPlan, cells_of_unit: dict[int, np.ndarray],
              rng: np.random.Generator) -> np.ndarray:
    """Return the rows (into the kept cells) of one Poisson-sampled step."""
    chosen = np.flatnonzero(rng.random(plan.n_units) < plan.rate)
    if not chosen.size:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([cells_of_unit[u] for u in chosen])


def cells_by_unit(plan: DPSGDPlan) -> dict[int, np.ndarray]:
    """Return the kept-cell rows of each unit."""
    return dict(pd.Series(np.arange(len(plan.kept))).groupby(plan.units).indices)


def noisy_gradients(wrapped: Any, params: list[Any], plan: DPSGDPlan, rows: np.ndarray,
                    summed_loss: Callable[[np.ndarray], Any], *, clip: float,
                    device: Any) -> None:
    """Set ``p.grad`` of every parameter to the clipped, noised mean gradient of one step.

    ``wrapped`` is the Opacus ``GradSampleModule`` around the module that owns ``params``;
    ``summed_loss(rows)`` returns the loss of those kept-cell rows **summed over cells**
    (so each cell's gradient is its own). With no rows, the gradient is noise only."""
    import torch

    summed = [torch.zeros_like(p) for p in params]
    if rows.size:
        loss = summed_loss(rows)
        wrapped.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # Opacus' hooks on the first layers: the inputs need no gradient.
            warnings.filterwarnings("ignore", message="Full backward hook")
            loss.backward()
        unit_index = torch.as_tensor(pd.factorize(plan.units[rows])[0], device=device)
        n_batch_units = int(unit_index.max()) + 1
        per_unit = []
        for p in params:
            sample = p.grad_sample if p.grad_sample is not None else torch.zeros(
                (rows.size, *p.shape), device=device)
            grouped = torch.zeros((n_batch_units, *p.shape), device=device)
            per_unit.append(grouped.index_add_(0, unit_index, sample))
        norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in per_unit))
        factor = torch.clamp(clip / (norms + 1e-12), max=1.0)
        summed = [torch.einsum("u,u...->...", factor, g) for g in per_unit]
    for p, total in zip(params, summed, strict=True):
        noise = torch.normal(0.0, plan.sigma * clip, size=p.shape, device=device)
        p.grad = (total + noise) / plan.expected_units
        p.grad_sample = None
