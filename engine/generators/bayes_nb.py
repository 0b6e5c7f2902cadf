"""A Bayesian negative-binomial model of counts in PyMC, fitted by minibatch ADVI.

For cell i and gene g::

    Y_ig ~ NegBinomial(μ_ig, φ_g)            Var = μ + μ² / φ
    μ_ig = s_i · exp(η_ig)
    η_ig = β0_g + Σ_l β1_lg · [condition_i = l] + γ · log(length_g) + (U V)_ig
    log s_i ~ N(μ_s, σ_s²)    β ~ N(0, σ_β²)    φ_g ~ HalfCauchy(scale)
    U_ik ~ N(0, 1)            V_kg ~ N(0, σ_v²)

What differs from the description, and why:

- **w_ig is low rank.** A free noise term per cell and gene (cells × genes parameters) is not
  estimable at scale; ``w = U V`` with ``latent_factors`` K (0 turns it off) carries the
  cell-to-cell structure (cell types, states) the fixed effects do not.
- **One coefficient per non-reference level** of any categorical condition column.
- **The gene-length coefficient is one number, γ, shared by all genes.** A per-gene γ_g times a
  per-gene constant log(length_g) is indistinguishable from β0_g; only a shared γ is identified.
  Without a gene-length table the term is left out (and the UI says so).
- **s_i is in counts per modelled gene:** μ_s and σ_s are the mean and sd of
  log(library_i / genes) over the training cells (empirical Bayes), so β0_g is gene g's log
  expression relative to an average gene and its N(0, σ_β0²) prior is centred where the data
  are.
- **The design is centred for inference:** the model uses condition indicators minus their
  training frequencies (and centred log lengths), which makes intercepts and effects nearly
  uncorrelated, so a mean-field posterior does not understate the effects' uncertainty. β0 is
  reported back on the uncentred scale (the reference level).

Inference is mean-field ADVI (full-rank optionally, for small problems) with minibatches of
cells: the likelihood of a batch is scaled by ``total_size`` (cells / batch), and every per-cell
latent (log s_i, U_i) is indexed by the batch's cell positions, so the objective is an unbiased
estimate of the full-data ELBO at every step. Before each global step the batch's per-cell
latents are set to their conditional mode and Laplace sd given the current gene parameters (the
local step of stochastic variational inference). Cells are read chunk by chunk (``.h5ad``, AnnData
Zarr or ``.npz`` chunks) through :class:`engine.data.chunks.TwoLevelLoader`; only one chunk of
counts is in memory at a time. Training stops when the mean ELBO of a window of steps rises by
less than ``tolerance`` (relative) or less than its noise ``patience`` windows running, after at
least ``min_epochs`` passes, or after ``max_steps``. The reported ELBO is the full-data estimate
(PyMC's own loss is divided by the minibatch scaling).

The posterior of the gene-level parameters is stored as ArviZ InferenceData (netcdf and Zarr);
per-cell latents as their variational means and sds. Synthetic cells are posterior-predictive
draws: a training cell's latents, a posterior draw of the gene parameters, any condition.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from engine.errors import DataError, UserFacingError
from engine.generators.base import Capabilities, Generator, Progress, no_progress
from engine.generators.registry import register

GLOBAL_NAMES = ("beta0", "beta1", "gamma", "phi", "V")
MAX_FULL_RANK_PARAMETERS = 20_000  # full-rank ADVI holds a P × P covariance factor
TARGET_SUM = 1e4  # log-normalised views use counts per 10⁴


@dataclass
class BayesNBConfig:
    """Options of the Bayesian negative-binomial model (form metadata in each field)."""

    condition: str = field(default="", metadata={
        "label": "Condition column",
        "help": "Any categorical column; one effect per gene for every level but the "
        "reference. Empty: the dataset's condition column."})
    reference: str = field(default="", metadata={
        "label": "Reference level",
        "help": "The level the effects are measured against. Empty: the first level in "
        "sorted order (ctrl before stim)."})
    n_genes: int = field(default=2000, metadata={
        "label": "Genes modelled", "min": 2, "max": 100_000,
        "help": "The most variable genes (variance of log1p counts per 10⁴); 0 … all genes "
        "is allowed up to the maximum."})
    latent_factors: int = field(default=10, metadata={
        "label": "Latent factors K", "min": 0, "max": 100,
        "help": "Rank of w = U V, the low-rank stand-in for a per-entry noise term (0: none)."})
    gene_lengths: str = field(default="", metadata={
        "label": "Gene-length table",
        "help": "Path of a CSV/TSV with a gene column and a length column. Empty: the "
        "gene-length term is left out."})
    prior_sd_effect: float = field(default=1.0, metadata={
        "label": "Prior sd of effects σ_β", "min": 0.01, "max": 100.0, "step": 0.1,
        "help": "Normal prior of condition effects and the gene-length coefficient."})
    prior_sd_intercept: float = field(default=3.0, metadata={
        "label": "Prior sd of intercepts", "min": 0.01, "max": 100.0, "step": 0.1,
        "help": "Normal prior of β0 (log expression relative to an average gene)."})
    prior_sd_factor: float = field(default=0.5, metadata={
        "label": "Prior sd of factor loadings", "min": 0.01, "max": 10.0, "step": 0.05,
        "help": "Normal prior of V; U has a standard normal prior."})
    dispersion_scale: float = field(default=2.0, metadata={
        "label": "Dispersion prior scale", "min": 0.01, "max": 1000.0, "step": 0.1,
        "help": "Scale of the HalfCauchy prior of φ (the NB size; variance μ + μ²/φ)."})
    method: str = field(default="advi", metadata={
        "label": "Variational family", "choices": ("advi", "fullrank_advi"),
        "help": "advi: mean-field; fullrank_advi: a full covariance (small problems only)."})
    batch_size: int = field(default=512, metadata={
        "label": "Cells per minibatch", "min": 8, "max": 100_000,
        "help": "The likelihood of a batch is scaled by cells / batch (total_size)."})
    learning_rate: float = field(default=0.02, metadata={
        "label": "Learning rate", "min": 1e-5, "max": 1.0, "step": 0.005,
        "help": "Adam step size."})
    max_steps: int = field(default=6000, metadata={
        "label": "Steps at most", "min": 10, "max": 1_000_000,
        "help": "Optimiser steps when the ELBO has not converged before."})
    tolerance: float = field(default=1e-3, metadata={
        "label": "Convergence tolerance", "min": 0.0, "max": 0.1, "step": 1e-4,
        "help": "A window counts as converged when its mean ELBO rose by less than this "
        "share, or by less than twice the noise of two windows' means."})
    window: int = field(default=100, metadata={
        "label": "ELBO window", "min": 5, "max": 10_000,
        "help": "Steps averaged per ELBO point (also how often the live curve updates)."})
    min_epochs: float = field(default=2.0, metadata={
        "label": "Passes before stopping", "min": 0.0, "max": 1000.0, "step": 0.5,
        "help": "Passes over the cells before convergence may stop training (every cell's "
        "latents must have been updated)."})
    patience: int = field(default=3, metadata={
        "label": "Converged windows", "min": 1, "max": 100,
        "help": "Windows in a row under the tolerance before training stops."})
    local_steps: bool = field(default=True, metadata={
        "label": "Local Newton steps",
        "help": "Set each batch's per-cell latents to their conditional mode and Laplace sd "
        "before the global step (mean-field only); off: plain ADVI steps for them too."})
    averaging: float = field(default=0.99, metadata={
        "label": "Parameter averaging", "min": 0.0, "max": 0.99999, "step": 0.001,
        "help": "Decay of the moving average of the variational parameters that is kept "
        "(0: the last iterate)."})
    posterior_draws: int = field(default=200, metadata={
        "label": "Posterior draws kept", "min": 10, "max": 5000,
        "help": "Draws of the gene-level parameters stored as InferenceData."})
    chunk_size: int = field(default=20_000, metadata={
        "label": "Cells per chunk read", "min": 256, "max": 10_000_000,
        "help": "Cells read from disk at a time (batches are cut from one chunk)."})
    seed: int = 0
    condition_key: str = ""  # filled from the dataset's condition role
    cell_type_key: str = ""  # carried over to synthetic cells as their label


@dataclass
class Posterior:
    """The fitted posterior as arrays: gene-level draws and per-cell variational moments.

    ``beta1`` is draws × levels-1 × genes, ``V`` draws × K × genes, ``phi`` and ``beta0``
    draws × genes, ``gamma`` draws; ``log_s`` / ``U`` hold (mean, sd) per training cell.
    """

    beta0: np.ndarray
    beta1: np.ndarray
    gamma: np.ndarray
    phi: np.ndarray
    V: np.ndarray
    log_s_mean: np.ndarray
    log_s_sd: np.ndarray
    U_mean: np.ndarray
    U_sd: np.ndarray

    @property
    def n_draws(self) -> int:
        return int(self.beta0.shape[0])


# --------------------------------------------------------------------------------- data prep
def read_gene_lengths(path: str | Path, genes: list[str]) -> np.ndarray:
    """Read a gene-length table (CSV/TSV: a gene column, a length column) and return the
    lengths of ``genes`` in order. DataError names what is missing or wrong."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"The gene-length table '{path}' does not exist.")
    try:
        table = pd.read_csv(path, sep=None, engine="python")
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise DataError(f"The gene-length table '{path.name}' cannot be read as CSV/TSV "
                        f"({exc}).") from None
    if table.shape[1] < 2:
        raise DataError(f"The gene-length table '{path.name}' needs two columns: gene and "
                        "length.")
    names = table.iloc[:, 0].astype(str)
    lengths = pd.to_numeric(table.iloc[:, 1], errors="coerce")
    lookup = pd.Series(lengths.to_numpy(), index=names.to_numpy())
    lookup = lookup[~lookup.index.duplicated()]
    found = lookup.reindex(genes)
    missing = found.index[found.isna()].tolist()
    if missing:
        raise DataError(f"The gene-length table has no length for {len(missing)} modelled "
                        f"genes (e.g. {', '.join(missing[:5])}); add them or leave the table "
                        "out.")
    if (found <= 0).any():
        raise DataError("Gene lengths must be positive numbers.")
    return found.to_numpy(dtype=np.float64)


