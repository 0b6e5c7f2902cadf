"""Design: cells steered toward a target phenotype (genes up or down) by a conditional diffusion
model, with how well they meet it and how real they stay; and denoising of real cells."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from engine.errors import UserFacingError
from engine.evaluate import design_figures as DF
from engine.evaluate.design import DesignResult, design_embedding_figure, violin_figure
from engine.generators.diffusion import DesignTarget
from engine.generators.registry import list_generators
from engine.tasks import load_model
from pages._ui import current, job_panel, jobs, page_setup, plotly, require_dataset, workspace

ANY = "(any)"
SCALE = 1.0  # the guidance strength the page starts from; labels name only other strengths

page_setup("Design")
st.caption("A conditional diffusion model generates cells; inverse design adds, at every "
           "denoising step, a push toward the genes you ask up or down (each by a number of "
           "standard deviations of the starting population). The same model denoises real "
           "cells: noised part of the way, then brought back in their own contexts.")

ws = workspace()
record = require_dataset()
capable = {g.name: g.label for g in list_generators() if g.capabilities.inverse_design}
runs = {r.key: r for r in ws.list_runs()
        if r.status == "done" and r.dataset_id == record.id and r.generator in capable}
if not runs:
    st.info(f"No diffusion model of **{record.name}** yet: train a "
            f"{' or '.join(capable.values())} on the Train page.")
    st.page_link("pages/train.py", label="Train a model", icon=":material/model_training:")
    st.stop()

keys = list(runs)
run_key = st.selectbox(
    "Model", keys, index=keys.index(current("run_key")) if current("run_key") in keys else 0,
    format_func=lambda k: f"{capable[runs[k].generator]} · {k[:8]} "
                          f"({runs[k].config.get('train_steps', '?')} steps)", key="dz_run")


@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def cached_model(key: str, root: str) -> Any:
    """The fitted model of a run, loaded once per process (read-only)."""
    return load_model(ws, key)


@st.cache_data(max_entries=4, show_spinner=False)
def dataset_obs(dataset_id: str) -> pd.DataFrame:
    return ws.load_obs(dataset_id)


@st.cache_resource(max_entries=8, show_spinner="Reading the design…")
def load_design(path: str) -> DesignResult:
    return DesignResult.load(Path(path))


@st.cache_resource(max_entries=8, show_spinner="Reading the denoised cells…")
def load_denoised(path: str) -> tuple[dict[str, Any], pd.DataFrame]:
    folder = Path(path)
    return (json.loads((folder / "summary.json").read_text()),
            pd.read_parquet(folder / "embedding.parquet"))


def stored_results(kind: str) -> dict[str, dict[str, Any]]:
    """{result id: summary} of the chosen run's stored results of ``kind`` ("designs" or
    "denoised"), newest first."""
    return ws.stored_results(run_key, kind)


def choose_stored(kind: str, label: str, state_key: str, result_key: str,
                  describe: Any) -> str | None:
    """A selectbox of the run's stored results of ``kind`` (newest first), defaulting to the
    one this session made last (``st.session_state[result_key]``), else the newest; return
    the chosen id, or None when the run has none."""
    summaries = stored_results(kind)
    if not summaries:
        return None
    ids = list(summaries)
    key = f"{state_key}.{run_key}"
    if st.session_state.get(key) not in ids:
        made = st.session_state.get(result_key) or (None, None)
        st.session_state[key] = made[1] if made[0] == run_key and made[1] in ids else ids[0]
    return st.selectbox(label, ids, key=key, format_func=lambda i: describe(summaries[i]),
                        help="Every result of this model stays in the workspace; newest first.")


def design_label(summary: dict[str, Any]) -> str:
    """E.g. "ISG15 ↑1.5, CCL2 ↓1 · CD14+ Monocytes · 120 cells" (from the stored request)."""
    request = summary.get("request", {})
    strength, strengths = request.get("strength", 1.0), request.get("strengths", {})
    moves = ([f"{g} ↑{strengths.get(g, strength):g}" for g in request.get("up", [])]
             + [f"{g} ↓{strengths.get(g, strength):g}" for g in request.get("down", [])])
    start = ", ".join(map(str, request.get("start", {}).values())) or "any start"
    parts = [", ".join(moves) or "no target", start,
             f"{summary.get('n_cells', request.get('n_cells', 0)):,} cells"]
    if request.get("scale") is not None and request["scale"] != SCALE:
        parts.append(f"guidance {request['scale']:g}")
    if request.get("guidance") is not None:
        parts.append(f"classifier-free {request['guidance']:g}")
    if request.get("seed", 0):
        parts.append(f"seed {request['seed']}")
    return " · ".join(parts)


def denoise_label(summary: dict[str, Any]) -> str:
    """E.g. "B cells, CD14+ Monocytes · strength 0.3 · 1,234 cells"."""
    request = summary.get("request", {})
    values = [str(v) for chosen in request.get("selection", {}).values() for v in chosen]
    what = (", ".join(values[:3]) + (f" +{len(values) - 3} more" if len(values) > 3 else "")
            if values else "all cells")
    parts = [what, f"strength {summary.get('strength', request.get('strength', 0)):g}",
             f"{summary.get('n_cells', 0):,} cells"]
    if request.get("seed", 0):
        parts.append(f"seed {request['seed']}")
    return " · ".join(parts)


try:
    model = cached_model(run_key, str(ws.root))
    gene_names = [str(g) for g in model.gene_names]
except UserFacingError as exc:
    st.error(str(exc))
    st.stop()
fields = list(model.categories)

with st.expander("What the model learnt"):
    config = model.config
    st.caption(f"{len(gene_names):,} highly variable genes, diffused as **{config.space}**; "
               f"{config.timesteps:,} diffusion steps, {config.sampler.upper()} sampling in "
               f"{config.sampling_steps} steps; conditioned on "
               f"{', '.join(fields) or 'nothing'}. Privacy: **{model.privacy_label}**. "
               "Training loss (noise-prediction error) per step:")
    plotly(DF.loss_figure(model.history_frame()), key="dz_loss")


def fmt_share(value: float | None) -> str:
    return "—" if value is None or pd.isna(value) else f"{value:.1%}"


def fmt_number(value: float | None, digits: int = 3) -> str:
    return "—" if value is None or pd.isna(value) else f"{value:.{digits}f}"


# -- design -----------------------------------------------------------------------------------
def design_panel() -> None:
    st.subheader("1 · Target phenotype")
    genes = st.multiselect("Genes to move", gene_names, key="dz_genes",
                           placeholder="type gene names",
                           help="Only the genes the model includes can be chosen.")
    strengths: dict[str, float] = {}
    if genes:
        st.caption("Per gene: how many standard deviations of the starting population to move "
                   "it; right is up, left is down, 0 ignores the gene.")
        cols = st.columns(min(3, len(genes)))
        for i, gene in enumerate(genes):
            value = cols[i % len(cols)].slider(gene, -3.0, 3.0, 0.0, 0.1,
                                               key=f"dz_strength.{gene}")
            if value != 0:
                strengths[gene] = float(value)
    up = [g for g, v in strengths.items() if v > 0]
    down = [g for g, v in strengths.items() if v < 0]

    st.subheader("2 · Start from")
    start: dict[str, str] = {}
    if fields:
        cols = st.columns(len(fields))
        for col, field_name in zip(cols, fields, strict=True):
            choice = col.selectbox(field_name, [ANY, *model.categories[field_name]],
                                   key=f"dz_start.{field_name}")
            if choice != ANY:
                start[field_name] = choice
    cols = st.columns(3)
    n_cells = cols[0].number_input("Designed cells", min_value=10, max_value=100_000,
                                   value=500, step=50, key="dz_n")
    scale = cols[1].slider("Guidance strength", 0.0, 2.0, SCALE, 0.05, key="dz_scale",
                           help="Share of each gene's remaining shortfall the push closes at "
                                "each denoising step (0: the starting population itself).")
    seed = cols[2].number_input("Seed", min_value=0, value=0, step=1, key="dz_seed")

    problem = None
    if strengths:
        try:
            DesignTarget.from_lists(up, down, 1.0, {g: abs(v) for g, v in strengths.items()})
            model.gene_positions(list(strengths))
        except UserFacingError as exc:
            problem = str(exc)
    go = st.button("Design cells", type="primary", key="dz_go",
                   disabled=not strengths or problem is not None)
    if not strengths:
        st.caption("Pick genes and move at least one slider away from 0.")
    if problem:
        st.error(problem)
    if go:
        params = {"run_key": run_key, "up": up, "down": down,
                  "strengths": {g: abs(v) for g, v in strengths.items()}, "start": start,
                  "n_cells": int(n_cells), "scale": float(scale), "seed": int(seed)}
        title = "Design " + ", ".join(f"{g} {'↑' if v > 0 else '↓'}{abs(v):g}"
                                      for g, v in strengths.items())
        st.session_state["dz_job"] = jobs().submit("design", params, title=title)

    def remember(job: Any) -> None:
        made = (job.result["run_key"], job.result["design_id"])
        st.session_state["dz_result"] = made
        st.session_state[f"dz_stored.{made[0]}"] = made[1]  # show it (before the selectbox)

    job_panel("dz_job", on_done=remember)
    design_results()


def design_results() -> None:
    """The report of a stored design of the chosen run (they outlive the session)."""
    if not stored_results("designs"):
        return
    st.subheader("3 · The designed cells")
    design_id = choose_stored("designs", "Stored designs", "dz_stored", "dz_result",
                              design_label)
    folder = ws.evaluation_dir(run_key, design_id, kind="designs")
    try:
        result = load_design(str(folder))
    except (OSError, ValueError):
        st.warning("That design is no longer readable in the workspace; make it again.")
        return
    summary = result.summary
    request = summary.get("request", {})
    target = summary.get("target", {})
    wanted = ", ".join(f"**{g}** {'↑' if d > 0 else '↓'} {s:g} sd" for g, d, s in zip(
        target.get("genes", []), target.get("directions", []), target.get("strengths", []),
        strict=False))
    context = ", ".join(f"{k} = {v}" for k, v in summary.get("start", {}).items()) or "any"
    st.markdown(f"**{summary['n_cells']:,}** cells toward {wanted}; starting context: "
                f"{context}; guidance strength {request.get('scale', '?')}.")

    share, start_share = summary["share_meeting_all"], summary["share_start_meeting_all"]
    cols = st.columns(3)
    cols[0].metric("Cells meeting every target", fmt_share(share),
                   delta=f"{share - start_share:+.1%} vs. start")
    cols[1].metric("Nearest-real distance ratio", fmt_number(summary.get("nn_distance_ratio"), 2))
    cols[2].metric("… of the starting cells",
                   fmt_number(summary.get("nn_distance_ratio_start"), 2))
    st.caption(f"**{fmt_share(share)}** of the designed cells meet every requested gene's "
               f"target; the starting population (same noise, no target): "
               f"**{fmt_share(start_share)}**. A gene meets its target in a cell when it lies "
               "at least its strength in sds of the starting population beyond that "
               "population's mean (a gene sent down also meets it at zero).")
    if summary.get("nn_distance_ratio") is not None:
        st.caption("The distance ratio is a cell's median distance to its nearest real cell "
                   "over real cells' median distance to their nearest other real cell: near 1, "
                   "the cells sit as close to real cells as real cells do to each other; far "
                   "above 1, they lie off the real data.")

    table = result.genes.rename(columns={
        "strength_sd": "strength (sd)", "start_mean": "start mean", "designed_mean":
        "designed mean", "shift_sd": "shift (sd)", "share_meeting": "share meeting"})
    st.dataframe(table.style.format({"strength (sd)": "{:.2f}", "start mean": "{:.3f}",
                                     "designed mean": "{:.3f}", "shift (sd)": "{:+.2f}",
                                     "share meeting": "{:.1%}"}),
                 hide_index=True, width="stretch")

    if not result.cell_types.empty:
        st.caption(
            "Cell types a classifier of real cells assigns to the starting and designed cells."
            + (f" Most designed cells: **{summary['top_assigned_type']}** "
               f"({summary['share_top_assigned_type']:.0%})." if "top_assigned_type" in summary
               else "")
            + (f" Still assigned to the starting type: "
               f"**{summary['share_assigned_start_type']:.0%}**."
               if "share_assigned_start_type" in summary else ""))
        plotly(DF.cell_type_figure(result.cell_types), key="dz_types")
    if not result.violins.empty:
        st.caption("Expression of the requested genes: starting, designed and real cells "
                   "(log-normalised).")
        plotly(violin_figure(result.violins), key="dz_violins")
    if not result.embedding.empty:
        options = ["group", "cell_type",
                   *[g for g in target.get("genes", []) if g in result.embedding]]
        if st.session_state.get("dz_color") not in options:  # a gene of another design
            st.session_state.pop("dz_color", None)
        color = st.selectbox("Colour the UMAP by", options, key="dz_color",
                             format_func=lambda c: {"group": "real / start / designed",
                                                    "cell_type": "cell type"}.get(c, c))
        st.caption("UMAP of real cells with the starting and designed cells, in the real "
                   "cells' principal components.")
        plotly(design_embedding_figure(result.embedding, color=color), key="dz_umap")
    st.caption(f"Privacy of the designed cells: **{summary.get('privacy_label', '?')}**.")
    st.download_button("Download designed cells (.h5ad)",
                       (folder / "designed.h5ad").read_bytes,
                       file_name=f"designed_{run_key[:8]}_{design_id}.h5ad",
                       mime="application/octet-stream", key="dz_download")


# -- denoise ----------------------------------------------------------------------------------
def denoise_panel() -> None:
    obs = dataset_obs(record.id)
    column = record.roles.get("cell_type")
    if not column or column not in obs:
        column = next((f for f in fields if f in obs), None)
    selection: dict[str, list[str]] = {}
    if column:
        values = sorted(map(str, obs[column].dropna().unique()))
        chosen = st.multiselect(f"Cells to denoise ({column})", values, key="dn_types",
                                placeholder="all cells")
        if chosen:
            selection[column] = chosen
        n_chosen = int(obs[column].astype(str).isin(chosen).sum()) if chosen else len(obs)
    else:
        st.caption("The dataset has no cell-type column: all cells are denoised.")
        n_chosen = len(obs)
    cols = st.columns(2)
    strength = cols[0].slider("Strength (share of the noising process)", 0.05, 1.0, 0.2, 0.05,
                              key="dn_strength",
                              help="Cells are noised to this share of the diffusion steps, "
                                   "then denoised; higher: more smoothing, less of the cell.")
    max_cells = cols[1].number_input("Cells at most", min_value=50, max_value=100_000,
                                     value=2000, step=500, key="dn_max")
    st.caption(f"**{n_chosen:,}** cells chosen (at most {int(max_cells):,} are used, chosen at "
               "random; cells without counts are left out).")
    if st.button("Denoise", type="primary", key="dn_go", disabled=n_chosen == 0):
        params = {"run_key": run_key, "selection": selection, "strength": float(strength),
                  "max_cells": int(max_cells), "seed": 0}
        what = ", ".join(selection.get(column, [])) if column else ""
        st.session_state["dn_job"] = jobs().submit(
            "denoise", params, title=f"Denoise {what or 'all cells'} (strength {strength:g})")

    def remember(job: Any) -> None:
        made = (job.result["run_key"], job.result["denoise_id"])
        st.session_state["dn_result"] = made
        st.session_state[f"dn_stored.{made[0]}"] = made[1]  # show it (before the selectbox)

    job_panel("dn_job", on_done=remember)
    denoise_results()


def denoise_results() -> None:
    """The report of a stored denoising of the chosen run (they outlive the session)."""
    denoise_id = choose_stored("denoised", "Stored denoisings", "dn_stored", "dn_result",
                               denoise_label)
    if denoise_id is None:
        return
    folder = ws.evaluation_dir(run_key, denoise_id, kind="denoised")
    try:
        summary, embedding = load_denoised(str(folder))
    except (OSError, ValueError):
        st.warning("That denoising is no longer readable in the workspace; make it again.")
        return
    st.markdown(f"**{summary['n_cells']:,}** cells noised to step **{summary['step']}** of "
                f"{summary['timesteps']} (strength {summary['strength']:g}), then denoised in "
                "their own contexts.")
    cols = st.columns(4)
    zero_before, zero_after = summary["zero_share_observed"], summary["zero_share_denoised"]
    cols[0].metric("Zero entries · observed", fmt_share(zero_before))
    cols[1].metric("Zero entries · denoised", fmt_share(zero_after),
                   delta=f"{zero_after - zero_before:+.1%}", delta_color="off")
    sil_before, sil_after = summary.get("silhouette_observed"), summary.get("silhouette_denoised")
    cols[2].metric("Cell-type silhouette · observed", fmt_number(sil_before))
    cols[3].metric("Cell-type silhouette · denoised", fmt_number(sil_after),
                   delta=(f"{sil_after - sil_before:+.3f}" if sil_before is not None
                          and sil_after is not None and not pd.isna(sil_after - sil_before)
                          else None))
    st.caption("Zero entries: share of the cells' genes at zero before and after. Silhouette: "
               "how well the cell types separate in the observed cells' principal components "
               "(−1 to 1, higher: better separated; undefined for one type).")
    markers = [m for m in summary.get("marker_genes", []) if m in embedding]
    if st.session_state.get("dn_color") not in ["cell_type", *markers]:
        st.session_state.pop("dn_color", None)
    color = st.selectbox("Colour the UMAPs by", ["cell_type", *markers], key="dn_color",
                         format_func=lambda c: "cell type" if c == "cell_type" else c)
    st.caption("One UMAP of the cells before (left) and after (right) denoising.")
    plotly(DF.denoise_embedding_figure(embedding, color=color), key="dn_umap")
    if markers:
        st.caption(f"Marker genes of the cell types ({', '.join(markers)}), observed vs "
                   "denoised, in the same cells.")
        plotly(DF.marker_figure(embedding, markers), key="dn_markers")
    st.download_button("Download denoised cells (.h5ad)",
                       (folder / "denoised.h5ad").read_bytes,
                       file_name=f"denoised_{run_key[:8]}_{denoise_id}.h5ad",
                       mime="application/octet-stream", key="dn_download")


design_tab, denoise_tab = st.tabs(["Design cells", "Denoise real cells"])
with design_tab:
    design_panel()
with denoise_tab:
    denoise_panel()
