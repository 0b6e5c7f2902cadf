"""Low-dimensional embeddings for pictures: normalise, log1p, HVG, PCA, kNN, UMAP (scanpy)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp

MAX_EMBED_CELLS = 50_000


def umap_embedding(
    adata: ad.AnnData,
    *,
    layer: str | None = None,
    n_top_genes: int = 1000,
    n_pcs: int = 30,
    n_neighbors: int = 15,
    seed: int = 0,
    max_cells: int = MAX_EMBED_CELLS,
) -> np.ndarray:
    """Return a 2-D UMAP (n_obs × 2, float32) of the counts in ``X`` or ``layers[layer]``.

    Counts are normalised to 1e4 per cell, log1p-transformed, reduced to the most variable
    genes and to ``n_pcs`` principal components. Above ``max_cells`` cells, UMAP is fitted
    on a seeded random subset and the other cells are placed by ``umap``'s transform.
    ``adata`` is not modified. Cells with no counts get the embedding's centre.
    """
    counts = adata.layers[layer] if layer else adata.X
    counts = sp.csr_matrix(counts, dtype=np.float32)
    work = ad.AnnData(counts)
    library = np.asarray(counts.sum(axis=1)).ravel()
    has_counts = library > 0
    work = work[has_counts].copy()
    sc.pp.normalize_total(work, target_sum=1e4)
    sc.pp.log1p(work)
    n_top = min(n_top_genes, work.n_vars)
    if n_top < work.n_vars:
        sc.pp.highly_variable_genes(work, n_top_genes=n_top, flavor="seurat")
        work = work[:, work.var["highly_variable"].to_numpy()].copy()
    n_comps = max(2, min(n_pcs, work.n_obs - 1, work.n_vars - 1))
    sc.pp.pca(work, n_comps=n_comps, random_state=seed)
    # umap-learn directly: scanpy 1.11's neighbours step fails on the sparse kNN graph that
    # scipy 1.17 returns for more than a few thousand cells (csr_array has no getnnz).
    import umap

    pcs = work.obsm["X_pca"]
    reducer = umap.UMAP(n_neighbors=min(n_neighbors, work.n_obs - 1), random_state=seed)
    if work.n_obs > max_cells:
        rng = np.random.default_rng(seed)
        fit_rows = np.sort(rng.choice(work.n_obs, size=max_cells, replace=False))
        reducer.fit(pcs[fit_rows])
        coords = reducer.transform(pcs)
    else:
        coords = reducer.fit_transform(pcs)
    out = np.zeros((adata.n_obs, 2), dtype=np.float32)
    out[has_counts] = coords
    if (~has_counts).any():
        out[~has_counts] = coords.mean(axis=0)
    return out
