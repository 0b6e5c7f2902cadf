"""Plotly figures of an evaluation, shared by the Compare page and the HTML report.

Each function takes the figure data of an :class:`engine.evaluate.suite.EvaluationResult`
(``result.figures[...]``, ``result.metrics``, ``result.audit``) and returns a plotly
``Figure`` (the joint UMAP also returns a caption saying how many cells it shows). Nothing
here computes a metric; it only lays out what the suite computed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import scipy.sparse as sp
from plotly.subplots import make_subplots

from engine.evaluate.display import DISPLAY_MAX_POINTS, downsample_for_display

SOURCES = ("real", "synthetic")
SOURCE_COLORS = {"real": "#4C78A8", "synthetic": "#F58518"}
STATUS_COLORS = {"good": "#2E7D32", "fair": "#F9A825", "poor": "#C62828", "n/a": "#9E9E9E"}
STATUS_BACKGROUNDS = {"good": "#C8E6C9", "fair": "#FFF3C4", "poor": "#FFCDD2", "n/a": "#EEEEEE"}
PALETTE = (  # plotly's "Plotly" + "D3" + "Set3"-like qualitative colours, in a stable order
    "#636EFA", "#EF553B", "#00CC96", "#AB63FA", "#FFA15A", "#19D3F3", "#FF6692", "#B6E880",
    "#FF97FF", "#FECB52", "#1F77B4", "#FF7F0E", "#2CA02C", "#D62728", "#9467BD", "#8C564B",
    "#E377C2", "#7F7F7F", "#BCBD22", "#17BECF", "#8DD3C7", "#BEBADA", "#FB8072", "#80B1D3",
)
UMAP_COLOR_ROLES = ("source", "cell_type", "condition", "donor")
KEY_METRICS = (  # the numbers of the summary chart, when the evaluation has them
    "classifier_auroc_gbt", "mmd", "ilisi", "gene_mean_pearson", "gene_variance_pearson",
    "gene_gene_corr_matrix_corr", "composition_distance", "tstr_relative_f1", "marker_overlap",
    "ks_library_size",
)
PROPERTY_LABELS = {
    "gene_mean": "Mean log2(CPM + 1) per gene",
    "gene_variance": "Variance of log2(CPM + 1) per gene",
    "gene_scaled_variance": "Scaled variance per gene",
    "gene_zero_fraction": "Fraction of cells with zero counts, per gene",
    "library_size": "Library size (total counts per cell)",
    "size_factor": "Size factor per cell",
    "effective_library_size": "Effective library size per cell",
    "cell_zero_fraction": "Fraction of genes with zero counts, per cell",
}
PAIRED_PROPERTIES = ("mean_variance", "mean_zero_fraction", "library_size_zero_fraction")
REPORT_PROPERTIES = ("library_size", "cell_zero_fraction", "gene_mean", "gene_variance",
                     "gene_zero_fraction", "size_factor")


def category_colors(values: Sequence[Any] | pd.Series) -> dict[str, str]:
    """Return a stable colour per category (sorted names; the source roles keep theirs)."""
    levels = sorted(pd.unique(pd.Series(values, dtype=str)))
    colors = {}
    for i, level in enumerate(levels):
        colors[level] = SOURCE_COLORS.get(level, PALETTE[i % len(PALETTE)])
    return colors


def property_label(name: str) -> str:
    """Return a readable title for a data property (``library_size`` -> a sentence)."""
    return PROPERTY_LABELS.get(name, name.replace("_", " ").capitalize())


# -- joint UMAP ----------------------------------------------------------------------------
def umap_display_rows(
    frame: pd.DataFrame, *, max_points: int = DISPLAY_MAX_POINTS, seed: int = 0,
    keep: np.ndarray | None = None,
) -> tuple[np.ndarray, str]:
    """Return the rows of the joint UMAP to draw and a caption saying how many cells it
    shows: all of them up to ``max_points`` per side, above that a sample stratified by cell
    type (rows flagged in ``keep`` always stay)."""
    sources = frame["source"].astype(str).to_numpy()
    labels = frame["cell_type"] if "cell_type" in frame else pd.Series(sources)
    labels = np.asarray(labels, dtype=str)
    rows, parts, sampled = [], [], False
    for source in SOURCES:
        side = np.flatnonzero(sources == source)
        if side.size == 0:
            continue
        picked = downsample_for_display(labels[side], max_points=max_points, seed=seed,
                                        keep=None if keep is None else keep[side])
        rows.append(side[picked])
        if picked.size < side.size:
            sampled = True
            parts.append(f"{picked.size:,} of {side.size:,} {source} cells")
        else:
            parts.append(f"{side.size:,} {source} cells")
    shown = np.sort(np.concatenate(rows)) if rows else np.arange(0)
    caption = "Joint UMAP of " + " and ".join(parts) + "."
    if sampled:
        caption += (f" Downsampled for display to at most {max_points:,} points per side "
                    "(stratified by cell type; selected cells kept).")
    return shown, caption


def umap_gene_values(figures: Mapping[str, Any], gene: str) -> np.ndarray:
    """Return one gene's log-normalised expression for every row of the joint UMAP."""
    genes = list(figures.get("umap_genes", []))
    if gene not in genes:
        raise KeyError(gene)
    column = figures["umap_expression"][:, genes.index(gene)]
    return np.asarray(column.toarray() if sp.issparse(column) else column,
                      dtype=np.float64).ravel()


