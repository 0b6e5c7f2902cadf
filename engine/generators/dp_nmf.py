"""DP-NMF: the CAMDA blue team's "SingleCellNMFGenerator", done right.

Method (each choice documented here, read by the Train page's help):

1. **Cells.** With ``sample_fraction < 1`` a seeded random subset of the training cells is
   used (never the first rows). Under DP each privacy unit (the ``donor_key`` column, else a
   cell) keeps at most ``max_cells_per_unit`` random cells. No privacy amplification from
   the subsample is claimed.
2. **NMF.** Input: ``log1p`` of the counts scaled to the fixed library size ``target_sum``
   (a data-independent constant), each cell's row then scaled to L2 norm 1 (its norm before
   is kept as the cell's profile scale). Unit rows make the factorisation free of library
   size and give every cell the same data-independent size in the DP releases. Sparse
   inputs stay sparse. sklearn ``MiniBatchNMF`` gives the basis H (k × genes); rows of H
   are scaled to norm 1 and each cell's weights W are non-negative least squares given H.
   With ``dp`` in ("nmf", "all") H comes from a DP mechanism instead: by default
   (``nmf_dp_method="centroids"``) spherical DP k-means with k = ``n_components`` centres
   in a seeded random projection (noisy counts and clipped sums per iteration), then one
   Gaussian release of each centre's summed gene profiles (genes indistinguishable from
   noise set to 0); or (``"sgd"``) DP-SGD on H: Poisson-subsampled units, per-cell clipped
   gradients ``outer(w_i, w_i H - x_i)``, Gaussian noise, projected steps.
3. **Clusters.** k-means on the rows of W scaled to unit L2 norm (programme composition).
   Each cluster's cell-type label is the majority training label (if ``cell_type_key`` is a
   column). DP k-means: random data-independent start, a fixed number of Lloyd iterations
   each releasing noisy counts and noisy sums of the (norm-1) rows. ``clusters_from``:
   ``"cell_type"`` makes one cluster per cell type instead (no budget); the default
   ``"auto"`` does so with ``dp="all"`` and a cell-type column (DP k-means at ε = 4 kept
   about half the no-DP F1 on Kang, cell types over 80 %; on the 200-donor mock data at
   donor level k-means 53 %, cell types 100 %, see :func:`clusters_by_type`), else k-means.
4. **Per-cluster summaries.** Without DP, exact: per gene the mean of the proportions
   ``q = x / L`` and of ``q²``, the detection rate, the mean and sd of log L, and of W. At
   the cluster's mean library size L̃: observed mean ``m = p L̃``, variance
   ``v = Var(q) L̃²`` (library-normalised, so library variation is not counted as gene
   over-dispersion), zero fraction ``z``. ZINB by method of moments, fixed-point
   steps: given π, NB mean ``μ = m / (1-π)`` and ``1/r`` from the ZINB variance
   ``v = (1-π) μ (1 + μ/r + π μ)`` (with the sampler's programme variation σ² of ρ:
   ``v + m² = (1-π)(μ + μ² (1+σ²)(1+1/r))``); then π = excess zeros over the NB zero
   probability (averaged over ρ), ``(z - p0) / (1 - p0)``, clipped to [0, 0.95]. Zeros
   are counted once: the NB part is refitted for the zeros π explains. Library size:
   log-normal (mean, sd of log L).
   With DP, every statistic is a clipped sum plus Gaussian noise: cluster sizes; the sums of
   the unit-norm log profiles (each cell uses its whole L2 budget of 1, about ten times the
   signal of proportions at the same noise; with a DP centroid basis, restricted to the
   basis's DP-selected genes and rescaled to norm 1), plus one pooled sum over all cells;
   a cluster keeps the pooled profile except on genes whose deviations
   are jointly significant, shrunk by their noise (post-processing), and the mean log
   profile is mapped back to proportions by inverting ``E[log1p]`` of Poisson counts at the
   cluster's library size; sums of the clipped, centred log L per cluster and of its square
   over all cells (one pooled spread); of W and W². With clusters from cell types and every
   stage DP the basis feeds nothing released, so none is fitted (no budget). ZINB's
   dispersion and zero inflation are pooled per gene over clusters from global noisy sums
   (three times the noise): a gene's over-dispersion is used only where its excess variance
   is 3 noise sds above zero, its zero inflation only where its zeros exceed the NB's by 3
   noise sds; every other gene is Poisson.
   **Donors as the unit** (``donor_key``). A cell-level sum moves by the cap when a donor
   is added, so its signal-to-noise grows with the number of donors, not cells: 100
   training donors of the mock data are about a tenth of Kang's 1,057 cells, and there the
   cell-level design kept 16-35 % of the no-DP F1 at ε = 4 (with 500 training donors, 100 %).
   So at donor level the profiles are released differently (each choice measured, mock,
   ε = 4, seeds 0/1/2; share of the no-DP F1): (a) each cell's profile is weighted by
   ``sqrt(f) / n`` (:func:`_unit_cluster_weights`: n its donor's cells in its cluster, f
   that over the donor's cells), so one donor moves all clusters' sums together by ≤ 1, not
   by the cap, and a cluster's mean is a weighted mean of its donors' means (the weights'
   sums are one more release, "cluster donor weights"); (b) only on the
   ``profile_genes`` (128) genes with the largest noisy pooled sum, each cell's restricted
   profile rescaled to norm 1 (on the mock data, after the rescaling, the top 100-200 genes
   carry as much of the types' squared differences as all 1,000, under an eighth of the
   noise); (c) each cluster's deviation from the pooled mean on those genes is shrunk
   as a whole (James-Stein, :func:`_donor_profiles`) instead of gene by gene; other genes
   keep the pooled profile; (d) each cluster's profile scale is set by its own profile
   (proportions sum to 1, :func:`_self_consistent_proportions`), so the pooled "profile
   scale" release is dropped. Measured: (a) alone 16 / 17 / 18 % (the gene-wise selection
   kept ~7 of 1,000 genes); (a)+(d) 67 / 38 / 62 %; (a)-(d) 100 / 100 / 100 %; with 32,
   64, 96, 256 or all 1,000 genes 79, 74, 90, 91, 79 % (mean; unstable over seeds);
   without the rescaling to norm 1 90 %; without shrinkage (64 genes) 42 %; with the
   released pooled scale instead of (d) 42 % (the mock types' mean scales are 18 and 39: one
   pooled scale fits neither; even noise-free profiles kept only 29 / 79 % with it, 100 /
   100 % with (d)); gene-wise variants of the old design (no selection, a z > 2 selection,
   shrinkage per expression bin, no shrinkage; keeping every gene) 17-52 %. (d) is not
   used with cells as the unit: on Kang it lowered ε = 4 from 86 to 77 % (the ~1,100 kept
   of 9,000 genes hold 60-66 % of the profile, so "sums to 1" overstates the scale by
   10-15 %). (e) The log library sizes are donor-weighted too (sensitivity half their
   clipped range, not the cap times it), and their spread is released as each cell's squared
   deviation from its cluster's released mean, clipped at ``_LOG_LIBRARY_DEV2`` (sensitivity
   the cap, not the cap × 12.25 of the centred squares): before, the spread came out near
   1 in log units (ε = 4, seed 1) and the median synthetic library 776 against 1,204 real
   (ε = 10, seed 2), after 947; the F1 stays (ε = 4: 100 / 100 / 100 %). (f) With ZINB
   each cluster's over-dispersion is one more donor-weighted release
   (:meth:`DPNMFGenerator._donor_dispersion`): the gene-level shape releases pass no gene
   at 100 donors, so every gene was Poisson, a type's synthetic cells were half as spread
   as its real ones (PC space), and a classifier trained on them failed on real cells the
   more, the better ε made the profiles (ε = 10: 76 % of the no-DP F1, ε = 4: 100 %).
   With it, ε = 10 keeps 97 % on seeds 0/1/2 and 85 % on 3/4/5 (70 % before), ε = 4 99 %.
5. **Sampling.** Cluster drawn ∝ (noisy) size (``proportion_aware``) or uniformly. Each
   cell gets a rate multiplier ρ per gene (clipped to [0, 10]), times ``L / L̃`` for a
   library size L drawn from the cluster's log-normal; then Poisson(ρ · m) or ZINB
   (Gamma-Poisson with mean ρ · μ and shape r, zeroed with probability π). Without DP on
   the summaries, the cell's programme weights and profile scale (w, s) are drawn jointly
   from the cluster's Gaussian (its exact mean and covariance; w clipped ≥ 0), and ρ is the
   cell's programme expression ``expm1(s · w H) + 0.001`` over the cluster's mean of it: the
   NMF's own reconstruction on the count scale, so genes of one programme rise and fall
   together (the 100 top genes' correlations within a cluster of 300 Kang cells, 6
   programmes: r = 0.44 with the real ones, against 0.09 with independent w components).
   The ZINB's dispersion is then fitted to the variance this ρ leaves (``programme_var``
   of ``_zinb_moments``), so the variance is not counted twice. With DP summaries,
   w ~ N(mean_c, sd_c) per component from the noisy sums and ρ = ``(w H)_g / (w̄_c H)_g``;
   with a DP basis the programme variation is switched off (sd 0): a noisy H would add
   noise genes to every cell.
6. **Privacy.** One :class:`~engine.privacy.accountant.Accountant` records every release.
   Add/remove adjacency of one unit: every release's sensitivity is a data-independent
   bound on how far one unit (≤ ``max_cells_per_unit`` cells) moves it.
   :func:`plan_privacy` calibrates the noise before training: one noise multiplier for all
   releases that spends ``epsilon_total`` (``budget_mode="total"``), or one per stage for
   ``epsilon_nmf`` / ``epsilon_kmeans`` / ``epsilon_sampling`` (``"per_stage"``). Only
   ``dp="all"`` makes the whole released model DP; with a partial choice the run is
   labelled not private and says which stage was noised.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.decomposition import MiniBatchNMF

from engine.errors import UserFacingError
from engine.generators.base import Capabilities, Generator, Progress, no_progress
from engine.generators.mock import _assemble_csr
from engine.generators.registry import register
from engine.privacy.accountant import Accountant, calibrate_noise_multiplier, default_delta
from engine.privacy.mechanisms import GaussianRelease, cap_cells_per_unit, clip_rows_l2

DP_CHOICES = ("none", "sampling", "kmeans", "nmf", "all")
BUDGET_MODES = ("total", "per_stage")
CLUSTER_SOURCES = ("auto", "kmeans", "cell_type")
STAGES = ("nmf", "kmeans", "sampling")
_STAGE_SEEDS = {"subsample": 1, "nmf": 2, "kmeans": 3, "sampling": 4, "cap": 5,
                "nmf_cells": 6}


@dataclass
class DPNMFConfig:
    """Options of the DP-NMF generator (form metadata in each field)."""

    sample_fraction: float = field(default=1.0, metadata={
        "label": "Fraction of training cells", "min": 0.01, "max": 1.0, "step": 0.05,
        "help": "Random (seeded) share of the training cells used to fit."})
    n_components: int = field(default=20, metadata={
        "label": "NMF components", "min": 2, "max": 200,
        "help": "Number of gene programmes (rows of H)."})
    nmf_batch_size: int = field(default=2048, metadata={
        "label": "NMF batch size", "min": 16, "max": 65536,
        "help": "Cells per minibatch (expected units per step under DP)."})
    nmf_max_iter: int = field(default=200, metadata={
        "label": "NMF passes", "min": 1, "max": 5000,
        "help": "Maximum passes over the cells for the (non-private) NMF."})
    nmf_steps: int = field(default=1000, metadata={
        "label": "NMF minibatch steps", "min": 1, "max": 100000,
        "help": "Minibatch updates of the (non-private) NMF (at most the passes above): "
        "a fixed budget, no early stop."})
    nmf_fit_cells: int = field(default=100_000, metadata={
        "label": "Cells for the NMF basis", "min": 1000, "max": 10_000_000,
        "help": "The basis H is learnt on at most this many random cells; every cell's "
        "weights are then fitted given H."})
    n_clusters: int = field(default=0, metadata={
        "label": "Clusters", "min": 0, "max": 500,
        "help": "0: number of cell types when the cell-type column exists, else 8."})
    clusters_from: str = field(default="auto", metadata={
        "label": "Clusters from", "choices": CLUSTER_SOURCES,
        "help": "auto: cell types with DP 'all' and a cell-type column (DP k-means keeps "
        "about half the no-DP F1 at ε = 4 on Kang, cell types over 80 %; with donors as the "
        "unit on mock data 53 % and 100 %), else k-means; kmeans: k-means on the programme "
        "weights (the seed's method); "
        "cell_type: one cluster per cell type of the cell-type column (a per-cell function "
        "of each cell's own label, so it costs no privacy budget)."})
    sampling_method: str = field(default="zinb", metadata={
        "label": "Count model", "choices": ("zinb", "poisson"),
        "help": "Zero-inflated negative binomial or Poisson per gene and cluster."})
    proportion_aware: bool = field(default=True, metadata={
        "label": "Keep cluster proportions",
        "help": "Draw clusters by their (noisy) sizes; otherwise uniformly."})
    dp: str = field(default="none", metadata={
        "label": "Differential privacy", "choices": DP_CHOICES, "privacy": True,
        "help": "Which stages are DP: none, the sampling statistics, k-means, the NMF, or "
        "all (only 'all' makes the whole model DP)."})
    budget_mode: str = field(default="total", metadata={
        "label": "Budget", "choices": BUDGET_MODES, "privacy": True,
        "help": "total: one ε split across the chosen stages by one accountant; per_stage: "
        "each stage gets its own ε (the seed's eps_nmf / eps_kmeans / eps_summaries)."})
    epsilon_total: float = field(default=4.0, metadata={
        "label": "Total ε", "min": 0.01, "max": 100.0, "privacy": True,
        "help": "Privacy budget split across every DP release (budget 'total')."})
    epsilon_nmf: float = field(default=1.0, metadata={
        "label": "ε of the NMF", "min": 0.01, "max": 100.0, "privacy": True,
        "help": "Budget of the DP basis H (budget 'per_stage'; the seed's eps_nmf)."})
    epsilon_kmeans: float = field(default=1.0, metadata={
        "label": "ε of k-means", "min": 0.01, "max": 100.0, "privacy": True,
        "help": "Budget of the DP Lloyd iterations (the seed's eps_kmeans)."})
    epsilon_sampling: float = field(default=2.0, metadata={
        "label": "ε of the sampling statistics", "min": 0.01, "max": 100.0, "privacy": True,
        "help": "Budget of the per-cluster statistics (the seed's eps_summaries)."})
    delta: float = field(default=0.0, metadata={
        "label": "δ", "min": 0.0, "max": 0.1, "privacy": True,
        "help": "0: 1 / (10 × number of privacy units)."})
    donor_key: str = field(default="", metadata={
        "label": "Donor column (privacy unit)",
        "help": "Protect whole donors; empty protects single cells."})
    max_cells_per_unit: int = field(default=50, metadata={
        "label": "Max cells per donor", "min": 1, "max": 100000, "privacy": True,
        "help": "Cap on cells one donor contributes under DP."})
    kmeans_iterations: int = field(default=5, metadata={
        "label": "DP k-means iterations", "min": 1, "max": 50, "privacy": True,
        "help": "Fixed number of noisy Lloyd iterations."})
    nmf_dp_method: str = field(default="centroids", metadata={
        "label": "DP basis", "choices": ("centroids", "sgd"), "privacy": True,
        "help": "centroids: DP spherical k-means in a random projection, then one noisy "
        "release of the centroids' gene profiles as H; sgd: DP-SGD on H."})
    dp_basis_genes: int = field(default=1000, metadata={
        "label": "Genes in the DP basis", "min": 10, "max": 100000, "privacy": True,
        "help": "centroids: the basis uses the genes with the largest noisy pooled "
        "expression (one more release); fewer genes, less noise in H."})
    nmf_dp_steps: int = field(default=20, metadata={
        "label": "DP-NMF steps", "min": 1, "max": 5000, "privacy": True,
        "help": "Noisy gradient steps on H."})
    nmf_dp_learning_rate: float = field(default=1.0, metadata={
        "label": "DP-NMF learning rate", "min": 1e-4, "max": 100.0, "privacy": True,
        "help": "Step size on H for the averaged noisy gradient."})
    gradient_clip: float = field(default=1.0, metadata={
        "label": "DP-NMF gradient clip", "min": 1e-3, "max": 1e4, "privacy": True,
        "help": "Frobenius bound on one unit's gradient of H (input rows have norm 1)."})
    profile_genes: int = field(default=128, metadata={
        "label": "Genes in the donor-level profiles", "min": 2, "max": 100000,
        "privacy": True,
        "help": "With donors as the privacy unit, the per-cluster profiles are released on "
        "this many genes with the largest noisy pooled expression (the others keep the "
        "pooled profile): fewer genes, less noise per cluster."})
    target_sum: float = field(default=1e4, metadata={
        "label": "Library size for the NMF input", "min": 1.0, "max": 1e7,
        "privacy": True,
        "help": "Fixed (data-independent) normalisation target of the NMF input."})
    profile_l2_bound: float = field(default=0.25, metadata={
        "label": "Proportion clip (L2)", "min": 1e-4, "max": 1.0, "privacy": True,
        "help": "Bound on a cell's proportion vector x / library for the ZINB shape "
        "statistics under DP (≤ 1 always holds)."})
    detection_l2_bound: float = field(default=40.0, metadata={
        "label": "Detection clip (L2)", "min": 1.0, "max": 1000.0, "privacy": True,
        "help": "Bound on a cell's detected-gene indicator vector."})
    log_library_min: float = field(default=5.0, metadata={
        "label": "Min log library size (DP)", "min": 0.0, "max": 19.0, "privacy": True,
        "help": "Under DP, log library sizes are clipped to [this, max] and centred, so "
        "one cell moves their sums by half the range, not the whole maximum."})
    log_library_max: float = field(default=12.0, metadata={
        "label": "Max log library size", "min": 1.0, "max": 20.0, "privacy": True,
        "help": "log library sizes are clipped to [0, this]."})
    w_l2_bound: float = field(default=1.5, metadata={
        "label": "W row clip (L2)", "min": 1e-3, "max": 1e4, "privacy": True,
        "help": "Bound on a cell's programme weights (input rows have norm 1, so ≈ 1)."})
    cell_type_key: str = field(default="cell_type", metadata={
        "label": "Cell-type column", "help": "Labels carried to the synthetic cells."})
    seed: int = field(default=0, metadata={"label": "Seed", "min": 0})


def _rng(seed: int, stage: str) -> np.random.Generator:
    """A generator per stage, so one stage's draws never shift another's."""
    return np.random.default_rng([int(seed), _STAGE_SEEDS[stage]])


_ROW_BLOCK = 16_384  # rows per block: a block's float64 temporaries stay ~0.3 GB at 2k genes


def _row_blocks(n: int) -> list[tuple[int, int]]:
    """Row ranges of at most ``_ROW_BLOCK`` rows covering ``range(n)``."""
    return [(s, min(s + _ROW_BLOCK, n)) for s in range(0, n, _ROW_BLOCK)]


def _counts_csr(matrix: Any) -> sp.csr_matrix:
    """The counts as CSR in their own dtype: CSR input is used as is (no float64 copy)."""
    return matrix if isinstance(matrix, sp.csr_matrix) else sp.csr_matrix(matrix)


def _library_sizes(counts: sp.csr_matrix) -> np.ndarray:
    """Row sums as float64, block by block (never a full-size upcast copy)."""
    parts = [np.asarray(counts[s:e].sum(axis=1), dtype=np.float64).ravel()
             for s, e in _row_blocks(counts.shape[0])]
    return np.concatenate(parts) if parts else np.zeros(0)


def _float_blocks(counts: sp.csr_matrix) -> Iterator[tuple[int, int, sp.csr_matrix]]:
    """Yield (start, stop, float64 CSR copy of those rows)."""
    for s, e in _row_blocks(counts.shape[0]):
        yield s, e, sp.csr_matrix(counts[s:e], dtype=np.float64)


def _single_threaded_blas() -> contextlib.AbstractContextManager[Any]:
    """BLAS on one thread: the NMF's products are small (batch × k × k) and two BLAS
    threads waiting on each other on a busy 2-core machine cost 5-10× their work."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _nndsvda_start(x: sp.csr_matrix, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's "nndsvda" start, identical values, without the full copy of ``x`` that
    its ``X.mean()`` makes (sparse mean divides a copy of the matrix)."""
    from sklearn.decomposition._nmf import _initialize_nmf

    w, h = _initialize_nmf(x, k, init="nndsvd", random_state=seed)
    avg = float(x.data.sum()) / (x.shape[0] * x.shape[1])
    w[w == 0] = avg
    h[h == 0] = avg
    return w, h


def _nnls_rows(x: sp.csr_matrix, h: np.ndarray, *, iterations: int = 30) -> np.ndarray:
    """Non-negative weights w_i minimising ||x_i - w_i H|| (multiplicative updates)."""
    hht = h @ h.T
    xht = np.asarray(x @ h.T)
    w = np.full((x.shape[0], h.shape[0]), 0.1)
    for _ in range(iterations):
        w *= xht / np.maximum(w @ hht, 1e-12)
    return w


def _cluster_sums(
    rows: np.ndarray | sp.spmatrix, clusters: np.ndarray, n_clusters: int
) -> np.ndarray:
    """Sum rows per cluster: an (n_clusters, d) dense array."""
    n = rows.shape[0]
    indicator = sp.csr_matrix((np.ones(n), (clusters, np.arange(n))), shape=(n_clusters, n))
    out = indicator @ rows
    return out.toarray() if sp.issparse(out) else np.asarray(out)


_RHO_NODES = 12  # quadrature nodes over the programme multiplier in the zero probability


def _zinb_moments(
    m: np.ndarray, v: np.ndarray, z: np.ndarray, *, programme_var: np.ndarray | float = 0.0,
    steps: int = 30,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ZINB (mu, r, pi) per gene from observed mean, variance and zero fraction.

    ``programme_var`` is σ², the variance of the per-cell rate multiplier ρ (mean 1) that
    sampling applies on top (a cell draws ``ZINB(μ ρ, r, π)``), so the NB part explains only
    what ρ does not: ``E[X²] = (1-π)(μ + μ²(1+σ²)(1+1/r))``; the NB zero probability is
    averaged over ρ taken as log-normal (it is the exponential of a programme sum), by
    Gauss-Hermite quadrature."""
    m = np.maximum(m, 1e-8)
    s2 = np.broadcast_to(np.asarray(programme_var, dtype=float), m.shape)
    nodes, node_weights = np.polynomial.hermite_e.hermegauss(_RHO_NODES)
    log_sd = np.sqrt(np.log1p(s2))[..., None]
    rho = np.exp(log_sd * nodes - log_sd**2 / 2)  # E[rho] = 1, Var[rho] = s2
    node_weights = node_weights / node_weights.sum()
    pi = np.zeros_like(m)
    for _ in range(steps):
        mu = m / (1.0 - pi)
        second = (v + m**2) / np.maximum(1.0 - pi, 1e-12)
        inv_r = (second - mu) / (mu**2 * (1.0 + s2)) - 1.0
        inv_r = np.clip(inv_r, 1e-4, 1e3)  # r in [1e-3, 1e4]: near-Poisson to very wide
        r = 1.0 / inv_r
        p0 = np.exp(-r[..., None] * np.log1p(mu[..., None] * rho / r[..., None])) @ node_weights
        pi = np.clip((z - p0) / np.maximum(1.0 - p0, 1e-12), 0.0, 0.95)
    mu = m / (1.0 - pi)
    return mu, r, pi