@dataclass
class _Prepared:
    """What one pass over the training cells gives: genes, codes, initial values."""

    genes: np.ndarray  # positions in the source
    gene_names: list[str]
    levels: list[str]
    codes: np.ndarray  # per cell, index into levels
    cell_names: np.ndarray
    labels: np.ndarray | None
    log_size: np.ndarray  # log(library over modelled genes / genes), floored
    beta0_start: np.ndarray


def _condition_codes(obs: pd.DataFrame, column: str, reference: str) -> tuple[list[str],
                                                                             np.ndarray]:
    values = obs[column]
    if values.isna().any():
        raise DataError(f"The condition column '{column}' is empty for {int(values.isna().sum())}"
                        " cells; fill it or pick another column.")
    values = values.astype(str)
    levels = sorted(pd.unique(values))
    if len(levels) < 2:
        raise DataError(f"The condition column '{column}' has one level ({levels[0]}) in the "
                        "training cells; a condition effect needs at least two.")
    if reference:
        if reference not in levels:
            raise DataError(f"The reference level '{reference}' is not in '{column}' (levels: "
                            f"{', '.join(levels)}).")
        levels = [reference] + [lv for lv in levels if lv != reference]
    codes = pd.Categorical(values, categories=levels).codes.astype(np.int64)
    return levels, codes


