"""Before / after views of denoised cells: marker genes, cell-type separation, a joint UMAP.

Works on the ``observed`` and ``denoised`` log-normalised layers that
:meth:`engine.generators.diffusion.DiffusionGenerator.denoise` writes.
"""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

MARKERS_PER_TYPE = 2


def marker_genes(expression: np.ndarray, labels: np.ndarray, genes: list[str], *,
                 per_type: int = MARKERS_PER_TYPE) -> list[str]:
    """Return, per cell type, the genes whose mean is highest above the other cells' mean
    (``per_type`` each, no repeats), in type order."""
    chosen: list[str] = []
    for label in sorted(pd.unique(labels)):
        own = labels == label
        if own.all():
            continue
        gap = expression[own].mean(axis=0) - expression[~own].mean(axis=0)
        fresh = [genes[p] for p in np.argsort(-gap, kind="stable") if genes[p] not in chosen]
        chosen += fresh[:per_type]
    return chosen


def _silhouette(points: np.ndarray, labels: np.ndarray, seed: int) -> float:
    from sklearn.metrics import silhouette_score

    if len(pd.unique(labels)) < 2:
        return float("nan")
    size = min(3000, points.shape[0])
    return float(silhouette_score(points, labels, sample_size=size, random_state=seed))


def analyse_denoising(denoised: ad.AnnData, *, label_key: str | None = None, seed: int = 0,
                      max_cells: int = 3000) -> tuple[dict[str, Any], pd.DataFrame]:
    """Return (summary, embedding) of denoised cells.

    The summary holds the share of zero entries before and after, the silhouette of the cell
    types in the principal components of the observed cells before and after (higher: types
    better separated), and marker genes per type. The embedding is a UMAP of up to
    ``max_cells`` cells before and after (two rows per cell, ``state`` observed/denoised),
    with the cell type and the marker genes' expression."""
    import umap
    from sklearn.decomposition import PCA

    observed = np.asarray(denoised.layers["observed"])
    after = np.asarray(denoised.layers["denoised"])
    genes = [str(g) for g in denoised.var_names]
    labels = (denoised.obs[label_key].astype(str).to_numpy()
              if label_key and label_key in denoised.obs else None)
    pca = PCA(n_components=max(2, min(30, observed.shape[0] - 1, observed.shape[1])),
              random_state=seed).fit(observed)
    summary: dict[str, Any] = {
        "n_cells": int(denoised.n_obs),
        **denoised.uns.get("denoise", {}),
        "zero_share_observed": float(np.mean(observed <= 0)),
        "zero_share_denoised": float(np.mean(after <= 1e-3)),
    }
    markers: list[str] = []
    if labels is not None:
        summary["silhouette_observed"] = _silhouette(pca.transform(observed), labels, seed)
        summary["silhouette_denoised"] = _silhouette(pca.transform(after), labels, seed)
        markers = marker_genes(observed, labels, genes)
    summary["marker_genes"] = markers
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.permutation(denoised.n_obs)[:max_cells])
    stacked = np.vstack([observed[rows], after[rows]])
    coords = umap.UMAP(n_neighbors=min(15, stacked.shape[0] - 1),
                       random_state=seed).fit_transform(pca.transform(stacked))
    embedding = pd.DataFrame({
        "umap_1": coords[:, 0], "umap_2": coords[:, 1],
        "state": ["observed"] * rows.size + ["denoised"] * rows.size,
        "cell": np.concatenate([rows, rows]).astype(int),
        "cell_type": (np.concatenate([labels[rows], labels[rows]]) if labels is not None
                      else "cells"),
    })
    for gene in markers:
        j = genes.index(gene)
        embedding[gene] = stacked[:, j]
    return summary, embedding