_EXPR_FLOOR = 1e-3  # added to a programme's expression: genes outside every programme keep ρ = 1


def _programme_expression(w: np.ndarray, scale: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Each cell's programme expression, ``expm1(scale · w H)`` + a floor: the NMF input is
    ``log1p(normalised counts) / scale``, so this is its reconstruction back on the count
    scale (counts per ``target_sum``)."""
    return np.expm1(np.maximum(scale, 0.0)[:, None] * (w @ h)) + _EXPR_FLOOR


@dataclass
class _Programmes:
    """Within-cluster programme variation (exact, no DP): per cluster the mean and a
    covariance factor of each cell's (w, profile scale), the mean programme expression, and
    σ² of the rate multiplier ρ = expression / mean expression per gene."""

    mean: np.ndarray  # (clusters, k + 1)
    factor: np.ndarray  # (clusters, k + 1, k + 1): cov = factor @ factor.T
    expression: np.ndarray  # (clusters, genes)
    variance: np.ndarray  # (clusters, genes)


_PROGRAMME_CELLS = 10_000  # cells per cluster for the programme moments (a sample beyond)
_PROGRAMME_BLOCK = 4_096  # rows per block there: each dense temporary stays ~65 MB at 2k genes


def _programme_moments(w: np.ndarray, scale: np.ndarray, h: np.ndarray, clusters: np.ndarray,
                       n_clusters: int, seed: int) -> _Programmes:
    """Block by block over at most ``_PROGRAMME_CELLS`` random cells of each cluster (all of
    a smaller cluster): a moment of a 21-number state and a per-gene mean need no more, and
    at 1M cells the full pass cost 0.7 GB of temporaries and tens of seconds."""
    rng = np.random.default_rng([seed, 8])
    picked = []
    for c in range(n_clusters):
        members = np.flatnonzero(clusters == c)
        if len(members) > _PROGRAMME_CELLS:
            members = np.sort(rng.choice(members, _PROGRAMME_CELLS, replace=False))
        picked.append(members)
    rows = np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=int)
    w, scale, clusters = w[rows], scale[rows], clusters[rows]
    wz = np.column_stack([w, scale])
    n = np.maximum(np.bincount(clusters, minlength=n_clusters).astype(float), 1.0)
    expr_sum = np.zeros((n_clusters, h.shape[1]))
    expr_sq = np.zeros_like(expr_sum)
    for s in range(0, len(rows), _PROGRAMME_BLOCK):
        e = min(s + _PROGRAMME_BLOCK, len(rows))
        expr = _programme_expression(w[s:e], scale[s:e], h)
        expr_sum += _cluster_sums(expr, clusters[s:e], n_clusters)
        np.multiply(expr, expr, out=expr)
        expr_sq += _cluster_sums(expr, clusters[s:e], n_clusters)
    expression = np.maximum(expr_sum / n[:, None], _EXPR_FLOOR)  # empty clusters: the floor
    variance = np.maximum(expr_sq / n[:, None] / expression**2 - 1.0, 0.0)
    mean = _cluster_sums(wz, clusters, n_clusters) / n[:, None]
    factor = np.zeros((n_clusters, wz.shape[1], wz.shape[1]))
    for c in range(n_clusters):
        members = wz[clusters == c]
        if len(members) < 2:
            continue
        values, vectors = np.linalg.eigh(np.cov(members, rowvar=False))
        factor[c] = vectors * np.sqrt(np.maximum(values, 0.0))
    return _Programmes(mean, factor, expression, variance)


def _nearest(rows: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of the nearest centre of each row (squared distances, no n × k × d array)."""
    distances = (rows**2).sum(axis=1)[:, None] - 2.0 * rows @ centers.T \
        + (centers**2).sum(axis=1)[None]
    return np.argmin(distances, axis=1)


def _one_hot(labels: np.ndarray, names: list[str]) -> np.ndarray:
    """Rows of indicators: which of ``names`` each label is."""
    return (labels[:, None] == np.asarray(names)[None]).astype(np.float64)


def _unit_log_profiles(counts: sp.csr_matrix, target: float) -> tuple[sp.csr_matrix, np.ndarray]:
    """Return log1p(counts scaled to library size ``target``) with every row scaled to L2
    norm 1, and each row's norm before that scaling. Unit rows make the NMF scale-free and
    give each cell the same, data-independent, L2 size for the DP releases.

    Built block by block straight from the (integer) counts into one float64 data array:
    no float64 copy of the counts and no intermediate full-size matrices."""
    n, indptr = counts.shape[0], counts.indptr
    data = np.empty(counts.nnz, dtype=np.float64)
    norms = np.empty(n)
    for s, e in _row_blocks(n):
        a, b = indptr[s], indptr[e]
        per_row = np.diff(indptr[s:e + 1])
        lib = np.asarray(counts[s:e].sum(axis=1), dtype=np.float64).ravel()
        block = counts.data[a:b] * np.repeat(target / np.maximum(lib, 1.0), per_row)
        np.log1p(block, out=block)
        rows = np.repeat(np.arange(e - s), per_row)
        norms[s:e] = np.sqrt(np.bincount(rows, weights=block * block, minlength=e - s))
        block *= np.repeat(1.0 / np.maximum(norms[s:e], 1e-12), per_row)
        data[a:b] = block
    unit = sp.csr_matrix((data, counts.indices.copy(), indptr.copy()), shape=counts.shape)
    return unit, norms


def _max_profile_scale(target: float, n_genes: int) -> float:
    """The largest norm ``||log1p(target · x / sum(x))||`` any cell can have: spread over k
    genes equally it is ``sqrt(k) log1p(target / k)`` (concavity makes equal shares the
    worst case), maximised over k. Data-independent, so it can bound a DP release."""
    k = np.arange(1, n_genes + 1, dtype=np.float64)
    return float(np.max(np.sqrt(k) * np.log1p(target / k)))


def _shrunk_profiles(sums: np.ndarray, sizes: np.ndarray, sigma: float,
                     pooled_release: np.ndarray) -> np.ndarray:
    """Per-cluster mean profiles from noisy per-cluster sums (noise sd ``sigma`` per entry)
    and one noisy pooled sum over all cells (same sd): post-processing of DP releases only.

    The pooled mean (both estimates of the pooled sum, inverse-variance weighted) is kept
    where it is more than ``_POOLED_SDS`` noise sds above zero (and on the ``_MIN_GENES``
    largest, so heavy noise never leaves an empty profile). A cluster departs from it only
    on genes whose deviations over the clusters are jointly significant (a χ² score more than
    ``_SELECT_Z`` sds above its null mean), shrunk by ``τ² / (τ² + noise variance)`` with
    τ² the gene's between-cluster variance net of noise. Small clusters thus stay near the
    pooled profile instead of carrying their noise into every synthetic cell."""
    k = sums.shape[0]
    n_total = max(float(sizes.sum()), 1.0)
    pooled = (pooled_release + sums.sum(axis=0) / k) / (1.0 + 1.0 / k)
    pooled_sd = sigma / np.sqrt(1.0 + 1.0 / k)
    keep = pooled > _POOLED_SDS * pooled_sd
    keep[np.argsort(-pooled)[:_MIN_GENES]] = True  # never an empty profile under heavy noise
    overall = np.where(keep, np.maximum(pooled, 0.0), 0.0) / n_total
    deviation = sums / sizes[:, None] - overall[None]
    noise_var = (sigma / sizes) ** 2
    chi = (deviation**2 / noise_var[:, None]).sum(axis=0)
    selected = (chi - k) / np.sqrt(2.0 * k) > _SELECT_Z
    tau2 = np.maximum((sizes / n_total) @ (deviation**2 - noise_var[:, None]), 0.0)
    weight = selected[None] * tau2[None] / np.maximum(tau2[None] + noise_var[:, None], 1e-300)
    return np.maximum(overall[None] + weight * deviation, 0.0)


def _unit_profile_sums(x: sp.csr_matrix, genes: np.ndarray, clusters: np.ndarray,
                       n_clusters: int, *, weights: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each cell's row of ``x`` restricted to the columns ``genes`` and rescaled to L2 norm 1
    (times its ``weights`` entry when given), summed per cluster (clusters × genes; no rows
    when ``n_clusters`` is 0) and over all cells (genes), with each cell's restricted norm
    before rescaling. Block by block: a
    restricted, rescaled copy of the whole matrix was three full-size temporaries (14 GB at
    1M cells × 2k genes). Writes nothing."""
    every_gene = len(genes) == x.shape[1] and bool(np.all(genes == np.arange(x.shape[1])))
    per_cluster = np.zeros((n_clusters, len(genes)))
    pooled = np.zeros(len(genes))
    norms = np.empty(x.shape[0])
    for s, e in _row_blocks(x.shape[0]):
        block = x[s:e] if every_gene else x[s:e][:, genes]
        norms[s:e] = np.sqrt(np.asarray(block.multiply(block).sum(axis=1)).ravel())
        factor = 1.0 / np.maximum(norms[s:e], 1e-12)
        if weights is not None:
            factor = factor * weights[s:e]
        block = sp.csr_matrix(sp.diags(factor) @ block)
        if n_clusters:
            per_cluster += _cluster_sums(block, clusters[s:e], n_clusters)
        pooled += np.asarray(block.sum(axis=0)).ravel()
    return per_cluster, pooled, norms


def _unit_cluster_weights(units: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Each cell's weight ``sqrt(f) / n`` in the donor-level profile release: ``n`` is its
    unit's number of cells in its cluster and ``f`` that number over the unit's cells.

    A unit's weighted rows then sum to ``sqrt(f_c)`` times its mean row in cluster c, and
    with rows of norm ≤ 1 the unit's stacked contribution over all clusters has norm at most
    ``sqrt(sum_c f_c) = 1``, whatever its cells and however many clusters it spans: the
    sensitivity is 1, not the cap on its cells. Each cluster's mean is then a weighted mean
    of its donors' means, the weights summing to ``Σ_d sqrt(f_dc)`` (a release of its own)."""
    _, codes = np.unique(units, return_inverse=True)
    pair = codes * (int(clusters.max(initial=0)) + 1) + clusters
    in_pair = np.bincount(pair)[pair].astype(float)
    in_unit = np.bincount(codes)[codes].astype(float)
    return np.sqrt(in_pair / in_unit) / in_pair


def _proportions_from_log_means(log_means: np.ndarray, libraries: np.ndarray,
                                target: float) -> np.ndarray:
    """Proportions p per cluster and gene such that ``E[log1p(target X / L)]`` equals
    ``log_means`` for X ~ Poisson(p L) at the cluster's library size L (a monotone function
    of p, tabulated and inverted). Unlike ``expm1`` of the mean log value, this keeps a gene
    seen in a few cells at its right mean. Pure post-processing."""
    out = np.zeros_like(log_means)
    for c, lib in enumerate(libraries):
        g, mu_grid = _poisson_log_mean_table(float(lib), target)
        out[c] = np.interp(log_means[c], g, mu_grid) / max(lib, 1.0)
    return out


def _poisson_log_mean_table(lib: float, target: float) -> tuple[np.ndarray, np.ndarray]:
    """``(g, mu)``: ``g = E[log1p(target X / lib)]`` for X ~ Poisson(mu) on a grid of mu
    (made non-decreasing, so it can be inverted by interpolation)."""
    from scipy.stats import poisson

    mu_grid = np.concatenate([[0.0], np.logspace(-4, 5, 400)])
    k = np.arange(0, 121)[:, None]
    a = target / max(lib, 1.0)
    small = mu_grid <= 30
    g = np.empty_like(mu_grid)
    g[small] = (poisson.pmf(k, mu_grid[small][None]) * np.log1p(a * k)).sum(axis=0)
    mu = mu_grid[~small]
    g[~small] = np.log1p(a * mu) - a**2 * mu / (2 * (1 + a * mu) ** 2)
    return np.maximum.accumulate(g), mu_grid


def _self_consistent_proportions(profiles: np.ndarray, libraries: np.ndarray, target: float,
                                 scale_max: float) -> np.ndarray:
    """Proportions from mean unit-norm log profiles without knowing the cells' profile
    scale: per cluster, ``_proportions_from_log_means(s · profile)`` at the scale s in
    [1, ``scale_max``] where they sum to 1 (the sum grows with s; bisection on log s).
    Proportions sum to 1 by definition, so this fixes each cluster's scale from its own
    profile: no release, and a scale per cluster (on the mock data the types' mean scales
    are 18 and 39; one pooled released scale fitted neither). Pure post-processing."""
    out = np.zeros_like(profiles)
    for c, lib in enumerate(libraries):
        g, mu_grid = _poisson_log_mean_table(float(lib), target)
        lo, hi = 0.0, float(np.log(scale_max))
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            total = np.interp(np.exp(mid) * profiles[c], g, mu_grid).sum() / max(lib, 1.0)
            lo, hi = (mid, hi) if total < 1.0 else (lo, mid)
        out[c] = np.interp(np.exp(0.5 * (lo + hi)) * profiles[c], g, mu_grid) / max(lib, 1.0)
    return out


@dataclass
class _ClusterData:
    """What the summary step needs of the fitted cells."""

    counts: sp.csr_matrix
    x: sp.csr_matrix  # unit-norm log profiles (the NMF input)
    scale: np.ndarray  # each cell's log-profile norm before scaling
    w: np.ndarray
    clusters: np.ndarray
    n_clusters: int
    cap: int
    units: np.ndarray  # each cell's privacy unit (donor, or the cell itself)
    labels: np.ndarray | None
    label_names: list[str]
    target: float


def _donor_profiles(means: np.ndarray, noise_sd: np.ndarray, shares: np.ndarray,
                    pooled_mean: np.ndarray, pooled_sd: float, top: np.ndarray) -> np.ndarray:
    """Per-cluster mean log profiles (clusters × genes) at donor level: post-processing of
    DP releases only.

    ``means`` are the clusters' noisy mean profiles on the genes ``top`` only (each cell's
    profile restricted to them and rescaled to norm 1; noise sd ``noise_sd`` per cluster),
    ``pooled_mean`` the noisy pooled mean over all genes (sd ``pooled_sd``), ``shares`` the
    clusters' shares of the cells. On ``top`` each cluster's deviation from the
    share-weighted mean is shrunk as a whole, James-Stein: by ``1 - |top| noise² / |dev|²``
    (at least 0). Gene by gene the deviations are within the noise at 100 donors (the mock
    data, ε = 4: about 7 of 1,000 genes pass :func:`_shrunk_profiles`' selection), but summed
    over the genes a cluster's deviation stands out. The shrunk profiles are put back on the
    pooled profile's scale (a least-squares factor between the two pooled means on ``top``);
    every other gene keeps the pooled mean where it is ``_POOLED_SDS`` sds above zero (and
    on the ``_MIN_GENES`` largest), else 0."""
    k, n_top = means.shape
    keep = pooled_mean > _POOLED_SDS * pooled_sd
    keep[np.argsort(-pooled_mean)[:_MIN_GENES]] = True  # never an empty profile
    overall = np.where(keep, np.maximum(pooled_mean, 0.0), 0.0)
    pooled_top = shares @ means
    deviation = means - pooled_top[None]
    energy = (deviation**2).sum(axis=1)
    shrink = np.clip(1.0 - n_top * noise_sd**2 / np.maximum(energy, 1e-300), 0.0, 1.0)
    shrunk = np.maximum(pooled_top[None] + shrink[:, None] * deviation, 0.0)
    out = np.tile(overall, (k, 1))
    positive = np.maximum(pooled_top, 0.0)
    ratio = float(overall[top] @ positive) / max(float(positive @ positive), 1e-300)
    if ratio > 0:  # else noise swamps the pooled means (a handful of donors): pooled only
        out[:, top] = ratio * shrunk
    return out

_LOG_LIBRARY_DEV2 = 1.0  # donor level: a cell's squared log-library deviation is clipped here
_POOLED_SDS = 3.0  # the pooled DP profile keeps genes this many noise sds above zero
_SELECT_Z = 5.0  # a gene's per-cluster deviations are used above this χ² z-score
_MIN_GENES = 50  # the pooled DP profile keeps at least this many (largest) genes
_SHAPE_SDS = 3.0  # a gene's DP dispersion / zero inflation is used this many sds above noise
_INV_R_MAX = 2.0  # donor level: a cell's moment estimate of 1 / r is clipped to [0, this]


# Scalar releases (counts, library-size moments) carry a signal of one per cell in every
# cluster, so they get this many times the noise of the others and cost ~1/9 as much budget.
# The ZINB shape releases (pooled proportions, their squares, detections) measure few genes
# at any useful ε (the others fall back to Poisson), so they too get 3× the noise: on Kang
# at ε = 4 the per-cluster profiles' noise goes down by about a fifth. (2× the noise on the
# pooled profile as well helped Kang more but broke the mock donor-level setting.)
NOISE_FACTORS = {"basis counts": 3.0, "kmeans counts": 3.0, "cluster sizes": 3.0,
                 "cluster donor weights": 3.0, "cluster dispersion sums": 3.0,
                 "log library sums": 3.0, "log library square sums": 3.0,
                 "profile scale": 3.0, "proportion sums": 3.0,
                 "proportion square sums": 3.0, "detections": 3.0}


def stage_releases(config: DPNMFConfig, stage: str, *, n_units: int,
                   n_labels: int) -> list[tuple[str, str, int, float | None, float]]:
    """The releases (name, mechanism, count, sampling rate, noise factor) one DP stage
    makes; a release's noise multiplier is its stage's multiplier times the factor."""
    if stage == "nmf" and _basis_unused(config, has_labels=n_labels > 0):
        return []
    if stage == "nmf" and config.nmf_dp_method == "centroids":
        names = [("basis gene sums", 1), ("basis counts", config.kmeans_iterations),
                 ("basis sums", config.kmeans_iterations), ("basis profiles", 1)]
    elif stage == "nmf":
        rate = min(1.0, config.nmf_batch_size / max(n_units, 1))
        return [("nmf gradient", "gaussian", config.nmf_dp_steps, rate, 1.0)]
    elif stage == "kmeans" and clusters_by_type(config, has_labels=n_labels > 0):
        names = []  # clusters are the cells' own labels: nothing is released
    elif stage == "kmeans":
        names = [("kmeans counts", config.kmeans_iterations),
                 ("kmeans sums", config.kmeans_iterations)]
    else:
        names = [(name, 1) for name in ("cluster sizes", "profile sums", "log library sums",
                                         "log library square sums", "profile pooled sums")]
        if _donor_weighted(config):  # the donor-weighted profiles' denominators
            names.append(("cluster donor weights", 1))
        else:  # at donor level each cluster's scale comes from its own profile (no release)
            names.append(("profile scale", 1))
        if config.dp not in ("nmf", "all"):  # with a DP basis the weights' spread is unused
            names += [("W sums", 1), ("W square sums", 1)]
        if n_labels and not clusters_by_type(config, has_labels=True):
            names.append(("label counts", 1))
        if config.sampling_method == "zinb":
            names += [("proportion sums", 1), ("proportion square sums", 1), ("detections", 1)]
            if _donor_weighted(config):  # the clusters' shared over-dispersion
                names.append(("cluster dispersion sums", 1))
    return [(name, "gaussian", count, None, NOISE_FACTORS.get(name, 1.0))
            for name, count in names]


def _donor_weighted(config: DPNMFConfig) -> bool:
    """Whether the per-cluster profile release weights each donor's cells by
    :func:`_unit_cluster_weights` (sensitivity 1): with donors as the privacy unit."""
    return bool(config.donor_key)


def clusters_by_type(config: DPNMFConfig, *, has_labels: bool) -> bool:
    """Whether the clusters are the cell types: ``clusters_from="cell_type"``, or ``"auto"``
    with every stage DP (``dp="all"``) and a cell-type column in the data.

    Why ``auto`` picks cell types under DP: on Kang (cell level, ε = 4, seeds 0/1/2) DP
    k-means clusters kept 52 % of the no-DP train-on-synthetic F1 (fewer Lloyd iterations,
    more noise on the clustering, k-means straight on projected profiles, more clusters:
    43-78 %, and unstable over seeds; one single cluster gave 53 %), cell types 85 %: the
    labels cost no budget, so all of it goes to the per-cluster statistics. With donors as
    the unit (``donor_key``; mock, 200 donors, ε = 4, seeds 0/1/2) cell types were at first
    no better (16 / 35 / 25 % against k-means' 92 / 16 / 17 %): the per-cluster profiles'
    noise, not the clusters, was the limit. With the donor-level profile release
    (:func:`_unit_cluster_weights`, :func:`_donor_profiles`, per-cluster scales) cell types
    keep 100 / 100 / 100 %, k-means 17 / 99 / 44 %, so ``auto`` picks cell types at both
    levels."""
    if config.clusters_from not in CLUSTER_SOURCES:
        raise UserFacingError(f"Clusters from must be one of {', '.join(CLUSTER_SOURCES)}.")
    if config.clusters_from == "auto":
        return config.dp == "all" and has_labels
    return config.clusters_from == "cell_type"


def _basis_unused(config: DPNMFConfig, *, has_labels: bool) -> bool:
    """With every stage DP and clusters from the cell types, the basis would feed nothing
    that is released (the programme spread is off and the profiles are released per gene),
    so it is not fitted and costs no budget; H is a data-independent placeholder."""
    return config.dp == "all" and clusters_by_type(config, has_labels=has_labels)


@dataclass
class PrivacyPlan:
    """What a DP-NMF config spends, known before training: the noise multiplier of each
    stage and the accountant's total (ε, δ)."""

    stages: tuple[str, ...]
    delta: float
    multipliers: dict[str, float]
    stage_epsilon: dict[str, float]
    epsilon: float
    n_units: int
    releases: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (stored with sweeps, shown on the Privacy page)."""
        return dict(self.__dict__, stages=list(self.stages))


def plan_privacy(config: DPNMFConfig, *, n_units: int, n_labels: int = 0,
                 method: str = "pld") -> PrivacyPlan:
    """Calibrate the noise of every DP stage of ``config`` for ``n_units`` privacy units.

    ``budget_mode="total"``: one noise multiplier shared by every release, found so that
    the accountant's total is ``epsilon_total``. ``"per_stage"``: each stage is calibrated
    to its own ε (``epsilon_nmf`` / ``epsilon_kmeans`` / ``epsilon_sampling``) at δ / (number
    of stages); the accountant then composes all releases, so the total is at most the sum
    of the stage budgets (usually less). Writes nothing."""
    if config.budget_mode not in BUDGET_MODES:
        raise UserFacingError(f"The budget mode must be one of {', '.join(BUDGET_MODES)}.")
    dp = config.dp
    stages = tuple(STAGES) if dp == "all" else () if dp == "none" else (dp,)
    delta = config.delta or default_delta(n_units)
    per_stage = {s: stage_releases(config, s, n_units=n_units, n_labels=n_labels)
                 for s in stages}
    stages = tuple(s for s in stages if per_stage[s])  # e.g. k-means with type clusters
    multipliers: dict[str, float] = {}
    try:
        if stages and config.budget_mode == "total":
            shared = calibrate_noise_multiplier(
                epsilon=config.epsilon_total, delta=delta,
                releases=[r for s in stages for r in per_stage[s]], method=method)
            multipliers = dict.fromkeys(stages, shared)
        for stage in stages if config.budget_mode == "per_stage" else ():
            budget = float(getattr(config, f"epsilon_{stage}"))
            multipliers[stage] = calibrate_noise_multiplier(
                epsilon=budget, delta=delta / len(stages), releases=per_stage[stage],
                method=method)
    except ValueError as exc:
        raise UserFacingError("This ε is too small for these settings: raise it or use "
                              "fewer DP steps.") from exc
    total = Accountant(method=method)
    stage_epsilon: dict[str, float] = {}
    for stage in stages:
        alone = Accountant(method=method)
        for name, _, count, rate, factor in per_stage[stage]:
            for acc in (total, alone):
                acc.gaussian(name, noise_multiplier=multipliers[stage] * factor, count=count,
                             sampling_rate=rate)
        stage_epsilon[stage] = alone.epsilon(delta)
    return PrivacyPlan(stages=stages, delta=delta, multipliers=multipliers,
                       stage_epsilon=stage_epsilon, epsilon=total.epsilon(delta),
                       n_units=n_units, releases=[r.__dict__ for r in total.releases])


_INVERSE_MAX_MEAN = 4.0   # above this mean, or
_INVERSE_MAX_Q = 0.8      # a tail ratio mu/(mu+r) above this: gamma-Poisson directly
_INVERSE_MAX_STEPS = 400
_ROWS_PER_CHUNK = 2048


def _sample_zinb(mu: np.ndarray, r: np.ndarray | None, pi: np.ndarray | None,
                 rng: np.random.Generator) -> np.ndarray:
    """Exact ZINB (or Poisson when ``r`` is None) counts, mean ``mu`` before zero
    inflation, shape ``r``, zero probability ``pi``; all arrays shaped like ``mu``.

    One uniform per entry decides zero inflation and, for small means, the count by
    inverse transform (most entries stop at zero after one comparison); only large means or
    heavy tails fall back to gamma-Poisson draws. Returns int32."""
    out = np.zeros(mu.shape, dtype=np.int32)
    u = rng.random(mu.shape)
    if pi is not None:  # zero-inflated below pi; above it u is again uniform on [0, 1)
        keep = u >= pi
        u -= pi
        u /= np.maximum(1.0 - pi, 1e-12)
    else:
        keep = np.ones(mu.shape, dtype=bool)
    if r is not None:
        q = mu / (mu + r)
        direct = keep & ((mu > _INVERSE_MAX_MEAN) | (q > _INVERSE_MAX_Q))
        p0 = np.log1p(-q)
        p0 *= r
    else:
        direct = keep & (mu > _INVERSE_MAX_MEAN)
        p0 = -mu
    np.exp(p0, out=p0)  # P(count = 0 | not inflated)
    rows, cols = np.nonzero(direct)
    if rows.size:
        m = mu[rows, cols]
        if r is not None:
            s = r[rows, cols]
            m = rng.gamma(s, m / s)
        out[rows, cols] = rng.poisson(m)
    rows, cols = np.nonzero(keep & ~direct & (u >= p0))
    u, pmf = u[rows, cols], p0[rows, cols]
    ratio = q[rows, cols] if r is not None else mu[rows, cols]
    s = r[rows, cols] if r is not None else None
    cdf = pmf.copy()
    k = 0
    while rows.size:
        k += 1
        pmf *= ratio * ((s + (k - 1)) / k) if s is not None else ratio / k
        cdf += pmf
        out[rows, cols] = k
        go_on = u >= cdf
        if k >= _INVERSE_MAX_STEPS:
            break
        rows, cols, u, ratio, pmf, cdf = (a[go_on] for a in (rows, cols, u, ratio, pmf, cdf))
        if s is not None:
            s = s[go_on]
    return out


def _draw_cells(prm: dict, h: np.ndarray, clusters: np.ndarray, seed: int, *, zinb: bool,
                progress: Progress = no_progress, threads: int | None = None) -> sp.csr_matrix:
    """All cells' counts, chunk by chunk on a thread pool (each chunk its own stream)."""
    base = prm["w_mean"] @ h
    joint = "programme_mean" in prm
    n, n_genes = len(clusters), h.shape[1]
    starts = list(range(0, n, _ROWS_PER_CHUNK))

    def chunk(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng([seed, 7, i])
        c = clusters[starts[i]:starts[i] + _ROWS_PER_CHUNK]
        if joint:  # (w, scale) ~ N(mean_c, cov_c); ρ = programme expression / cluster mean
            noise = rng.standard_normal((len(c), prm["programme_mean"].shape[1]))
            wz = prm["programme_mean"][c] + np.einsum("nij,nj->ni",
                                                      prm["programme_factor"][c], noise)
            expr = _programme_expression(np.maximum(wz[:, :-1], 0.0), wz[:, -1], h)
            ratio = np.clip(expr / prm["programme_expression"][c], 0.0, 10.0)
        else:  # w ~ N(mean_c, sd_c) per component; ρ = w H / w̄_c H
            wc = np.maximum(rng.normal(prm["w_mean"][c], prm["w_sd"][c]), 0.0)
            # genes outside every programme (base ≈ 0) keep their cluster mean
            ratio = np.clip((wc @ h + 1e-6) / (base[c] + 1e-6), 0.0, 10.0)
        lib = np.exp(rng.normal(prm["log_lib_mean"][c], prm["log_lib_sd"][c]))
        ratio *= (lib / prm["lib_ref"][c])[:, None]
        if zinb:
            ratio *= prm["mu"][c]
            x = _sample_zinb(ratio, prm["r"][c], prm["pi"][c], rng)
        else:
            ratio *= prm["mean"][c]
            x = _sample_zinb(ratio, None, None, rng)
        mask = x != 0
        flat = np.flatnonzero(mask)
        return (np.count_nonzero(mask, axis=1), (flat % n_genes).astype(np.int32),
                x.ravel()[flat])

    workers = threads or max(1, min(len(os.sched_getaffinity(0)), 8))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        parts = []
        for i, part in enumerate(pool.map(chunk, range(len(starts)))):
            parts.append(part)
            progress(min(1.0, (i + 1) * _ROWS_PER_CHUNK / max(n, 1)), "drawing cells")
    return _assemble_csr(parts, (n, n_genes))  # fills one CSR, dropping chunks as it goes


@register
class DPNMFGenerator(Generator):
    """NMF programmes + k-means clusters + per-cluster count models, optionally DP."""

    name = "dp-nmf"
    label = "DP-NMF (CAMDA blue team)"
    description = (
        "Factorises cells into gene programmes (NMF), clusters the programme weights, and "
        "draws counts from per-cluster ZINB or Poisson models with per-cell library size "
        "and programme variation. Each stage can be made differentially private."
    )
    config_class = DPNMFConfig
    capabilities = Capabilities(dp_mechanisms=("nmf", "kmeans", "sampling"))

    def __init__(self, config: DPNMFConfig | None = None) -> None:
        super().__init__(config)
        self.gene_names: np.ndarray | None = None
        self.h: np.ndarray | None = None
        self.params: dict[str, np.ndarray] = {}
        self.cluster_labels: list[str] = []
        self.n_train_cells: int = 0
        self.delta_used: float = 0.0
        self.unit_name: str = "cell"
        self.accountant = Accountant()
        self._spend: dict[str, Any] | None = None
        self.train_clusters: np.ndarray | None = None  # kept in memory for inspection
        self._basis_genes: np.ndarray | None = None  # genes the DP centroid basis chose
        self.clusters_by_type = False  # the clusters of the last fit are the cell types

    # ----------------------------------------------------------------- privacy
    def _stages(self) -> set[str]:
        dp = self.config.dp
        return {"sampling", "kmeans", "nmf"} if dp == "all" else set() if dp == "none" else {dp}

    @property
    def privacy_label(self) -> str:
        if not self._stages():
            return "not private"
        eps = self.privacy_spend()["epsilon"]
        text = f"DP (ε={eps:.2g}, δ={self.delta_used:.1g}, unit={self.unit_name})"
        if self.config.dp != "all":
            text = (f"not private: only the {self.config.dp} stage is noised "
                    f"(partial {text})")
        return text

    def privacy_spend(self) -> dict[str, Any]:
        if not self._stages():
            return {}
        if self._spend is None:  # composing every release (PLD) is slow: once per model
            self._spend = self.accountant.spend(self.delta_used)
        return self._spend

    # ----------------------------------------------------------------- fit
    def fit(self, train: ad.AnnData | None, *, progress: Progress = no_progress) -> None:
        """Fit NMF, clusters and per-cluster count models on the training cells."""
        cfg = self.config
        if train is None:
            raise UserFacingError("DP-NMF needs training cells.")
        if cfg.dp not in DP_CHOICES:
            raise UserFacingError(f"DP must be one of {', '.join(DP_CHOICES)}.")
        stages = self._stages()
        n_all = train.n_obs
        rows = np.arange(n_all)
        if cfg.sample_fraction < 1.0:
            size = max(2, round(n_all * cfg.sample_fraction))
            rows = np.sort(_rng(cfg.seed, "subsample").choice(n_all, size=size, replace=False))
        if cfg.donor_key:
            if cfg.donor_key not in train.obs:
                raise UserFacingError(f"The donor column {cfg.donor_key!r} is not in the data.")
            units = train.obs[cfg.donor_key].astype(str).to_numpy()[rows]
            self.unit_name = f"donor ({cfg.donor_key})"
            cap = int(cfg.max_cells_per_unit)
            if stages:
                keep = cap_cells_per_unit(units, max_cells=cap, rng=_rng(cfg.seed, "cap"))
                rows, units = rows[keep], units[keep]
        else:
            units = rows.astype(str)
            self.unit_name = "cell"
            cap = 1
        counts = _counts_csr(train.X if len(rows) == n_all else train.X[rows])
        labels = None
        if cfg.cell_type_key and cfg.cell_type_key in train.obs:
            labels = train.obs[cfg.cell_type_key].astype(str).to_numpy()[rows]
        label_names = sorted(set(labels)) if labels is not None else []
        by_type = clusters_by_type(cfg, has_labels=bool(label_names))
        self.clusters_by_type = by_type
        if by_type and labels is None:
            raise UserFacingError("Clusters from cell types need the cell-type column "
                                  f"{cfg.cell_type_key!r} in the data.")
        n_clusters = len(label_names) if by_type else (
            cfg.n_clusters or (len(label_names) if label_names else 8))
        n_clusters = max(1, min(n_clusters, counts.shape[0]))
        n_units = len(np.unique(units))

        self.accountant = Accountant()
        self._spend = None
        self._basis_genes = None
        multipliers: dict[str, float] = {}
        if stages:
            progress(0.02, "calibrating the noise to the budget")
            plan = plan_privacy(cfg, n_units=n_units, n_labels=len(label_names))
            self.delta_used, multipliers = plan.delta, plan.multipliers

        # 1. NMF on unit-norm rows of log1p(library-normalised counts)
        progress(0.05, "factorising (NMF)")
        x_in, scale = _unit_log_profiles(counts, cfg.target_sum)
        with _single_threaded_blas():
            if "nmf" in stages and _basis_unused(cfg, has_labels=bool(label_names)):
                k = min(cfg.n_components, min(x_in.shape))
                h = np.ones((k, x_in.shape[1]))
            elif "nmf" in stages and cfg.nmf_dp_method == "centroids":
                h = self._dp_centroid_basis(x_in, cap, multipliers["nmf"])
            elif "nmf" in stages:
                h = self._dp_nmf(x_in, units, cap, multipliers["nmf"])
            else:
                k = min(cfg.n_components, min(x_in.shape))
                x_fit = x_in  # H from at most nmf_fit_cells random cells: same work at any n
                if x_in.shape[0] > cfg.nmf_fit_cells:
                    pick = _rng(cfg.seed, "nmf_cells").choice(x_in.shape[0],
                                                              cfg.nmf_fit_cells, replace=False)
                    x_fit = x_in[np.sort(pick)]
                w0, h0 = _nndsvda_start(x_fit, k, cfg.seed)
                batches = -(-x_fit.shape[0] // cfg.nmf_batch_size)
                nmf = MiniBatchNMF(n_components=k, batch_size=cfg.nmf_batch_size,
                                   init="custom", random_state=cfg.seed,
                                   max_iter=min(cfg.nmf_max_iter,
                                                max(1, -(-cfg.nmf_steps // batches))),
                                   tol=0.0, max_no_improvement=None)
                nmf.fit(x_fit, W=w0, H=h0)
                h = nmf.components_
            h = h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)
            w = _nnls_rows(x_in, h)
        # 2. clusters
        progress(0.5, "clustering the programme weights")
        direction = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
        if by_type:
            clusters = np.searchsorted(np.asarray(label_names), labels)
        elif "kmeans" in stages:
            clusters = self._dp_kmeans(direction, units, cap, n_clusters, multipliers["kmeans"])
        else:
            km = KMeans(n_clusters=n_clusters, n_init=4, random_state=cfg.seed)
            clusters = km.fit_predict(direction)
        self.train_clusters = clusters
        # 3. summaries
        progress(0.7, "summarising the clusters")
        context = _ClusterData(counts, x_in, scale, w, clusters, n_clusters, cap, units,
                               labels, label_names, cfg.target_sum)
        if "sampling" in stages:
            self._private_summaries(context, h, multipliers["sampling"])
        else:
            self._summaries(context, h, programmes="nmf" not in stages)
        if "nmf" in stages:  # a noisy basis would add noise genes to each cell's profile
            self.params["w_sd"] = np.zeros_like(self.params["w_sd"])
        self.h = h
        self.gene_names = np.asarray(train.var_names).astype(str)
        progress(1.0, f"fitted {n_clusters} clusters on {counts.shape[0]} cells")

    def _release(self, name: str, value: np.ndarray, sensitivity: float, multiplier: float,
                 rng: np.random.Generator, *, count: int = 1,
                 sampling_rate: float | None = None, record: bool = True) -> np.ndarray:
        """Add calibrated Gaussian noise and record the release (once per name)."""
        multiplier *= NOISE_FACTORS.get(name, 1.0)
        mech = GaussianRelease(sensitivity=sensitivity, sigma=multiplier * sensitivity)
        if record:
            self.accountant.gaussian(name, noise_multiplier=multiplier, count=count,
                                     sampling_rate=sampling_rate)
        return mech.release(value, rng)

    def _dp_nmf(self, x: sp.csr_matrix, units: np.ndarray, cap: int,
                multiplier: float) -> np.ndarray:
        """DP-SGD on H: Poisson-sampled units, per-cell clipped gradients, Gaussian noise.

        Input rows have unit norm, so a cell's gradient ``outer(w, wH - x)`` is about 1;
        the rows of H are kept at unit norm after each projected step (post-processing)."""
        cfg = self.config
        rng = _rng(cfg.seed, "nmf")
        k = min(cfg.n_components, min(x.shape))
        h = np.abs(rng.normal(0.0, 1.0, size=(k, x.shape[1])))
        h /= np.linalg.norm(h, axis=1, keepdims=True)
        unit_ids, codes = np.unique(units, return_inverse=True)
        rate = min(1.0, cfg.nmf_batch_size / len(unit_ids))
        per_cell_clip = cfg.gradient_clip / cap  # a unit's summed gradient stays ≤ the clip
        expected = max(rate * len(unit_ids), 1.0)
        for step in range(cfg.nmf_dp_steps):
            chosen = rng.random(len(unit_ids)) < rate
            batch = np.flatnonzero(chosen[codes])
            grad = np.zeros_like(h)
            if len(batch):
                xb = x[batch]
                wb = _nnls_rows(xb, h, iterations=10)
                resid = wb @ h - xb.toarray()
                norms = np.linalg.norm(wb, axis=1) * np.linalg.norm(resid, axis=1)
                factors = np.minimum(1.0, per_cell_clip / np.maximum(norms, 1e-12))
                grad = (wb * factors[:, None]).T @ resid
            noisy = self._release("nmf gradient", grad, cfg.gradient_clip, multiplier, rng,
                                  count=cfg.nmf_dp_steps, sampling_rate=rate,
                                  record=step == 0)
            h = np.maximum(h - cfg.nmf_dp_learning_rate * noisy / expected, 0.0)
            h /= np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)
        return h

    def _dp_centroid_basis(self, x: sp.csr_matrix, cap: int, multiplier: float) -> np.ndarray:
        """A DP basis H: spherical DP Lloyd iterations with ``n_components`` centres in a
        data-independent random projection (32 dimensions; noisy counts and clipped sums),
        then one release of each centre's summed unit-norm gene profiles (sensitivity 1 per
        cell). Genes whose pooled sum is within 3 noise sds of zero get 0 in every row."""
        cfg = self.config
        rng = _rng(cfg.seed, "nmf")
        k = min(cfg.n_components, min(x.shape))
        # DP gene selection: the noisy pooled profile picks the genes the basis may use, so
        # the basis carries noise on those genes only (restricted rows keep norm ≤ 1).
        pooled = self._release("basis gene sums", np.asarray(x.sum(axis=0)).ravel(),
                               float(cap), multiplier, rng)
        genes = np.sort(np.argsort(-pooled)[:min(cfg.dp_basis_genes, x.shape[1])])
        self._basis_genes = genes
        full_width = x.shape[1]
        x = x[:, genes]
        projection = rng.normal(size=(x.shape[1], 32)) / np.sqrt(32.0)
        y = np.asarray(clip_rows_l2(np.asarray(x @ projection), 1.0))
        centers = rng.normal(size=(k, 32))
        centers /= np.linalg.norm(centers, axis=1, keepdims=True)
        for it in range(cfg.kmeans_iterations):
            assign = _nearest(y, centers)
            sizes = self._release("basis counts", np.bincount(assign, minlength=k),
                                  float(cap), multiplier, rng, count=cfg.kmeans_iterations,
                                  record=it == 0)
            sums = self._release("basis sums", _cluster_sums(y, assign, k), float(cap),
                                 multiplier, rng, count=cfg.kmeans_iterations, record=it == 0)
            ok = sizes >= 1.0
            centers[ok] = sums[ok] / np.maximum(np.linalg.norm(sums[ok], axis=1,
                                                               keepdims=True), 1e-12)
        assign = _nearest(y, centers)
        profiles = self._release("basis profiles", _cluster_sums(x, assign, k), float(cap),
                                 multiplier, rng)
        sigma = multiplier * cap
        expressed = profiles.sum(axis=0) > 3.0 * sigma * np.sqrt(k)
        h = np.zeros((k, full_width))
        h[:, genes] = np.maximum(profiles, 0.0) * expressed[None] + 1e-12 * expressed[None]
        return h

    def _dp_kmeans(self, rows: np.ndarray, units: np.ndarray, cap: int, n_clusters: int,
                   multiplier: float) -> np.ndarray:
        """DP Lloyd iterations on norm-≤1, non-negative rows.

        Start (data-independent): one centre per programme (the unit vectors) plus random
        non-negative directions up to ``n_clusters``; after the first noisy iteration only
        the ``n_clusters`` centres with the largest noisy counts are kept (post-processing),
        so no centre starts where no cell is."""
        cfg = self.config
        rng = _rng(cfg.seed, "kmeans")
        rows = np.asarray(clip_rows_l2(rows, 1.0))
        width = rows.shape[1]
        extra = np.abs(rng.normal(size=(max(0, n_clusters - width), width)))
        centers = np.vstack([np.eye(width), extra])
        centers /= np.linalg.norm(centers, axis=1, keepdims=True)
        for it in range(cfg.kmeans_iterations):
            assign = _nearest(rows, centers)
            k = len(centers)
            sizes = self._release("kmeans counts", np.bincount(assign, minlength=k),
                                  float(cap), multiplier, rng, count=cfg.kmeans_iterations,
                                  record=it == 0)
            sums = self._release("kmeans sums", _cluster_sums(rows, assign, k),
                                 float(cap), multiplier, rng, count=cfg.kmeans_iterations,
                                 record=it == 0)
            ok = sizes >= 1.0
            centers[ok] = np.maximum(sums[ok] / sizes[ok, None], 0.0)
            if it == 0 and k > n_clusters:
                centers = centers[np.sort(np.argsort(-sizes)[:n_clusters])]
        return _nearest(rows, centers)

    def _summaries(self, data: _ClusterData, h: np.ndarray, *, programmes: bool) -> None:
        """Exact per-cluster, per-gene statistics → count-model parameters (no DP); with
        ``programmes`` also the within-cluster programme variation (``_Programmes``), and
        the ZINB's dispersion then explains only the variance that variation leaves."""
        cfg = self.config
        counts, clusters, n_clusters = data.counts, data.clusters, data.n_clusters
        lib = _library_sizes(counts)
        loglib = np.clip(np.log(np.maximum(lib, 1.0)), 0.0, cfg.log_library_max)
        n = np.maximum(np.bincount(clusters, minlength=n_clusters).astype(float), 1.0)
        q_sum, q2_sum, det_sum = (np.zeros((n_clusters, counts.shape[1])) for _ in range(3))
        for s, e, block in _float_blocks(counts):  # block by block: no full-size copies
            q = sp.csr_matrix(sp.diags(1.0 / np.maximum(lib[s:e], 1.0)) @ block)
            q_sum += _cluster_sums(q, clusters[s:e], n_clusters)
            q2_sum += _cluster_sums(q.multiply(q).tocsr(), clusters[s:e], n_clusters)
            det_sum += _cluster_sums((block > 0).astype(np.float64).tocsr(), clusters[s:e],
                                     n_clusters)
        p = q_sum / n[:, None]
        p /= np.maximum(p.sum(axis=1, keepdims=True), 1e-12)
        eq2 = np.maximum(q2_sum / n[:, None], p**2)
        detected = np.clip(det_sum / n[:, None], 0.0, 1.0)
        lmean = _cluster_sums(loglib[:, None], clusters, n_clusters)[:, 0] / n
        lvar = _cluster_sums(loglib[:, None] ** 2, clusters, n_clusters)[:, 0] / n - lmean**2
        wmean = _cluster_sums(data.w, clusters, n_clusters) / n[:, None]
        wsd = np.sqrt(np.maximum(_cluster_sums(data.w**2, clusters, n_clusters) / n[:, None]
                                 - wmean**2, 0.0))
        lsd = np.sqrt(np.clip(lvar, 0.05**2, 4.0))
        lib_ref = np.exp(lmean + lsd**2 / 2)
        m = p * lib_ref[:, None]
        v = (eq2 - p**2) * lib_ref[:, None] ** 2
        prog = _programme_moments(data.w, data.scale, h, clusters, n_clusters,
                                  cfg.seed) \
            if programmes else None
        mu, r, pi = _zinb_moments(m, v, 1.0 - detected,
                                  programme_var=prog.variance if prog else 0.0)
        label_counts = None
        if data.label_names and data.labels is not None:
            label_counts = _cluster_sums(_one_hot(data.labels, data.label_names), clusters,
                                         n_clusters)
        self._set_params(m=m, mu=mu, r=r, pi=pi, lmean=lmean, lsd=lsd, wmean=wmean, wsd=wsd,
                         weights=n * (np.bincount(clusters, minlength=n_clusters) > 0),
                         label_counts=label_counts, label_names=data.label_names)
        if prog is not None:
            self.params.update(programme_mean=prog.mean, programme_factor=prog.factor,
                               programme_expression=prog.expression)

    def _private_summaries(self, data: _ClusterData, h: np.ndarray, multiplier: float) -> None:
        """Per-cluster statistics from clipped, noised sums → count-model parameters.

        The gene-level release per cluster is the sum of the cells' unit-norm log profiles
        (the NMF input): every cell uses its whole L2 budget of 1, unlike proportions
        ``x / library`` (norm ≈ 0.1), so the same noise carries ~10× more signal; one more
        release sums them over all cells. :func:`_shrunk_profiles` denoises the cluster means
        toward the pooled one and :func:`_proportions_from_log_means` maps them back to
        proportions at the cluster's library size (both post-processing). Log library sizes
        are clipped to [``log_library_min``, ``log_library_max``] and centred (sensitivity
        half the range); their square is released pooled, so every cluster shares one spread,
        and the cluster means are shrunk toward the pooled mean by their noise. ZINB's
        dispersion and zero inflation are pooled over clusters per gene
        from three global releases (proportions, their squares, detections), and shrunk to
        Poisson where a gene's released sum is within 3 noise sds of zero. With donors as the
        unit the per-cluster profiles are donor-weighted sums on the pooled profile's top
        ``profile_genes`` genes (sensitivity 1), denoised by :func:`_donor_profiles`, and each
        cluster's scale comes from :func:`_self_consistent_proportions` (no scale release).
        Writes ``self.params`` (through ``_set_params``) and records every release."""
        cfg = self.config
        rng = _rng(cfg.seed, "sampling")
        counts, clusters, n_clusters, cap = data.counts, data.clusters, data.n_clusters, data.cap
        lib = _library_sizes(counts)
        lo = cfg.log_library_min  # log L clipped to [lo, max], centred: a smaller bound
        centre, half = (lo + cfg.log_library_max) / 2, (cfg.log_library_max - lo) / 2
        loglib = np.clip(np.log(np.maximum(lib, 1.0)), lo, cfg.log_library_max)[:, None] - centre
        w_rows = np.asarray(clip_rows_l2(data.w, cfg.w_l2_bound))
        scale_max = _max_profile_scale(data.target, counts.shape[1])
        # With a DP centroid basis, the profiles are released on the basis's DP-selected
        # genes only, each cell's restricted profile rescaled to norm 1: the same noise on
        # fewer genes, each with more of the cell's budget. Other genes stay at 0.
        genes = self._basis_genes if self._basis_genes is not None else np.arange(
            counts.shape[1])
        # With donors as the unit the profiles are released later, donor-weighted, on the
        # pooled profile's top genes; with cells, here. (name, per-cluster sums,
        # sensitivity): one unit moves the stacked sums by ≤ cap × a row's bound, or by ≤ 1
        # for the donor weights.
        donor_weighted = _donor_weighted(cfg)
        profile_sums, profile_pooled, kept = _unit_profile_sums(
            data.x, genes, clusters, 0 if donor_weighted else n_clusters)
        cell_scale = data.scale * kept
        blocks: list[tuple[str, np.ndarray, float]] = [
            ("cluster sizes", _cluster_sums(np.ones((len(clusters), 1)), clusters, n_clusters),
             float(cap))]
        if donor_weighted:  # Σ_d sqrt(f_dc): a donor's vector of them has norm 1
            cell_weights = _unit_cluster_weights(data.units, clusters)
            blocks += [("log library sums",
                        _cluster_sums(loglib * cell_weights[:, None], clusters, n_clusters),
                        half),
                       ("cluster donor weights",
                        _cluster_sums(cell_weights[:, None], clusters, n_clusters), 1.0)]
        else:
            blocks += [("profile sums", profile_sums, float(cap)),
                       ("log library sums", _cluster_sums(loglib, clusters, n_clusters),
                        cap * half)]
        del profile_sums
        private_basis = cfg.dp in ("nmf", "all")
        if not private_basis:
            blocks += [("W sums", _cluster_sums(w_rows, clusters, n_clusters),
                        cap * cfg.w_l2_bound),
                       ("W square sums", _cluster_sums(w_rows**2, clusters, n_clusters),
                        cap * cfg.w_l2_bound**2)]
        by_type = self.clusters_by_type
        if data.label_names and data.labels is not None and not by_type:
            blocks.append(("label counts", _cluster_sums(
                _one_hot(data.labels, data.label_names), clusters, n_clusters), float(cap)))
        sums: dict[str, np.ndarray] = {}
        for name, cluster_sums, sensitivity in blocks:
            sums[name] = self._release(name, cluster_sums, sensitivity, multiplier, rng)
        everyone = np.zeros(len(clusters), dtype=int)
        pooled_profile = self._release("profile pooled sums", profile_pooled[None],
                                       float(cap), multiplier, rng)[0]
        if donor_weighted:  # on the noisy pooled profile's top genes, rows rescaled to 1
            top = np.sort(np.argsort(-pooled_profile)[:min(cfg.profile_genes, len(genes))])
            restricted, _, _ = _unit_profile_sums(data.x, genes[top], clusters, n_clusters,
                                                  weights=cell_weights)
            sums["profile sums"] = self._release(  # a donor moves it by ≤ 1 (weights)
                "profile sums", restricted, 1.0, multiplier, rng)
        n = np.maximum(sums["cluster sizes"][:, 0], 1.0)
        n_all = max(float(n.sum()), 1.0)
        lib_noise = multiplier * NOISE_FACTORS["log library sums"] * cap * half / n
        if donor_weighted:  # donor-weighted means; squared deviations from them, clipped
            donor_w = np.maximum(sums["cluster donor weights"][:, 0], 1.0)
            lmean = sums["log library sums"][:, 0] / donor_w
            lib_noise = multiplier * NOISE_FACTORS["log library sums"] * half / donor_w
            g_mean = float(np.clip((n / n_all) @ lmean, -half, half))
            deviation = np.minimum((loglib[:, 0] - lmean[clusters]) ** 2, _LOG_LIBRARY_DEV2)
            loglib_sq = self._release("log library square sums",
                                      _cluster_sums(deviation[:, None], everyone, 1),
                                      cap * _LOG_LIBRARY_DEV2, multiplier, rng)[0, 0]
            # the released means' own noise adds its variance to the squared deviations
            variance = loglib_sq / n_all - (n / n_all) @ lib_noise**2
        else:
            lmean = sums["log library sums"][:, 0] / n
            g_mean = float(np.clip(sums["log library sums"].sum() / n_all, -half, half))
            loglib_sq = self._release("log library square sums",
                                      _cluster_sums(loglib**2, everyone, 1), cap * half**2,
                                      multiplier, rng)[0, 0]
            variance = loglib_sq / n_all - g_mean**2
        if not donor_weighted:
            scale = np.clip(cell_scale, 0.0, scale_max)[:, None]
            total_scale = self._release("profile scale", _cluster_sums(scale, everyone, 1),
                                        cap * scale_max, multiplier, rng)[0, 0]
            n_total = max(float(sums["cluster sizes"].sum()), 1.0)
            mean_scale = float(np.clip(total_scale / n_total, 1.0, scale_max))
        lsd = np.full(n_clusters, np.sqrt(np.clip(variance, 0.05**2, 4.0)))
        noise = lib_noise**2
        tau2 = max(float((n / n_all) @ ((lmean - g_mean) ** 2 - noise)), 0.0)
        lmean = np.clip(g_mean + (lmean - g_mean) * tau2 / (tau2 + noise), -half, half) + centre
        lib_ref = np.exp(lmean + lsd**2 / 2)
        sigma = multiplier * cap
        if donor_weighted:  # the donor-weighted sums' noise sd is the multiplier
            log_profile = _donor_profiles(sums["profile sums"] / donor_w[:, None],
                                          multiplier / donor_w, n / n.sum(),
                                          pooled_profile / n.sum(), sigma / n.sum(), top)
        else:
            log_profile = _shrunk_profiles(sums["profile sums"], n, sigma, pooled_profile)
        p = np.zeros((n_clusters, counts.shape[1]))
        if donor_weighted:  # each cluster's own scale: the mock types' are 18 and 39
            p[:, genes] = _self_consistent_proportions(log_profile, lib_ref, data.target,
                                                       scale_max)
        else:
            p[:, genes] = _proportions_from_log_means(mean_scale * log_profile, lib_ref,
                                                      data.target)
        p /= np.maximum(p.sum(axis=1, keepdims=True), 1e-12)
        if private_basis:  # the programme spread is switched off with a DP basis
            wmean = wsd = np.zeros((n_clusters, h.shape[0]))
        else:
            wmean = np.maximum(sums["W sums"] / n[:, None], 0.0)
            wsd = np.sqrt(np.maximum(sums["W square sums"] / n[:, None] - wmean**2, 0.0))
        m = p * lib_ref[:, None]
        weights = np.maximum(sums["cluster sizes"][:, 0], 0.0)
        mu, r, pi = m, np.full_like(m, 1e4), np.zeros_like(m)
        if cfg.sampling_method == "zinb":
            r_gene, pi_gene = self._private_gene_shapes(data, p, weights, lib_ref, rng,
                                                         multiplier)
            pi = np.broadcast_to(pi_gene, m.shape).copy()
            r = np.broadcast_to(r_gene, m.shape).copy()
            if donor_weighted:  # the gene-level shapes measure nothing at donor level
                inv_r = self._donor_dispersion(data, p, genes[top], cell_weights, donor_w,
                                               n / n_all, multiplier, rng)
                r = np.minimum(r, 1.0 / inv_r[:, None])
            mu = m / (1.0 - pi)
        self._set_params(m=m, mu=mu, r=r, pi=pi, lmean=lmean, lsd=lsd, wmean=wmean, wsd=wsd,
                         weights=weights,
                         label_counts=np.eye(n_clusters) if by_type else sums.get("label counts"),
                         label_names=data.label_names)

    def _donor_dispersion(self, data: _ClusterData, p: np.ndarray, genes: np.ndarray,
                          cell_weights: np.ndarray, donor_w: np.ndarray, shares: np.ndarray,
                          multiplier: float, rng: np.random.Generator) -> np.ndarray:
        """Each cluster's NB over-dispersion ``1 / r`` (shared by its genes) at donor level,
        from one donor-weighted release, "cluster dispersion sums"; records it.

        A cell's moment estimate on ``genes`` (the released profiles' top genes) is
        ``Σ_g ((x_g - μ_g)² - x_g) / Σ_g μ_g²`` with ``μ = library · p`` from the DP profile
        ``p`` (a release already made): it is ``1 / r`` for NB counts of mean μ. It is clipped
        to [0, ``_INV_R_MAX``], centred, and summed with the profile's donor weights
        (sensitivity half the range), divided by the released donor weights, and shrunk
        toward the share-weighted mean by its noise, like the log library means. Why: with
        the cap on cells per donor the gene-level shape releases pass no gene at 100 donors,
        every gene was Poisson, and the synthetic cells of a type were about half as spread
        as the real ones; a classifier trained on them then failed on real cells the better
        ε made the profiles (mock, 200 donors: ε = 10 kept 76 % of the no-DP F1, ε = 4
        100 %; with this release 97 and 99 %)."""
        counts, clusters, n_clusters = data.counts, data.clusters, data.n_clusters
        lib = _library_sizes(counts)
        inv_r = np.zeros(len(clusters))
        p_top = p[:, genes]
        for s, e, block in _float_blocks(counts):
            x = block[:, genes].toarray()
            mu = lib[s:e, None] * p_top[clusters[s:e]]
            excess = ((x - mu) ** 2 - x).sum(axis=1)
            inv_r[s:e] = excess / np.maximum((mu**2).sum(axis=1), 1e-12)
        half = _INV_R_MAX / 2
        centred = np.clip(inv_r, 0.0, _INV_R_MAX) - half
        sums = self._release("cluster dispersion sums",
                             _cluster_sums((centred * cell_weights)[:, None], clusters,
                                           n_clusters), half, multiplier, rng)[:, 0]
        mean = sums / donor_w
        noise = (multiplier * NOISE_FACTORS["cluster dispersion sums"] * half / donor_w) ** 2
        pooled = float(shares @ mean)
        tau2 = max(float(shares @ ((mean - pooled) ** 2 - noise)), 0.0)
        mean = pooled + (mean - pooled) * tau2 / (tau2 + noise)
        return np.clip(mean + half, 1e-4, _INV_R_MAX)

    def _private_gene_shapes(self, data: _ClusterData, p: np.ndarray, weights: np.ndarray,
                             lib_ref: np.ndarray, rng: np.random.Generator,
                             multiplier: float) -> tuple[np.ndarray, np.ndarray]:
        """Per-gene NB shape and zero inflation pooled over clusters, from global DP sums."""
        cfg = self.config
        counts, cap = data.counts, data.cap
        lib = _library_sizes(counts)
        totals = np.zeros((3, counts.shape[1]))  # clipped proportions, their squares, detections
        for s, e, block in _float_blocks(counts):  # rows are clipped one by one: exact in blocks
            q = clip_rows_l2(sp.csr_matrix(sp.diags(1.0 / np.maximum(lib[s:e], 1.0)) @ block),
                             cfg.profile_l2_bound)
            det = clip_rows_l2((block > 0).astype(np.float64).tocsr(), cfg.detection_l2_bound)
            totals[0] += np.asarray(q.sum(axis=0)).ravel()
            totals[1] += np.asarray(q.multiply(q).sum(axis=0)).ravel()
            totals[2] += np.asarray(det.sum(axis=0)).ravel()
        q_sum = self._release("proportion sums", totals[0][None],
                              cap * cfg.profile_l2_bound, multiplier, rng)[0]
        q2_sum = self._release("proportion square sums", totals[1][None],
                               cap * cfg.profile_l2_bound**2, multiplier, rng)[0]
        det_sum = self._release("detections", totals[2][None],
                                cap * cfg.detection_l2_bound, multiplier, rng)[0]
        # noise sds of the three releases (as drawn by _release): post-processing only
        sd_q, sd_q2, sd_det = (multiplier * NOISE_FACTORS.get(name, 1.0) * cap * bound
                               for name, bound in (
                                   ("proportion sums", cfg.profile_l2_bound),
                                   ("proportion square sums", cfg.profile_l2_bound**2),
                                   ("detections", cfg.detection_l2_bound)))
        share = weights / max(weights.sum(), 1e-12)
        n_total = max(float(weights.sum()), 1.0)
        lib_avg = float(share @ lib_ref)
        pooled_p = np.maximum(q_sum / n_total, 0.0)
        between = share @ (p - share @ p) ** 2
        within = q2_sum / n_total - pooled_p**2 - between
        m = pooled_p * lib_avg
        # A gene's over-dispersion is used only where its excess variance (over Poisson)
        # stands _SHAPE_SDS noise sds of the square sums above zero; elsewhere the noisy
        # square sums would give random, mostly extreme, dispersions (every synthetic cell
        # then lands off the real cells): those genes stay Poisson. A median dispersion of
        # the measured (highly expressed) genes for the rest was tried and is worse.
        excess = within * lib_avg**2 - m
        measured = (q_sum > _SHAPE_SDS * sd_q) & (
            excess > _SHAPE_SDS * sd_q2 / n_total * lib_avg**2)
        inv_r = np.full_like(m, 1e-4)
        inv_r[measured] = np.clip(excess[measured] / np.maximum(m[measured], 1e-12) ** 2,
                                  1e-4, 1e3)
        r = 1.0 / inv_r
        # Zero inflation only where the zeros exceed the NB's by _SHAPE_SDS noise sds.
        z = 1.0 - np.clip(det_sum / n_total, 0.0, 1.0)
        p0 = np.exp(-r * np.log1p(m / r))
        inflated = (q_sum > _SHAPE_SDS * sd_q) & (z - p0 > _SHAPE_SDS * sd_det / n_total)
        if not inflated.any():
            return r, np.zeros_like(m)
        _, r_zi, pi = _zinb_moments(m, np.maximum(m + inv_r * m**2, m), z)
        return np.where(inflated, r_zi, r), np.where(inflated, pi, 0.0)

    def _set_params(self, *, m: np.ndarray, mu: np.ndarray, r: np.ndarray, pi: np.ndarray,
                    lmean: np.ndarray, lsd: np.ndarray, wmean: np.ndarray, wsd: np.ndarray,
                    weights: np.ndarray, label_counts: np.ndarray | None,
                    label_names: list[str]) -> None:
        """Store the count-model parameters and the clusters' labels and weights."""
        if weights.sum() <= 0:
            weights = np.ones(len(weights))
        lib_ref = np.exp(lmean + lsd**2 / 2)
        self.params = {"mean": m, "mu": mu, "r": r, "pi": pi, "log_lib_mean": lmean,
                       "log_lib_sd": lsd, "lib_ref": lib_ref, "w_mean": wmean, "w_sd": wsd,
                       "weights": weights}
        if label_names and label_counts is not None:
            self.cluster_labels = [label_names[i] for i in label_counts.argmax(axis=1)]
        else:
            self.cluster_labels = [f"cluster {c}" for c in range(len(weights))]
        self.n_train_cells = max(1, round(float(weights.sum())))

    # ----------------------------------------------------------------- sample
    def sample(
        self,
        n: int | None = None,
        *,
        contexts: pd.DataFrame | None = None,
        seed: int = 0,
        progress: Progress = no_progress,
    ) -> ad.AnnData:
        """Draw ``n`` synthetic cells (default: as many as the training cells)."""
        if self.h is None or self.gene_names is None:
            raise UserFacingError("Fit the DP-NMF generator before sampling.")
        prm = self.params
        n = self.n_train_cells if n is None else int(n)
        rng = np.random.default_rng(int(seed))
        k = len(prm["weights"])
        probs = prm["weights"] / prm["weights"].sum() if self.config.proportion_aware \
            else np.full(k, 1.0 / k)
        clusters = rng.choice(k, size=n, p=probs)
        x_all = _draw_cells(prm, self.h, clusters, int(seed),
                            zinb=self.config.sampling_method == "zinb", progress=progress)
        obs = pd.DataFrame({
            "cluster": pd.Categorical([str(c) for c in clusters]),
            "cell_type": pd.Categorical([self.cluster_labels[c] for c in clusters]),
        }, index=[f"synthetic_{i}" for i in range(n)])
        out = ad.AnnData(X=x_all, obs=obs, var=pd.DataFrame(index=list(self.gene_names)))
        spend = self.privacy_spend()
        out.uns["privacy"] = _h5ad_safe(spend) if spend else {"label": "not private"}
        out.uns["privacy"]["label"] = self.privacy_label
        return out

    # ----------------------------------------------------------------- state
    def _state(self, folder: Path) -> None:
        if self.h is None or self.gene_names is None:
            raise UserFacingError("Fit the DP-NMF generator before saving it.")
        np.savez(folder / "model.npz", h=self.h, **self.params)
        state = {"gene_names": self.gene_names.tolist(), "cluster_labels": self.cluster_labels,
                 "n_train_cells": self.n_train_cells, "delta": self.delta_used,
                 "unit": self.unit_name, "method": self.accountant.method,
                 "releases": [r.__dict__ for r in self.accountant.releases]}
        (folder / "state.json").write_text(json.dumps(state))

    def _restore(self, folder: Path) -> None:
        state = json.loads((folder / "state.json").read_text())
        with np.load(folder / "model.npz", allow_pickle=False) as data:
            self.h = data["h"]
            self.params = {key: data[key] for key in data.files if key != "h"}
        self.gene_names = np.asarray(state["gene_names"], dtype=object)
        self.cluster_labels = list(state["cluster_labels"])
        self.n_train_cells = int(state["n_train_cells"])
        self.delta_used = float(state["delta"])
        self.unit_name = state["unit"]
        self.accountant = Accountant(method=state["method"])
        self._spend = None
        for rel in state["releases"]:
            self.accountant.gaussian(rel["name"], noise_multiplier=rel["noise_multiplier"],
                                     count=rel["count"], sampling_rate=rel["sampling_rate"])


def _h5ad_safe(spend: dict[str, Any]) -> dict[str, Any]:
    """Return the spend without None values (h5ad cannot store them)."""
    releases = [{k: v for k, v in r.items() if v is not None} for r in spend["releases"]]
    return {**spend, "releases": {str(i): r for i, r in enumerate(releases)}}
