"""DP-NMF: the CAMDA blue team's "SingleCellNMFGenerator", done right.

Method (each choice documented here, read by the Train page's help):

1. **Cells.** With ``sample_fraction < 1`` a seeded random subset of the training cells is
   used (never the first rows). Under DP each privacy unit (the ``donor_key`` column, else a
   cell) keeps at most ``max_cells_per_unit`` random cells. No privacy amplification from
   the subsample is claimed.
2. **NMF.** Input is ``log1p`` of the counts scaled to a common library size: the median
   training library size (not private), or, when the NMF is DP, the fixed ``target_sum``
   (a data-independent constant). Sparse inputs stay sparse. sklearn ``MiniBatchNMF`` gives
   W (cells × k) and H (k × genes). With ``dp`` in ("nmf", "all") H is instead learnt by
   DP-SGD: Poisson-subsampled minibatches of units, each cell's gradient
   ``outer(w_i, w_i H - x_i)`` (w_i from a few non-negative multiplicative updates given
   H) clipped in Frobenius norm, Gaussian noise, projected step; W of every cell is then a
   per-cell function of the DP H.
3. **Clusters.** k-means on the rows of W scaled to unit L2 norm (program composition,
   free of library size). Each cluster's cell-type label is the majority training label
   (if ``cell_type_key`` is a column). DP k-means: random data-independent start, a fixed
   number of Lloyd iterations each releasing noisy counts and noisy sums of the (norm-1)
   rows.
4. **Per-cluster summaries**, from sums over cells (so each is a clipped sum under DP):
   cell count; per-gene sums of proportions ``q = x / L`` and ``q²`` (L2 norm ≤ 1 per cell,
   clipped to ``profile_l2_bound``); per-gene detection counts (indicator rows clipped to
   ``detection_l2_bound``); sums of log library size and its square (log L clipped to
   [0, ``log_library_max``]); sums of W and W² (W rows clipped to ``w_l2_bound``). From
   these, at the cluster's mean library size L̃: observed mean ``m = p L̃``, variance
   ``v = Var(q) L̃²`` (library-normalised, so library variation is not counted as gene
   over-dispersion), zero fraction ``z``. ZINB by method of moments, a few fixed-point
   steps: given π, NB mean ``μ = m / (1-π)`` and ``1/r`` from the ZINB variance
   ``v = (1-π) μ (1 + μ/r + π μ)``; then π = excess zeros over the NB zero probability,
   ``(z - p0) / (1 - p0)``, clipped to [0, 0.95]. Zeros are counted once: the NB part is
   refitted for the zeros π explains. Library size: log-normal (mean, sd of log L).
5. **Sampling.** Cluster drawn ∝ (noisy) size (``proportion_aware``) or uniformly. A cell's
   w ~ N(mean_c, sd_c) per component, clipped ≥ 0; its per-gene rate is the cluster's mean
   times ``(w H)_g / (w̄_c H)_g`` (clipped to [0, 10]): the cell's expression relative to
   its cluster's average; times ``L / L̃`` for a library size L drawn from the cluster's
   log-normal. Then Poisson(rate · m) or ZINB (Gamma-Poisson with mean rate · μ and shape
   r, zeroed with probability π). Cells vary within a cluster in library and programme.
6. **Privacy.** One :class:`~engine.privacy.accountant.Accountant` records every release;
   one noise multiplier from ``calibrate_noise_multiplier`` spends ``epsilon_total`` across
   all the chosen mechanisms. Only ``dp="all"`` makes the whole released model DP; with a
   partial choice the label says which stages are covered.
"""

from __future__ import annotations

import json
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
from engine.generators.registry import register
from engine.privacy.accountant import Accountant, calibrate_noise_multiplier, default_delta
from engine.privacy.mechanisms import GaussianRelease, cap_cells_per_unit, clip_rows_l2

DP_CHOICES = ("none", "sampling", "kmeans", "nmf", "all")
_STAGE_SEEDS = {"subsample": 1, "nmf": 2, "kmeans": 3, "sampling": 4, "cap": 5}


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
    n_clusters: int = field(default=0, metadata={
        "label": "Clusters", "min": 0, "max": 500,
        "help": "0: number of cell types when the cell-type column exists, else 8."})
    sampling_method: str = field(default="zinb", metadata={
        "label": "Count model", "choices": ("zinb", "poisson"),
        "help": "Zero-inflated negative binomial or Poisson per gene and cluster."})
    proportion_aware: bool = field(default=True, metadata={
        "label": "Keep cluster proportions",
        "help": "Draw clusters by their (noisy) sizes; otherwise uniformly."})
    dp: str = field(default="none", metadata={
        "label": "Differential privacy", "choices": DP_CHOICES,
        "help": "Which stages are DP: none, the sampling statistics, k-means, the NMF, or "
        "all (only 'all' makes the whole model DP)."})
    epsilon_total: float = field(default=4.0, metadata={
        "label": "Total ε", "min": 0.01, "max": 100.0,
        "help": "Privacy budget split across every DP release."})
    delta: float = field(default=0.0, metadata={
        "label": "δ", "min": 0.0, "max": 0.1,
        "help": "0: 1 / (10 × number of privacy units)."})
    donor_key: str = field(default="", metadata={
        "label": "Donor column (privacy unit)",
        "help": "Protect whole donors; empty protects single cells."})
    max_cells_per_unit: int = field(default=50, metadata={
        "label": "Max cells per donor", "min": 1, "max": 100000,
        "help": "Cap on cells one donor contributes under DP."})
    kmeans_iterations: int = field(default=5, metadata={
        "label": "DP k-means iterations", "min": 1, "max": 50,
        "help": "Fixed number of noisy Lloyd iterations."})
    nmf_dp_steps: int = field(default=60, metadata={
        "label": "DP-NMF steps", "min": 1, "max": 5000,
        "help": "Noisy gradient steps on H."})
    nmf_dp_learning_rate: float = field(default=0.5, metadata={
        "label": "DP-NMF learning rate", "min": 1e-4, "max": 100.0,
        "help": "Step size on H for the averaged noisy gradient."})
    gradient_clip: float = field(default=5.0, metadata={
        "label": "DP-NMF gradient clip", "min": 1e-3, "max": 1e4,
        "help": "Frobenius bound on one unit's gradient of H."})
    target_sum: float = field(default=1e4, metadata={
        "label": "Library size for DP-NMF input", "min": 1.0, "max": 1e7,
        "help": "Fixed normalisation target when the NMF is DP (else the median)."})
    profile_l2_bound: float = field(default=1.0, metadata={
        "label": "Profile clip (L2)", "min": 1e-4, "max": 1.0,
        "help": "Bound on a cell's proportion vector (≤ 1 always holds)."})
    detection_l2_bound: float = field(default=40.0, metadata={
        "label": "Detection clip (L2)", "min": 1.0, "max": 1000.0,
        "help": "Bound on a cell's detected-gene indicator vector."})
    log_library_max: float = field(default=12.0, metadata={
        "label": "Max log library size", "min": 1.0, "max": 20.0,
        "help": "log library sizes are clipped to [0, this]."})
    w_l2_bound: float = field(default=10.0, metadata={
        "label": "W row clip (L2)", "min": 1e-3, "max": 1e4,
        "help": "Bound on a cell's programme weights for the DP W summaries."})
    cell_type_key: str = field(default="cell_type", metadata={
        "label": "Cell-type column", "help": "Labels carried to the synthetic cells."})
    seed: int = field(default=0, metadata={"label": "Seed", "min": 0})


def _rng(seed: int, stage: str) -> np.random.Generator:
    """A generator per stage, so one stage's draws never shift another's."""
    return np.random.default_rng([int(seed), _STAGE_SEEDS[stage]])


def _as_csr(matrix: Any) -> sp.csr_matrix:
    """Return ``matrix`` as a float64 CSR matrix (sparse input stays sparse)."""
    return sp.csr_matrix(matrix, dtype=np.float64)


def _log_normalise(counts: sp.csr_matrix, target: float) -> sp.csr_matrix:
    """log1p of counts scaled so every cell's library size is ``target``."""
    lib = np.asarray(counts.sum(axis=1)).ravel()
    scaled = sp.csr_matrix(sp.diags(target / np.maximum(lib, 1.0)) @ counts)
    scaled.data = np.log1p(scaled.data)
    return scaled


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


def _zinb_moments(
    m: np.ndarray, v: np.ndarray, z: np.ndarray, *, steps: int = 8
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ZINB (mu, r, pi) per gene from observed mean, variance and zero fraction."""
    m = np.maximum(m, 1e-8)
    pi = np.zeros_like(m)
    for _ in range(steps):
        mu = m / (1.0 - pi)
        inv_r = (v / np.maximum((1.0 - pi) * mu, 1e-12) - 1.0 - pi * mu) / mu
        inv_r = np.clip(inv_r, 1e-4, 1e3)  # r in [1e-3, 1e4]: near-Poisson to very wide
        r = 1.0 / inv_r
        p0 = np.exp(-r * np.log1p(mu / r))
        pi = np.clip((z - p0) / np.maximum(1.0 - p0, 1e-12), 0.0, 0.95)
    mu = m / (1.0 - pi)
    return mu, r, pi


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
        self.train_clusters: np.ndarray | None = None  # kept in memory for inspection

    # ----------------------------------------------------------------- privacy
    def _stages(self) -> set[str]:
        dp = self.config.dp
        return {"sampling", "kmeans", "nmf"} if dp == "all" else set() if dp == "none" else {dp}

    @property
    def privacy_label(self) -> str:
        if not self._stages():
            return "not private"
        eps = self.accountant.epsilon(self.delta_used)
        text = f"DP (ε={eps:.2g}, δ={self.delta_used:.1g}, unit={self.unit_name})"
        if self.config.dp != "all":
            text += f"; partial: only {self.config.dp} is private"
        return text

    def privacy_spend(self) -> dict[str, Any]:
        if not self._stages():
            return {}
        return self.accountant.spend(self.delta_used)

    def _planned_releases(
        self, n_units: int, n_labels: int
    ) -> list[tuple[str, str, int, float | None]]:
        cfg, stages = self.config, self._stages()
        releases: list[tuple[str, str, int, float | None]] = []
        if "nmf" in stages:
            rate = min(1.0, cfg.nmf_batch_size / max(n_units, 1))
            releases.append(("nmf gradient", "gaussian", cfg.nmf_dp_steps, rate))
        if "kmeans" in stages:
            releases.append(("kmeans counts", "gaussian", cfg.kmeans_iterations, None))
            releases.append(("kmeans sums", "gaussian", cfg.kmeans_iterations, None))
        if "sampling" in stages:
            names = ["cluster sizes", "profile sums", "profile square sums", "detections",
                     "log library sums", "log library square sums", "W sums", "W square sums"]
            if n_labels:
                names.append("label counts")
            releases.extend((name, "gaussian", 1, None) for name in names)
        return releases

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
        counts = _as_csr(train.X[rows])
        labels = None
        if cfg.cell_type_key and cfg.cell_type_key in train.obs:
            labels = train.obs[cfg.cell_type_key].astype(str).to_numpy()[rows]
        label_names = sorted(set(labels)) if labels is not None else []
        n_clusters = cfg.n_clusters or (len(label_names) if label_names else 8)
        n_clusters = max(1, min(n_clusters, counts.shape[0]))
        n_units = len(np.unique(units))

        self.accountant = Accountant()
        multiplier = 0.0
        if stages:
            self.delta_used = cfg.delta or default_delta(n_units)
            progress(0.02, "calibrating the noise to the budget")
            multiplier = calibrate_noise_multiplier(
                epsilon=cfg.epsilon_total, delta=self.delta_used,
                releases=self._planned_releases(n_units, len(label_names)))

        # 1. NMF
        progress(0.05, "factorising (NMF)")
        if "nmf" in stages:
            x_in = _log_normalise(counts, cfg.target_sum)
            h = self._dp_nmf(x_in, units, cap, multiplier)
            w = _nnls_rows(x_in, h)
        else:
            lib = np.asarray(counts.sum(axis=1)).ravel()
            x_in = _log_normalise(counts, float(np.median(lib)))
            nmf = MiniBatchNMF(n_components=min(cfg.n_components, min(x_in.shape)),
                               batch_size=cfg.nmf_batch_size, init="nndsvda",
                               random_state=cfg.seed, max_iter=cfg.nmf_max_iter)
            w = nmf.fit_transform(x_in)
            h = nmf.components_
        # 2. clusters
        progress(0.5, "clustering the programme weights")
        direction = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
        if "kmeans" in stages:
            clusters = self._dp_kmeans(direction, units, cap, n_clusters, multiplier)
        else:
            km = KMeans(n_clusters=n_clusters, n_init=4, random_state=cfg.seed)
            clusters = km.fit_predict(direction)
        self.train_clusters = clusters
        # 3. summaries
        progress(0.7, "summarising the clusters")
        self._summaries(counts, w, clusters, n_clusters, units, cap, labels, label_names,
                        multiplier if "sampling" in stages else 0.0)
        self.h = h
        self.gene_names = np.asarray(train.var_names).astype(str)
        progress(1.0, f"fitted {n_clusters} clusters on {counts.shape[0]} cells")

    def _release(self, name: str, value: np.ndarray, sensitivity: float, multiplier: float,
                 rng: np.random.Generator, *, count: int = 1,
                 sampling_rate: float | None = None, record: bool = True) -> np.ndarray:
        """Add calibrated Gaussian noise and record the release (once per name)."""
        mech = GaussianRelease(sensitivity=sensitivity, sigma=multiplier * sensitivity)
        if record:
            self.accountant.gaussian(name, noise_multiplier=multiplier, count=count,
                                     sampling_rate=sampling_rate)
        return mech.release(value, rng)

    def _dp_nmf(self, x: sp.csr_matrix, units: np.ndarray, cap: int,
                multiplier: float) -> np.ndarray:
        """DP-SGD on H: Poisson-sampled units, per-cell clipped gradients, Gaussian noise."""
        cfg = self.config
        rng = _rng(cfg.seed, "nmf")
        k = min(cfg.n_components, min(x.shape))
        h = np.abs(rng.normal(0.0, 0.1, size=(k, x.shape[1])))
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
        return h

    def _dp_kmeans(self, rows: np.ndarray, units: np.ndarray, cap: int, n_clusters: int,
                   multiplier: float) -> np.ndarray:
        """DP Lloyd iterations on norm-≤1 rows from a data-independent random start."""
        cfg = self.config
        rng = _rng(cfg.seed, "kmeans")
        rows = np.asarray(clip_rows_l2(rows, 1.0))
        centers = np.abs(rng.normal(size=(n_clusters, rows.shape[1])))
        centers /= np.linalg.norm(centers, axis=1, keepdims=True)
        for it in range(cfg.kmeans_iterations):
            assign = np.argmin(((rows[:, None, :] - centers[None]) ** 2).sum(-1), axis=1)
            sizes = self._release("kmeans counts", np.bincount(assign, minlength=n_clusters),
                                  float(cap), multiplier, rng, count=cfg.kmeans_iterations,
                                  record=it == 0)
            sums = self._release("kmeans sums", _cluster_sums(rows, assign, n_clusters),
                                 float(cap), multiplier, rng, count=cfg.kmeans_iterations,
                                 record=it == 0)
            ok = sizes >= 1.0
            centers[ok] = np.maximum(sums[ok] / sizes[ok, None], 0.0)
        return np.argmin(((rows[:, None, :] - centers[None]) ** 2).sum(-1), axis=1)

    def _summaries(self, counts: sp.csr_matrix, w: np.ndarray, clusters: np.ndarray,
                   n_clusters: int, units: np.ndarray, cap: int, labels: np.ndarray | None,
                   label_names: list[str], multiplier: float) -> None:
        """Per-cluster sums (clipped and noisy under DP) → count-model parameters."""
        cfg = self.config
        rng = _rng(cfg.seed, "sampling")
        private = multiplier > 0
        lib = np.asarray(counts.sum(axis=1)).ravel()
        q = sp.csr_matrix(sp.diags(1.0 / np.maximum(lib, 1.0)) @ counts)
        q2 = q.multiply(q).tocsr()
        det = (counts > 0).astype(np.float64).tocsr()
        loglib = np.clip(np.log(np.maximum(lib, 1.0)), 0.0, cfg.log_library_max)[:, None]
        w_rows = np.asarray(clip_rows_l2(w, cfg.w_l2_bound)) if private else w
        if private:
            q = clip_rows_l2(q, cfg.profile_l2_bound)
            q2 = clip_rows_l2(q2, cfg.profile_l2_bound)
            det = clip_rows_l2(det, cfg.detection_l2_bound)
        blocks: list[tuple[str, Any, float]] = [
            ("cluster sizes", np.ones((len(clusters), 1)), 1.0),
            ("profile sums", q, cfg.profile_l2_bound),
            ("profile square sums", q2, cfg.profile_l2_bound),
            ("detections", det, cfg.detection_l2_bound),
            ("log library sums", loglib, cfg.log_library_max),
            ("log library square sums", loglib**2, cfg.log_library_max**2),
            ("W sums", w_rows, cfg.w_l2_bound),
            ("W square sums", w_rows**2, cfg.w_l2_bound**2),
        ]
        if label_names and labels is not None:
            onehot = (labels[:, None] == np.asarray(label_names)[None]).astype(np.float64)
            blocks.append(("label counts", onehot, 1.0))
        sums: dict[str, np.ndarray] = {}
        for name, rows, bound in blocks:
            value = _cluster_sums(rows, clusters, n_clusters)
            if private:  # one unit moves the stacked sums by ≤ cap × the per-cell bound
                value = self._release(name, value, cap * bound, multiplier, rng)
            sums[name] = value
        n = np.maximum(sums["cluster sizes"][:, 0], 1.0)
        p = np.maximum(sums["profile sums"] / n[:, None], 0.0)
        p /= np.maximum(p.sum(axis=1, keepdims=True), 1e-12)
        eq2 = np.maximum(sums["profile square sums"] / n[:, None], p**2)
        detected = np.clip(sums["detections"] / n[:, None], 0.0, 1.0)
        lmean = np.clip(sums["log library sums"][:, 0] / n, 0.0, cfg.log_library_max)
        lvar = sums["log library square sums"][:, 0] / n - lmean**2
        lsd = np.sqrt(np.clip(lvar, 0.05**2, 4.0))
        lib_ref = np.exp(lmean + lsd**2 / 2)
        wmean = np.maximum(sums["W sums"] / n[:, None], 0.0)
        wsd = np.sqrt(np.maximum(sums["W square sums"] / n[:, None] - wmean**2, 0.0))
        m = p * lib_ref[:, None]
        v = (eq2 - p**2) * lib_ref[:, None] ** 2
        mu, r, pi = _zinb_moments(m, v, 1.0 - detected)
        weights = np.maximum(sums["cluster sizes"][:, 0], 0.0)
        if weights.sum() <= 0:
            weights = np.ones(n_clusters)
        self.params = {"mean": m, "mu": mu, "r": r, "pi": pi, "log_lib_mean": lmean,
                       "log_lib_sd": lsd, "lib_ref": lib_ref, "w_mean": wmean, "w_sd": wsd,
                       "weights": weights}
        if label_names:
            self.cluster_labels = [label_names[i] for i in sums["label counts"].argmax(axis=1)]
        else:
            self.cluster_labels = [f"cluster {c}" for c in range(n_clusters)]
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
        base = np.maximum(prm["w_mean"] @ self.h, 1e-8)
        zinb = self.config.sampling_method == "zinb"
        parts = []
        for start in range(0, n, 512):
            c = clusters[start:start + 512]
            wc = np.maximum(rng.normal(prm["w_mean"][c], prm["w_sd"][c]), 0.0)
            ratio = np.clip((wc @ self.h) / base[c], 0.0, 10.0)
            lib = np.exp(rng.normal(prm["log_lib_mean"][c], prm["log_lib_sd"][c]))
            scale = ratio * (lib / prm["lib_ref"][c])[:, None]
            if zinb:
                shape = prm["r"][c]
                lam = rng.gamma(shape, prm["mu"][c] * scale / shape)
                x = rng.poisson(lam)
                x[rng.random(x.shape) < prm["pi"][c]] = 0
            else:
                x = rng.poisson(prm["mean"][c] * scale)
            parts.append(sp.csr_matrix(x.astype(np.int32)))
            progress(min(1.0, (start + len(c)) / max(n, 1)), "drawing cells")
        x_all = sp.vstack(parts, format="csr") if parts else \
            sp.csr_matrix((0, len(self.gene_names)), dtype=np.int32)
        x_all = sp.csr_matrix(x_all, dtype=np.int32)
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
        for rel in state["releases"]:
            self.accountant.gaussian(rel["name"], noise_multiplier=rel["noise_multiplier"],
                                     count=rel["count"], sampling_rate=rel["sampling_rate"])


def _h5ad_safe(spend: dict[str, Any]) -> dict[str, Any]:
    """Return the spend without None values (h5ad cannot store them)."""
    releases = [{k: v for k, v in r.items() if v is not None} for r in spend["releases"]]
    return {**spend, "releases": {str(i): r for i, r in enumerate(releases)}}