def _gene_moments(source: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass over a chunk source: per gene the sum of counts and the mean and variance of
    log1p(counts per 10⁴); per cell nothing is kept."""
    n_vars = source.n_vars
    total = np.zeros(n_vars)
    s1 = np.zeros(n_vars)
    s2 = np.zeros(n_vars)
    for i in range(source.n_chunks):
        X = source.read_chunk(i).X
        library = np.asarray(X.sum(axis=1)).ravel()
        total += np.asarray(X.sum(axis=0)).ravel()
        scaled = sp.diags((TARGET_SUM / np.maximum(library, 1.0)).astype(np.float32)) @ X
        scaled.data = np.log1p(scaled.data)
        s1 += np.asarray(scaled.sum(axis=0)).ravel()
        s2 += np.asarray(scaled.multiply(scaled).sum(axis=0)).ravel()
    n = max(source.n_obs, 1)
    mean = s1 / n
    return total, mean, s2 / n - mean**2


def prepare(source: Any, config: BayesNBConfig, condition: str,
            progress: Progress = no_progress) -> _Prepared:
    """Choose genes and read codes, library sizes and starting intercepts (two passes)."""
    obs_columns = [condition] + ([config.cell_type_key] if config.cell_type_key
                                 and config.cell_type_key in source.obs_columns else [])
    if condition not in source.obs_columns:
        raise DataError(f"The data has no column '{condition}'; name a condition column "
                        "(Train form, or --set condition=COLUMN).")
    obs = source.obs(obs_columns)
    levels, codes = _condition_codes(obs, condition, config.reference)
    progress(0.01, "choosing genes")
    total, _, variance = _gene_moments(source)
    expressed = np.flatnonzero(total > 0)
    n_genes = min(config.n_genes, expressed.size) if config.n_genes else expressed.size
    if n_genes < 2:
        raise DataError("Fewer than two genes have any counts in the training cells.")
    order = expressed[np.argsort(-variance[expressed], kind="stable")][:n_genes]
    genes = np.sort(order)
    library = np.zeros(source.n_obs)
    gene_totals = np.zeros(genes.size)
    for i in range(source.n_chunks):
        chunk = source.read_chunk(i, genes=genes)
        library[chunk.rows] = np.asarray(chunk.X.sum(axis=1)).ravel()
        gene_totals += np.asarray(chunk.X.sum(axis=0)).ravel()
    if (library == 0).all():
        raise DataError("The training cells have no counts in the modelled genes.")
    log_size = np.log(np.maximum(library, 0.5) / genes.size)
    relative = gene_totals / max(gene_totals.mean(), 1e-12)
    beta0_start = np.log(np.maximum(relative, 1e-3))
    labels = (obs[config.cell_type_key].astype(str).to_numpy()
              if config.cell_type_key and config.cell_type_key in obs else None)
    return _Prepared(genes=genes, gene_names=[str(g) for g in source.var_names[genes]],
                     levels=levels, codes=codes, cell_names=obs.index.astype(str).to_numpy(),
                     labels=labels, log_size=log_size, beta0_start=beta0_start)


def _factor_start(source: Any, genes: np.ndarray, k: int, seed: int, max_cells: int = 4000
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Starting U (cells × K) and V (K × genes): principal axes of centred log1p(CP10k) from
    the first chunk, every cell projected on them (U scaled to unit variance)."""
    rng = np.random.default_rng(seed)
    first = source.read_chunk(0, genes=genes)
    rows = rng.choice(len(first), size=min(len(first), max_cells), replace=False)
    sample = _log_normalised(first.X[rows])
    centre = sample.mean(axis=0)
    _, _, vt = np.linalg.svd(sample - centre, full_matrices=False)
    axes = vt[:k]
    U = np.zeros((source.n_obs, k))
    for i in range(source.n_chunks):
        chunk = source.read_chunk(i, genes=genes)
        for start in range(0, len(chunk), 2048):  # dense blocks of rows, never a whole chunk
            block = slice(start, start + 2048)
            U[chunk.rows[block]] = (_log_normalised(chunk.X[block]) - centre) @ axes.T
    scale = U.std(axis=0) + 1e-8
    U /= scale
    # log1p(CP10k) differences overstate log-mean differences of lowly expressed genes.
    V = 0.5 * axes * scale[:, None]
    return U, V


def _log_normalised(X: sp.csr_matrix) -> np.ndarray:
    library = np.asarray(X.sum(axis=1)).ravel()
    dense = X.toarray().astype(np.float64)
    return np.log1p(dense * (TARGET_SUM / np.maximum(library, 1.0))[:, None])


# ------------------------------------------------------------------------------------ model
def build_model(*, n_cells: int, n_genes: int, n_levels: int, k: int, config: BayesNBConfig,
                size_prior: tuple[float, float], log_length: np.ndarray | None,
                level_share: np.ndarray, level_members: np.ndarray,
                batch: dict[str, Any]) -> Any:
    """Return the PyMC model over one minibatch held in the shared variables of ``batch``
    (``y`` counts, ``rows`` cell positions, ``codes`` condition codes).
    ``level_members`` (levels × cells) averages the cells of each level.

    The likelihood is scaled by ``total_size=(n_cells, None)``; per-cell latents are full
    length and indexed by ``rows``.
    """
    import pymc as pm
    import pytensor.tensor as pt

    coords = {"gene": np.arange(n_genes), "cell": np.arange(n_cells),
              "level": np.arange(max(n_levels - 1, 0)), "factor": np.arange(k)}
    with pm.Model(coords=coords) as model:
        log_s = pm.Normal("log_s", size_prior[0], size_prior[1], dims="cell")
        beta0 = pm.Normal("beta0_centred", 0.0, config.prior_sd_intercept, dims="gene")
        beta1 = pm.Normal("beta1", 0.0, config.prior_sd_effect, dims=("level", "gene"))
        phi = pm.HalfCauchy("phi", config.dispersion_scale, dims="gene")
        rows = batch["rows"]
        indicator = pt.eq(batch["codes"][:, None], pt.arange(1, n_levels)[None, :])
        centred = indicator - pt.as_tensor_variable(level_share[1:])[None, :]
        eta = log_s[rows][:, None] + beta0[None, :] + pt.dot(centred, beta1)
        if log_length is not None:
            gamma = pm.Normal("gamma", 0.0, config.prior_sd_effect)
            eta = eta + gamma * pt.as_tensor_variable(log_length - log_length.mean())[None, :]
        if k > 0:
            U = pm.Normal("U", 0.0, 1.0, dims=("cell", "factor"))
            V = pm.Normal("V", 0.0, config.prior_sd_factor, dims=("factor", "gene"))
            # Factors are centred within each condition level, so a condition effect cannot
            # hide in U V (β1 and V would otherwise trade off, which a mean-field posterior
            # cannot represent: measured 90 % coverage of β1 0.61-0.74 without, see README).
            members = pt.as_tensor_variable(level_members)
            level_means = pt.dot(members, U)
            eta = eta + pt.dot(U[rows] - level_means[batch["codes"]], V)
        pm.NegativeBinomial("y", mu=pt.exp(eta), alpha=phi, observed=batch["y"],
                            total_size=(n_cells, None))
    return model


def simulate(n_cells: int = 1000, n_genes: int = 100, *, latent_factors: int = 2,
             n_levels: int = 2, seed: int = 0) -> tuple[ad.AnnData, dict[str, np.ndarray]]:
    """Draw counts from the model itself with known parameters; return (cells, truth).

    Cells have a ``condition`` column (levels ``c0`` reference, ``c1``, …, equally likely);
    ``truth`` holds beta0 (uncentred), beta1 (levels-1 × genes), phi, log_s, U, V and w = U V.
    """
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, n_levels, n_cells)
    log_s = rng.normal(np.log(1500.0 / n_genes), 0.3, n_cells)
    beta0 = rng.normal(0.0, 1.0, n_genes)
    beta1 = rng.normal(0.0, 0.5, (n_levels - 1, n_genes))
    phi = np.exp(rng.normal(np.log(5.0), 0.5, n_genes))
    U = rng.normal(0.0, 1.0, (n_cells, latent_factors))
    V = rng.normal(0.0, 0.3, (latent_factors, n_genes))
    effect = np.vstack([np.zeros((1, n_genes)), beta1])
    w = U @ V
    mu = np.exp(log_s[:, None] + beta0[None, :] + effect[codes] + w)
    counts = rng.poisson(rng.gamma(phi, mu / phi))
    levels = [f"c{i}" for i in range(n_levels)]
    obs = pd.DataFrame({"condition": pd.Categorical(np.asarray(levels)[codes],
                                                    categories=levels)},
                       index=[f"cell{i}" for i in range(n_cells)])
    cells = ad.AnnData(sp.csr_matrix(counts.astype(np.float32)), obs=obs,
                       var=pd.DataFrame(index=[f"gene{g}" for g in range(n_genes)]))
    return cells, {"beta0": beta0, "beta1": beta1, "phi": phi, "log_s": log_s, "U": U,
                   "V": V, "w": w}


def level_average_matrix(codes: np.ndarray, n_levels: int) -> np.ndarray:
    """Return the levels × cells matrix whose product with a cells × K matrix gives each
    level's mean row (sparse in spirit; dense is fine for the factors' K columns)."""
    members = np.zeros((n_levels, codes.size))
    members[codes, np.arange(codes.size)] = 1.0
    return members / np.maximum(members.sum(axis=1, keepdims=True), 1.0)


