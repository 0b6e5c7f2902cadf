"""Counterfactual: chosen cells in new contexts ("these cells, but stimulated"), with what
changed, each head's part in it, and how close the result lands to real cells."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from engine.errors import UserFacingError
from engine.evaluate import counterfactual as CF
from engine.generators.registry import list_generators
from engine.tasks import load_model
from pages._ui import current, job_panel, jobs, page_setup, plotly, require_dataset, workspace

page_setup("Counterfactual")
st.caption("A cycle autoencoder learns, per metadata field, how that field adds to expression. "
           "Pick cells, give them new contexts (e.g. condition ctrl → stim), and see what the "
           "model predicts. Counterfactuals decode real cells: they are **not private**.")

ws = workspace()
record = require_dataset()
capable = {g.name: g.label for g in list_generators() if g.capabilities.counterfactual}
runs = {r.key: r for r in ws.list_runs()
        if r.status == "done" and r.dataset_id == record.id and r.generator in capable}
if not runs:
    st.info(f"No counterfactual model of **{record.name}** yet: train a "
            f"{' or '.join(capable.values())} on the Train page.")
    st.page_link("pages/train.py", label="Train a model", icon=":material/model_training:")
    st.stop()

keys = list(runs)
run_key = st.selectbox(
    "Model", keys, index=keys.index(current("run_key")) if current("run_key") in keys else 0,
    format_func=lambda k: f"{capable[runs[k].generator]} · {k[:8]} "
                          + (f"({runs[k].config['epochs']} epochs)" if "epochs" in runs[k].config
                             else ""), key="cf_run")


@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def cached_model(key: str, root: str) -> object:
    """The fitted model of a run, loaded once per process (read-only)."""
    return load_model(ws, key)


@st.cache_data(max_entries=4, show_spinner=False)
def dataset_obs(dataset_id: str) -> pd.DataFrame:
    return ws.load_obs(dataset_id)


@st.cache_data(max_entries=4, show_spinner="Embedding the cells for the lasso (UMAP)…")
def dataset_umap(dataset_id: str) -> np.ndarray:
    from engine.evaluate.embedding import umap_embedding

    stored = ws.load_obsm(dataset_id, "X_umap")
    return stored if stored is not None else umap_embedding(ws.load_dataset(dataset_id))


model = cached_model(run_key, str(ws.root))


@st.cache_data(max_entries=16, show_spinner="Decoding the reference cells…")
def field_contributions(key: str, field_name: str) -> pd.DataFrame:
    return CF.context_contributions(cached_model(key, str(ws.root)), field_name)


obs = dataset_obs(record.id)
fields = list(model.categories)

if not hasattr(model, "head_contributions"):  # the Bayesian NB model has its own page
    st.caption(f"{capable[runs[run_key].generator]}: a counterfactual keeps each cell's size "
               "factor and latent factors and changes its condition. The posterior (effects, "
               "dispersion, predictive checks) is on the Posterior page.")
else:
    with st.expander("What the model learnt: each head's size over training, and the losses"):
        history = model.history_frame()
        n_members = getattr(model, "n_members", 1)
        if n_members > 1:
            st.caption(f"The model is the mean of **{n_members}** members trained with seeds "
                       f"{model.config.seed}–{model.config.seed + n_members - 1}; its heads, "
                       "the plots below and every counterfactual use that mean.")
        cols = st.columns(2)
        with cols[0]:
            st.caption("Mean L2 norm of each head's additive output per epoch: how much the base "
                       "and each field contribute to the cells' expression"
                       + (" (the members' mean output)." if n_members > 1 else "."))
            plotly(CF.head_norm_figure(history), key="cf_norms")
        with cols[1]:
            st.caption("Loss terms per epoch"
                       + (", the mean over the members." if n_members > 1 else "."))
            plotly(CF.loss_figure(history), key="cf_losses")
        cols = st.columns(2)
        head_field = cols[0].selectbox("Field", fields, key="cf_head_field")
        head_value = cols[1].selectbox("Context", model.categories[head_field],
                                       key="cf_head_value")
        st.caption(f"Per-gene contribution of the **{head_field}** head for **{head_value}**: its "
                   "mean output over the model's reference cells put in that context, minus its "
                   "mean over all values of the field.")
        plotly(CF.context_figure(field_contributions(run_key, head_field), head_value),
               key="cf_head_genes")

# -- which cells ------------------------------------------------------------------------------
st.subheader("1 · Pick cells")
how = st.radio("Choose cells", ["by metadata", "by lasso on a UMAP"], horizontal=True,
               key="cf_how")
selection: dict[str, list[str]] = {}
names: list[str] = []
selectable = [c for c in dict.fromkeys([*fields, *(r for r in (record.roles.get("donor"),)
                                                    if r)]) if c in obs]
if how == "by metadata":
    cols = st.columns(max(1, len(selectable)))
    for col, column in zip(cols, selectable, strict=False):
        values = sorted(map(str, obs[column].dropna().unique()))
        chosen = col.multiselect(column, values, key=f"cf_sel.{column}",
                                 placeholder="any")
        if chosen:
            selection[column] = chosen
else:
    coords = dataset_umap(record.id)
    color = st.selectbox("Colour by", selectable, key="cf_color") if selectable else None
    frame = pd.DataFrame({"umap1": coords[:, 0], "umap2": coords[:, 1],
                          "label": obs[color].astype(str).to_numpy() if color else "cells",
                          "row": np.arange(len(obs))})
    import plotly.express as px

    figure = px.scatter(frame, x="umap1", y="umap2", color="label", render_mode="webgl",
                        height=480, custom_data=["row"])
    figure.update_traces(marker={"size": 3})
    figure.update_layout(dragmode="lasso", legend_title_text=color or "")
    event = plotly(figure, key="cf_lasso", on_select="rerun", selection_mode=("lasso", "box"))
    points = event.selection.points if event and event.selection else []
    # Each point carries its cell's row as custom data; without it, map (trace, point in the
    # trace) back: plotly draws one trace per colour, in order of first appearance.
    rows_of_trace = [np.flatnonzero(frame["label"].to_numpy() == label)
                     for label in frame["label"].unique()]
    picked = sorted({int(p["customdata"][0]) if p.get("customdata") is not None else
                     int(rows_of_trace[int(p["curve_number"])][int(p["point_index"])])
                     for p in points})
    names = obs.index[picked].astype(str).tolist()
    st.caption(f"{len(names):,} cells lassoed." if names else
               "Draw a lasso (or a box) around cells on the map.")

matched: np.ndarray | list[int] = []
if how == "by metadata" or names:
    try:
        matched = CF.select_cells(obs, selection, names or None)
    except UserFacingError as exc:
        st.warning(str(exc))
st.caption(f"**{len(matched):,}** cells selected (at most 5,000 are used, chosen at random).")

# -- new contexts -----------------------------------------------------------------------------
st.subheader("2 · New contexts")
changes: dict[str, str] = {}
cols = st.columns(len(fields))
for col, field_name in zip(cols, fields, strict=True):
    choice = col.selectbox(f"{field_name} →", ["(keep)", *model.categories[field_name]],
                           key=f"cf_set.{field_name}")
    if choice != "(keep)":
        changes[field_name] = choice
seed = st.number_input("Seed (counts are drawn around the predicted expression)", min_value=0,
                       value=0, step=1, key="cf_seed")
go = st.button("Generate counterfactual", type="primary", key="cf_go",
               disabled=not changes or len(matched) == 0)
if not changes:
    st.caption("Choose a new value for at least one field.")
if go:
    st.session_state["cf_job"] = jobs().submit(
        "counterfactual",
        {"run_key": run_key, "selection": selection, "cells": names, "changes": changes,
         "seed": int(seed)},
        title="Counterfactual " + ", ".join(f"{k} → {v}" for k, v in changes.items()))


def remember(job: object) -> None:
    st.session_state["cf_result"] = (job.result["run_key"], job.result["counterfactual_id"])


job_panel("cf_job", on_done=remember)

# -- results ----------------------------------------------------------------------------------
stored = st.session_state.get("cf_result")
if not stored or stored[0] != run_key:
    st.stop()
folder = ws.evaluation_dir(stored[0], stored[1], kind="counterfactuals")
if not (folder / "summary.json").exists():
    st.stop()


@st.cache_resource(max_entries=4, show_spinner="Reading the counterfactual…")
def load_result(path: str) -> CF.CounterfactualResult:
    return CF.CounterfactualResult.load(Path(path))


result = load_result(str(folder))
st.subheader("3 · What changed")
request = result.summary.get("changes", {})
st.markdown(f"**{result.cells.n_obs:,}** cells, " + ", ".join(
    f"**{k}** → **{v}**" for k, v in request.items()) + ".")

closeness = result.closeness
if closeness.get("counterfactual"):
    st.caption(f"Real cells in the target context ({', '.join(f'{k} = {v}' for k, v in closeness['target_context'].items())}): "  # noqa: E501
               f"{closeness['n_real_target_cells']:,}. R² of mean expression against them; "
               "the unchanged cells are the baseline.")
    table = pd.DataFrame({
        "counterfactual": closeness["counterfactual"],
        "cells unchanged (baseline)": closeness["unchanged_baseline"],
    }).T[["r2_all", "r2_top_de", "direction_agreement"]]
    table.columns = ["R² all genes", "R² top 100 DE genes", "top DE direction agreement"]
    st.dataframe(table.style.format("{:.3f}"), width="stretch")
elif closeness.get("target_context"):
    st.caption(f"Only {closeness.get('n_real_target_cells', 0)} real cells are in the target "
               "context: too few to say how close the counterfactual lands.")

cols = st.columns([3, 2])
with cols[0]:
    st.caption("UMAP of the chosen cells (grey), their counterfactuals (red) and real cells of "
               "the target context (blue); lines join a cell to its counterfactual.")
    plotly(CF.shift_figure(result.embedding), key="cf_shift")
with cols[1]:
    st.caption("Top changed genes (log2 fold change of mean normalised expression).")
    plotly(CF.top_genes_figure(result.genes), key="cf_top")

top = result.genes.nsmallest(20, "rank").index.tolist()
st.caption("The 20 most changed genes in the same cells, before and as counterfactuals "
           "(log-normalised expression).")
plotly(CF.heatmap_figure(result.cells, top), key="cf_heat")
st.caption("Each head's part in the change (mean output after − before), for the top genes; "
           "fields left unchanged contribute only through the new input.")
plotly(CF.head_contribution_figure(result.heads, top[:12]), key="cf_heads")

st.download_button("Download counterfactual cells (.h5ad)",
                    (folder / "cells.h5ad").read_bytes,
                    file_name=f"counterfactual_{run_key[:8]}_{stored[1]}.h5ad",
                    mime="application/octet-stream", key="cf_download")
st.download_button("Download changed genes (.csv)", result.genes.to_csv().encode(),
                   file_name=f"counterfactual_genes_{stored[1]}.csv", mime="text/csv",
                   key="cf_genes_csv")
