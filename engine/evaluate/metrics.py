"""Realism metrics: pure functions comparing two samples of cells (real vs synthetic, or two
halves of real data for the noise floor).

Inputs are plain arrays: raw counts and log-normalised values as scipy CSR matrices (cells ×
genes, same gene order in both samples), PCA coordinates as dense ``n × k`` arrays in a shared
space, and cell labels as 1-D arrays (compared as strings). Sparse matrices are never densified
beyond a subsample of cells/genes. Every random choice takes a ``seed``. When a sample is too
small for a metric, the metric returns ``nan`` rather than raising.

The PCA metrics trust the space they are given: cells used to fit a PCA spread wider along its
noise components than cells projected into it, so a PCA fitted on one compared sample alone
makes two samples of one distribution look different. Fit it on equal parts of every sample
compared (as ``features.fit_feature_space`` does).

Definitions chosen here (see each docstring):

* gene mean / variance: of log2(CPM + 1), per gene (SimBench's ``average_log2_cpm``).
* scaled variance: a gene's log2-CPM variance z-scored among genes of similar mean (20
  equal-width bins of the mean), like Seurat's ``dispersion.scaled`` that SimBench uses.
* size factor: edgeR-style TMM normalisation factor of each cell against the sample's pooled
  profile (SimBench's "TMM"), scaled to geometric mean 1; effective library size = library
  size × size factor (SimBench's ``EffLibsize``).
* correlations: Spearman, among the most variable genes (SimBench).
* relationships (mean–variance, mean–zero fraction, library size–zero fraction): paired
  ``n × 2`` arrays compared with the two-dimensional Kolmogorov–Smirnov statistic of
  Fasano & Franceschini (1987), in [0, 1].
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats
from sklearn.base import ClassifierMixin
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

__all__ = [
    "PROPERTY_NAMES",
    "RELATIONSHIP_NAMES",
    "cell_properties",
    "classifier_auroc",
    "composition_distance",
    "correlation_properties",
    "data_properties",
    "distance_to_closest_ratio",
    "fasano_franceschini",
    "gene_properties",
    "genewise_correlations",
    "ilisi",
    "marker_recovery",
    "marker_table",
    "median_heuristic_bandwidth",
    "mmd_rbf",
    "prdc",
    "predict_labels",
    "property_statistics",
    "traffic_light",
    "train_label_classifier",
    "tstr_f1",
]

Matrix = sp.spmatrix | sp.sparray | np.ndarray
ArrayLike = np.ndarray | pd.Series | pd.Categorical | list

#: The 13 SimBench data properties, in display order.
PROPERTY_NAMES: tuple[str, ...] = (
    "gene_mean",
    "gene_variance",
    "gene_scaled_variance",
    "gene_zero_fraction",
    "gene_gene_correlation",
    "library_size",
    "size_factor",
    "effective_library_size",
    "cell_zero_fraction",
    "cell_cell_correlation",
    "mean_variance",
    "mean_zero_fraction",
    "library_size_zero_fraction",
)
#: The properties that are relationships (paired ``n × 2`` arrays).
RELATIONSHIP_NAMES: tuple[str, ...] = (
    "mean_variance",
    "mean_zero_fraction",
    "library_size_zero_fraction",
)

_NAN = float("nan")


# --------------------------------------------------------------------------------------------
# small helpers


def _to_csr(x: Matrix) -> sp.csr_matrix:
    """Return ``x`` as a float64 CSR matrix (a copy only when a conversion is needed)."""
    if sp.issparse(x):
        out = sp.csr_matrix(x)
        return out if out.dtype == np.float64 else out.astype(np.float64)
    return sp.csr_matrix(np.asarray(x, dtype=np.float64))


def _dense(x: np.ndarray) -> np.ndarray:
    """Return PCA-like coordinates as a 2-D float64 array."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D array of coordinates, got shape {arr.shape}")
    return arr


def _labels(x: ArrayLike) -> np.ndarray:
    """Return labels as a 1-D array of strings."""
    return np.asarray(pd.Series(np.asarray(x)).astype(str))