def umap_figure(
    frame: pd.DataFrame,
    *,
    color: str = "source",
    values: np.ndarray | None = None,
    value_label: str = "expression",
    side_by_side: bool = False,
    max_points: int = DISPLAY_MAX_POINTS,
    seed: int = 0,
    keep: np.ndarray | None = None,
    title: str | None = None,
) -> tuple[go.Figure, str]:
    """Return the joint UMAP of real and synthetic cells and its caption.

    ``color`` is a column of ``frame`` (``source``, ``cell_type``, ``condition``, ``donor``)
    or, with ``values`` (one number per row, e.g. a gene's expression), a continuous colour
    named ``value_label``. ``side_by_side`` draws real and synthetic in two panels with shared
    axes. Each point carries its row of ``frame`` as ``customdata`` (for lasso selections).
    """
    rows, caption = umap_display_rows(frame, max_points=max_points, seed=seed, keep=keep)
    shown = frame.iloc[rows]
    panels = list(SOURCES) if side_by_side else [None]
    figure = make_subplots(rows=1, cols=len(panels), shared_xaxes=True, shared_yaxes=True,
                           horizontal_spacing=0.03,
                           subplot_titles=[f"{p} cells" for p in panels] if side_by_side
                           else None)
    hover = _hover_columns(shown)
    continuous = values is not None
    if continuous:
        values = np.asarray(values, dtype=np.float64)[rows]
        cmax = float(np.nanmax(values)) if values.size and np.isfinite(values).any() else 1.0
    else:
        colors = category_colors(shown[color]) if color in shown else {}
    legend_seen: set[str] = set()
    for col, panel in enumerate(panels, start=1):
        in_panel = np.ones(len(shown), dtype=bool) if panel is None else \
            (shown["source"].astype(str).to_numpy() == panel)
        if continuous:
            part = shown[in_panel]
            order = np.argsort(values[in_panel], kind="stable")  # high values on top
            figure.add_trace(go.Scattergl(
                x=part["x"].to_numpy()[order], y=part["y"].to_numpy()[order], mode="markers",
                name=value_label, showlegend=False,
                marker={"size": 3, "color": values[in_panel][order], "colorscale": "Viridis",
                        "cmin": 0.0, "cmax": max(cmax, 1e-9), "showscale": col == 1,
                        "colorbar": {"title": {"text": value_label}}},
                customdata=rows[in_panel][order],
                hovertext=hover[in_panel][order], hovertemplate="%{hovertext}<extra></extra>",
            ), row=1, col=col)
            continue
        levels = shown[color].astype(str).to_numpy() if color in shown else \
            np.full(len(shown), "cells")
        for level in _ordered_levels(levels[in_panel], color):
            mask = in_panel & (levels == level)
            part = shown[mask]
            figure.add_trace(go.Scattergl(
                x=part["x"], y=part["y"], mode="markers", name=level, legendgroup=level,
                showlegend=level not in legend_seen,
                marker={"size": 3, "color": colors.get(level, PALETTE[0]),
                        "opacity": 0.7 if color == "source" else 0.8},
                customdata=rows[mask],
                hovertext=hover[mask], hovertemplate="%{hovertext}<extra></extra>",
            ), row=1, col=col)
            legend_seen.add(level)
    label = value_label if continuous else color.replace("_", " ")
    figure.update_layout(
        title=title or f"Joint UMAP of real and synthetic cells, by {label}",
        legend={"itemsizing": "constant", "title": {"text": label}},
        dragmode="lasso", height=520, margin={"t": 70, "l": 10, "r": 10, "b": 10},
        plot_bgcolor="white",
    )
    figure.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, title=None)
    figure.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, title=None)
    return figure, caption


