"""How well designed cells meet their target phenotype, and how realistic they stay.

Used by the Design page (through the ``design`` task), the CLI and the benchmark. Everything
is on log1p of counts normalised per cell (the generators' expression layer).

- **Target**: a gene meets its target in a cell when the cell's expression is at least
  ``strength`` standard deviations of the starting population away from that population's
  mean, in the requested direction (a gene asked to go down also meets it at zero, the
  lowest expression there is). A cell meets the target when every requested gene does.
- **Realism**: a classifier trained on real cells (logistic regression on the real cells'
  principal components) assigns each designed cell a cell type; and each designed cell's
  distance to its nearest real cell is compared with real cells' distances to their nearest
  other real cell (a ratio near 1: as close to real cells as real cells are to each other).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

AT_ZERO = 1e-3


def target_table(designed: np.ndarray, start: np.ndarray, genes: list[str],
                 directions: list[int], strengths: list[float]) -> tuple[pd.DataFrame,
                                                                         np.ndarray]:
    """Return (one row per requested gene, each cell's "meets every gene" flag) for the
    designed and starting expression of the requested genes (cells × genes, same order)."""
    mean = start.mean(axis=0)
    sd = np.maximum(start.std(axis=0), 0.1)
    sign = np.asarray(directions, dtype=float)
    strength = np.asarray(strengths, dtype=float)
    shift = sign * (designed - mean) / sd
    meets = (shift >= strength) | ((sign < 0) & (designed <= AT_ZERO))
    table = pd.DataFrame({
        "gene": genes,
        "direction": ["up" if d > 0 else "down" for d in directions],
        "strength_sd": strength,
        "start_mean": mean,
        "designed_mean": designed.mean(axis=0),
        "shift_sd": ((designed.mean(axis=0) - mean) / sd),
        "share_meeting": meets.mean(axis=0),
    })
    return table, meets.all(axis=1)


@dataclass
class DesignResult:
    """The report of one design: per-gene table, summary numbers, cell types, embedding."""

    genes: pd.DataFrame
    summary: dict[str, Any]
    cell_types: pd.DataFrame = field(default_factory=pd.DataFrame)
    embedding: pd.DataFrame = field(default_factory=pd.DataFrame)
    violins: pd.DataFrame = field(default_factory=pd.DataFrame)

    def save(self, folder: Path) -> None:
        """Write ``genes.csv``, ``cell_types.csv``, ``embedding.parquet``,
        ``violins.parquet`` and ``summary.json`` into ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        self.genes.to_csv(folder / "genes.csv", index=False)
        self.cell_types.to_csv(folder / "cell_types.csv", index=False)
        self.embedding.to_parquet(folder / "embedding.parquet")
        self.violins.to_parquet(folder / "violins.parquet")
        (folder / "summary.json").write_text(json.dumps(self.summary, indent=1))

    @classmethod
    def load(cls, folder: Path) -> DesignResult:
        """Read a result written by :meth:`save`."""
        return cls(genes=pd.read_csv(folder / "genes.csv"),
                   summary=json.loads((folder / "summary.json").read_text()),
                   cell_types=pd.read_csv(folder / "cell_types.csv"),
                   embedding=pd.read_parquet(folder / "embedding.parquet"),
                   violins=pd.read_parquet(folder / "violins.parquet"))


def _real_space(real_expression: np.ndarray, seed: int) -> Any:
    from sklearn.decomposition import PCA

    k = max(2, min(30, real_expression.shape[0] - 1, real_expression.shape[1]))
    return PCA(n_components=k, random_state=seed).fit(real_expression)


def realism(designed: np.ndarray, real_expression: np.ndarray, real_labels: np.ndarray | None,
            *, seed: int = 0) -> dict[str, Any]:
    """Return the classifier's cell-type assignment of the designed cells (``assigned``, an
    array) and the nearest-real-cell distance ratio (median designed → nearest real over
    median real → nearest other real) in the real cells' principal components."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import NearestNeighbors

    pca = _real_space(real_expression, seed)
    real_pc = pca.transform(real_expression)
    designed_pc = pca.transform(designed)
    neighbours = NearestNeighbors(n_neighbors=2).fit(real_pc)
    real_nn = neighbours.kneighbors(real_pc)[0][:, 1]
    designed_nn = neighbours.kneighbors(designed_pc, n_neighbors=1)[0][:, 0]
    out: dict[str, Any] = {
        "nn_distance_designed": float(np.median(designed_nn)),
        "nn_distance_real": float(np.median(real_nn)),
        "nn_distance_ratio": float(np.median(designed_nn) / max(np.median(real_nn), 1e-12)),
        "designed_nn": designed_nn,
    }
    if real_labels is not None and len(pd.unique(real_labels)) > 1:
        classifier = LogisticRegression(max_iter=2000).fit(real_pc, real_labels)
        out["assigned"] = classifier.predict(designed_pc)
        out["classifier"] = (pca, classifier)
    return out


def analyse_design(designed: ad.AnnData, start: ad.AnnData, *, real: ad.AnnData | None = None,
                   real_expression: np.ndarray | None = None, label_key: str | None = None,
                   start_label: str | None = None, max_embedding_cells: int = 3000,
                   seed: int = 0) -> DesignResult:
    """Analyse a design: ``designed`` and ``start`` as :meth:`DiffusionGenerator.design`
    returns them (expression in ``layers['expression']``, the target in
    ``designed.uns['design']``); ``real`` cells with their log-normalised expression of the
    same genes (``real_expression``) and cell types in ``obs[label_key]`` for the realism
    checks and the plots (optional)."""
    import umap

    spec = designed.uns["design"]["target"]
    genes = [str(g) for g in spec["genes"]]
    position = pd.Index(designed.var_names.astype(str)).get_indexer(genes)
    expression = np.asarray(designed.layers["expression"])
    start_expression = np.asarray(start.layers["expression"])
    table, meets = target_table(expression[:, position], start_expression[:, position], genes,
                                list(spec["directions"]), list(spec["strengths"]))
    summary: dict[str, Any] = {
        "n_cells": int(designed.n_obs),
        "share_meeting_all": float(meets.mean()),
        "share_start_meeting_all": float(target_table(
            start_expression[:, position], start_expression[:, position], genes,
            list(spec["directions"]), list(spec["strengths"]))[1].mean()),
        "target": spec,
        "start": designed.uns["design"].get("start", {}),
    }
    cell_types = pd.DataFrame()
    embedding = pd.DataFrame()
    violin_frames = [
        pd.DataFrame({"group": group, "gene": gene, "expression": values[:, j]})
        for group, values in (("start (generated)", start_expression[:, position]),
                              ("designed", expression[:, position]))
        for j, gene in enumerate(genes)]
    if real is not None and real_expression is not None:
        labels = (real.obs[label_key].astype(str).to_numpy()
                  if label_key and label_key in real.obs else None)
        checks = realism(expression, real_expression, labels, seed=seed)
        start_checks = realism(start_expression, real_expression, labels, seed=seed)
        summary.update({k: v for k, v in checks.items() if k.startswith("nn_distance_")})
        summary["nn_distance_ratio_start"] = start_checks["nn_distance_ratio"]
        if "assigned" in checks:
            assigned = pd.Series(checks["assigned"])
            cell_types = pd.DataFrame({
                "cell_type": sorted(set(assigned) | set(start_checks["assigned"])),
            })
            cell_types["designed"] = cell_types["cell_type"].map(
                assigned.value_counts(normalize=True)).fillna(0.0)
            cell_types["start"] = cell_types["cell_type"].map(
                pd.Series(start_checks["assigned"]).value_counts(normalize=True)).fillna(0.0)
            summary["top_assigned_type"] = str(assigned.value_counts().index[0])
            summary["share_top_assigned_type"] = float(assigned.value_counts(normalize=True)
                                                       .iloc[0])
            if start_label:
                summary["share_assigned_start_type"] = float((assigned == start_label).mean())
        rng = np.random.default_rng(seed)
        keep = rng.permutation(real.n_obs)[:max_embedding_cells]
        real_rows = real_expression[keep]
        stacked = np.vstack([real_rows, start_expression, expression])
        pca = _real_space(real_rows, seed)
        # umap-learn on the real cells' principal components (the embedding module's own
        # function starts from counts, and these are expression values).
        coords = umap.UMAP(n_neighbors=min(15, stacked.shape[0] - 1),
                           random_state=seed).fit_transform(pca.transform(stacked))
        groups = (["real"] * len(keep) + ["start (generated)"] * start.n_obs
                  + ["designed"] * designed.n_obs)
        embedding = pd.DataFrame({"umap_1": coords[:, 0], "umap_2": coords[:, 1],
                                  "group": groups,
                                  "cell_type": ([*labels[keep]] if labels is not None
                                                else ["real"] * len(keep))
                                  + ["start (generated)"] * start.n_obs
                                  + ["designed"] * designed.n_obs})
        for j, gene in enumerate(genes):
            embedding[gene] = stacked[:, position[j]]
        if labels is not None and start_label:
            own = labels == start_label
            if own.any():
                violin_frames.append(pd.concat(
                    pd.DataFrame({"group": f"real {start_label}", "gene": gene,
                                  "expression": real_expression[own][:, position[j]]})
                    for j, gene in enumerate(genes)))
    return DesignResult(genes=table, summary=summary, cell_types=cell_types,
                        embedding=embedding, violins=pd.concat(violin_frames,
                                                               ignore_index=True))


def violin_figure(violins: pd.DataFrame) -> Any:
    """Violin plots of the requested genes: starting, designed and real cells."""
    import plotly.express as px

    figure = px.violin(violins, x="gene", y="expression", color="group", box=True,
                       points=False)
    figure.update_traces(spanmode="hard")  # no smoothed tails below zero expression
    figure.update_layout(violinmode="group", yaxis_title="log1p(normalised expression)",
                         height=380, margin={"l": 10, "r": 10, "t": 30, "b": 10})
    return figure


def design_embedding_figure(embedding: pd.DataFrame, *, color: str = "group") -> Any:
    """UMAP of real, starting and designed cells, coloured by group, cell type or a gene."""
    import plotly.express as px

    numeric = pd.api.types.is_numeric_dtype(embedding[color])
    figure = px.scatter(embedding, x="umap_1", y="umap_2", color=color,
                        color_continuous_scale="Viridis" if numeric else None,
                        opacity=0.7, render_mode="webgl")
    figure.update_traces(marker={"size": 4})
    figure.update_layout(height=480, margin={"l": 10, "r": 10, "t": 30, "b": 10})
    return figure
