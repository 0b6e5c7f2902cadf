"""The one feature space every metric uses: normalise to 1e4, log1p, HVGs, PCA.

The space is fitted on a *balanced pool* of every sample being compared (equal numbers of
cells from each, all of them in the pool when they are the same size), so no side is
in-sample while another is out-of-sample: a PCA or an HVG selection fitted on one side alone
makes even two random halves of one dataset look different. Transforming streams over row
chunks of a CSR matrix and never densifies it.
"""

from __future__ import annotations

from dataclasses import dataclass

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp

TARGET_SUM = 1e4
CHUNK_ROWS = 20_000


def log_normalise(counts: sp.spmatrix) -> sp.csr_matrix:
    """Return log1p(counts / library size × 1e4) as float32 CSR; empty cells stay zero."""
    counts = sp.csr_matrix(counts, dtype=np.float32)
    library = np.asarray(counts.sum(axis=1)).ravel()
    scale = np.divide(TARGET_SUM, library, out=np.zeros_like(library), where=library > 0)
    out = sp.diags(scale.astype(np.float32)) @ counts
    out = sp.csr_matrix(out)
    np.log1p(out.data, out=out.data)
    return out


@dataclass
class FeatureSpace:
    """HVGs and a PCA fitted on a balanced pool; ``transform`` maps log-normalised cells."""

    hvg: np.ndarray  # column indices of the highly variable genes
    mean: np.ndarray  # PCA centre over the HVGs
    components: np.ndarray  # (n_pcs, n_hvg)
    explained_variance_ratio: np.ndarray

    @property
    def n_pcs(self) -> int:
        return int(self.components.shape[0])

    def transform(self, lognorm: sp.csr_matrix) -> np.ndarray:
        """Return PCA coordinates (n_cells × n_pcs, float32) of log-normalised cells."""
        out = np.empty((lognorm.shape[0], self.n_pcs), dtype=np.float32)
        shift = self.mean @ self.components.T
        for start in range(0, lognorm.shape[0], CHUNK_ROWS):
            block = lognorm[start : start + CHUNK_ROWS][:, self.hvg]
            out[start : start + CHUNK_ROWS] = block @ self.components.T - shift
        return out


def fit_feature_space(
    *samples: sp.csr_matrix,
    n_hvg: int = 2000,
    n_pcs: int = 30,
    max_cells_per_side: int = 5000,
    seed: int = 0,
) -> FeatureSpace:
    """Fit HVGs (scanpy's Seurat flavour) and PCA on equal numbers of log-normalised cells
    from each of ``samples`` (same genes, same order); return the fitted space.

    Pass every sample that will be compared (e.g. reference, floor and synthetic): each then
    contributes equally, so no comparison pits in-sample cells against out-of-sample ones.
    """
    rng = np.random.default_rng(seed)
    n = min(min(sample.shape[0] for sample in samples), max_cells_per_side)
    pool = sp.vstack(
        [sample[np.sort(rng.choice(sample.shape[0], size=n, replace=False))]
         for sample in samples],
        format="csr",
    )
    work = ad.AnnData(pool)
    n_top = min(n_hvg, pool.shape[1])
    if n_top < pool.shape[1]:
        sc.pp.highly_variable_genes(work, n_top_genes=n_top, flavor="seurat")
        hvg = np.flatnonzero(work.var["highly_variable"].to_numpy())
    else:
        hvg = np.arange(pool.shape[1])
    dense = pool[:, hvg].toarray()
    mean = dense.mean(axis=0)
    n_comps = max(2, min(n_pcs, dense.shape[0] - 1, dense.shape[1] - 1))
    from sklearn.decomposition import PCA

    pca = PCA(n_components=n_comps, svd_solver="randomized", random_state=seed)
    pca.fit(dense - mean)
    return FeatureSpace(
        hvg=hvg,
        mean=mean.astype(np.float32),
        components=pca.components_.astype(np.float32),
        explained_variance_ratio=pca.explained_variance_ratio_.astype(np.float32),
    )