def _ordered_levels(levels: np.ndarray, color: str) -> list[str]:
    present = list(pd.unique(pd.Series(levels, dtype=str)))
    if color == "source":
        return [s for s in SOURCES if s in present] + [p for p in present if p not in SOURCES]
    return sorted(present)


def _hover_columns(frame: pd.DataFrame) -> np.ndarray:
    parts = [frame[c].astype(str).radd(f"{c.replace('_', ' ')}: ").to_numpy()
             for c in ("source", *UMAP_COLOR_ROLES[1:]) if c in frame]
    if not parts:
        return np.full(len(frame), "")
    text = parts[0]
    for part in parts[1:]:
        text = np.char.add(np.char.add(text.astype(str), "<br>"), part.astype(str))
    return np.asarray(text, dtype=str)


def selection_rows(points: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Return the UMAP rows of a plotly selection (the ``customdata`` of each point)."""
    rows = []
    for point in points:
        data = point.get("customdata")
        if isinstance(data, list | tuple):
            data = data[0] if data else None
        if data is not None:
            rows.append(int(data))
    return np.unique(np.asarray(rows, dtype=np.int64))


def selection_summary(frame: pd.DataFrame, rows: np.ndarray,
                      *, by: str = "cell_type") -> tuple[dict[str, int], pd.DataFrame]:
    """Return how many real and synthetic cells a selection holds and its composition by
    ``by``: a table with one row per level and, per source, cells and fraction."""
    selected = frame.iloc[np.asarray(rows, dtype=np.int64)]
    counts = {source: int((selected["source"] == source).sum()) for source in SOURCES}
    if by not in selected or selected.empty:
        return counts, pd.DataFrame()
    table = pd.crosstab(selected[by].astype(str), selected["source"].astype(str))
    table = table.reindex(columns=list(SOURCES), fill_value=0)
    out = pd.DataFrame(index=table.index)
    for source in SOURCES:
        total = table[source].sum()
        out[f"{source} cells"] = table[source].astype(int)
        out[f"{source} fraction"] = (table[source] / total).round(3) if total else 0.0
    out = out.sort_values([f"{s} cells" for s in SOURCES], ascending=False)
    return counts, out.reset_index(names=by.replace("_", " "))


# -- distributions -------------------------------------------------------------------------
def overlay_properties(properties_long: pd.DataFrame) -> list[str]:
    """Return the properties that have one value per gene or cell, in stored order (the
    paired ones, such as mean with variance, are drawn by their own figures)."""
    names = pd.unique(properties_long["property"].astype(str))
    return [n for n in names if n not in PAIRED_PROPERTIES]


def property_overlay(properties_long: pd.DataFrame, name: str, *, bins: int = 60,
                     log: bool | None = None) -> go.Figure:
    """Return overlaid histograms (fractions, shared bins) of one data property for real and
    synthetic cells. ``log`` puts the values on a log10 scale (default: for skewed,
    positive properties such as library size)."""
    part = properties_long[properties_long["property"] == name]
    values = {s: part.loc[part["source"] == s, "value"].to_numpy(dtype=np.float64)
              for s in SOURCES}
    finite = np.concatenate([v[np.isfinite(v)] for v in values.values()])
    if log is None:
        log = bool(finite.size and finite.min() > 0 and
                   np.percentile(finite, 99) > 20 * max(np.median(finite), 1e-12))
    transform = np.log10 if log else (lambda v: v)
    figure = go.Figure()
    shown = transform(finite[finite > 0]) if log else finite
    if shown.size:
        lo, hi = float(np.min(shown)), float(np.max(shown))
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
        for source in SOURCES:
            v = values[source]
            v = v[np.isfinite(v)]
            v = transform(v[v > 0]) if log else v
            counts, _ = np.histogram(v, bins=edges)
            fraction = counts / counts.sum() if counts.sum() else counts.astype(float)
            figure.add_trace(go.Bar(
                x=(edges[:-1] + edges[1:]) / 2, y=fraction, width=np.diff(edges), name=source,
                marker={"color": SOURCE_COLORS[source], "line": {"width": 0}}, opacity=0.55,
                hovertemplate=f"{source}<br>%{{x:.3g}}: %{{y:.3f}}<extra></extra>",
            ))
    label = property_label(name)
    figure.update_layout(
        barmode="overlay", title=label, bargap=0, height=380, legend={"title": {"text": ""}},
        xaxis_title=f"log10 {label.lower()}" if log else label, yaxis_title="fraction",
        margin={"t": 60, "l": 10, "r": 10, "b": 10},
    )
    return figure


def mean_variance_figure(frame: pd.DataFrame) -> go.Figure:
    """Return the per-gene mean–variance scatter of real and synthetic cells (both of
    log2(CPM + 1), as the suite computes them)."""
    figure = go.Figure()
    for source in SOURCES:
        part = frame[frame["source"] == source]
        figure.add_trace(go.Scattergl(
            x=part["mean"], y=part["variance"], mode="markers", name=source,
            marker={"size": 4, "color": SOURCE_COLORS[source], "opacity": 0.55},
            text=part["gene"].astype(str),
            hovertemplate="%{text}<br>mean %{x:.3g}<br>variance %{y:.3g}<extra>"
                          + source + "</extra>",
        ))
    figure.update_layout(title="Mean–variance relationship per gene", height=430,
                         xaxis_title="mean of log2(CPM + 1)",
                         yaxis_title="variance of log2(CPM + 1)",
                         legend={"itemsizing": "constant"},
                         margin={"t": 60, "l": 10, "r": 10, "b": 10})
    return figure


def corr_heatmaps(gene_corr: Mapping[str, Any]) -> go.Figure:
    """Return the gene–gene correlation matrices of real and synthetic cells side by side
    (same genes, same order, same colour scale)."""
    genes = [str(g) for g in gene_corr["genes"]]
    figure = make_subplots(rows=1, cols=2, horizontal_spacing=0.08,
                           subplot_titles=["real cells", "synthetic cells"])
    for col, source in enumerate(SOURCES, start=1):
        matrix = np.asarray(gene_corr[source], dtype=np.float64)
        figure.add_trace(go.Heatmap(
            z=matrix, x=genes, y=genes, zmin=-1, zmax=1, colorscale="RdBu_r", name=source,
            showscale=col == 2, colorbar={"title": {"text": "r"}},
            hovertemplate="%{y} – %{x}: %{z:.2f}<extra>" + source + "</extra>",
        ), row=1, col=col)
    figure.update_yaxes(autorange="reversed")
    figure.update_xaxes(tickfont={"size": 8})
    figure.update_yaxes(tickfont={"size": 8})
    figure.update_layout(title=f"Gene–gene correlation of the {len(genes)} most expressed genes",
                         height=560, margin={"t": 80, "l": 10, "r": 10, "b": 10})
    return figure


# -- markers -------------------------------------------------------------------------------
def marker_genes(markers: pd.DataFrame | None, *, n_genes: int = 3) -> list[str]:
    """Return the top ``n_genes`` markers of each cell type in the real cells (by rank, cell
    types in name order, each gene once)."""
    if markers is None or markers.empty or "marker_of" not in markers:
        return []
    real = markers[(markers["source"] == "real") & (markers["marker_rank"] <= n_genes)]
    real = real.drop_duplicates(["marker_of", "gene"]).sort_values(["marker_of", "marker_rank"])
    return list(dict.fromkeys(real["gene"].astype(str)))


def marker_dot_table(figures: Mapping[str, Any], *, n_genes: int = 3) -> pd.DataFrame:
    """Return ``source, cell_type, gene, mean_expression, fraction_expressing`` for the real
    markers (:func:`marker_genes`) in every cell type of both sources.

    Values come from the log-normalised expression behind the joint UMAP, so the same genes
    are shown for real and synthetic cells (the suite's marker table lists each side's own
    top markers); without it, from the marker table (a gene missing there is left out).
    """
    markers = figures.get("markers")
    genes = marker_genes(markers, n_genes=n_genes)
    columns = ["source", "cell_type", "gene", "mean_expression", "fraction_expressing"]
    if not genes:
        return pd.DataFrame(columns=columns)
    frame, expression = figures.get("umap"), figures.get("umap_expression")
    names = list(map(str, figures.get("umap_genes", [])))
    if frame is not None and expression is not None and all(g in names for g in genes):
        sub = sp.csr_matrix(expression)[:, [names.index(g) for g in genes]]
        keys = pd.DataFrame({"source": frame["source"].astype(str).to_numpy(),
                             "cell_type": frame["cell_type"].astype(str).to_numpy()})
        rows = []
        for (source, cell_type), index in keys.groupby(["source", "cell_type"]).indices.items():
            block = sub[index]
            mean = np.asarray(block.mean(axis=0)).ravel()
            expressed = np.asarray((block > 0).sum(axis=0)).ravel() / max(len(index), 1)
            rows.append(pd.DataFrame({"source": source, "cell_type": cell_type, "gene": genes,
                                      "mean_expression": mean,
                                      "fraction_expressing": expressed}))
        table = pd.concat(rows, ignore_index=True)
        return table[table["source"].isin(SOURCES)][columns].reset_index(drop=True)
    table = markers[markers["gene"].astype(str).isin(genes)]
    table = table.drop_duplicates(["source", "cell_type", "gene"])
    return table[columns].reset_index(drop=True)


def marker_dotplot(figures: Mapping[str, Any], *, n_genes: int = 3) -> go.Figure:
    """Return a dot plot of the top ``n_genes`` real marker genes per cell type, for real and
    synthetic cells side by side (synthetic cell types are the classifier's labels): dot
    size is the fraction of cells expressing the gene, colour its mean log-normalised
    expression."""
    table = marker_dot_table(figures, n_genes=n_genes)
    figure = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.04,
                           subplot_titles=["real cells", "synthetic cells"])
    if table.empty:
        figure.update_layout(title="Marker genes: no cell-type labels to compare", height=220)
        return figure
    genes = marker_genes(figures.get("markers"), n_genes=n_genes)
    cell_types = sorted(table["cell_type"].astype(str).unique())
    cmax = float(np.nanmax(table["mean_expression"].to_numpy(dtype=np.float64)))
    for col, source in enumerate(SOURCES, start=1):
        part = table[table["source"] == source]
        size = np.clip(np.nan_to_num(part["fraction_expressing"].to_numpy(np.float64)), 0, 1)
        figure.add_trace(go.Scatter(
            x=part["gene"].astype(str), y=part["cell_type"].astype(str), mode="markers",
            name=source, showlegend=False, customdata=size,
            marker={"size": 3 + 19 * np.sqrt(size),
                    "color": part["mean_expression"].to_numpy(np.float64),
                    "colorscale": "Reds", "cmin": 0, "cmax": max(cmax, 1e-9),
                    "showscale": col == 2, "colorbar": {"title": {"text": "mean"}},
                    "line": {"width": 0.5, "color": "#444"}},
            hovertemplate="%{y} · %{x}<br>expressing %{customdata:.0%}"
                          "<br>mean %{marker.color:.2f}<extra>" + source + "</extra>",
        ), row=1, col=col)
    figure.update_xaxes(categoryorder="array", categoryarray=genes, tickangle=-60)
    figure.update_yaxes(categoryorder="array", categoryarray=cell_types[::-1])
    figure.update_layout(
        title=f"Top {n_genes} marker genes per cell type of the real cells (size: fraction "
              "expressing; colour: mean log-normalised expression)",
        height=max(340, 34 * len(cell_types) + 190),
        margin={"t": 80, "l": 10, "r": 10, "b": 10})
    return figure


# -- metrics and audit ---------------------------------------------------------------------
def metrics_summary_figure(results: Mapping[str, pd.DataFrame], *,
                           metrics: Sequence[str] | None = None,
                           group: str = "all") -> go.Figure:
    """Return small bar charts, one per key metric, comparing runs: a bar per run (its
    value, coloured by its traffic light) and a black tick for that run's noise floor."""
    frames = {label: frame[frame["group"] == group] for label, frame in results.items()}
    present: list[str] = []
    for frame in frames.values():
        present.extend(m for m in frame["metric"] if m not in present)
    chosen = [m for m in (metrics or KEY_METRICS) if m in present] or present[:8]
    if not chosen:
        figure = go.Figure()
        figure.update_layout(title="No metrics to compare", height=200)
        return figure
    n_cols = min(len(chosen), 4)
    n_rows = math.ceil(len(chosen) / n_cols)
    titles = []
    for metric in chosen:
        direction = next((f.loc[f["metric"] == metric, "direction"].iloc[0]
                          for f in frames.values() if (f["metric"] == metric).any()), "")
        arrow = {"lower": " (↓ better)", "higher": " (↑ better)"}.get(direction, "")
        titles.append(f"{metric}<br><span style='font-size:11px'>{arrow.strip()}</span>")
    figure = make_subplots(rows=n_rows, cols=n_cols, subplot_titles=titles,
                           horizontal_spacing=0.07, vertical_spacing=0.36 / n_rows)
    labels = list(frames)
    floor_legend = True
    for i, metric in enumerate(chosen):
        row, col = divmod(i, n_cols)
        values, floors, colours, statuses = [], [], [], []
        for label in labels:
            hit = frames[label][frames[label]["metric"] == metric]
            value = float(hit["value"].iloc[0]) if not hit.empty else math.nan
            floor = float(hit["floor"].iloc[0]) if not hit.empty else math.nan
            status = str(hit["status"].iloc[0]) if not hit.empty else "n/a"
            values.append(value)
            floors.append(floor)
            statuses.append(status)
            colours.append(STATUS_COLORS.get(status, STATUS_COLORS["n/a"]))
        figure.add_trace(go.Bar(
            x=labels, y=values, marker={"color": colours}, name=metric, showlegend=False,
            customdata=np.column_stack([floors, statuses]),
            hovertemplate="%{x}<br>value %{y:.3f}<br>floor %{customdata[0]:.3f}"
                          "<br>%{customdata[1]}<extra>" + metric + "</extra>",
        ), row=row + 1, col=col + 1)
        figure.add_trace(go.Scatter(
            x=labels, y=floors, mode="markers", name="noise floor (real vs real)",
            legendgroup="floor", showlegend=floor_legend,
            marker={"symbol": "line-ew", "size": 34, "line": {"width": 3, "color": "black"},
                    "color": "black"},
            hovertemplate="floor %{y:.3f}<extra>" + metric + "</extra>",
        ), row=row + 1, col=col + 1)
        floor_legend = False
    for status, colour in STATUS_COLORS.items():  # a legend for the bar colours
        figure.add_trace(go.Bar(x=[None], y=[None], marker={"color": colour}, name=status,
                                showlegend=True, hoverinfo="skip"), row=1, col=1)
    longest = max(len(label) for label in labels)
    figure.update_xaxes(type="category", tickangle=0 if longest * len(labels) < 24 else -30,
                        tickfont={"size": 10})
    figure.update_annotations(font={"size": 12})
    figure.update_layout(
        title="Key metrics per run: bar = value (colour: traffic light), tick = noise floor",
        height=290 * n_rows + 130, bargap=0.35, margin={"t": 90, "l": 10, "r": 10, "b": 60},
        legend={"orientation": "h", "yref": "container", "y": 0.0, "yanchor": "bottom",
                "x": 0.5, "xanchor": "center"},
    )
    return figure


def audit_roc_figure(roc: Mapping[str, pd.DataFrame]) -> go.Figure:
    """Return the ROC curves of the membership-inference attacks, with the chance line."""
    figure = go.Figure()
    from engine.privacy.audit import ATTACK_LABELS

    for i, (attack, frame) in enumerate(roc.items()):
        figure.add_trace(go.Scatter(x=frame["fpr"], y=frame["tpr"], mode="lines",
                                    name=ATTACK_LABELS.get(attack, attack),
                                    line={"color": PALETTE[i % len(PALETTE)], "width": 2}))
    figure.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance",
                                line={"color": "#888", "dash": "dash", "width": 1}))
    figure.update_layout(title="Membership-inference attacks: ROC", height=400,
                         xaxis={"title": "false-positive rate", "range": [0, 1]},
                         yaxis={"title": "true-positive rate", "range": [0, 1]},
                         margin={"t": 60, "l": 10, "r": 10, "b": 10})
    return figure


