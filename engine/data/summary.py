"""One pass over a dataset for the numbers the Data page shows.

:func:`summarize` reads ``X`` in row chunks (in memory or backed on disk), never densifies it,
and returns per-cell QC vectors (library size, detected genes, mitochondrial fraction), the
counts check and a table describing the ``obs`` columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import anndata
import numpy as np
import pandas as pd

from engine.data.validate import (
    CountsCheck,
    _counts_check,
    _find_counts_layer,
    _ValueScan,
    iter_row_chunks,
)

__all__ = ["DatasetSummary", "mito_mask", "obs_columns_table", "summarize"]

#: var columns that may hold gene symbols when ``var_names`` are IDs (e.g. Ensembl).
SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "feature_name", "gene_name", "symbol")
_MITO_PREFIX = "MT-"
_TOP_LEVELS = 5
_NUMERIC_LEVELS = 20


@dataclass
class DatasetSummary:
    """Numbers describing a dataset.

    Attributes
    ----------
    n_cells, n_genes
        Shape of ``X``.
    nnz
        Number of non-zero values.
    sparsity
        Fraction of zeros, ``1 - nnz / (n_cells * n_genes)``.
    counts
        Whether ``X`` holds raw counts (:class:`~engine.data.validate.CountsCheck`).
    library_size
        Total of each cell's row (float64, one per cell).
    n_detected
        Number of genes with a non-zero value in each cell (int64, one per cell).
    mito_fraction
        Fraction of each cell's total from mitochondrial genes (``MT-`` / ``mt-``; 0 for
        empty cells), or None when the dataset has no mitochondrial genes.
    mito_genes
        Number of mitochondrial genes found.
    obs_columns
        One row per ``obs`` column: ``column``, ``dtype``, ``n_levels``, ``top_levels``
        (e.g. ``"ctrl: 1000, stim: 1000"``) and ``n_missing``.
    """

    n_cells: int
    n_genes: int
    nnz: int
    sparsity: float
    counts: CountsCheck
    library_size: np.ndarray
    n_detected: np.ndarray
    mito_fraction: np.ndarray | None
    mito_genes: int
    obs_columns: pd.DataFrame


def mito_mask(var_names: pd.Index, var: pd.DataFrame | None = None) -> np.ndarray:
    """Return a boolean mask of mitochondrial genes (names starting ``MT-``, any case).

    When no ``var_names`` match and ``var`` has a gene-symbol column (``gene_symbols``,
    ``feature_name``, ...), that column is used instead, so Ensembl-indexed data works too.

    Returns
    -------
    A boolean array with one entry per gene.
    """
    mask = pd.Index(var_names).astype(str).str.upper().str.startswith(_MITO_PREFIX)
    mask = np.asarray(mask, dtype=bool)
    if not mask.any() and var is not None:
        for column in SYMBOL_COLUMNS:
            if column in var.columns:
                symbols = var[column].astype(str).str.upper().str.startswith(_MITO_PREFIX)
                candidate = np.asarray(symbols, dtype=bool)
                if candidate.any():
                    return candidate
    return mask


def _level_text(counts: pd.Series) -> str:
    """Return ``"a: 10, b: 5"`` for the top levels of a value count, with a tail note."""
    top = counts.iloc[:_TOP_LEVELS]
    text = ", ".join(f"{level}: {int(n)}" for level, n in top.items())
    if len(counts) > _TOP_LEVELS:
        text += f", … ({len(counts) - _TOP_LEVELS} more)"
    return text


def obs_columns_table(obs: pd.DataFrame) -> pd.DataFrame:
    """Describe every ``obs`` column.

    Returns
    -------
    A DataFrame with columns ``column``, ``dtype``, ``n_levels`` (distinct non-missing
    values), ``top_levels`` (the most frequent levels with their counts, or the range for
    numeric columns with more than 20 levels) and ``n_missing``.
    """
    rows = []
    for name in obs.columns:
        series = obs[name]
        n_missing = int(series.isna().sum())
        numeric = pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)
        n_levels = int(series.nunique(dropna=True))
        if numeric and n_levels > _NUMERIC_LEVELS:
            top = f"range {series.min():.4g} – {series.max():.4g}"
        else:
            counts = series.value_counts(dropna=True, sort=True)
            counts = counts[counts > 0]
            top = _level_text(counts)
        rows.append(
            {
                "column": str(name),
                "dtype": str(series.dtype),
                "n_levels": n_levels,
                "top_levels": top,
                "n_missing": n_missing,
            }
        )
    return pd.DataFrame(rows, columns=["column", "dtype", "n_levels", "top_levels", "n_missing"])


def summarize(adata: anndata.AnnData, *, chunk_size: int = 100_000) -> DatasetSummary:
    """Summarise a dataset in one chunked pass over ``X``.

    Works on in-memory CSR/CSC/dense ``X`` and on backed AnnData (``read_h5ad(...,
    backed='r')``, only ``chunk_size`` rows are read at a time); ``X`` is never densified.
    When ``X`` is not counts, the layers and ``.raw`` are also checked (extra passes) to find
    one that is.

    Parameters
    ----------
    adata
        The dataset; not modified.
    chunk_size
        Rows per chunk.

    Returns
    -------
    A :class:`DatasetSummary`.
    """
    n_cells, n_genes = int(adata.n_obs), int(adata.n_vars)
    mito = mito_mask(adata.var_names, adata.var)
    n_mito = int(mito.sum())
    weights_all = np.ones(n_genes, dtype=np.float64)
    weights_mito = mito.astype(np.float64)
    library = np.zeros(n_cells, dtype=np.float64)
    detected = np.zeros(n_cells, dtype=np.int64)
    mito_total = np.zeros(n_cells, dtype=np.float64) if n_mito else None
    scan = _ValueScan()
    for start, chunk in iter_row_chunks(adata.X, chunk_size=chunk_size):
        stop = start + chunk.shape[0]
        scan.add(chunk, start)
        library[start:stop] = chunk @ weights_all
        per_row = np.diff(chunk.indptr)
        explicit_zeros = chunk.data == 0
        if explicit_zeros.any():
            zeros = np.concatenate(([0], np.cumsum(explicit_zeros)))
            per_row = per_row - (zeros[chunk.indptr[1:]] - zeros[chunk.indptr[:-1]])
        detected[start:stop] = per_row
        if mito_total is not None:
            mito_total[start:stop] = chunk @ weights_mito
    mito_fraction = None
    if mito_total is not None:
        mito_fraction = np.divide(
            mito_total, library, out=np.zeros_like(mito_total), where=library != 0
        )
    layer = None if scan.is_counts else _find_counts_layer(adata, chunk_size=chunk_size)
    total = n_cells * n_genes
    return DatasetSummary(
        n_cells=n_cells,
        n_genes=n_genes,
        nnz=int(scan.n_nonzero),
        sparsity=float(1.0 - scan.n_nonzero / total) if total else 1.0,
        counts=_counts_check(scan, layer),
        library_size=library,
        n_detected=detected,
        mito_fraction=mito_fraction,
        mito_genes=n_mito,
        obs_columns=obs_columns_table(adata.obs),
    )
