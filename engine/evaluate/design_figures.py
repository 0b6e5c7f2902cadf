"""Figures of the Design page that :mod:`engine.evaluate.design` does not draw: the diffusion
model's training loss, the designed cells' cell-type assignment, and denoising before / after
(a joint UMAP side by side, marker genes observed vs denoised).

The frames are those the ``design`` and ``denoise`` tasks store (``DesignResult.cell_types``,
the denoising ``embedding.parquet``); nothing here computes science, it only draws it.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

MARGIN = {"l": 10, "r": 10, "t": 30, "b": 10}


def loss_figure(history: pd.DataFrame) -> Any:
    """Training loss (noise-prediction MSE) per reported step of a diffusion model."""
    import plotly.express as px

    frame = history if not history.empty else pd.DataFrame({"step": [], "loss": []})
    figure = px.line(frame, x="step", y="loss")
    figure.update_layout(height=280, margin=MARGIN, xaxis_title="training step",
                         yaxis_title="loss")
    return figure


def cell_type_figure(cell_types: pd.DataFrame) -> Any:
    """Share of designed and starting cells that a classifier of real cells assigns to each
    cell type (grouped bars)."""
    import plotly.express as px

    long = cell_types.melt(id_vars="cell_type", value_vars=["start", "designed"],
                           var_name="cells", value_name="share")
    long["cells"] = long["cells"].map({"start": "start (generated)", "designed": "designed"})
    figure = px.bar(long, x="cell_type", y="share", color="cells", barmode="group")
    figure.update_layout(height=340, margin=MARGIN, xaxis_title="assigned cell type",
                         yaxis_title="share of cells", yaxis_tickformat=".0%")
    return figure


def denoise_embedding_figure(embedding: pd.DataFrame, *, color: str = "cell_type") -> Any:
    """The joint UMAP of denoised cells: observed (left) and denoised (right), coloured by
    ``color`` (cell type, or a marker gene)."""
    import plotly.express as px

    numeric = pd.api.types.is_numeric_dtype(embedding[color])
    figure = px.scatter(embedding, x="umap_1", y="umap_2", color=color, facet_col="state",
                        category_orders={"state": ["observed", "denoised"]},
                        color_continuous_scale="Viridis" if numeric else None,
                        opacity=0.7, render_mode="webgl")
    figure.update_traces(marker={"size": 4})
    figure.for_each_annotation(lambda a: a.update(text=a.text.split("=")[-1]))
    figure.update_layout(height=440, margin=MARGIN)
    return figure


def marker_figure(embedding: pd.DataFrame, markers: list[str]) -> Any:
    """Box plots of each marker gene's expression, observed vs denoised, in the same cells."""
    import plotly.express as px

    present = [m for m in markers if m in embedding]
    long = embedding.melt(id_vars=["state"], value_vars=present, var_name="gene",
                          value_name="expression")
    figure = px.box(long, x="gene", y="expression", color="state", points=False,
                    category_orders={"state": ["observed", "denoised"], "gene": present})
    figure.update_layout(boxmode="group", height=380, margin=MARGIN,
                         yaxis_title="log1p(normalised expression)")
    return figure
