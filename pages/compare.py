"""Compare: synthetic runs against the held-out real donors of the current split — metrics
beside their noise floor, the privacy audit beside the utility numbers, and the pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from engine.evaluate import figures as F
from engine.evaluate.report import not_privacy_sentence
from engine.evaluate.suite import EvaluationResult
from engine.generators.registry import list_generators
from pages._ui import current, job_panel, jobs, page_setup, plotly, require_dataset, workspace

COLOR_CHOICES = {"source": "real / synthetic", "cell_type": "cell type",
                 "condition": "condition", "donor": "donor", "gene": "a gene"}

page_setup("Compare")
st.caption("Synthetic cells are compared with real cells of the **held-out** donors. Beside "
           "every metric stands its noise floor: the same metric between two donor-disjoint "
           "halves of the real held-out cells.")

ws = workspace()
record = require_dataset()
split_id = current("split_id")
split = ws.get_split(split_id) if split_id else None
if split is None or split.dataset_id != record.id:
    st.info(f"Compare needs a split of **{record.name}**: synthetic cells are compared with "
            "its held-out donors, never with the training cells.")
    st.page_link("pages/split.py", label="Make a split", icon=":material/call_split:")
    st.stop()
st.caption(f"Held-out cells: {split.n_test:,} of **{record.name}** ({split.label}).")

runs = {r.key: r for r in ws.list_runs() if r.status == "done" and r.dataset_id == record.id}
if not runs:
    st.info(f"No synthetic runs of **{record.name}** yet.")
    st.page_link("pages/train.py", label="Train a generator", icon=":material/model_training:")
    st.stop()
generator_labels = {g.name: g.label for g in list_generators()}


def run_label(key: str) -> str:
    run = runs[key]
    return f"{generator_labels.get(run.generator, run.generator)} · {key[:8]} " \
           f"({run.privacy_label})"


def evaluation_dir(key: str) -> Path:
    return ws.evaluation_dir(key, split.id)


def is_evaluated(key: str) -> bool:
    return (evaluation_dir(key) / "result.json").exists()


@st.cache_resource(max_entries=8, show_spinner="Reading the evaluation…")
def load_evaluation(folder: str, mtime: float) -> EvaluationResult:
    """Read an evaluation once per file version (shared, read-only: it can be large)."""
    return EvaluationResult.load(Path(folder))


def evaluation(key: str) -> EvaluationResult:
    folder = evaluation_dir(key)
    return load_evaluation(str(folder), (folder / "result.json").stat().st_mtime)


# -- which runs, and evaluating them ---------------------------------------------------------
keys = list(runs)
run_key = current("run_key")
selected = st.multiselect(
    "Runs to compare", keys, default=[run_key] if run_key in runs else keys[:1],
    format_func=run_label, key="compare_runs",
    help="Runs of this dataset. Each is evaluated once per split; the result is stored.",
)
if not selected:
    st.info("Pick one or more runs to compare.")
    st.stop()
for key in selected:
    if runs[key].split_id not in (None, split.id):
        st.warning(f"{run_label(key)} was trained on another split: some of its training "
                   "donors may be among these held-out donors, which flatters its metrics and "
                   "blurs its audit. Evaluate it on its own split for a fair picture.")


def job_key(key: str) -> str:
    return f"evaluate_job.{key}.{split.id}"


def job_active(key: str) -> bool:
    job_id = st.session_state.get(job_key(key))
    job = jobs().get(job_id) if job_id else None
    return job is not None and job.is_active


pending = [k for k in selected if not is_evaluated(k) and not job_active(k)]
if pending:
    st.caption("Not evaluated on this split yet: " + ", ".join(map(run_label, pending)) + ".")
if st.button(f"Evaluate {len(pending)} run{'s' if len(pending) != 1 else ''}",
             type="primary", disabled=not pending, key="evaluate",
             help="Each run is compared with the held-out cells and audited, as a job. "
                  "Results are stored: a run is evaluated once per split."):
    panels = st.session_state.setdefault("compare_jobs", [])
    for key in pending:
        st.session_state[job_key(key)] = jobs().submit(
            "evaluate", {"run_key": key, "split_id": split.id},
            title=f"Evaluate {run_label(key)}",
        )
        if job_key(key) not in panels:
            panels.append(job_key(key))
for state_key in st.session_state.get("compare_jobs", []):
    job_panel(state_key)

evaluated = [k for k in selected if is_evaluated(k)]
if not evaluated:
    st.info("None of the selected runs is evaluated on this split yet: press **Evaluate**.")
    st.stop()
results = {key: evaluation(key) for key in evaluated}

# -- all evaluated runs side by side -----------------------------------------------------------
st.subheader("Key metrics")
short = {k: f"{runs[k].generator} · {k[:8]}" for k in results}
plotly(F.metrics_summary_figure({short[k]: r.metrics for k, r in results.items()}),
       key="summary-chart")

# -- one run in detail ---------------------------------------------------------------------------
st.divider()
key = evaluated[0]
if len(evaluated) > 1:
    key = st.selectbox("Run in detail", evaluated, format_func=run_label,
                       index=evaluated.index(run_key) if run_key in evaluated else 0,
                       key="compare_detail")
result = results[key]
run = runs[key]
provenance = result.provenance
st.subheader(run_label(key))
private = not run.privacy_label.lower().startswith("not")
st.badge(run.privacy_label, color="green" if private else "red",
         icon=":material/lock:" if private else ":material/lock_open:")
counted = {k: f"{provenance[k]:,}" if isinstance(provenance.get(k), int) else "?"
           for k in ("n_synthetic", "n_reference_a", "n_floor_b", "n_genes_compared")}
floor_unit = "donors" if provenance.get("floor_unit") == "donor" else "cells"
st.caption(f"{counted['n_synthetic']} synthetic cells against {counted['n_reference_a']} "
           f"held-out real cells; noise floor: {counted['n_floor_b']} real cells of other "
           f"held-out {floor_unit} · {counted['n_genes_compared']} genes · seed {run.seed}.")
for note in result.notes:
    st.caption(note)

sentence = not_privacy_sentence()
utility, privacy = st.columns(2, gap="large")
with utility:
    st.markdown("#### Utility")
    key_rows = result.metrics[result.metrics["metric"].isin(F.KEY_METRICS)
                              & (result.metrics["group"] == "all")]
    st.dataframe(F.style_metrics(F.metrics_table(key_rows)[["metric", "value", "floor",
                                                            "better", "status"]]),
                 hide_index=True, width="stretch", key="key_metrics")
with privacy:
    st.markdown("#### Privacy audit (membership inference)")
    st.warning(sentence, icon=":material/warning:")
    audit = result.audit
    if audit is None:
        st.info("No audit was run: it needs the training cells of this split.")
    else:
        if audit.feasibility:
            st.info(audit.feasibility)
        if audit.table is not None and not audit.table.empty:
            st.dataframe(F.audit_table(audit.table, compact=True), hide_index=True,
                         width="stretch", key="audit_table")
            with st.expander("Every audit number"):
                st.dataframe(F.audit_table(audit.table), hide_index=True, key="audit_full")
        for note in F.audit_notes(audit, sentence):
            st.caption(note)

st.markdown("#### All metrics")
per_type = st.toggle("Show per-cell-type rows", key="compare_per_type")
groups = None if per_type else ["all", "per-type (weighted)"]
table = F.metrics_table(result.metrics, groups=groups)
st.dataframe(F.style_metrics(table), hide_index=True, width="stretch", key="metrics_table",
             column_config={"description": st.column_config.TextColumn(width="large")})
cols = st.columns(2)
cols[0].download_button("Download metrics (CSV)", result.metrics.to_csv(index=False),
                        file_name=f"metrics_{run.generator}_{key[:8]}_{split.id[:8]}.csv",
                        mime="text/csv", key="download_metrics")
report = evaluation_dir(key) / "report.html"
if report.exists():
    cols[1].download_button("Download report (HTML)", report.read_bytes,
                            file_name=f"report_{run.generator}_{key[:8]}_{split.id[:8]}.html",
                            mime="text/html", key="download_report")

# -- pictures --------------------------------------------------------------------------------
figures = result.figures
tabs = st.tabs(["Joint UMAP", "Distributions", "Mean–variance", "Gene–gene correlation",
                "Markers", "Attack ROC"])
with tabs[0]:
    frame = figures["umap"]
    cols = st.columns([2, 2, 1])
    color = cols[0].selectbox("Colour by", [c for c in COLOR_CHOICES
                                            if c == "gene" or c in frame],
                              format_func=COLOR_CHOICES.get, key="compare_umap_color")
    gene = None
    if color == "gene":
        genes = list(figures.get("umap_genes", []))
        markers = F.marker_genes(figures.get("markers"), n_genes=1)
        gene = cols[1].selectbox("Gene", genes,
                                 index=genes.index(markers[0]) if markers else 0,
                                 key="compare_umap_gene")
    side_by_side = cols[2].toggle("Side by side", key="compare_umap_side")
    umap_key = f"umap-{key}"
    previous = (st.session_state.get(umap_key) or {}).get("selection") or {}
    kept = F.selection_rows(previous.get("points", []))
    keep = np.zeros(len(frame), dtype=bool)
    keep[kept[kept < len(frame)]] = True
    figure, caption = F.umap_figure(
        frame, color="source" if gene else color, side_by_side=side_by_side, keep=keep,
        values=F.umap_gene_values(figures, gene) if gene else None, value_label=gene or "",
    )
    event = plotly(figure, key=umap_key, on_select="rerun", selection_mode=("lasso", "box"))
    st.caption(caption)
    rows = F.selection_rows(event.selection.points) if event else np.arange(0)
    if rows.size:
        counts, composition = F.selection_summary(frame, rows)
        st.markdown(f"Selected: **{counts['real']:,} real** and **{counts['synthetic']:,} "
                    "synthetic** cells.")
        st.dataframe(composition, hide_index=True, key="selection_table")
    else:
        st.caption("Draw a lasso or a box on the UMAP to count the real and synthetic cells "
                   "inside and see their cell types.")
with tabs[1]:
    properties = figures.get("properties_long")
    if properties is None or properties.empty:
        st.info("No data properties were stored with this evaluation.")
    else:
        names = F.overlay_properties(properties)
        name = st.selectbox("Property", names, format_func=F.property_label,
                            index=names.index("library_size") if "library_size" in names else 0,
                            key="compare_property")
        plotly(F.property_overlay(properties, name), key=f"property-{key}")
with tabs[2]:
    plotly(F.mean_variance_figure(figures["mean_variance"]), key=f"mean-variance-{key}")
with tabs[3]:
    plotly(F.corr_heatmaps(figures["gene_corr"]), key=f"corr-{key}")
with tabs[4]:
    n_markers = st.slider("Markers per cell type", 1, 5, 3, key="compare_markers")
    plotly(F.marker_dotplot(figures, n_genes=n_markers), key=f"markers-{key}")
with tabs[5]:
    if result.audit is not None and result.audit.roc:
        plotly(F.audit_roc_figure(result.audit.roc), key=f"roc-{key}")
    else:
        st.info("No attack curves: the audit was not run or not feasible.")