AUDIT_COLUMNS = {  # shown in this order when present
    "attack": "attack", "auroc": "AUROC", "auroc_floor": "AUROC floor",
    "auroc_null_halfwidth": "chance ± (AUROC)", "tpr_at_1pct_fpr": "TPR at 1 % FPR",
    "tpr_at_10pct_fpr": "TPR at 10 % FPR", "epsilon_lower_bound": "ε lower bound",
    "epsilon_lower_bound_floor": "ε lower bound floor", "epsilon_ci_low": "ε CI low",
    "epsilon_ci_high": "ε CI high", "n_members": "members", "n_nonmembers": "non-members",
    "unit": "unit",
}


AUDIT_KEY_COLUMNS = ("attack", "auroc", "auroc_floor", "tpr_at_1pct_fpr", "epsilon_lower_bound")


def audit_table(table: pd.DataFrame, *, compact: bool = False) -> pd.DataFrame:
    """Return the audit table for display: readable attack names and column titles; with
    ``compact`` only the attack, its AUROC and floor, TPR at 1 % FPR and the ε lower bound."""
    from engine.privacy.audit import ATTACK_LABELS

    columns = AUDIT_KEY_COLUMNS if compact else AUDIT_COLUMNS
    shown = table[[c for c in columns if c in table]].copy()
    if "attack" in shown:
        shown["attack"] = shown["attack"].map(lambda a: ATTACK_LABELS.get(a, a))
    return shown.rename(columns=AUDIT_COLUMNS).reset_index(drop=True)