def _rows(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Return sorted row indices: all ``n`` rows, or a random ``size`` of them."""
    if n <= size:
        return np.arange(n)
    return np.sort(rng.choice(n, size=size, replace=False))


def _row_sums(x: sp.csr_matrix) -> np.ndarray:
    return np.asarray(x.sum(axis=1)).ravel()


def _col_mean_var(x: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Return per-column mean and sample variance (ddof=1) of a sparse matrix."""
    n = x.shape[0]
    mean = np.asarray(x.sum(axis=0)).ravel() / n
    sq = np.asarray(x.multiply(x).sum(axis=0)).ravel() / n
    var = np.maximum(sq - mean**2, 0.0) * (n / (n - 1)) if n > 1 else np.full_like(mean, _NAN)
    return mean, var


def _nonzero_per_col(x: sp.csr_matrix) -> np.ndarray:
    return np.bincount(x.indices[x.data != 0], minlength=x.shape[1])


def _nonzero_per_row(x: sp.csr_matrix) -> np.ndarray:
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    return np.bincount(rows[x.data != 0], minlength=x.shape[0])


def _scale_rows(x: sp.csr_matrix, factors: np.ndarray) -> sp.csr_matrix:
    """Return a copy of ``x`` with row i multiplied by ``factors[i]``."""
    out = x.copy()
    out.data *= np.repeat(factors, np.diff(x.indptr))
    return out


def _log_normalise(counts: sp.csr_matrix, *, target: float, base2: bool) -> sp.csr_matrix:
    """Return log(1 + target · counts / library) per cell (natural log, or log2)."""
    lib = _row_sums(counts)
    scale = np.divide(target, lib, out=np.zeros_like(lib), where=lib > 0)
    out = _scale_rows(counts, scale)
    out.data = np.log2(1.0 + out.data) if base2 else np.log1p(out.data)
    return out


def _corr_columns(a: np.ndarray) -> np.ndarray:
    """Return the Pearson correlation matrix of the columns of ``a`` (nan for constant ones)."""
    centred = a - a.mean(axis=0)
    norms = np.sqrt((centred**2).sum(axis=0))
    with np.errstate(divide="ignore", invalid="ignore"):
        centred = centred / np.where(norms > 0, norms, np.nan)
    return centred.T @ centred


def _spearman_columns(a: np.ndarray) -> np.ndarray:
    """Return the Spearman correlation matrix of the columns of ``a`` (average ranks)."""
    return _corr_columns(stats.rankdata(a, axis=0))


def _upper(c: np.ndarray) -> np.ndarray:
    """Return the finite values of the strict upper triangle of a square matrix."""
    vals = c[np.triu_indices(c.shape[0], k=1)]
    return vals[np.isfinite(vals)]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r over the positions where both are finite (nan when undefined)."""
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return _NAN
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return _NAN
    return _pearson(stats.rankdata(a[ok]), stats.rankdata(b[ok]))


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return the squared Euclidean distances between the rows of ``a`` and of ``b``."""
    d = (a**2).sum(axis=1)[:, None] + (b**2).sum(axis=1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def _min_dists(a: np.ndarray, b: np.ndarray, *, chunk: int = 2048) -> np.ndarray:
    """Return, for every row of ``a``, the Euclidean distance to its nearest row of ``b``."""
    out = np.empty(len(a))
    for start in range(0, len(a), chunk):
        out[start:start + chunk] = np.sqrt(_sq_dists(a[start:start + chunk], b).min(axis=1))
    return out


def _kth_neighbour_distance(x: np.ndarray, k: int) -> np.ndarray:
    """Return each row's distance to its k-th nearest other row of ``x``."""
    nn = NearestNeighbors(n_neighbors=k).fit(x)
    dist, _ = nn.kneighbors()  # without X: a point is not its own neighbour
    return dist[:, k - 1]


# --------------------------------------------------------------------------------------------
# 1. data properties (SimBench's 13)


def gene_properties(
    counts: Matrix, *, n_bins: int = 20
) -> dict[str, np.ndarray]:
    """Return per-gene properties of a raw count matrix (cells × genes).

    Returns a dict of arrays, one value per gene unless said otherwise:

    * ``gene_mean``: mean of log2(CPM + 1) over cells (cells with no counts give zeros).
    * ``gene_variance``: sample variance (ddof=1) of log2(CPM + 1).
    * ``gene_scaled_variance``: ``gene_variance`` z-scored among genes of similar mean — genes
      are put in ``n_bins`` equal-width bins of ``gene_mean`` and standardised within their
      bin (0 where a bin holds one gene or has no spread), as Seurat's ``dispersion.scaled``
      which SimBench calls scaled variance. It measures over-dispersion independent of mean.
    * ``gene_zero_fraction``: fraction of cells with a zero count.
    * ``mean_variance``: ``n_genes × 2`` array (gene_mean, gene_variance).
    * ``mean_zero_fraction``: ``n_genes × 2`` array (gene_mean, gene_zero_fraction).
    """
    x = _to_csr(counts)
    n_cells = x.shape[0]
    logcpm = _log_normalise(x, target=1e6, base2=True)
    mean, var = _col_mean_var(logcpm)
    zero = 1.0 - _nonzero_per_col(x) / n_cells if n_cells else np.full(x.shape[1], _NAN)
    scaled = _binned_zscore(mean, var, n_bins=n_bins)
    return {
        "gene_mean": mean,
        "gene_variance": var,
        "gene_scaled_variance": scaled,
        "gene_zero_fraction": zero,
        "mean_variance": np.column_stack([mean, var]),
        "mean_zero_fraction": np.column_stack([mean, zero]),
    }


def _binned_zscore(mean: np.ndarray, value: np.ndarray, *, n_bins: int) -> np.ndarray:
    """Return ``value`` standardised within equal-width bins of ``mean``."""
    out = np.zeros_like(value, dtype=np.float64)
    ok = np.isfinite(mean) & np.isfinite(value)
    if not ok.any():
        return np.full_like(value, _NAN, dtype=np.float64)
    edges = np.linspace(mean[ok].min(), mean[ok].max(), n_bins + 1)
    bins = np.clip(np.searchsorted(edges, mean, side="right") - 1, 0, n_bins - 1)
    frame = pd.DataFrame({"bin": bins[ok], "v": value[ok]})
    grouped = frame.groupby("bin")["v"]
    centre = grouped.transform("mean").to_numpy()
    spread = grouped.transform("std").to_numpy()  # ddof=1; nan for single-gene bins
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (frame["v"].to_numpy() - centre) / spread
    out[ok] = np.where(np.isfinite(z), z, 0.0)
    out[~ok] = _NAN
    return out


def _tmm_factors(
    x: sp.csr_matrix, lib: np.ndarray, *, logratio_trim: float = 0.3, sum_trim: float = 0.05
) -> np.ndarray:
    """Return edgeR-style TMM factors of each cell against the pooled profile of all cells.

    For each gene a cell detects, M = log2(cell proportion / pooled proportion) and
    A = mean of the two log2 proportions; the 30 % most extreme M on each side and the 5 %
    most extreme A are trimmed, and the factor is 2 ** (inverse-variance-weighted mean of M).
    Tied values are ranked in no set order (edgeR averages them). Factors are scaled to geometric
    mean 1 over cells with counts; cells with no counts, or nothing left after trimming, get 1.
    """
    n = x.shape[0]
    ref = np.asarray(x.sum(axis=0)).ravel()
    total = ref.sum()
    factors = np.ones(n)
    if total <= 0:
        return factors
    rows = np.repeat(np.arange(n), np.diff(x.indptr))
    keep = x.data > 0
    rows, genes, y = rows[keep], x.indices[keep], x.data[keep]
    if not len(y):
        return factors
    n_obs, r = lib[rows], ref[genes]
    log_o, log_r = np.log2(y / n_obs), np.log2(r / total)
    m_val = log_o - log_r
    a_val = 0.5 * (log_o + log_r)
    v = (n_obs - y) / (n_obs * y) + (total - r) / (total * r)
    w = 1.0 / np.maximum(v, 1e-12)
    per_row = np.bincount(rows, minlength=n)
    start = np.concatenate([[0], np.cumsum(per_row)[:-1]])

    def within_row_rank(values: np.ndarray) -> np.ndarray:
        # one float key per entry: the row plus the value squeezed into [0, 0.999]; sorting
        # it is faster than np.lexsort. Values closer than ~1e-12 of their range tie, and
        # ties are ranked in no particular order.
        span = float(values.max() - values.min()) or 1.0
        key = rows + (values - values.min()) * (0.999 / span)
        order = np.argsort(key)
        rank = np.empty(len(values), dtype=np.int64)
        rank[order] = np.arange(len(values)) - start[rows[order]] + 1
        return rank

    size = per_row[rows]
    rank_m, rank_a = within_row_rank(m_val), within_row_rank(a_val)
    lo_m = np.floor(size * logratio_trim) + 1
    lo_a = np.floor(size * sum_trim) + 1
    kept = (
        (rank_m >= lo_m) & (rank_m <= size + 1 - lo_m)
        & (rank_a >= lo_a) & (rank_a <= size + 1 - lo_a)
    )
    num = np.bincount(rows, weights=np.where(kept, w * m_val, 0.0), minlength=n)
    den = np.bincount(rows, weights=np.where(kept, w, 0.0), minlength=n)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_f = np.where(den > 0, num / den, 0.0)
    has = lib > 0
    log_f[~has] = 0.0
    if has.any():
        log_f[has] -= log_f[has].mean()
    factors = 2.0**log_f
    return factors


def cell_properties(counts: Matrix) -> dict[str, np.ndarray]:
    """Return per-cell properties of a raw count matrix (cells × genes).

    Returns a dict of arrays, one value per cell:

    * ``library_size``: total counts.
    * ``size_factor``: TMM normalisation factor (edgeR's method, each cell against the pooled
      profile of the whole sample, scaled to geometric mean 1) — a composition factor that is
      free of sequencing depth. SimBench's "TMM" property.
    * ``effective_library_size``: ``library_size × size_factor`` (SimBench's ``EffLibsize``).
    * ``cell_zero_fraction``: fraction of genes with a zero count.
    * ``library_size_zero_fraction``: ``n_cells × 2`` array (library_size,
      cell_zero_fraction).
    """
    x = _to_csr(counts)
    lib = _row_sums(x)
    factors = _tmm_factors(x, lib)
    n_genes = x.shape[1]
    zero = 1.0 - _nonzero_per_row(x) / n_genes if n_genes else np.full(x.shape[0], _NAN)
    return {
        "library_size": lib,
        "size_factor": factors,
        "effective_library_size": lib * factors,
        "cell_zero_fraction": zero,
        "library_size_zero_fraction": np.column_stack([lib, zero]),
    }


def correlation_properties(
    lognorm: Matrix,
    *,
    n_genes: int = 500,
    n_cells: int = 1000,
    max_cells: int = 5000,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Return correlation properties of a log-normalised matrix (cells × genes).

    Genes: the ``n_genes`` with the highest variance (zero-variance genes excluded).
    Returns a dict of 1-D arrays:

    * ``gene_gene_correlation``: the upper triangle of the Spearman correlation matrix among
      those genes, over at most ``max_cells`` random cells.
    * ``cell_cell_correlation``: the upper triangle of the Spearman correlation matrix among
      at most ``n_cells`` random cells, over those genes.

    Undefined correlations (a constant gene or cell) are left out. Only the subsample
    (cells × selected genes) is densified. Spearman makes the values the same for any
    monotone per-cell normalisation (CP10k or CPM, ln or log2).
    """
    x = _to_csr(lognorm)
    rng = np.random.default_rng(seed)
    var = _col_mean_var(x)[1] if x.shape[0] > 1 else np.zeros(x.shape[1])
    order = np.argsort(-var, kind="stable")
    genes = np.sort(order[var[order] > 0][:n_genes])
    sub_g = x[:, genes]
    gene_rows = _rows(x.shape[0], max_cells, rng)
    cell_rows = _rows(x.shape[0], n_cells, rng)
    empty = np.empty(0)
    gene_corr = (
        _upper(_spearman_columns(sub_g[gene_rows].toarray())) if len(genes) > 1 else empty
    )
    cell_corr = (
        _upper(_spearman_columns(sub_g[cell_rows].toarray().T)) if len(genes) > 1 else empty
    )
    return {"gene_gene_correlation": gene_corr, "cell_cell_correlation": cell_corr}


def data_properties(
    counts: Matrix,
    lognorm: Matrix,
    *,
    n_genes: int = 500,
    n_cells: int = 1000,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Return all 13 SimBench properties of one sample (``PROPERTY_NAMES`` as keys), merging
    :func:`gene_properties` and :func:`cell_properties` of ``counts`` with
    :func:`correlation_properties` of ``lognorm``."""
    props = {
        **gene_properties(counts),
        **cell_properties(counts),
        **correlation_properties(lognorm, n_genes=n_genes, n_cells=n_cells, seed=seed),
    }
    return {name: props[name] for name in PROPERTY_NAMES}


def fasano_franceschini(
    a: np.ndarray, b: np.ndarray, *, max_points: int = 3000, seed: int = 0
) -> float:
    """Return the two-sample, two-dimensional Kolmogorov–Smirnov statistic of Fasano &
    Franceschini (1987) between point sets ``a`` and ``b`` (each ``n × 2``), in [0, 1].

    Every point of either sample is taken in turn as an origin; the plane is cut into the four
    quadrants (x ≤ x0 or >, y ≤ y0 or >), and the largest difference between the two samples'
    fractions in any quadrant is kept. The statistic is the mean of the maxima over origins
    from ``a`` and from ``b``; 0 for identical samples. Invariant to monotone transforms of
    either axis. Each sample is first subsampled to ``max_points``; non-finite rows dropped.
    """
    a, b = _dense(a), _dense(b)
    a, b = a[np.isfinite(a).all(axis=1)], b[np.isfinite(b).all(axis=1)]
    if not len(a) or not len(b):
        return _NAN
    rng = np.random.default_rng(seed)
    a, b = a[_rows(len(a), max_points, rng)], b[_rows(len(b), max_points, rng)]

    def quadrant_fractions(points: np.ndarray, origins: np.ndarray) -> np.ndarray:
        n = len(points)
        xs, ys = np.sort(points[:, 0]), np.sort(points[:, 1])
        left = np.searchsorted(xs, origins[:, 0], side="right")
        low = np.searchsorted(ys, origins[:, 1], side="right")
        both = np.empty(len(origins))
        for s in range(0, len(origins), 512):
            o = origins[s:s + 512]
            both[s:s + 512] = (
                (points[None, :, 0] <= o[:, None, 0]) & (points[None, :, 1] <= o[:, None, 1])
            ).sum(axis=1)
        quads = np.column_stack([both, left - both, low - both, n - left - low + both])
        return quads / n

    def max_diff(origins: np.ndarray) -> float:
        diff = np.abs(quadrant_fractions(a, origins) - quadrant_fractions(b, origins))
        return float(diff.max())

    return 0.5 * (max_diff(a) + max_diff(b))


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if not len(a) or not len(b):
        return _NAN
    return float(stats.ks_2samp(a, b, method="asymp").statistic)


def property_statistics(
    real: dict[str, np.ndarray],
    synth: dict[str, np.ndarray],
    *,
    max_points: int = 3000,
    seed: int = 0,
) -> dict[str, float]:
    """Return, for each property present in both dicts, a two-sample statistic in [0, 1]
    (0 = same distribution): the Kolmogorov–Smirnov statistic (``scipy.stats.ks_2samp``)
    for 1-D properties and :func:`fasano_franceschini` for ``n × 2`` relationships.

    Keys follow ``PROPERTY_NAMES`` order, then any others; non-finite values are ignored and a
    property with no finite values gives ``nan``. These statistics compare distributions over
    genes (or cells) and are blind to gene identity: pair them with
    :func:`genewise_correlations`.
    """
    names = [n for n in PROPERTY_NAMES if n in real and n in synth]
    names += [n for n in real if n in synth and n not in names]
    out: dict[str, float] = {}
    for name in names:
        a, b = np.asarray(real[name]), np.asarray(synth[name])
        if a.ndim == 2 and b.ndim == 2:
            out[name] = fasano_franceschini(a, b, max_points=max_points, seed=seed)
        else:
            out[name] = _ks(a, b)
    return out


# --------------------------------------------------------------------------------------------
# 2. gene-wise agreement


def genewise_correlations(
    real_counts: Matrix,
    synth_counts: Matrix,
    *,
    n_genes: int = 200,
    max_cells: int = 5000,
    seed: int = 0,
) -> dict[str, float]:
    """Return how well per-gene statistics agree gene by gene (same gene order required).

    Per-gene mean, variance (ddof=1) and zero fraction are computed on the raw counts of each
    sample; across genes, ``*_spearman`` is the Spearman correlation of the raw statistics and
    ``*_pearson`` the Pearson correlation of log1p(mean), log1p(variance) and of the raw
    zero fractions. Keys: ``gene_mean_spearman``, ``gene_mean_pearson``,
    ``gene_variance_spearman``, ``gene_variance_pearson``, ``gene_zero_fraction_spearman``,
    ``gene_zero_fraction_pearson`` and ``gene_gene_corr_matrix_corr``: the Pearson correlation
    between the upper triangles of the two samples' gene–gene Pearson correlation matrices
    (on log1p of counts per 10k, at most ``max_cells`` random cells each) over the
    ``n_genes`` genes with the highest mean in the first argument. ``nan`` when undefined.
    """
    x, y = _to_csr(real_counts), _to_csr(synth_counts)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"gene counts differ: {x.shape[1]} vs {y.shape[1]}")
    if x.shape[0] < 2 or y.shape[0] < 2:
        keys = ("gene_mean", "gene_variance", "gene_zero_fraction")
        out = {f"{k}_{m}": _NAN for k in keys for m in ("spearman", "pearson")}
        out["gene_gene_corr_matrix_corr"] = _NAN
        return out
    mean_x, var_x = _col_mean_var(x)
    mean_y, var_y = _col_mean_var(y)
    zero_x = 1.0 - _nonzero_per_col(x) / x.shape[0]
    zero_y = 1.0 - _nonzero_per_col(y) / y.shape[0]
    out = {
        "gene_mean_spearman": _spearman(mean_x, mean_y),
        "gene_mean_pearson": _pearson(np.log1p(mean_x), np.log1p(mean_y)),
        "gene_variance_spearman": _spearman(var_x, var_y),
        "gene_variance_pearson": _pearson(np.log1p(var_x), np.log1p(var_y)),
        "gene_zero_fraction_spearman": _spearman(zero_x, zero_y),
        "gene_zero_fraction_pearson": _pearson(zero_x, zero_y),
    }
    genes = np.sort(np.argsort(-mean_x, kind="stable")[: min(n_genes, x.shape[1])])
    rng = np.random.default_rng(seed)
    mats = []
    for m in (x, y):
        sub = m[_rows(m.shape[0], max_cells, rng)]
        norm = _log_normalise(sub, target=1e4, base2=False)
        mats.append(_corr_columns(norm[:, genes].toarray()))
    iu = np.triu_indices(len(genes), k=1)
    out["gene_gene_corr_matrix_corr"] = _pearson(mats[0][iu], mats[1][iu])
    return out


# --------------------------------------------------------------------------------------------
# 3. whole distribution, on PCA coordinates


def classifier_auroc(
    real_pcs: np.ndarray,
    synth_pcs: np.ndarray,
    *,
    model: Literal["gbt", "logreg"] = "gbt",
    folds: int = 5,
    max_cells: int = 5000,
    seed: int = 0,
) -> float:
    """Return the cross-validated AUROC of a classifier telling the two samples apart.

    Both samples are subsampled to the same size (at most ``max_cells`` each), then a
    stratified ``folds``-fold cross-validation fits ``HistGradientBoostingClassifier``
    (``"gbt"``) or a standardised ``LogisticRegression`` (``"logreg"``); the result is the
    mean AUROC over folds. 0.5 = indistinguishable, 1 = perfectly separable (values a bit
    under 0.5 are noise). ``nan`` when a sample has fewer than ``folds`` cells.
    """
    a, b = _dense(real_pcs), _dense(synth_pcs)
    n = min(len(a), len(b), max_cells)
    if n < folds or folds < 2:
        return _NAN
    rng = np.random.default_rng(seed)
    data = np.vstack([a[_rows(len(a), n, rng)], b[_rows(len(b), n, rng)]])
    target = np.r_[np.zeros(n, dtype=int), np.ones(n, dtype=int)]
    scores = []
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    # one thread: on a few busy cores, fitting on this little data runs several times faster
    # single-threaded than with spinning OpenMP/BLAS worker threads
    with threadpool_limits(limits=1):
        for train, test in splitter.split(data, target):
            clf = _binary_classifier(model, seed)
            clf.fit(data[train], target[train])
            scores.append(roc_auc_score(target[test], clf.predict_proba(data[test])[:, 1]))
    return float(np.mean(scores))


def _binary_classifier(model: str, seed: int) -> Any:
    if model == "gbt":
        return HistGradientBoostingClassifier(
            max_iter=100, early_stopping=False, random_state=seed
        )
    if model == "logreg":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    raise ValueError(f"unknown model {model!r}: use 'gbt' or 'logreg'")


def median_heuristic_bandwidth(
    x: np.ndarray, y: np.ndarray | None = None, *, max_cells: int = 2000, seed: int = 0
) -> float:
    """Return the median pairwise Euclidean distance within the pooled sample (``x`` and, if
    given, ``y``; each subsampled to ``max_cells``) — the Gaussian kernel bandwidth σ that
    :func:`mmd_rbf` uses by default."""
    rng = np.random.default_rng(seed)
    parts = [_dense(x)] + ([_dense(y)] if y is not None else [])
    pooled = np.vstack([p[_rows(len(p), max_cells, rng)] for p in parts])
    d2 = _sq_dists(pooled, pooled)
    return float(np.sqrt(np.median(_upper(d2))))


def mmd_rbf(
    x: np.ndarray,
    y: np.ndarray,
    *,
    max_cells: int = 2000,
    bandwidth: float | None = None,
    seed: int = 0,
) -> float:
    """Return the unbiased estimate of the squared maximum mean discrepancy (MMD²) between
    samples ``x`` and ``y`` with the Gaussian kernel exp(-‖a−b‖² / (2σ²)).

    Each sample is subsampled to ``max_cells``. σ is ``bandwidth`` when given, else the
    median pairwise distance of the pooled subsample (median heuristic). ~0 (can be slightly
    negative) for samples of the same distribution, at most 2. Pass the same ``bandwidth``
    (e.g. from :func:`median_heuristic_bandwidth` on the real data) to compare a value with
    its noise floor on one scale. ``nan`` when a sample has fewer than 2 cells.
    """
    a, b = _dense(x), _dense(y)
    rng = np.random.default_rng(seed)
    a, b = a[_rows(len(a), max_cells, rng)], b[_rows(len(b), max_cells, rng)]
    n, m = len(a), len(b)
    if n < 2 or m < 2:
        return _NAN
    pooled = np.vstack([a, b])
    d2 = _sq_dists(pooled, pooled)
    sigma2 = float(np.median(_upper(d2))) if bandwidth is None else float(bandwidth) ** 2
    if sigma2 <= 0:
        sigma2 = 1.0
    k = d2  # in place: the pooled kernel matrix is the largest array here
    k *= -0.5 / sigma2
    np.exp(k, out=k)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    term_x = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    term_y = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(term_x + term_y - 2.0 * kxy.mean())


def ilisi(
    x: np.ndarray, y: np.ndarray, *, k: int = 30, max_cells: int = 5000, seed: int = 0
) -> float:
    """Return the mixing of two samples as a scaled integration LISI, in [0, 1].

    Both samples are subsampled to the same size (at most ``max_cells`` each) and pooled; for
    every cell, the inverse Simpson index of the sample labels among its ``k`` nearest other
    cells (uniform weights, not LISI's perplexity weights) is in [1, 2]; the result is
    mean − 1. 1 = perfectly mixed, 0 = separated. Because k neighbours are a finite draw,
    two samples from one distribution score about 1 − 2/(k + 1) (≈ 0.94 at k = 30), so
    read it against the real-vs-real floor. ``nan`` when a sample has at most ``k`` cells.
    """
    a, b = _dense(x), _dense(y)
    n = min(len(a), len(b), max_cells)
    if n <= k:
        return _NAN
    rng = np.random.default_rng(seed)
    pooled = np.vstack([a[_rows(len(a), n, rng)], b[_rows(len(b), n, rng)]])
    source = np.r_[np.zeros(n), np.ones(n)]
    _, idx = NearestNeighbors(n_neighbors=k).fit(pooled).kneighbors()
    p = source[idx].mean(axis=1)
    simpson = p**2 + (1.0 - p) ** 2
    return float(np.mean(1.0 / simpson) - 1.0)


def prdc(
    real: np.ndarray, synth: np.ndarray, *, k: int = 5, max_cells: int = 5000, seed: int = 0
) -> dict[str, float]:
    """Return precision, recall, density and coverage of ``synth`` against ``real``
    (Naeem et al. 2020), with k-nearest-neighbour balls (radius: distance to the k-th nearest
    other point of the same sample).

    Both samples are subsampled to the same size (at most ``max_cells``). Keys:
    ``precision`` — fraction of synthetic cells inside some real ball; ``recall`` — fraction
    of real cells inside some synthetic ball; ``density`` — mean number of real balls holding
    a synthetic cell, divided by k (≈ 1 for matching distributions, can exceed 1);
    ``coverage`` — fraction of real balls holding at least one synthetic cell. ``nan``
    values when a sample has at most ``k`` cells. In many dimensions precision and recall of
    two samples of one distribution fall well below 1 (about 0.75 on 50 PCs at k = 5) while
    density stays near 1 and coverage near 1 − 2⁻ᵏ: read them against the real-vs-real floor.
    """
    a, b = _dense(real), _dense(synth)
    n = min(len(a), len(b), max_cells)
    if n <= k:
        return {"precision": _NAN, "recall": _NAN, "density": _NAN, "coverage": _NAN}
    rng = np.random.default_rng(seed)
    a, b = a[_rows(len(a), n, rng)], b[_rows(len(b), n, rng)]
    radius_real = _kth_neighbour_distance(a, k)
    radius_synth = _kth_neighbour_distance(b, k)
    in_real_balls = np.zeros(n)  # per synthetic cell: how many real balls hold it
    real_in_synth = np.zeros(n, dtype=bool)  # per real cell: inside some synthetic ball
    nearest_synth = np.full(n, np.inf)  # per real cell: distance to nearest synthetic cell
    chunk = 1024
    for s in range(0, n, chunk):
        d = np.sqrt(_sq_dists(b[s:s + chunk], a))  # synthetic chunk × real
        in_real_balls[s:s + chunk] = (d <= radius_real[None, :]).sum(axis=1)
        real_in_synth |= (d <= radius_synth[s:s + chunk, None]).any(axis=0)
        nearest_synth = np.minimum(nearest_synth, d.min(axis=0))
    return {
        "precision": float(np.mean(in_real_balls > 0)),
        "recall": float(np.mean(real_in_synth)),
        "density": float(in_real_balls.sum() / (k * n)),
        "coverage": float(np.mean(nearest_synth <= radius_real)),
    }


# --------------------------------------------------------------------------------------------
# 4. biology


def composition_distance(real_labels: ArrayLike, synth_labels: ArrayLike) -> float:
    """Return the total variation distance between the label proportions of two samples:
    half the sum over labels (compared as strings) of the absolute difference in proportion.
    0 = same composition, 1 = no label in common. ``nan`` when a sample is empty."""
    a, b = _labels(real_labels), _labels(synth_labels)
    if not len(a) or not len(b):
        return _NAN
    pa = pd.Series(a).value_counts(normalize=True)
    pb = pd.Series(b).value_counts(normalize=True)
    both = pa.index.union(pb.index)
    diff = pa.reindex(both, fill_value=0.0) - pb.reindex(both, fill_value=0.0)
    return float(0.5 * diff.abs().sum())


def _label_model(seed: int) -> Pipeline:
    return make_pipeline(
        StandardScaler(),
        LogisticRegression(max_iter=1000, class_weight="balanced", random_state=seed),
    )


def train_label_classifier(
    real_pcs: np.ndarray, real_labels: ArrayLike, *, seed: int = 0
) -> Pipeline:
    """Return a fitted cell-type classifier on PCA coordinates: standardisation followed by
    multinomial logistic regression with class weights balanced (so rare types count).
    Labels are learnt as strings."""
    model = _label_model(seed)
    model.fit(_dense(real_pcs), _labels(real_labels))
    return model


def predict_labels(model: Pipeline | ClassifierMixin, pcs: np.ndarray) -> np.ndarray:
    """Return the labels (strings) that ``model`` predicts for the rows of ``pcs``."""
    return np.asarray(model.predict(_dense(pcs)))


def tstr_f1(
    real_pcs: np.ndarray,
    real_labels: ArrayLike,
    synth_pcs: np.ndarray,
    synth_labels: ArrayLike,
    *,
    folds: int = 5,
    max_cells: int = 5000,
    seed: int = 0,
) -> dict[str, float]:
    """Return train-on-synthetic, test-on-real macro F1 against a real-only baseline.

    Each sample is subsampled to at most ``max_cells``; the classifier is
    :func:`train_label_classifier`'s. Keys: ``f1_train_synth_test_real`` — trained on all
    synthetic cells, tested on the real ones; ``f1_train_real_test_real`` — out-of-fold
    predictions from a stratified ``folds``-fold cross-validation on the real cells; both are
    macro F1 over the real labels (a type the synthetic data lacks scores 0);
    ``tstr_relative_f1`` — their ratio (≈ 1 when synthetic labels are as learnable as real
    ones). With a single synthetic label every real cell is predicted as it; ``nan`` where
    undefined (no synthetic cells, or fewer than two real labels for the baseline).
    """
    a, b = _dense(real_pcs), _dense(synth_pcs)
    la, lb = _labels(real_labels), _labels(synth_labels)
    rng = np.random.default_rng(seed)
    ra, rb = _rows(len(a), max_cells, rng), _rows(len(b), max_cells, rng)
    a, la, b, lb = a[ra], la[ra], b[rb], lb[rb]
    classes = np.unique(la)
    out = {"f1_train_synth_test_real": _NAN, "f1_train_real_test_real": _NAN,
           "tstr_relative_f1": _NAN}
    if len(a) == 0:
        return out
    with threadpool_limits(limits=1):  # see classifier_auroc
        return _tstr(a, la, b, lb, classes, out, folds=folds, seed=seed)


def _tstr(
    a: np.ndarray,
    la: np.ndarray,
    b: np.ndarray,
    lb: np.ndarray,
    classes: np.ndarray,
    out: dict[str, float],
    *,
    folds: int,
    seed: int,
) -> dict[str, float]:
    """Fill ``out`` for :func:`tstr_f1` (subsampled inputs)."""
    synth_classes = np.unique(lb)
    if len(synth_classes):
        # One synthetic label teaches a classifier to answer it for every cell: a defined,
        # low score, not a missing one (a generator whose cells all carry one label failed).
        predicted = train_label_classifier(b, lb, seed=seed).predict(a) \
            if len(synth_classes) >= 2 else np.full(len(a), synth_classes[0])
        out["f1_train_synth_test_real"] = float(
            f1_score(la, predicted, labels=classes, average="macro", zero_division=0)
        )
    n_splits = min(folds, int(pd.Series(la).value_counts().max()))
    if len(classes) >= 2 and n_splits >= 2:
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            predicted = cross_val_predict(_label_model(seed), a, la, cv=splitter)
        out["f1_train_real_test_real"] = float(
            f1_score(la, predicted, labels=classes, average="macro", zero_division=0)
        )
    if out["f1_train_real_test_real"] > 0:
        out["tstr_relative_f1"] = out["f1_train_synth_test_real"] / out["f1_train_real_test_real"]
    return out


def _group_stats(
    lognorm: sp.csr_matrix, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (types, cells per type, per-type mean, per-type rest mean, per-type fraction
    expressing), the last three as types × genes arrays."""
    types, codes = np.unique(labels, return_inverse=True)
    n = len(labels)
    indicator = sp.csr_matrix(
        (np.ones(n), (codes, np.arange(n))), shape=(len(types), n)
    )
    sizes = np.bincount(codes, minlength=len(types)).astype(np.float64)
    sums = np.asarray((indicator @ lognorm).todense())
    total = sums.sum(axis=0)
    binary = lognorm.copy()
    binary.data = (binary.data != 0).astype(np.float64)
    expressing = np.asarray((indicator @ binary).todense())
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = sums / sizes[:, None]
        rest = (total[None, :] - sums) / (n - sizes)[:, None]
        frac = expressing / sizes[:, None]
    return types, sizes.astype(int), mean, rest, frac


def _top(values: np.ndarray, top_n: int) -> np.ndarray:
    """Indices of the ``top_n`` largest values (ties by position)."""
    return np.argsort(-values, kind="stable")[:top_n]


def marker_recovery(
    real_lognorm: Matrix,
    real_labels: ArrayLike,
    synth_lognorm: Matrix,
    synth_labels: ArrayLike,
    *,
    genes: ArrayLike,
    top_n: int = 50,
    min_cells: int = 5,
) -> pd.DataFrame:
    """Return, per cell type, how well the synthetic data reproduces the real markers.

    For every type with at least ``min_cells`` cells in both samples (and other cells beside
    it), the log-fold change of each gene is mean(log-normalised value in the type) −
    mean(in all other cells), computed within each sample. Columns: ``cell_type``,
    ``n_real``, ``n_synth``, ``overlap`` (fraction of the real top-``top_n`` genes by LFC
    also in the synthetic top-``top_n``), ``slope`` (least-squares slope through the origin
    of synthetic on real LFC over all genes: Σxy / Σx², 1 = same effect sizes), ``pearson``
    (Pearson r of the LFCs over all genes), ``real_markers`` (the first 10
    real markers, comma-separated names from ``genes``) and ``missed_markers`` (real top
    markers absent from the synthetic top, up to 10). Sorted by cell type.
    """
    x, y = _to_csr(real_lognorm), _to_csr(synth_lognorm)
    names = np.asarray(genes).astype(str)
    if not (x.shape[1] == y.shape[1] == len(names)):
        raise ValueError(
            f"gene counts differ: real {x.shape[1]}, synthetic {y.shape[1]}, names {len(names)}"
        )
    types_x, n_x, mean_x, rest_x, _ = _group_stats(x, _labels(real_labels))
    types_y, n_y, mean_y, rest_y, _ = _group_stats(y, _labels(synth_labels))
    where_y = {t: i for i, t in enumerate(types_y)}
    top_n = min(top_n, len(names))
    records = []
    for i, cell_type in enumerate(types_x):
        j = where_y.get(cell_type)
        if j is None or min(n_x[i], n_y[j]) < min_cells:
            continue
        if n_x[i] == x.shape[0] or n_y[j] == y.shape[0]:
            continue  # no other cells to compare with
        lfc_x, lfc_y = mean_x[i] - rest_x[i], mean_y[j] - rest_y[j]
        top_x, top_y = _top(lfc_x, top_n), _top(lfc_y, top_n)
        in_synth_top = set(top_y.tolist())
        missed = [g for g in top_x if g not in in_synth_top]
        denom = float(lfc_x @ lfc_x)
        records.append({
            "cell_type": cell_type,
            "n_real": int(n_x[i]),
            "n_synth": int(n_y[j]),
            "overlap": len(np.intersect1d(top_x, top_y)) / top_n if top_n else _NAN,
            "slope": float(lfc_x @ lfc_y) / denom if denom > 0 else _NAN,
            "pearson": _pearson(lfc_x, lfc_y),
            "real_markers": ", ".join(names[top_x[:10]]),
            "missed_markers": ", ".join(names[missed[:10]]),
        })
    columns = ["cell_type", "n_real", "n_synth", "overlap", "slope", "pearson", "real_markers",
               "missed_markers"]
    return pd.DataFrame.from_records(records, columns=columns)


def marker_table(
    lognorm: Matrix, labels: ArrayLike, genes: ArrayLike, *, top_n: int = 5
) -> pd.DataFrame:
    """Return a long table for a marker dot plot.

    For each cell type, its ``top_n`` markers (by log-fold change vs all other cells, on the
    log-normalised values; needs at least two types) are listed against every cell type. One
    row per (``marker_of``, ``gene``, ``cell_type``) with columns ``marker_of`` (the type the
    gene marks), ``marker_rank`` (1 = strongest), ``gene``, ``cell_type``, ``lfc`` (of the
    gene in ``cell_type`` vs the rest), ``mean_expression`` (mean log-normalised value in
    ``cell_type``) and ``fraction_expressing`` (fraction of its cells with a non-zero value).
    A gene marking two types appears under both. Types sorted by name.
    """
    x = _to_csr(lognorm)
    names = np.asarray(genes).astype(str)
    if x.shape[1] != len(names):
        raise ValueError(f"gene counts differ: matrix {x.shape[1]}, names {len(names)}")
    types, _, mean, rest, frac = _group_stats(x, _labels(labels))
    columns = ["marker_of", "marker_rank", "gene", "cell_type", "lfc", "mean_expression",
               "fraction_expressing"]
    if len(types) < 2:
        return pd.DataFrame(columns=columns)
    lfc = mean - rest
    frames = []
    for i, marked in enumerate(types):
        top = _top(lfc[i], min(top_n, len(names)))
        rank = np.arange(1, len(top) + 1)
        frames.append(pd.DataFrame({
            "marker_of": marked,
            "marker_rank": np.tile(rank, len(types)),
            "gene": np.tile(names[top], len(types)),
            "cell_type": np.repeat(types, len(top)),
            "lfc": lfc[:, top].ravel(),
            "mean_expression": mean[:, top].ravel(),
            "fraction_expressing": frac[:, top].ravel(),
        }))
    return pd.concat(frames, ignore_index=True)[columns]


# --------------------------------------------------------------------------------------------
# 5. memorisation


def distance_to_closest_ratio(
    synth_pcs: np.ndarray,
    train_pcs: np.ndarray,
    holdout_pcs: np.ndarray,
    *,
    max_cells: int = 5000,
    seed: int = 0,
) -> dict[str, Any]:
    """Return distances from synthetic cells to their closest training and held-out cells.

    Training and held-out cells are subsampled to the same size (the smaller of the two, at
    most ``max_cells``) so neither set is closer just for being denser; synthetic cells to at
    most ``max_cells``. Keys: ``d_train`` and ``d_holdout`` (arrays, one Euclidean distance
    per synthetic cell); ``median_ratio`` = median(d_train / d_holdout), a pair of zero
    distances counting as 1 (≈ 1 healthy, ≪ 1 memorised); ``fraction_closer_to_train`` =
    share of synthetic cells strictly closer to a training cell, ties counting half (≈ 0.5
    healthy, → 1 memorised). ``nan`` values when a set is empty.
    """
    s, t, h = _dense(synth_pcs), _dense(train_pcs), _dense(holdout_pcs)
    n = min(len(t), len(h), max_cells)
    if n == 0 or len(s) == 0:
        empty = np.empty(0)
        return {"d_train": empty, "d_holdout": empty, "median_ratio": _NAN,
                "fraction_closer_to_train": _NAN}
    rng = np.random.default_rng(seed)
    t, h = t[_rows(len(t), n, rng)], h[_rows(len(h), n, rng)]
    s = s[_rows(len(s), max_cells, rng)]
    d_train, d_holdout = _min_dists(s, t), _min_dists(s, h)
    both_zero = (d_train == 0) & (d_holdout == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(both_zero, 1.0, d_train / d_holdout)
    closer = np.mean(d_train < d_holdout) + 0.5 * np.mean(d_train == d_holdout)
    return {
        "d_train": d_train,
        "d_holdout": d_holdout,
        "median_ratio": float(np.median(ratio)),
        "fraction_closer_to_train": float(closer),
    }


def _row_keys(counts: Matrix) -> list[bytes]:
    """Return one hashable key per row: its non-zero column indices and values."""
    x = _to_csr(counts)
    x.sum_duplicates()
    x.eliminate_zeros()
    indices = x.indices.astype(np.int64)
    data = x.data.astype(np.float64)
    return [indices[a:b].tobytes() + b"|" + data[a:b].tobytes()
            for a, b in zip(x.indptr[:-1], x.indptr[1:], strict=True)]


def exact_copy_fraction(candidates: Matrix, reference: Matrix) -> float:
    """Return the fraction of ``candidates`` rows (count profiles) identical to some row of
    ``reference`` over the same genes: the bluntest form of memorisation. Unlike distances
    in a subsample, every reference row is checked. ``nan`` for no candidates."""
    keys = set(_row_keys(reference))
    candidate_keys = _row_keys(candidates)
    if not candidate_keys:
        return _NAN
    return float(np.mean([key in keys for key in candidate_keys]))


# --------------------------------------------------------------------------------------------
# verdicts


def traffic_light(
    value: float,
    floor: float,
    *,
    direction: Literal["lower", "higher"],
    scale: float,
) -> Literal["good", "fair", "poor"]:
    """Return a verdict on a metric ``value`` given its real-vs-real noise ``floor``.

    ``direction`` says which way is better: ``"lower"`` for distances and for classifier
    AUROC (KS, MMD², TV distance, AUROC), ``"higher"`` for scores (correlations, F1, iLISI,
    PRDC, marker overlap). The shortfall is how much worse than the floor the value is
    (``value − floor`` for "lower", ``floor − value`` for "higher"; ≤ 0 when at least as good).
    Returns ``"good"`` when the shortfall ≤ ``scale``, ``"fair"`` when ≤ 3 × ``scale``,
    ``"poor"`` otherwise. Raises ``ValueError`` for a non-finite value or floor (no verdict
    can be given) or a negative scale.
    """
    if direction not in ("lower", "higher"):
        raise ValueError(f"direction must be 'lower' or 'higher', not {direction!r}")
    if not (np.isfinite(value) and np.isfinite(floor)):
        raise ValueError(f"no verdict for a non-finite value ({value}) or floor ({floor})")
    if not scale >= 0:
        raise ValueError(f"scale must be non-negative, not {scale}")
    shortfall = value - floor if direction == "lower" else floor - value
    if shortfall <= scale:
        return "good"
    if shortfall <= 3 * scale:
        return "fair"
    return "poor"
