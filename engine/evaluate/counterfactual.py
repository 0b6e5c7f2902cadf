"""Counterfactual analysis: what changed, how each head contributed, and how close the
counterfactual cells land to real cells of the target context.

Used by the Counterfactual page (through the ``counterfactual`` task), the CLI and the
validation benchmark. Everything works on log1p of counts normalised per cell (the model's
space); fold changes are of mean normalised expression (``expm1`` of the logs).
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

from engine.errors import UserFacingError

MIN_TARGET_CELLS = 5
TOP_DE_GENES = 100


def r_squared(predicted: np.ndarray, observed: np.ndarray) -> float:
    """Return the squared Pearson correlation of two vectors (the R² reported by scGen and
    CPA for mean expression); NaN when either is constant."""
    if predicted.size < 2 or np.std(predicted) == 0 or np.std(observed) == 0:
        return float("nan")
    return float(np.corrcoef(predicted, observed)[0, 1] ** 2)


def mean_log(expression: np.ndarray | sp.spmatrix) -> np.ndarray:
    """Return the per-gene mean of a (cells × genes) log-normalised matrix."""
    return np.asarray(expression.mean(axis=0)).ravel()


def top_de_genes(source_mean: np.ndarray, target_mean: np.ndarray, n: int = TOP_DE_GENES
                 ) -> np.ndarray:
    """Return the positions of the ``n`` genes with the largest |difference| of mean log
    expression between the real source and the real target cells."""
    order = np.argsort(-np.abs(target_mean - source_mean), kind="stable")
    return order[: min(n, order.size)]


def prediction_scores(predicted_mean: np.ndarray, source_mean: np.ndarray,
                      target_mean: np.ndarray, *, n_top: int = TOP_DE_GENES
                      ) -> dict[str, float]:
    """Return R² over all genes and over the top DE genes, and the share of top DE genes whose
    predicted change (prediction − source) has the real change's sign."""
    top = top_de_genes(source_mean, target_mean, n_top)
    real_change = target_mean[top] - source_mean[top]
    predicted_change = predicted_mean[top] - source_mean[top]
    return {
        "r2_all": r_squared(predicted_mean, target_mean),
        "r2_top_de": r_squared(predicted_mean[top], target_mean[top]),
        "direction_agreement": float(np.mean(np.sign(predicted_change) == np.sign(real_change))),
        "n_top_de": int(top.size),
    }


def log_normalised(adata: ad.AnnData, genes: list[str], target_sum: float = 1e4) -> np.ndarray:
    """Return dense log1p(counts / library · target_sum) of ``adata`` restricted to ``genes``
    (library over all of its genes), as the cycle autoencoder sees cells."""
    from engine.generators.cae import log_normalise

    counts = sp.csr_matrix(adata.X, dtype=np.float32)
    library = np.asarray(counts.sum(axis=1)).ravel()
    position = pd.Index(adata.var_names.astype(str)).get_indexer(genes)
    return log_normalise(counts[:, position], library, target_sum)