def centred_within_levels(values: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Return ``values`` (cells × K) minus the mean of the cells of the same level."""
    means = level_average_matrix(codes, int(codes.max()) + 1) @ values
    return values - means[codes]


def nb_log_likelihood(y: np.ndarray, mu: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Elementwise log NB(y | μ, φ) with variance μ + μ²/φ (the parametrisation used)."""
    from scipy.special import gammaln

    return (gammaln(y + phi) - gammaln(phi) - gammaln(y + 1.0)
            + phi * np.log(phi / (phi + mu)) + y * np.log(mu / (phi + mu)))


# ------------------------------------------------------------------------------- generator
@register
class BayesNBGenerator(Generator):
    """Posterior-predictive cells from a Bayesian NB model with condition effects."""

    name = "bayes-nb"
    label = "Bayesian negative binomial (PyMC, ADVI)"
    description = (
        "Counts ~ NegBinomial(s·exp(β0 + β1·condition + γ·log length + U V), φ), fitted by "
        "minibatch ADVI in PyMC; posterior of condition effects, dispersion and low-rank "
        "factors, predictive checks, and posterior-predictive cells in any condition."
    )
    config_class = BayesNBConfig
    capabilities = Capabilities(conditional=True, counterfactual=True, posterior=True,
                                streams_from_disk=True)

    def __init__(self, config: BayesNBConfig | None = None) -> None:
        super().__init__(config)
        self.gene_names: list[str] = []
        self.levels: list[str] = []
        self.condition = ""
        self.cell_names = np.array([], dtype=str)
        self.cell_codes = np.array([], dtype=np.int64)
        self.cell_labels: np.ndarray | None = None
        self.posterior: Posterior | None = None
        self.log_length: np.ndarray | None = None
        self.size_prior = (0.0, 1.0)
        self.level_share = np.array([])
        self.history: dict[str, list[float]] = {"step": [], "elbo": []}
        self.fit_info: dict[str, Any] = {}
        self.inference_data: Any = None

    # -- fitting -----------------------------------------------------------------------------
    @property
    def categories(self) -> dict[str, list[str]]:
        """The editable field of a counterfactual: the condition column and its levels."""
        return {self.condition: list(self.levels)}

    def fit(self, train: ad.AnnData | None, *, progress: Progress = no_progress) -> None:
        """Fit on ``train`` (in memory or backed); see :meth:`fit_source`."""
        from engine.data.chunks import open_chunk_source

        if train is None:
            raise UserFacingError("The Bayesian NB model learns from real cells; make a split.")
        self.fit_source(open_chunk_source(train, chunk_size=self.config.chunk_size),
                        progress=progress)

    def fit_source(self, source: Any, *, progress: Progress = no_progress) -> None:
        """Fit the model on the cells of a :class:`~engine.data.chunks.ChunkSource` (read in
        chunks: an ``.h5ad``, an AnnData Zarr store, ``.npz`` chunks or memory).

        Sets :attr:`posterior`, :attr:`history` (ELBO per window, also streamed through
        ``progress`` as the metric ``ELBO``), :attr:`fit_info` and :attr:`inference_data`.
        """
        import pytensor

        cfg = self.config
        started = time.time()
        self.condition = cfg.condition or cfg.condition_key
        if not self.condition:
            raise UserFacingError("The Bayesian NB model needs a condition column: map one on "
                                  "the Data page or name it in the form.")
        prepared = prepare(source, cfg, self.condition, progress)
        n_cells, n_genes = source.n_obs, prepared.genes.size
        k = cfg.latent_factors
        self.gene_names, self.levels = prepared.gene_names, prepared.levels
        self.cell_names, self.cell_codes = prepared.cell_names, prepared.codes
        self.cell_labels = prepared.labels
        self.log_length = (np.log(read_gene_lengths(cfg.gene_lengths, self.gene_names))
                           if cfg.gene_lengths else None)
        self.size_prior = (float(prepared.log_size.mean()),
                           float(max(prepared.log_size.std(), 0.05)))
        self.level_share = np.bincount(prepared.codes, minlength=len(self.levels)) / n_cells
        start = {"log_s": prepared.log_size,
                 "beta0_centred": prepared.beta0_start,
                 "beta1": np.zeros((len(self.levels) - 1, n_genes)),
                 "phi_log__": np.zeros(n_genes)}
        if k > 0:
            progress(0.03, "starting values of the latent factors")
            start["U"], start["V"] = _factor_start(source, prepared.genes, k, cfg.seed)
        b = min(cfg.batch_size, n_cells)
        batch = {"y": pytensor.shared(np.zeros((b, n_genes), dtype=np.int64), name="y_batch"),
                 "rows": pytensor.shared(np.arange(b, dtype=np.int64), name="rows_batch"),
                 "codes": pytensor.shared(prepared.codes[:b], name="codes_batch")}
        model = build_model(n_cells=n_cells, n_genes=n_genes, n_levels=len(self.levels), k=k,
                            config=cfg, size_prior=self.size_prior, log_length=self.log_length,
                            level_share=self.level_share,
                            level_members=level_average_matrix(prepared.codes,
                                                               len(self.levels)),
                            batch=batch)
        progress(0.05, "compiling the model")
        approx, steps, converged = self._optimise(model, source, prepared, batch, start,
                                                  progress)
        progress(0.97, "drawing from the posterior")
        self.posterior = self._posterior_from(approx, model, n_cells, k)
        self.inference_data = self._inference_data()
        self.fit_info = {"steps": steps, "converged": converged, "seconds":
                         round(time.time() - started, 2), "cells": n_cells, "genes": n_genes,
                         "method": cfg.method, "final_elbo": self.history["elbo"][-1]
                         if self.history["elbo"] else None}
        progress(1.0, f"{'converged' if converged else 'stopped'} after {steps} steps")

    def _optimise(self, model: Any, source: Any, prepared: _Prepared, batch: dict[str, Any],
                  start: dict[str, np.ndarray], progress: Progress) -> tuple[Any, int, bool]:
        """Run ADVI until the windowed ELBO converges; return (approximation, steps, converged)."""
        import pymc as pm

        from engine.data.chunks import TwoLevelLoader

        cfg = self.config
        with model:
            if cfg.method == "fullrank_advi":
                size = sum(int(np.prod(v.shape)) for v in start.values())
                if size > MAX_FULL_RANK_PARAMETERS:
                    raise UserFacingError(
                        f"Full-rank ADVI needs a {size:,}² covariance here; use it for at "
                        f"most {MAX_FULL_RANK_PARAMETERS:,} parameters (fewer cells, genes or "
                        "factors), or use mean-field advi.")
                inference = pm.FullRankADVI(start=start, random_seed=cfg.seed)
            else:
                inference = pm.ADVI(start=start, random_seed=cfg.seed,
                                    start_sigma={name: np.full(value.size, 0.05)
                                                 for name, value in start.items()})
            # PyMC divides the objective by the minibatch scaling by default, so its "loss"
            # is not the ELBO (measured: off by N²/(batch·genes)); unscaled, −loss is the
            # full-data ELBO estimate, and Adam's steps do not depend on the scale.
            inference.approx.scale_cost_to_minibatch = False
            step = inference.objective.step_function(
                obj_n_mc=1, obj_optimizer=pm.adam(learning_rate=cfg.learning_rate),
                total_grad_norm_constraint=None, score=True)
        loader = TwoLevelLoader(source, batch_size=cfg.batch_size, genes=prepared.genes,
                                shuffle=True, seed=cfg.seed, drop_last=source.n_obs
                                >= cfg.batch_size)
        window: list[float] = []
        previous: tuple[float, float] | None = None  # (mean, standard error) of a window
        calm = 0
        earliest_stop = math.ceil(cfg.min_epochs * source.n_obs / cfg.batch_size)
        self.history = {"step": [], "elbo": []}
        averaged = _ParameterAverage(inference.approx.params, cfg.averaging)
        local = (_LocalUpdate(inference.approx.groups[0], k=cfg.latent_factors,
                              n_levels=len(self.levels), codes=prepared.codes,
                              level_share=self.level_share, log_length=self.log_length,
                              size_prior=self.size_prior)
                 if cfg.method == "advi" and cfg.local_steps else None)
        for steps, (rows, counts) in enumerate(_batches_forever(loader), start=1):
            batch["y"].set_value(counts)
            batch["rows"].set_value(rows)
            batch["codes"].set_value(prepared.codes[rows])
            if local is not None:
                local.update(rows, counts)
            loss = float(step())
            averaged.update()
            if not math.isfinite(loss):
                raise UserFacingError(
                    f"ADVI diverged at step {steps} (the ELBO became {loss}); lower the "
                    "learning rate or the number of latent factors.")
            window.append(-loss)
            if len(window) == cfg.window:
                elbo = float(np.mean(window))
                error = float(np.std(window) / math.sqrt(len(window)))
                window = []
                self.history["step"].append(steps)
                self.history["elbo"].append(elbo)
                progress(0.05 + 0.9 * steps / cfg.max_steps, f"step {steps}: ELBO {elbo:,.0f}",
                         metrics={"ELBO": elbo})
                calm = calm + 1 if previous is not None and _plateau(
                    elbo, error, *previous, cfg.tolerance) else 0
                previous = (elbo, error)
                if calm >= cfg.patience and steps >= earliest_stop:
                    averaged.apply()
                    return inference.approx, steps, True
            if steps >= cfg.max_steps:
                averaged.apply()
                return inference.approx, steps, False
        raise AssertionError("unreachable")  # pragma: no cover

    def _posterior_from(self, approx: Any, model: Any, n_cells: int, k: int) -> Posterior:
        """Draw the gene-level parameters and read the per-cell moments from ``approx``."""
        cfg = self.config
        rng = np.random.default_rng(cfg.seed + 1)
        draws = cfg.posterior_draws
        if cfg.method == "fullrank_advi":
            samples = approx.sample_dict_fn(draws, random_seed=cfg.seed + 1)
            samples = {name: np.asarray(value) for name, value in samples.items()}
            mean = {name: value.mean(axis=0) for name, value in samples.items()}
            sd = {name: value.std(axis=0) for name, value in samples.items()}
        else:
            mean_data, sd_data = approx.mean_data, approx.std_data
            mean = {name: np.asarray(mean_data[name].values) for name in mean_data.data_vars}
            sd = {name: np.asarray(sd_data[name].values) for name in sd_data.data_vars}
            samples = {name: mean[name][None] + sd[name][None]
                       * rng.standard_normal((draws, *mean[name].shape))
                       for name in mean if name not in ("log_s", "U")}
        n_genes = len(self.gene_names)
        beta1 = samples["beta1"].reshape(draws, len(self.levels) - 1, n_genes)
        beta0 = samples["beta0_centred"] - np.einsum("l,dlg->dg", self.level_share[1:], beta1)
        gamma = samples["gamma"].reshape(draws) if "gamma" in samples else np.zeros(draws)
        if self.log_length is not None:
            beta0 = beta0 - gamma[:, None] * self.log_length.mean()
        V = samples["V"].reshape(draws, k, n_genes) if k > 0 else np.zeros((draws, 0, n_genes))
        return Posterior(
            beta0=beta0, beta1=beta1, gamma=gamma, phi=np.exp(samples["phi_log__"]), V=V,
            log_s_mean=mean["log_s"].reshape(n_cells), log_s_sd=sd["log_s"].reshape(n_cells),
            U_mean=centred_within_levels(mean["U"].reshape(n_cells, k), self.cell_codes)
            if k > 0 else np.zeros((n_cells, 0)),
            U_sd=sd["U"].reshape(n_cells, k) if k > 0 else np.zeros((n_cells, 0)))

    def _inference_data(self) -> Any:
        """Return the gene-level posterior (and per-cell moments) as ArviZ InferenceData."""
        import arviz as az

        post = self._require_fit()
        levels = self.levels[1:]
        factors = np.arange(post.V.shape[1])
        posterior = {"beta0": post.beta0[None], "beta1": post.beta1[None],
                     "phi": post.phi[None], "dispersion": 1.0 / post.phi[None],
                     "V": post.V[None]}
        dims = {"beta0": ["gene"], "beta1": ["level", "gene"], "phi": ["gene"],
                "dispersion": ["gene"], "V": ["factor", "gene"]}
        if self.log_length is not None:
            posterior["gamma"] = post.gamma[None]
        coords = {"gene": self.gene_names, "level": levels, "factor": factors,
                  "cell": self.cell_names.astype(str)}
        idata = az.from_dict(posterior=posterior, coords=coords, dims=dims)
        local = {"log_s_mean": post.log_s_mean, "log_s_sd": post.log_s_sd,
                 "U_mean": post.U_mean, "U_sd": post.U_sd}
        local_dims = {"log_s_mean": ["cell"], "log_s_sd": ["cell"], "U_mean": ["cell", "factor"],
                      "U_sd": ["cell", "factor"]}
        elbo = np.asarray(self.history["elbo"], dtype=float)
        with _quiet_arviz():
            idata.add_groups(
                {"variational_locals": _dataset(local, coords, local_dims),
                 "sample_stats": _dataset({"elbo": elbo, "elbo_step": np.asarray(
                     self.history["step"], dtype=np.int64)}, {"window": np.arange(elbo.size)},
                     {"elbo": ["window"], "elbo_step": ["window"]})})
        idata.attrs.update({"condition": self.condition, "reference": self.levels[0],
                            "levels": json.dumps(self.levels),
                            "gene_length_term": int(self.log_length is not None),
                            "latent_factors": int(post.V.shape[1]),
                            "inference": self.config.method})
        return idata

    def _require_fit(self) -> Posterior:
        if self.posterior is None:
            raise UserFacingError("The Bayesian NB model has not been fitted.")
        return self.posterior

    # -- prediction ---------------------------------------------------------------------------
    def _eta(self, draw: np.ndarray, codes: np.ndarray, log_s: np.ndarray,
             U: np.ndarray) -> np.ndarray:
        """Return η + log s for cells (one posterior draw index per cell)."""
        post = self._require_fit()
        eta = log_s[:, None] + post.beta0[draw]
        effect = np.concatenate([np.zeros((post.n_draws, 1, post.beta0.shape[1])),
                                 post.beta1], axis=1)
        eta = eta + effect[draw, codes]
        if self.log_length is not None:
            eta = eta + post.gamma[draw][:, None] * self.log_length[None, :]
        if U.shape[1]:
            eta = eta + np.einsum("ck,ckg->cg", U, post.V[draw])
        return eta

    def posterior_mean_parameters(self) -> dict[str, np.ndarray]:
        """Posterior means of the gene-level parameters (beta0, beta1, gamma, phi, V)."""
        post = self._require_fit()
        return {"beta0": post.beta0.mean(0), "beta1": post.beta1.mean(0),
                "gamma": post.gamma.mean(0), "phi": post.phi.mean(0), "V": post.V.mean(0)}

    def mean_expression(self, codes: np.ndarray, log_s: np.ndarray, U: np.ndarray,
                        parameters: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Return μ (cells × genes) at the posterior-mean gene parameters."""
        p = parameters or self.posterior_mean_parameters()
        effect = np.vstack([np.zeros((1, p["beta0"].size)), p["beta1"]])
        eta = log_s[:, None] + p["beta0"][None, :] + effect[codes]
        if self.log_length is not None:
            eta = eta + p["gamma"] * self.log_length[None, :]
        if U.shape[1]:
            eta = eta + U @ p["V"]
        return np.exp(np.minimum(eta, 30.0))

    def draw_counts(self, codes: np.ndarray, log_s_mean: np.ndarray, log_s_sd: np.ndarray,
                    U_mean: np.ndarray, U_sd: np.ndarray, rng: np.random.Generator,
                    block: int = 2000, draw: int | None = None) -> sp.csr_matrix:
        """Posterior-predictive counts: for each cell a posterior draw of the gene parameters
        (``draw`` gives one for all cells: one replicated dataset of a predictive check), a
        draw of its latents, and NB counts (gamma-Poisson), in blocks of cells."""
        post = self._require_fit()
        parts = []
        for start in range(0, codes.size, block):
            sl = slice(start, start + block)
            n = codes[sl].size
            draws = (rng.integers(0, post.n_draws, n) if draw is None
                     else np.full(n, int(draw)))
            log_s = log_s_mean[sl] + log_s_sd[sl] * rng.standard_normal(n)
            U = U_mean[sl] + U_sd[sl] * rng.standard_normal(U_mean[sl].shape)
            mu = np.exp(np.minimum(self._eta(draws, codes[sl], log_s, U), 30.0))
            phi = post.phi[draws]
            rate = rng.gamma(phi, mu / phi)
            parts.append(sp.csr_matrix(rng.poisson(rate).astype(np.float32)))
        return sp.vstack(parts).tocsr() if parts else sp.csr_matrix(
            (0, len(self.gene_names)), dtype=np.float32)

    def codes_of(self, values: Any) -> np.ndarray:
        """Return the level codes of condition ``values``; UserFacingError for unknown ones."""
        values = pd.Series(values).astype(str)
        unknown = sorted(set(values) - set(self.levels))
        if unknown:
            raise UserFacingError(f"'{unknown[0]}' is not a level of {self.condition}; the "
                                  f"levels are {', '.join(self.levels)}.")
        return pd.Categorical(values, categories=self.levels).codes.astype(np.int64)

    def sample(self, n: int | None = None, *, contexts: pd.DataFrame | None = None,
               seed: int = 0, progress: Progress = no_progress) -> ad.AnnData:
        """Posterior-predictive cells: ``n`` random training cells' latents (default: every
        training cell once), in their own condition or the one ``contexts`` gives per cell
        (a frame with the condition column, or one row for every cell)."""
        post = self._require_fit()
        rng = np.random.default_rng(seed)
        n_train = self.cell_names.size
        n = n_train if n is None else int(n)
        source = (np.arange(n_train) if n == n_train
                  else np.sort(rng.choice(n_train, size=n, replace=n > n_train)))
        codes = self.cell_codes[source].copy()
        if contexts is not None and self.condition in contexts:
            wanted = contexts[self.condition].astype(str).to_numpy()
            codes = self.codes_of(wanted if wanted.size == n else np.repeat(wanted[:1], n))
        progress(0.1, f"drawing {n:,} posterior-predictive cells")
        X = self.draw_counts(codes, post.log_s_mean[source], post.log_s_sd[source],
                             post.U_mean[source], post.U_sd[source], rng)
        obs = pd.DataFrame({self.condition: pd.Categorical(np.asarray(self.levels)[codes],
                                                           categories=self.levels)},
                           index=[f"bnb_{i}" for i in range(n)])
        if self.cell_labels is not None and self.config.cell_type_key:
            obs[self.config.cell_type_key] = pd.Categorical(self.cell_labels[source])
        obs["source_cell"] = self.cell_names[source]
        out = ad.AnnData(X, obs=obs, var=pd.DataFrame(index=self.gene_names))
        out.uns["generator"] = self.name
        progress(1.0, "sampled")
        return out

    # -- cells given by the user (counterfactuals, predictive checks) ----------------------------
    def cell_counts(self, cells: ad.AnnData) -> sp.csr_matrix:
        """Return ``cells``' counts over the modelled genes (CSR float32), in model order."""
        names = pd.Index(cells.var_names.astype(str))
        position = names.get_indexer(self.gene_names)
        if (position < 0).any():
            missing = [g for g, p in zip(self.gene_names, position, strict=True) if p < 0]
            raise UserFacingError(f"The cells lack {len(missing)} modelled genes (e.g. "
                                  f"{', '.join(missing[:3])}).")
        X = cells.X[:, position] if not cells.isbacked else cells[:, position].X
        return sp.csr_matrix(X, dtype=np.float32)

    def cell_latents(self, counts: sp.csr_matrix, codes: np.ndarray,
                     names: np.ndarray | None = None, *, iterations: int = 150,
                     genes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return (log s, U) for cells: the stored variational means for training cells
        (matched by name), else MAP estimates under the posterior-mean gene parameters from
        the cells' counts over ``genes`` (positions; default all modelled genes)."""
        post = self._require_fit()
        k = post.V.shape[1]
        log_s = np.zeros(counts.shape[0])
        U = np.zeros((counts.shape[0], k))
        todo = np.ones(counts.shape[0], dtype=bool)
        if names is not None and genes is None:
            lookup = pd.Index(self.cell_names).get_indexer(np.asarray(names).astype(str))
            known = lookup >= 0
            log_s[known] = post.log_s_mean[lookup[known]]
            U[known] = post.U_mean[lookup[known]]
            todo = ~known
        if todo.any():
            log_s[todo], U[todo] = self._map_latents(counts[np.flatnonzero(todo)], codes[todo],
                                                     iterations, genes)
        return log_s, U

    def _map_latents(self, counts: sp.csr_matrix, codes: np.ndarray, iterations: int,
                     genes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """MAP of log s and U per cell (priors included) by Adam on the NB log-likelihood."""
        p = self.posterior_mean_parameters()
        sel = np.arange(len(self.gene_names)) if genes is None else np.asarray(genes)
        y = counts.toarray()[:, sel] if genes is not None else counts.toarray()
        phi = p["phi"][sel]
        effect = np.vstack([np.zeros((1, p["beta0"].size)), p["beta1"]])
        base = p["beta0"][None, :] + effect[codes]
        if self.log_length is not None:
            base = base + p["gamma"] * self.log_length[None, :]
        base = base[:, sel]
        V = p["V"][:, sel]
        k = V.shape[0]
        library = y.sum(axis=1)
        log_s = np.log(np.maximum(library, 0.5) / np.exp(base).sum(axis=1))
        U = np.zeros((y.shape[0], k))
        m = np.zeros((y.shape[0], k + 1))
        v = np.zeros_like(m)
        prior_mean, prior_sd = self.size_prior
        for t in range(1, iterations + 1):
            mu = np.exp(np.minimum(log_s[:, None] + base + U @ V, 30.0))
            residual = (y - mu) * phi / (phi + mu)  # d log NB / d η
            grad = np.column_stack([residual.sum(axis=1) - (log_s - prior_mean) / prior_sd**2,
                                    residual @ V.T - U])
            m = 0.9 * m + 0.1 * grad
            v = 0.999 * v + 0.001 * grad**2
            update = 0.05 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
            log_s += update[:, 0]
            U += update[:, 1:]
        return log_s, U

    def to_counts(self, expression: np.ndarray, library: np.ndarray, seed: int) -> sp.csr_matrix:
        """Return Poisson counts around ``expm1(expression) · library / 10⁴``."""
        rng = np.random.default_rng(seed)
        mean = np.expm1(np.maximum(expression, 0.0)) * (library / TARGET_SUM)[:, None]
        return sp.csr_matrix(rng.poisson(mean).astype(np.float32))

    def counterfactual_expression(self, cells: ad.AnnData, changes: dict[str, str] | None = None
                                  ) -> dict[str, Any]:
        """Predict ``cells`` in another condition (``changes = {condition column: level}``).

        Returns log-normalised arrays like the cycle autoencoder's: ``source`` (observed),
        ``reconstructed`` (posterior-mean expression in the cells' own condition),
        ``decoded`` and ``predicted`` (in the new condition), the heads (``condition``: the
        condition's term of η; ``latent factors``: U V) before and after, library sizes and
        the context frames."""
        changes = dict(changes or {})
        unknown = [f for f in changes if f != self.condition]
        if unknown:
            raise UserFacingError(f"The model has no field {unknown[0]!r}; its field is "
                                  f"{self.condition}.")
        if self.condition not in cells.obs:
            raise UserFacingError(f"The cells have no column '{self.condition}'.")
        # The cell type rides along unchanged, so closeness is measured against real cells of
        # the same type in the new condition.
        kept = [c for c in (self.config.cell_type_key,) if c and c in cells.obs
                and c != self.condition]
        source_frame = cells.obs[[self.condition, *kept]].astype(str).reset_index(drop=True)
        target_frame = source_frame.copy()
        if self.condition in changes:
            target_frame[self.condition] = str(changes[self.condition])
        source_codes = self.codes_of(source_frame[self.condition])
        target_codes = self.codes_of(target_frame[self.condition])
        counts = self.cell_counts(cells)
        library = np.asarray(counts.sum(axis=1)).ravel()
        log_s, U = self.cell_latents(counts, source_codes, cells.obs_names.to_numpy())
        p = self.posterior_mean_parameters()
        before = self.mean_expression(source_codes, log_s, U, p)
        after = self.mean_expression(target_codes, log_s, U, p)

        def log_norm(mu: np.ndarray) -> np.ndarray:
            return np.log1p(mu / mu.sum(axis=1, keepdims=True) * TARGET_SUM)

        effect = np.vstack([np.zeros((1, p["beta0"].size)), p["beta1"]])
        factors = U @ p["V"] if U.shape[1] else np.zeros_like(before)
        return {"source": _log_normalised(counts), "reconstructed": log_norm(before),
                "decoded": log_norm(after), "predicted": log_norm(after),
                "heads_source": {"condition": effect[source_codes], "latent factors": factors},
                "heads_target": {"condition": effect[target_codes], "latent factors": factors},
                "library": library, "source_contexts": source_frame,
                "target_contexts": target_frame, "log_s": log_s, "U": U,
                "target_codes": target_codes}

    def counterfactual(self, cells: ad.AnnData, changes: dict[str, str], *, seed: int = 0
                       ) -> ad.AnnData:
        """Posterior-predictive counts of ``cells`` in the new condition: each cell keeps its
        latents (log s, U) and gets a posterior draw of the gene parameters and NB noise."""
        result = self.counterfactual_expression(cells, changes)
        rng = np.random.default_rng(seed)
        n = cells.n_obs
        k = result["U"].shape[1]
        X = self.draw_counts(result["target_codes"], result["log_s"], np.zeros(n), result["U"],
                             np.zeros((n, k)), rng)
        obs = result["target_contexts"].copy()
        obs[f"source_{self.condition}"] = result["source_contexts"][self.condition].to_numpy()
        obs.index = [f"{name}_cf" for name in cells.obs_names.astype(str)]
        out = ad.AnnData(X, obs=obs, var=pd.DataFrame(index=self.gene_names))
        out.layers["predicted"] = result["predicted"].astype(np.float32)
        out.uns["counterfactual"] = {"changes": json.dumps(changes), "seed": int(seed),
                                     "privacy_label": "not private (real cells' latents)"}
        return out

    # -- storage -----------------------------------------------------------------------------
    def _state(self, folder: Path) -> None:
        """Write ``state.json``, ``posterior.nc`` and ``posterior.zarr`` (InferenceData) and
        ``cells.npz`` (training cell names, codes, labels)."""
        post = self._require_fit()
        if self.inference_data is None:
            self.inference_data = self._inference_data()
        with _quiet_arviz():
            self.inference_data.to_netcdf(str(folder / "posterior.nc"))
            # ArviZ 0.23's own to_zarr refuses zarr 3; its DataTree form writes the same groups.
            self.inference_data.to_datatree().to_zarr(str(folder / "posterior.zarr"))
        np.savez_compressed(
            folder / "cells.npz", names=self.cell_names.astype(str), codes=self.cell_codes,
            labels=(self.cell_labels.astype(str) if self.cell_labels is not None
                    else np.array([], dtype=str)))
        state = {"genes": self.gene_names, "levels": self.levels, "condition": self.condition,
                 "size_prior": list(self.size_prior), "level_share": self.level_share.tolist(),
                 "log_length": None if self.log_length is None else self.log_length.tolist(),
                 "history": self.history, "fit_info": self.fit_info,
                 "draws": post.n_draws}
        (folder / "state.json").write_text(json.dumps(state))

    def _restore(self, folder: Path) -> None:
        import arviz as az

        state = json.loads((folder / "state.json").read_text())
        self.gene_names, self.levels = state["genes"], state["levels"]
        self.condition = state["condition"]
        self.size_prior = tuple(state["size_prior"])
        self.level_share = np.asarray(state["level_share"])
        self.log_length = (None if state["log_length"] is None
                           else np.asarray(state["log_length"]))
        self.history, self.fit_info = state["history"], state["fit_info"]
        with np.load(folder / "cells.npz", allow_pickle=False) as cells:
            self.cell_names = cells["names"].astype(str)
            self.cell_codes = cells["codes"].astype(np.int64)
            labels = cells["labels"].astype(str)
        self.cell_labels = labels if labels.size else None
        with _quiet_arviz():
            idata = az.from_netcdf(str(folder / "posterior.nc"))
        post = idata.posterior
        local = idata.variational_locals
        n_draws = post.sizes["draw"]
        self.posterior = Posterior(
            beta0=post["beta0"].values[0], beta1=post["beta1"].values[0],
            gamma=post["gamma"].values[0] if "gamma" in post else np.zeros(n_draws),
            phi=post["phi"].values[0], V=post["V"].values[0],
            log_s_mean=local["log_s_mean"].values, log_s_sd=local["log_s_sd"].values,
            U_mean=local["U_mean"].values, U_sd=local["U_sd"].values)
        self.inference_data = idata

    def history_frame(self) -> pd.DataFrame:
        """The ELBO trace: one row per window (step, ELBO)."""
        return pd.DataFrame(self.history)


def _plateau(elbo: float, error: float, previous: float, previous_error: float,
             tolerance: float) -> bool:
    """True when a window's mean ELBO rose less than ``tolerance`` (relative) or less than
    twice the standard error of the difference of two windows' means: the minibatch noise of
    the full-data estimate (about 0.1 % of it per 100-step window at 512 cells) would
    otherwise keep a relative test from ever passing on large data."""
    noise = 2.0 * math.hypot(error, previous_error)
    return elbo - previous < max(tolerance * abs(elbo), noise)


class _ParameterAverage:
    """An exponential moving average of the variational parameters (Polyak averaging): the
    stochastic optimiser's last iterate jitters around the optimum by about a posterior sd,
    which would narrow the credible intervals' coverage; the average does not."""

    def __init__(self, params: list[Any], decay: float) -> None:
        self.params = list(params)
        self.decay = decay
        self.values = [p.get_value().copy() for p in self.params] if decay > 0 else []

    def update(self) -> None:
        if not self.values:  # decay 0: the last iterate is kept
            return
        for value, param in zip(self.values, self.params, strict=True):
            value *= self.decay
            value += (1.0 - self.decay) * param.get_value(borrow=True)

    def apply(self) -> None:
        if not self.values:
            return
        for value, param in zip(self.values, self.params, strict=True):
            param.set_value(value)


class _LocalUpdate:
    """Per-cell latents set to their conditional optimum whenever their cells are in a batch
    (stochastic variational inference's local step, Hoffman et al. 2013): given the current
    means of the gene parameters, a few Newton steps find the mode of (log s_i, U_i) and the
    Laplace approximation there gives their sds, written into the mean-field approximation's
    μ and ρ. Without it each cell's latents get one noisy Adam step per pass over the data:
    on 100,000 cells they had not converged after 20 passes (90 % coverage of φ 0.004)."""

    def __init__(self, group: Any, *, k: int, n_levels: int, codes: np.ndarray,
                 level_share: np.ndarray, log_length: np.ndarray | None,
                 size_prior: tuple[float, float], iterations: int = 4) -> None:
        self.mu = group.params_dict["mu"]
        self.rho = group.params_dict["rho"]
        self.slices = {name: info[1] for name, info in group.ordering.items()}
        self.shapes = {name: info[2] for name, info in group.ordering.items()}
        self.k, self.n_levels, self.codes = k, n_levels, codes
        self.level_share = level_share
        self.log_length = None if log_length is None else log_length - log_length.mean()
        self.size_prior = size_prior
        self.iterations = iterations
        self.members = level_average_matrix(codes, n_levels)

    def _read(self, mu: np.ndarray, name: str) -> np.ndarray:
        return mu[self.slices[name]].reshape(self.shapes[name])

    def update(self, rows: np.ndarray, counts: np.ndarray) -> None:
        """Set the latents of the cells ``rows`` (their ``counts``: batch × genes)."""
        mu = self.mu.get_value(borrow=True)
        rho = self.rho.get_value()
        phi = np.exp(self._read(mu, "phi_log__"))
        codes = self.codes[rows]
        indicator = (codes[:, None] == np.arange(1, self.n_levels)[None, :]).astype(float)
        base = (self._read(mu, "beta0_centred")[None, :]
                + (indicator - self.level_share[1:][None, :]) @ self._read(mu, "beta1"))
        if self.log_length is not None:
            base = base + self._read(mu, "gamma") * self.log_length[None, :]
        k = self.k
        log_s = self._read(mu, "log_s")[rows].copy()
        if k:
            U_all = self._read(mu, "U")
            level_mean = (self.members @ U_all)[codes]
            U = U_all[rows].copy()
            V = self._read(mu, "V")
        else:
            level_mean = U = np.zeros((rows.size, 0))
            V = np.zeros((0, base.shape[1]))
        prior_mean, prior_sd = self.size_prior
        design = np.vstack([np.ones((1, V.shape[1])), V])  # (K+1) × genes
        # Products of design rows, so each cell's (K+1)² precision is one matrix product.
        outer = (design[:, None, :] * design[None, :, :]).reshape((k + 1) ** 2, -1).T
        eye = np.diag([1.0 / prior_sd**2] + [1.0] * k)
        for _ in range(self.iterations):
            eta = np.minimum(log_s[:, None] + base + (U - level_mean) @ V, 30.0)
            mean = np.exp(eta)
            gradient_eta = phi * (counts - mean) / (phi + mean)
            weight = (counts + phi) * mean * phi / (phi + mean) ** 2
            gradient = gradient_eta @ design.T
            gradient[:, 0] -= (log_s - prior_mean) / prior_sd**2
            gradient[:, 1:] -= U
            precision = (weight @ outer).reshape(-1, k + 1, k + 1) + eye
            step = np.linalg.solve(precision, gradient[:, :, None])[:, :, 0]
            step = np.clip(step, -1.0, 1.0)  # damped: far from the mode a full step can jump
            log_s += step[:, 0]
            U += step[:, 1:]
        sd = np.sqrt(np.diagonal(np.linalg.inv(precision), axis1=1, axis2=2))
        mu = mu.copy()
        start = self.slices["log_s"].start
        mu[start + rows] = log_s
        rho[start + rows] = _rho(sd[:, 0])
        if k:
            start = self.slices["U"].start
            flat = (start + rows[:, None] * k + np.arange(k)[None, :]).ravel()
            mu[flat] = U.ravel()
            rho[flat] = _rho(sd[:, 1:]).ravel()
        self.mu.set_value(mu)
        self.rho.set_value(rho)


def _rho(sd: np.ndarray) -> np.ndarray:
    """ρ of PyMC's mean-field family for a standard deviation (sd = log1p(exp ρ))."""
    return np.log(np.expm1(np.maximum(sd, 1e-8)))


def _batches_forever(loader: Any) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (cell positions, dense int64 counts) minibatches, epoch after epoch."""
    while True:
        for batch in loader:
            yield batch.rows, np.rint(batch.X.toarray()).astype(np.int64)


def _dataset(values: dict[str, np.ndarray], coords: dict[str, Any],
             dims: dict[str, list[str]]) -> Any:
    import xarray as xr

    return xr.Dataset({name: (dims[name], value) for name, value in values.items()},
                      coords={d: coords[d] for names in dims.values() for d in names})


@contextlib.contextmanager
def _quiet_arviz() -> Iterator[None]:
    """Silence ArviZ's refactoring notices and non-standard-group warnings."""
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield
