"""The comparison of synthetic cells with held-out real cells, with a noise floor.

How it is done (DESIGN section 5):

1. Only genes present on both sides are compared. The real cells are the **held-out** cells
   (test donors); training cells are used only for memorisation and the privacy audit.
2. The held-out cells are split into two donor-disjoint halves, A and B (cell halves when
   there is no donor role, and the result says so). A is the reference. Each metric is
   computed twice: A against the synthetic cells (the **value**) and A against B (the
   **floor**: what two samples of real cells of different donors score). The synthetic
   sample is subsampled to B's size so value and floor see equal numbers of cells.
3. One feature space (normalise to 1e4, log1p, HVGs, PCA) is fitted on a balanced pool of
   A, B and the synthetic sample (equal sizes, all cells in the pool), so no side is
   out-of-sample while another is in-sample.
4. Cell-type labels of synthetic cells (and of B) come from a classifier trained on A's real
   labels, never from the generator. Per-cell-type metrics are averaged with A's proportions.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from engine.errors import DataError
from engine.evaluate import metrics as M
from engine.evaluate.features import FeatureSpace, fit_feature_space, log_normalise
from engine.generators.base import Progress, no_progress

MIN_SHARED_GENES = 20
# The audit (and memorisation) look at up to this many synthetic and training cells: an
# attacker holds the whole release, and a copied cell is only found if its copy is sampled.
AUDIT_MAX_CELLS = 5000
MIN_CELLS_PER_TYPE = 20
N_CORR_GENES = 40
SCALES = {  # how far from the floor still counts as "good" (see metrics.traffic_light)
    "classifier_auroc_gbt": 0.05,
    "classifier_auroc_logreg": 0.05,
    "mmd": 0.02,
    "ilisi": 0.05,
    "median_dcr_ratio": 0.1,
}
DEFAULT_SCALE = 0.05


@dataclass
class MetricSpec:
    """What a metric means: its family, which way is better, and a one-line description."""

    family: str
    direction: str  # "lower" or "higher" is better
    description: str


SPECS: dict[str, MetricSpec] = {}


def _spec(name: str, family: str, direction: str, description: str) -> None:
    SPECS[name] = MetricSpec(family, direction, description)


for _name in ("gene_mean", "gene_variance", "gene_scaled_variance", "gene_zero_fraction",
              "gene_gene_correlation", "library_size", "size_factor", "effective_library_size",
              "cell_zero_fraction", "cell_cell_correlation", "mean_variance",
              "mean_zero_fraction", "library_size_zero_fraction"):
    _spec(f"ks_{_name}", "data properties", "lower",
          f"two-sample statistic of {_name.replace('_', ' ')} (0 = same distribution)")
for _stat in ("mean", "variance", "zero_fraction"):
    for _kind in ("spearman", "pearson"):
        _spec(f"gene_{_stat}_{_kind}", "gene by gene", "higher",
              f"{_kind.title()} correlation of per-gene {_stat.replace('_', ' ')}s")
_spec("gene_gene_corr_matrix_corr", "gene by gene", "higher",
      "correlation of the gene–gene correlation matrices (top genes)")
_spec("classifier_auroc_gbt", "whole distribution", "lower",
      "cross-validated AUROC of a gradient-boosting real-vs-synthetic classifier (0.5 = "
      "indistinguishable)")
_spec("classifier_auroc_logreg", "whole distribution", "lower",
      "cross-validated AUROC of a logistic-regression real-vs-synthetic classifier")
_spec("mmd", "whole distribution", "lower", "MMD² with a Gaussian kernel (median bandwidth)")
_spec("ilisi", "whole distribution", "higher", "kNN mixing of real and synthetic (iLISI, 0–1)")
for _name in ("precision", "recall", "density", "coverage"):
    _spec(_name, "whole distribution", "higher", f"{_name} (Naeem et al. 2020)")
_spec("composition_distance", "biology", "lower",
      "total-variation distance of cell-type proportions (synthetic labels by a classifier)")
_spec("tstr_relative_f1", "biology", "higher",
      "F1 of a cell-type classifier trained on this sample and tested on real cells, "
      "relative to one trained on real cells")
_spec("marker_overlap", "biology", "higher", "top-50 marker overlap per cell type (weighted)")
_spec("marker_lfc_slope", "biology", "higher",
      "slope of this sample's vs real log-fold changes per cell type (1 = same)")
_spec("median_dcr_ratio", "memorisation", "higher",
      "median of distance to nearest training cell / to nearest held-out cell (≈1 healthy)")
_spec("exact_copy_fraction", "memorisation", "lower",
      "fraction of cells whose counts equal a training cell's (every training cell checked)")
_spec("fraction_closer_to_train", "memorisation", "lower",
      "fraction of cells closer to a training cell than to a held-out one (≈0.5 healthy)")


@dataclass
class EvaluationResult:
    """Everything the Compare page, the report and the CLI show for one comparison.

    ``metrics`` has one row per (metric, group): ``metric, family, group, value, floor,
    direction, status, description``; group ``"all"`` is overall, a cell type name is that
    type, and ``"per-type (weighted)"`` the average over types weighted by real proportions.
    """

    metrics: pd.DataFrame
    figures: dict[str, Any]
    provenance: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    audit: Any | None = None

    def metric(self, name: str, group: str = "all") -> tuple[float, float]:
        """Return (value, floor) of one metric."""
        row = self.metrics[(self.metrics["metric"] == name) & (self.metrics["group"] == group)]
        if row.empty:
            raise KeyError(f"{name} [{group}]")
        return float(row["value"].iloc[0]), float(row["floor"].iloc[0])

    def to_json(self) -> dict[str, Any]:
        """Return every metric by name with its floor, the audit, provenance and notes."""
        def clean(x: Any) -> Any:
            return None if isinstance(x, float) and not math.isfinite(x) else x

        metrics = {}
        for row in self.metrics.itertuples(index=False):
            key = row.metric if row.group == "all" else f"{row.metric}[{row.group}]"
            metrics[key] = {"value": clean(float(row.value)), "floor": clean(float(row.floor)),
                            "direction": row.direction, "status": row.status,
                            "family": row.family}
        payload = {"metrics": metrics, "provenance": self.provenance, "notes": self.notes}
        if self.audit is not None:
            payload["audit"] = self.audit.to_json()
        return payload

    # -- persistence (no pickle: parquet, npz without objects, JSON) -----------------------
    def save(self, folder: Path) -> None:
        """Write ``metrics.parquet``, ``result.json`` and the figure data into ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        self.metrics.to_parquet(folder / "metrics.parquet")
        (folder / "result.json").write_text(json.dumps(self.to_json(), indent=2, default=str))
        figures = self.figures
        for name in ("umap", "mean_variance", "markers", "properties_long"):
            if name in figures and figures[name] is not None:
                figures[name].to_parquet(folder / f"{name}.parquet")
        if "umap_expression" in figures:
            sp.save_npz(folder / "umap_expression.npz", figures["umap_expression"])
        np.savez(folder / "gene_corr.npz", real=figures["gene_corr"]["real"],
                 synthetic=figures["gene_corr"]["synthetic"],
                 genes=np.asarray(figures["gene_corr"]["genes"], dtype=str))
        (folder / "figures.json").write_text(json.dumps(
            {"umap_genes": list(map(str, figures.get("umap_genes", [])))}))
        if self.audit is not None:
            self.audit.table.to_parquet(folder / "audit.parquet")
            roc = pd.concat([frame.assign(attack=name) for name, frame in self.audit.roc.items()],
                            ignore_index=True) if self.audit.roc else pd.DataFrame()
            roc.to_parquet(folder / "audit_roc.parquet")

    @classmethod
    def load(cls, folder: Path) -> EvaluationResult:
        """Read a result written by :meth:`save` (the audit comes back as plain tables)."""
        payload = json.loads((folder / "result.json").read_text())
        figures: dict[str, Any] = {}
        for name in ("umap", "mean_variance", "markers", "properties_long"):
            path = folder / f"{name}.parquet"
            if path.exists():
                figures[name] = pd.read_parquet(path)
        if (folder / "umap_expression.npz").exists():
            figures["umap_expression"] = sp.load_npz(folder / "umap_expression.npz")
        with np.load(folder / "gene_corr.npz", allow_pickle=False) as data:
            figures["gene_corr"] = {"real": data["real"], "synthetic": data["synthetic"],
                                    "genes": data["genes"].tolist()}
        figures["umap_genes"] = json.loads((folder / "figures.json").read_text())["umap_genes"]
        audit = None
        if (folder / "audit.parquet").exists():
            audit = StoredAudit(
                table=pd.read_parquet(folder / "audit.parquet"),
                roc_frame=pd.read_parquet(folder / "audit_roc.parquet"),
                payload=payload.get("audit", {}),
            )
        return cls(metrics=pd.read_parquet(folder / "metrics.parquet"), figures=figures,
                   provenance=payload["provenance"], notes=payload["notes"], audit=audit)


@dataclass
class StoredAudit:
    """An audit result read back from disk: its table, ROC curves and JSON."""

    table: pd.DataFrame
    roc_frame: pd.DataFrame
    payload: dict[str, Any]

    @property
    def roc(self) -> dict[str, pd.DataFrame]:
        if self.roc_frame.empty:
            return {}
        return {name: frame.drop(columns="attack")
                for name, frame in self.roc_frame.groupby("attack", sort=False)}

    @property
    def feasibility(self) -> str | None:
        return self.payload.get("feasibility")

    @property
    def notes(self) -> list[str]:
        return list(self.payload.get("notes", []))

    def to_json(self) -> dict[str, Any]:
        return self.payload


# -- preparation ---------------------------------------------------------------------------
def _rows_in_memory(adata: ad.AnnData, rows: np.ndarray) -> ad.AnnData:
    """Return the cells at ``rows`` as an in-memory AnnData; a backed file reads only them."""
    subset = adata[rows]
    return subset.to_memory() if adata.isbacked else subset.copy()


def _counts(adata: ad.AnnData) -> sp.csr_matrix:
    matrix = adata.X
    return matrix.tocsr() if sp.issparse(matrix) else sp.csr_matrix(matrix)


def shared_genes(real: ad.AnnData, synthetic: ad.AnnData) -> list[str]:
    """Return the genes present in both, in the real data's order; DataError if too few."""
    in_synthetic = set(map(str, synthetic.var_names))
    genes = [g for g in map(str, real.var_names) if g in in_synthetic]
    if len(genes) < MIN_SHARED_GENES:
        raise DataError(
            f"The synthetic data shares only {len(genes)} gene names with the real data "
            f"(at least {MIN_SHARED_GENES} are needed): was it generated from this dataset?"
        )
    return genes


def stratified_rows(labels: pd.Series | None, n_total: int, size: int,
                    rng: np.random.Generator) -> np.ndarray:
    """Return sorted row positions of a seeded subsample of ``size`` rows, stratified by
    ``labels`` (each level keeps its share, at least one row) when given."""
    if size >= n_total:
        return np.arange(n_total)
    if labels is None:
        return np.sort(rng.choice(n_total, size=size, replace=False))
    values = pd.Series(np.asarray(labels, dtype=str))
    picked = []
    for _, rows in values.groupby(values, sort=True).indices.items():
        take = max(1, round(len(rows) * size / n_total))
        picked.append(rng.choice(rows, size=min(take, len(rows)), replace=False))
    return np.sort(np.concatenate(picked))


def donor_halves(donors: pd.Series | None, n_cells: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
    """Split cells into two halves: donor-disjoint, balanced in cells, when there are at
    least two donors; otherwise two random cell halves. Returns (A rows, B rows, unit)."""
    if donors is not None:
        values = np.asarray(donors, dtype=str)
        sizes = pd.Series(values).value_counts()
        if len(sizes) >= 2:
            order = list(sizes.index)
            rng.shuffle(order)
            order.sort(key=lambda d: -sizes[d])  # largest first, ties in seeded order
            side_a, side_b, n_a, n_b = [], [], 0, 0
            for donor in order:
                if n_a <= n_b:
                    side_a.append(donor)
                    n_a += sizes[donor]
                else:
                    side_b.append(donor)
                    n_b += sizes[donor]
            in_a = np.isin(values, side_a)
            return np.flatnonzero(in_a), np.flatnonzero(~in_a), "donor"
    order = rng.permutation(n_cells)
    half = n_cells // 2
    return np.sort(order[:half]), np.sort(order[half:]), "cell"


# -- the comparison ------------------------------------------------------------------------
def _compare(
    *,
    reference_counts: sp.csr_matrix,
    reference_lognorm: sp.csr_matrix,
    reference_pcs: np.ndarray,
    reference_labels: np.ndarray | None,
    reference_properties: dict[str, np.ndarray],
    other_counts: sp.csr_matrix,
    other_lognorm: sp.csr_matrix,
    other_pcs: np.ndarray,
    other_labels: np.ndarray | None,
    train_pcs: np.ndarray | None,
    train_counts_all: sp.csr_matrix | None,
    genes: np.ndarray,
    seed: int,
) -> dict[str, float]:
    """Return every overall metric of ``other`` against the reference sample (whose data
    properties, from :func:`_properties`, are computed once for value and floor)."""
    out: dict[str, float] = {}
    properties_other = _properties(other_counts, other_lognorm, seed=seed)
    for name, value in M.property_statistics(reference_properties, properties_other).items():
        out[f"ks_{name}"] = value
    out.update(M.genewise_correlations(reference_counts, other_counts))
    out["classifier_auroc_gbt"] = M.classifier_auroc(reference_pcs, other_pcs, model="gbt",
                                                     seed=seed)
    out["classifier_auroc_logreg"] = M.classifier_auroc(reference_pcs, other_pcs,
                                                        model="logreg", seed=seed)
    # One kernel scale for value and floor: the bandwidth comes from the reference alone.
    bandwidth = M.median_heuristic_bandwidth(reference_pcs, seed=seed)
    out["mmd"] = M.mmd_rbf(reference_pcs, other_pcs, bandwidth=bandwidth, seed=seed)
    out["ilisi"] = M.ilisi(reference_pcs, other_pcs, seed=seed)
    out.update(M.prdc(reference_pcs, other_pcs, seed=seed))
    if reference_labels is not None and other_labels is not None:
        out["composition_distance"] = M.composition_distance(reference_labels, other_labels)
        tstr = M.tstr_f1(reference_pcs, reference_labels, other_pcs, other_labels, seed=seed)
        out["tstr_relative_f1"] = tstr["tstr_relative_f1"]
        markers = M.marker_recovery(reference_lognorm, reference_labels, other_lognorm,
                                    other_labels, genes=genes)
        if not markers.empty:
            weights = pd.Series(reference_labels).value_counts(normalize=True)
            w = weights.reindex(markers["cell_type"]).fillna(0).to_numpy()
            w = w / w.sum() if w.sum() > 0 else w
            out["marker_overlap"] = float(np.sum(w * markers["overlap"].to_numpy()))
            out["marker_lfc_slope"] = float(np.sum(w * markers["slope"].to_numpy()))
    if train_counts_all is not None:
        out["exact_copy_fraction"] = M.exact_copy_fraction(other_counts, train_counts_all)
    if train_pcs is not None:
        dcr = M.distance_to_closest_ratio(other_pcs, train_pcs, reference_pcs, seed=seed)
        out["median_dcr_ratio"] = dcr["median_ratio"]
        out["fraction_closer_to_train"] = dcr["fraction_closer_to_train"]
    return out


def _properties(counts: sp.csr_matrix, lognorm: sp.csr_matrix, *, seed: int
                ) -> dict[str, np.ndarray]:
    """Return the 13 SimBench data properties of one sample."""
    return {**M.gene_properties(counts), **M.cell_properties(counts),
            **M.correlation_properties(lognorm, seed=seed)}


PER_TYPE_METRICS = ("classifier_auroc_logreg", "mmd", "gene_mean_pearson")


def _compare_per_type(ref_pcs, ref_counts, ref_labels, other_pcs, other_counts, other_labels,
                      *, seed: int) -> dict[str, dict[str, float]]:
    """Return {cell type: {metric: value}} for types with enough cells on both sides."""
    out: dict[str, dict[str, float]] = {}
    for cell_type in pd.unique(ref_labels):
        in_ref = ref_labels == cell_type
        in_other = other_labels == cell_type
        if in_ref.sum() < MIN_CELLS_PER_TYPE or in_other.sum() < MIN_CELLS_PER_TYPE:
            continue
        bandwidth = M.median_heuristic_bandwidth(ref_pcs[in_ref], seed=seed)
        out[str(cell_type)] = {
            "classifier_auroc_logreg": M.classifier_auroc(ref_pcs[in_ref], other_pcs[in_other],
                                                          model="logreg", seed=seed),
            "mmd": M.mmd_rbf(ref_pcs[in_ref], other_pcs[in_other], bandwidth=bandwidth,
                             seed=seed),
            "gene_mean_pearson": M.genewise_correlations(
                ref_counts[in_ref], other_counts[in_other])["gene_mean_pearson"],
        }
    return out


def evaluate(
    real: ad.AnnData,
    synthetic: ad.AnnData,
    *,
    train: ad.AnnData | None = None,
    roles: dict[str, str | None] | None = None,
    max_cells: int = 4000,
    n_hvg: int = 2000,
    n_pcs: int = 30,
    seed: int = 0,
    audit: bool = True,
    progress: Progress = no_progress,
) -> EvaluationResult:
    """Compare ``synthetic`` with the held-out ``real`` cells; return the metrics with their
    noise floor, figure data, the membership audit (when ``train`` is given) and provenance.

    ``real`` must hold only held-out donors (never the training cells); ``roles`` maps
    ``donor``, ``cell_type`` and ``condition`` to columns of ``real.obs``. At most
    ``max_cells`` cells per compared sample are used (stratified by cell type).
    """
    roles = dict(roles or {})
    rng = np.random.default_rng(seed)
    notes: list[str] = []
    progress(0.02, "aligning genes")
    genes = shared_genes(real, synthetic)
    if len(genes) < real.n_vars:
        notes.append(f"{len(genes):,} of {real.n_vars:,} real genes are in the synthetic data; "
                     "only those are compared.")
    cell_type_col = roles.get("cell_type") if roles.get("cell_type") in real.obs else None
    donor_col = roles.get("donor") if roles.get("donor") in real.obs else None
    condition_col = roles.get("condition") if roles.get("condition") in real.obs else None

    real_labels_all = real.obs[cell_type_col].astype(str) if cell_type_col else None
    real_rows = stratified_rows(real_labels_all, real.n_obs, 2 * max_cells, rng)
    real = _rows_in_memory(real, real_rows)
    real_counts = _counts(real[:, genes])

    donors = real.obs[donor_col].astype(str) if donor_col else None
    rows_a, rows_b, unit = donor_halves(donors, real.n_obs, rng)
    if unit == "cell":
        notes.append("The noise floor compares two random cell halves of the held-out cells "
                     "(no donor role, or one held-out donor): it is lower than a donor-level "
                     "floor would be.")
    # A (reference), B (floor) and the synthetic sample get the same size, so value and
    # floor see equal numbers of cells and all three are wholly in the feature-space pool.
    size = min(len(rows_a), len(rows_b), max_cells, synthetic.n_obs)
    # The audit's attacker sees up to max_cells synthetic cells; the compared sample S is
    # a size-matched subset of those.
    release_size = min(synthetic.n_obs, max(max_cells, AUDIT_MAX_CELLS))
    release_rows = np.sort(rng.choice(synthetic.n_obs, size=release_size, replace=False))
    in_sample = np.sort(rng.choice(len(release_rows), size=size, replace=False))
    rows_a = np.sort(rng.choice(rows_a, size=size, replace=False))
    rows_b = np.sort(rng.choice(rows_b, size=size, replace=False))
    n_synthetic_total = int(synthetic.n_obs)
    synthetic_provenance = _uns_provenance(synthetic)
    synthetic = _rows_in_memory(synthetic, release_rows)
    release_counts = _counts(synthetic[:, genes])
    synthetic_counts = release_counts[in_sample]
    if synthetic_counts.nnz and (synthetic_counts.data < 0).any():
        raise DataError("The synthetic data holds negative values; it must hold counts.")

    train_counts = train_counts_all = None
    if train is not None:
        train_genes = {str(g) for g in train.var_names}
        if all(g in train_genes for g in genes):
            progress(0.05, "reading the training cells")
            train_counts_all = _counts(_rows_in_memory(train, np.arange(train.n_obs))[:, genes])
            train_rows = stratified_rows(
                train.obs[cell_type_col].astype(str) if cell_type_col in train.obs else None,
                train.n_obs, max(max_cells, AUDIT_MAX_CELLS), rng)
            train = _rows_in_memory(train, train_rows)
            train_rows = np.arange(train.n_obs)
            train_counts = _counts(train[:, genes])
        else:
            notes.append("The training cells lack some compared genes; memorisation and the "
                         "audit are skipped.")

    progress(0.08, "fitting the shared feature space")
    real_lognorm = log_normalise(real_counts)
    synthetic_lognorm = log_normalise(synthetic_counts)
    train_lognorm = log_normalise(train_counts) if train_counts is not None else None
    # Every compared sample, the training cells included (memorisation measures distances
    # to them), contributes equally to the space, so none is out-of-sample.
    pool = [real_lognorm[rows_a], real_lognorm[rows_b], synthetic_lognorm]
    if train_lognorm is not None:
        pool.append(train_lognorm)
    space: FeatureSpace = fit_feature_space(*pool, n_hvg=n_hvg, n_pcs=n_pcs,
                                            max_cells_per_side=max_cells, seed=seed)
    real_pcs = space.transform(real_lognorm)
    release_pcs = space.transform(log_normalise(release_counts))
    synthetic_pcs = release_pcs[in_sample]
    train_pcs = space.transform(train_lognorm) if train_lognorm is not None else None

    labels_a = labels_b = labels_s = None
    if cell_type_col:
        progress(0.15, "labelling cells with a classifier trained on real cells")
        labels_real = real.obs[cell_type_col].astype(str).to_numpy()
        labels_a = labels_real[rows_a]
        classifier = M.train_label_classifier(real_pcs[rows_a], labels_a, seed=seed)
        labels_b = M.predict_labels(classifier, real_pcs[rows_b])
        labels_s = M.predict_labels(classifier, synthetic_pcs)
    else:
        notes.append("No cell-type role: biology metrics and per-type results are skipped.")

    gene_names = np.asarray(genes)
    common = dict(reference_counts=real_counts[rows_a], reference_lognorm=real_lognorm[rows_a],
                  reference_pcs=real_pcs[rows_a], reference_labels=labels_a,
                  reference_properties=_properties(real_counts[rows_a], real_lognorm[rows_a],
                                                   seed=seed),
                  train_pcs=train_pcs, train_counts_all=train_counts_all, genes=gene_names,
                  seed=seed)
    progress(0.25, "comparing synthetic with real cells")
    values = _compare(**common, other_counts=synthetic_counts, other_lognorm=synthetic_lognorm,
                      other_pcs=synthetic_pcs, other_labels=labels_s)
    progress(0.5, "computing the noise floor (real vs real)")
    floors = _compare(**common, other_counts=real_counts[rows_b],
                      other_lognorm=real_lognorm[rows_b], other_pcs=real_pcs[rows_b],
                      other_labels=labels_b)
    rows = [_row(name, "all", value, floors.get(name, math.nan))
            for name, value in values.items()]

    if cell_type_col:
        progress(0.7, "per cell type")
        per_type_values = _compare_per_type(real_pcs[rows_a], real_counts[rows_a], labels_a,
                                            synthetic_pcs, synthetic_counts, labels_s, seed=seed)
        per_type_floor = _compare_per_type(real_pcs[rows_a], real_counts[rows_a], labels_a,
                                           real_pcs[rows_b], real_counts[rows_b], labels_b,
                                           seed=seed)
        weights = pd.Series(labels_a).value_counts(normalize=True)
        for metric in PER_TYPE_METRICS:
            weighted_value = weighted_floor = total = 0.0
            for cell_type, per_metric in per_type_values.items():
                floor = per_type_floor.get(cell_type, {}).get(metric, math.nan)
                rows.append(_row(metric, cell_type, per_metric[metric], floor))
                if math.isfinite(floor):
                    w = float(weights.get(cell_type, 0.0))
                    weighted_value += w * per_metric[metric]
                    weighted_floor += w * floor
                    total += w
            if total > 0:
                rows.append(_row(metric, "per-type (weighted)", weighted_value / total,
                                 weighted_floor / total))

    progress(0.8, "figures")
    figures = _figures(real_counts=real_counts, real_lognorm=real_lognorm, real_pcs=real_pcs,
                       real_obs=real.obs, synthetic_counts=synthetic_counts,
                       synthetic_lognorm=synthetic_lognorm, synthetic_pcs=synthetic_pcs,
                       synthetic_labels=labels_s, cell_type_col=cell_type_col,
                       condition_col=condition_col, donor_col=donor_col, genes=gene_names,
                       seed=seed, rows_a=rows_a, labels_a=labels_a)
    audit_result = None
    if audit and train is not None and train_pcs is not None:
        progress(0.9, "membership-inference audit")
        audit_result = run_membership_audit(
            train=train, train_pcs=train_pcs, train_rows=train_rows, real=real,
            real_pcs=real_pcs, synthetic_pcs=release_pcs, donor_col=donor_col, seed=seed)
    provenance = {
        "n_real_held_out": int(real.n_obs), "n_reference_a": len(rows_a),
        "n_floor_b": len(rows_b), "n_synthetic": int(size),
        "n_synthetic_total": n_synthetic_total, "n_genes_compared": len(genes),
        "n_hvg": len(space.hvg), "n_pcs": space.n_pcs, "floor_unit": unit,
        "seed": seed, "max_cells": max_cells,
        "synthetic_provenance": synthetic_provenance,
    }
    progress(1.0, "done")
    return EvaluationResult(metrics=pd.DataFrame(rows), figures=figures, provenance=provenance,
                            notes=notes, audit=audit_result)


def _row(name: str, group: str, value: float, floor: float) -> dict[str, Any]:
    spec = SPECS.get(name, MetricSpec("other", "lower", name))
    status = "n/a"
    if math.isfinite(value) and math.isfinite(floor):
        status = M.traffic_light(value, floor, direction=spec.direction,
                                 scale=SCALES.get(name, DEFAULT_SCALE))
    return {"metric": name, "family": spec.family, "group": group, "value": float(value),
            "floor": float(floor), "direction": spec.direction, "status": status,
            "description": spec.description}


def _uns_provenance(adata: ad.AnnData) -> dict[str, Any]:
    info = adata.uns.get("synthcell", {})
    return {str(k): (v.item() if hasattr(v, "item") else v) for k, v in dict(info).items()}


def _figures(*, real_counts, real_lognorm, real_pcs, real_obs, synthetic_counts,
             synthetic_lognorm, synthetic_pcs, synthetic_labels, cell_type_col, condition_col,
             donor_col, genes, seed, rows_a, labels_a) -> dict[str, Any]:
    """Return the data behind the pictures: joint UMAP, property overlays, mean–variance,
    gene–gene correlations, marker dot plots."""
    import umap

    coords = umap.UMAP(n_neighbors=15, random_state=seed).fit_transform(
        np.vstack([real_pcs, synthetic_pcs]))
    n_real = real_pcs.shape[0]
    frame = pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1],
                          "source": ["real"] * n_real + ["synthetic"] * synthetic_pcs.shape[0]})
    for role, column in (("cell_type", cell_type_col), ("condition", condition_col),
                         ("donor", donor_col)):
        real_values = real_obs[column].astype(str).tolist() if column else ["—"] * n_real
        if role == "cell_type" and synthetic_labels is not None:
            synth_values = list(map(str, synthetic_labels))
        else:
            synth_values = ["synthetic"] * synthetic_pcs.shape[0] if role == "donor" else \
                ["—"] * synthetic_pcs.shape[0]
        frame[role] = real_values + synth_values
    expression = sp.vstack([real_lognorm, synthetic_lognorm], format="csr").astype(np.float32)

    props_real = {**M.gene_properties(real_counts), **M.cell_properties(real_counts)}
    props_synth = {**M.gene_properties(synthetic_counts), **M.cell_properties(synthetic_counts)}
    long = []
    # Only one-number-per-gene/cell properties: the paired relationships (n × 2) are
    # pictured as scatters (mean–variance), not as histograms.
    univariate = [name for name, v in props_real.items() if np.asarray(v).ndim == 1]
    for name in univariate:
        for source, props in (("real", props_real), ("synthetic", props_synth)):
            values = np.asarray(props[name], dtype=np.float64).ravel()
            long.append(pd.DataFrame({"property": name, "source": source, "value": values}))
    properties_long = pd.concat(long, ignore_index=True)
    mean_variance = pd.concat([
        pd.DataFrame({"gene": genes, "mean": props_real["gene_mean"],
                      "variance": props_real["gene_variance"], "source": "real"}),
        pd.DataFrame({"gene": genes, "mean": props_synth["gene_mean"],
                      "variance": props_synth["gene_variance"], "source": "synthetic"}),
    ], ignore_index=True)

    top = np.argsort(-np.asarray(props_real["gene_mean"]))[:N_CORR_GENES]
    gene_corr = {"genes": list(genes[top]),
                 "real": _corr(real_lognorm[:, top]), "synthetic": _corr(synthetic_lognorm[:, top])}
    markers = pd.DataFrame()
    if labels_a is not None and synthetic_labels is not None:
        real_markers = M.marker_table(real_lognorm[rows_a], labels_a, genes)
        synth_markers = M.marker_table(synthetic_lognorm, synthetic_labels, genes)
        markers = pd.concat([real_markers.assign(source="real"),
                             synth_markers.assign(source="synthetic")], ignore_index=True)
    return {"umap": frame, "umap_expression": expression, "umap_genes": list(genes),
            "properties_long": properties_long, "mean_variance": mean_variance,
            "gene_corr": gene_corr, "markers": markers}


def _corr(matrix: sp.csr_matrix) -> np.ndarray:
    dense = matrix.toarray()
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(dense, rowvar=False)
    return np.nan_to_num(corr).astype(np.float32)


def run_membership_audit(*, train, train_pcs, train_rows, real, real_pcs, synthetic_pcs,
                         donor_col, seed) -> Any:
    """Run the membership-inference audit: training donors are members; the held-out donors
    are split into non-members and the attacker's reference set."""
    from engine.privacy.audit import run_audit, split_audit_donors

    member_units = (train.obs[donor_col].astype(str).to_numpy()[train_rows]
                    if donor_col and donor_col in train.obs else None)
    if donor_col and member_units is not None:
        held_out_donors = real.obs[donor_col].astype(str).to_numpy()
        nonmember_donors, reference_donors = split_audit_donors(
            sorted(set(held_out_donors)), seed=seed)
        is_nonmember = np.isin(held_out_donors, nonmember_donors)
        is_reference = np.isin(held_out_donors, reference_donors)
        return run_audit(synth=synthetic_pcs, members=train_pcs,
                         nonmembers=real_pcs[is_nonmember], reference=real_pcs[is_reference],
                         member_units=member_units,
                         nonmember_units=held_out_donors[is_nonmember],
                         reference_units=held_out_donors[is_reference], unit="donor", seed=seed)
    order = np.random.default_rng(seed).permutation(real_pcs.shape[0])
    half = len(order) // 2
    return run_audit(synth=synthetic_pcs, members=train_pcs, nonmembers=real_pcs[order[:half]],
                     reference=real_pcs[order[half:]], member_units=None, nonmember_units=None,
                     unit="cell", seed=seed)