def audit_notes(audit: Any, sentence: str) -> list[str]:
    """Return the audit's notes without ``sentence`` (shown on its own, once)."""
    return [str(n) for n in (getattr(audit, "notes", None) or []) if str(n) != sentence]


def metrics_table(metrics: pd.DataFrame, *, groups: Sequence[str] | None = None) -> pd.DataFrame:
    """Return the metrics as a display table (``metric, family, group, value, floor,
    better, status, description``), optionally only some groups."""
    table = metrics if groups is None else metrics[metrics["group"].isin(list(groups))]
    table = table.assign(better=table["direction"].map(
        {"lower": "lower ↓", "higher": "higher ↑"}).fillna(table["direction"]))
    columns = ["metric", "family", "group", "value", "floor", "better", "status", "description"]
    return table[[c for c in columns if c in table]].reset_index(drop=True)


def style_metrics(table: pd.DataFrame, *, uuid: str | None = None) -> Any:
    """Return a pandas ``Styler`` of a :func:`metrics_table`: the status cell (and the value)
    coloured by traffic light, numbers to 3 decimals. ``uuid`` names its CSS ids (stable
    HTML; unique per table of a page)."""
    def colour(row: pd.Series) -> list[str]:
        status = str(row.get("status", "n/a"))
        css = f"background-color: {STATUS_BACKGROUNDS.get(status, STATUS_BACKGROUNDS['n/a'])}"
        return [css if c in ("status", "value") else "" for c in row.index]

    styler = table.style if uuid is None else table.style.set_uuid(uuid)
    return (styler.apply(colour, axis=1)
            .format({"value": "{:.3f}", "floor": "{:.3f}"}, na_rep="—")
            .hide(axis="index"))