@dataclass
class CounterfactualResult:
    """A counterfactual of chosen cells and its analysis (see :func:`analyse`)."""

    cells: ad.AnnData  # counterfactual counts; layers 'predicted' and 'source' (log1p); contexts
    # per gene: observed and predicted mean log expression, the model's log2 fold change
    # (decoded in the new contexts vs in the cells' own), rank by |fold change|
    genes: pd.DataFrame
    heads: pd.DataFrame  # per gene × head: the head's mean output change (after − before)
    head_norms: dict[str, dict[str, float]]  # head → mean L2 norm before / after
    embedding: pd.DataFrame  # UMAP of source, counterfactual and real target cells
    closeness: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: Path) -> None:
        """Write ``cells.h5ad``, ``genes.csv``, ``heads.csv``, ``embedding.parquet`` and
        ``summary.json`` (closeness, head norms, the request) into ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        self.cells.write_h5ad(folder / "cells.h5ad", compression="gzip")
        self.genes.to_csv(folder / "genes.csv")
        self.heads.to_csv(folder / "heads.csv")
        self.embedding.to_parquet(folder / "embedding.parquet")
        (folder / "summary.json").write_text(json.dumps(
            {**self.summary, "closeness": self.closeness, "head_norms": self.head_norms},
            indent=2, default=float))

    @classmethod
    def load(cls, folder: Path) -> CounterfactualResult:
        """Read a result written by :meth:`save`."""
        summary = json.loads((folder / "summary.json").read_text())
        return cls(
            cells=ad.read_h5ad(folder / "cells.h5ad"),
            genes=pd.read_csv(folder / "genes.csv", index_col=0),
            heads=pd.read_csv(folder / "heads.csv", index_col=0),
            head_norms=summary.pop("head_norms"),
            embedding=pd.read_parquet(folder / "embedding.parquet"),
            closeness=summary.pop("closeness"),
            summary=summary,
        )


def select_cells(obs: pd.DataFrame, selection: dict[str, list[str]] | None = None,
                 names: list[str] | None = None) -> np.ndarray:
    """Return the positions of the cells whose columns hold one of the chosen values (all
    columns must match), or of the named cells; UserFacingError when none match."""
    mask = np.ones(len(obs), dtype=bool)
    for column, values in (selection or {}).items():
        if column not in obs:
            raise UserFacingError(f"The cells have no column {column!r}.")
        mask &= obs[column].astype(str).isin([str(v) for v in values]).to_numpy()
    if names:
        mask &= obs.index.astype(str).isin([str(n) for n in names])
    rows = np.flatnonzero(mask)
    if rows.size == 0:
        raise UserFacingError("No cells match that selection; choose other values.")
    return rows


def analyse(model: Any, cells: ad.AnnData, changes: dict[str, str], *,
            real: ad.AnnData | None = None, seed: int = 0, max_plot_cells: int = 3000
            ) -> CounterfactualResult:
    """Make the counterfactual of ``cells`` under ``changes`` with a fitted
    :class:`~engine.generators.cae.CAEGenerator` and analyse it.

    ``real`` (optional) holds real cells to compare with: those in the target context (the
    cells' contexts with ``changes`` applied) are the reference for closeness, reported as
    R² of mean expression (all genes, top DE genes), direction agreement, and the same for
    the unchanged cells as a baseline. Returns the counterfactual cells, per-gene changes,
    each head's contribution, and a joint UMAP (at most ``max_plot_cells`` per group). For an
    ensemble the expression, the heads' changes and norms are those of the members' mean
    model (the summary names the number of members).
    """
    from engine.evaluate.embedding import umap_embedding

    if not changes:
        raise UserFacingError("Choose a new value for at least one field.")
    result = model.counterfactual_expression(cells, changes)
    out = model.counterfactual(cells, changes, seed=seed)
    out.layers["source"] = result["source"].astype(np.float32)
    genes = [str(g) for g in model.gene_names]
    before = mean_log(result["source"])
    after = mean_log(result["predicted"])
    # The fold change is the model's own change (decoded in the new vs in the cells' own
    # contexts), so the autoencoder's reconstruction error does not pose as an effect.
    # A pseudo-count of one normalised count keeps barely expressed genes from topping the list.
    lfc = np.log2((np.expm1(mean_log(result["decoded"])) + 1.0)
                  / (np.expm1(mean_log(result["reconstructed"])) + 1.0))
    gene_table = pd.DataFrame({"mean_log_before": before, "mean_log_after": after,
                               "log2_fold_change": lfc}, index=genes)
    gene_table["rank"] = (-gene_table["log2_fold_change"].abs()).rank(method="first")
    gene_table = gene_table.sort_values("rank")

    heads = pd.DataFrame({h: mean_log(result["heads_target"][h])
                          - mean_log(result["heads_source"][h])
                          for h in result["heads_source"]}, index=genes)
    head_norms = {h: {"before": float(np.linalg.norm(result["heads_source"][h], axis=1).mean()),
                      "after": float(np.linalg.norm(result["heads_target"][h], axis=1).mean())}
                  for h in result["heads_source"]}

    closeness: dict[str, Any] = {}
    target_cells = None
    target = result["target_contexts"].drop_duplicates()
    if real is not None and len(target) == 1:
        wanted = target.iloc[0].to_dict()
        in_target = np.ones(real.n_obs, dtype=bool)
        for column, value in wanted.items():
            in_target &= real.obs[column].astype(str).to_numpy() == value if column in \
                real.obs else False
        closeness["target_context"] = wanted
        closeness["n_real_target_cells"] = int(in_target.sum())
        if in_target.sum() >= MIN_TARGET_CELLS:
            target_cells = real[np.flatnonzero(in_target)]
            target_sum = getattr(model.config, "target_sum", 1e4)
            real_target = mean_log(log_normalised(target_cells, genes, target_sum))
            closeness["counterfactual"] = prediction_scores(after, before, real_target)
            closeness["unchanged_baseline"] = prediction_scores(before, before, real_target)

    embedding = _joint_embedding(result, out, target_cells, genes, model, seed=seed,
                                 max_cells=max_plot_cells, umap=umap_embedding)
    summary = {"changes": changes, "n_cells": int(cells.n_obs), "seed": int(seed),
               "fields": list(model.categories)}
    if hasattr(model, "n_members"):
        summary["ensemble_members"] = int(model.n_members)
    return CounterfactualResult(out, gene_table, heads, head_norms, embedding, closeness,
                                summary)


def _joint_embedding(result: dict[str, Any], out: ad.AnnData, target_cells: ad.AnnData | None,
                     genes: list[str], model: Any, *, seed: int, max_cells: int,
                     umap: Any) -> pd.DataFrame:
    """Return a UMAP of the source cells, their counterfactuals (paired rows, for arrows) and
    the real target cells, from counts (each group subsampled to ``max_cells``)."""
    rng = np.random.default_rng(seed)
    n = out.n_obs
    rows = np.sort(rng.choice(n, size=min(n, max_cells), replace=False))
    source_counts = model.to_counts(result["source"][rows], result["library"][rows], seed)
    groups = [("source", source_counts, rows), ("counterfactual", out.X[rows], rows)]
    if target_cells is not None:
        t_rows = np.sort(rng.choice(target_cells.n_obs, size=min(target_cells.n_obs,
                                                                  max_cells), replace=False))
        position = pd.Index(target_cells.var_names.astype(str)).get_indexer(genes)
        groups.append(("real target", sp.csr_matrix(target_cells.X[t_rows][:, position]),
                       t_rows))
    matrix = sp.vstack([sp.csr_matrix(g[1], dtype=np.float32) for g in groups]).tocsr()
    coords = umap(ad.AnnData(matrix), n_top_genes=min(1000, len(genes)), seed=seed)
    frames = []
    start = 0
    for name, block, index in groups:
        stop = start + block.shape[0]
        frames.append(pd.DataFrame({"umap1": coords[start:stop, 0],
                                    "umap2": coords[start:stop, 1], "group": name,
                                    "cell": index.astype(int)}))
        start = stop
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------------------ figures
GROUP_COLORS = {"source": "#9e9e9e", "counterfactual": "#d62728", "real target": "#1f77b4"}


def shift_figure(embedding: pd.DataFrame, *, max_arrows: int = 150, seed: int = 0) -> Any:
    """Return a plotly UMAP of the source cells, their counterfactuals and the real target
    cells, with a line from each of up to ``max_arrows`` source cells to its counterfactual."""
    import plotly.graph_objects as go

    figure = go.Figure()
    source = embedding[embedding["group"] == "source"].set_index("cell")
    moved = embedding[embedding["group"] == "counterfactual"].set_index("cell")
    pairs = source.index.intersection(moved.index)
    rng = np.random.default_rng(seed)
    shown = rng.choice(pairs, size=min(max_arrows, len(pairs)), replace=False) if len(
        pairs) else []
    xs: list[float | None] = []
    ys: list[float | None] = []
    for cell in shown:
        xs += [source.at[cell, "umap1"], moved.at[cell, "umap1"], None]
        ys += [source.at[cell, "umap2"], moved.at[cell, "umap2"], None]
    figure.add_trace(go.Scattergl(x=xs, y=ys, mode="lines", name="cell → counterfactual",
                                  line={"width": 0.6, "color": "rgba(90,90,90,0.35)"},
                                  hoverinfo="skip"))
    for group, color in GROUP_COLORS.items():
        part = embedding[embedding["group"] == group]
        if len(part):
            figure.add_trace(go.Scattergl(x=part["umap1"], y=part["umap2"], mode="markers",
                                          name=f"{group} ({len(part):,})",
                                          marker={"size": 4, "color": color, "opacity": 0.7}))
    figure.update_layout(height=520, xaxis_title="UMAP 1", yaxis_title="UMAP 2",
                         legend={"orientation": "h"}, margin={"t": 30})
    return figure


def top_genes_figure(genes: pd.DataFrame, *, n: int = 25) -> Any:
    """Return a bar chart of the ``n`` genes with the largest |log2 fold change|."""
    import plotly.express as px

    top = genes.nsmallest(n, "rank").iloc[::-1]
    figure = px.bar(top, x="log2_fold_change", y=top.index, orientation="h",
                    color=np.where(top["log2_fold_change"] > 0, "up", "down"),
                    color_discrete_map={"up": "#d62728", "down": "#1f77b4"},
                    labels={"y": "gene", "log2_fold_change": "log2 fold change", "color": ""})
    figure.update_layout(height=max(300, 18 * n), margin={"t": 30})
    return figure


def heatmap_figure(cells: ad.AnnData, genes: list[str], *, max_cells: int = 200,
                   seed: int = 0) -> Any:
    """Return a heatmap of log-normalised expression of ``genes``: the cells before
    (``layers['source']``, left block, when present) and as counterfactuals
    (``layers['predicted']``, right block), the same cells in the same order."""
    import plotly.graph_objects as go

    position = pd.Index(cells.var_names.astype(str)).get_indexer(genes)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(cells.n_obs, size=min(max_cells, cells.n_obs), replace=False))
    blocks = [np.asarray(cells.layers["predicted"][rows][:, position])]
    labels = ["counterfactual"] * len(rows)
    source_expression = cells.layers.get("source")
    if source_expression is not None:
        blocks.insert(0, np.asarray(source_expression[rows][:, position]))
        labels = ["before"] * len(rows) + labels
    matrix = np.concatenate(blocks, axis=0).T
    figure = go.Figure(go.Heatmap(z=matrix, y=genes, x=list(range(matrix.shape[1])),
                                  colorscale="Viridis", colorbar={"title": "log1p"},
                                  customdata=np.array([labels] * len(genes)),
                                  hovertemplate="%{y} · %{customdata}: %{z:.2f}<extra></extra>"))
    if source_expression is not None:
        figure.add_vline(x=len(rows) - 0.5, line_color="white", line_width=3)
    figure.update_layout(height=max(300, 16 * len(genes)), xaxis_title="cells: before | after"
                         if source_expression is not None else "cells", margin={"t": 30})
    figure.update_xaxes(showticklabels=False)
    return figure


def head_contribution_figure(heads: pd.DataFrame, genes: list[str]) -> Any:
    """Return grouped bars: each head's change of mean output (after − before) for ``genes``."""
    import plotly.express as px

    table = heads.loc[genes].reset_index(names="gene").melt(id_vars="gene", var_name="head",
                                                             value_name="change")
    figure = px.bar(table, x="gene", y="change", color="head", barmode="group",
                    labels={"change": "head output change (log1p)"})
    figure.update_layout(height=380, margin={"t": 30})
    return figure


def head_norm_figure(history: pd.DataFrame) -> Any:
    """Return the L2 norm of each head's output per epoch (interpretability over training),
    from the ``norm_<head>`` columns of a model's history (for an ensemble: the norms of the
    members' mean output)."""
    import plotly.express as px

    columns = [c for c in history.columns if c.startswith("norm_")]
    table = history.melt(id_vars="epoch", value_vars=columns, var_name="head",
                         value_name="mean L2 norm")
    table["head"] = table["head"].str.removeprefix("norm_")
    figure = px.line(table, x="epoch", y="mean L2 norm", color="head", markers=True)
    figure.update_layout(height=320, margin={"t": 30})
    return figure


def loss_figure(history: pd.DataFrame) -> Any:
    """Return the training loss terms per epoch (log scale), from a model's history (for an
    ensemble: the members' mean per epoch)."""
    import plotly.express as px

    terms = [c for c in ("reconstruction", "cycle", "integration", "target", "classifier",
                         "means", "loss") if c in history]
    table = history.melt(id_vars="epoch", value_vars=terms, var_name="term", value_name="value")
    figure = px.line(table, x="epoch", y="value", color="term", log_y=True)
    figure.update_layout(height=320, margin={"t": 30})
    return figure


def context_contributions(model: Any, field_name: str, *, max_cells: int = 2000,
                          seed: int = 0) -> pd.DataFrame:
    """Return genes × values of ``field_name``: the field head's mean output over up to
    ``max_cells`` reference cells put in each value, minus its mean over the values (what a
    context adds relative to the field's average)."""
    reference = model.reference
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(reference.n_obs, size=min(max_cells, reference.n_obs),
                              replace=False))
    table = model.head_contributions(reference[rows], field_name)
    return table.sub(table.mean(axis=1), axis=0)


def context_figure(contributions: pd.DataFrame, value: str, *, n: int = 20) -> Any:
    """Return bars of the ``n`` genes a context raises or lowers most (from
    :func:`context_contributions`)."""
    import plotly.express as px

    column = contributions[value]
    top = column.reindex(column.abs().sort_values(ascending=False).index[:n]).iloc[::-1]
    figure = px.bar(x=top.to_numpy(), y=top.index, orientation="h",
                    color=np.where(top.to_numpy() > 0, "raised", "lowered"),
                    color_discrete_map={"raised": "#d62728", "lowered": "#1f77b4"},
                    labels={"x": f"head output vs the field's average (log1p) · {value}",
                            "y": "gene", "color": ""})
    figure.update_layout(height=max(300, 18 * n), margin={"t": 30})
    return figure
