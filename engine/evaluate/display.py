"""Helpers that prepare data for pictures: downsampling and readable labels."""

from __future__ import annotations

import numpy as np
import pandas as pd

DISPLAY_MAX_POINTS = 100_000


def downsample_for_display(
    labels: pd.Series | np.ndarray, *, max_points: int = DISPLAY_MAX_POINTS, seed: int = 0,
    keep: np.ndarray | None = None,
) -> np.ndarray:
    """Return sorted row indices to plot: all rows when there are at most ``max_points``,
    otherwise a seeded sample stratified by ``labels`` (each level keeps its share, and at
    least one point), always including the rows flagged in ``keep`` (a selection)."""
    labels = pd.Series(np.asarray(labels)).astype(str)
    n = len(labels)
    if n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for _, rows in labels.groupby(labels, sort=True).indices.items():
        take = max(1, round(len(rows) * max_points / n))
        chosen.append(rng.choice(rows, size=min(take, len(rows)), replace=False))
    picked = np.concatenate(chosen)
    if keep is not None:
        picked = np.union1d(picked, np.flatnonzero(keep))
    return np.unique(picked)


def observed_modalities(obs: pd.DataFrame) -> pd.Series:
    """Return, per cell, which modalities are observed (e.g. ``"RNA+ADT"``), from the
    ``has_rna`` / ``has_atac`` / ``has_adt`` columns; ``"none"`` when a cell has none."""
    parts = []
    for column, name in (("has_rna", "RNA"), ("has_atac", "ATAC"), ("has_adt", "ADT")):
        if column in obs:
            parts.append(np.where(obs[column].astype(bool).to_numpy(), name, ""))
    if not parts:
        return pd.Series("RNA", index=obs.index)
    joined = ["+".join(p for p in row if p) or "none" for row in zip(*parts, strict=True)]
    return pd.Series(joined, index=obs.index, dtype="category")


def histogram_table(values: np.ndarray, *, bins: int = 60) -> pd.DataFrame:
    """Return a histogram as a small table (``left``, ``right``, ``centre``, ``cells``), so
    a page draws 60 bars instead of sending a million values to the browser. NaNs are
    dropped."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return pd.DataFrame({"left": [], "right": [], "centre": [], "cells": []})
    counts, edges = np.histogram(finite, bins=bins)
    return pd.DataFrame({"left": edges[:-1], "right": edges[1:],
                         "centre": (edges[:-1] + edges[1:]) / 2, "cells": counts})
