"""Data: open a dataset (sample, upload, path), see what it holds, map column roles."""

from __future__ import annotations

import uuid

import pandas as pd
import plotly.express as px
import streamlit as st

from engine.data.catalog import list_datasets
from engine.data.roles import ROLES, check_role_mapping
from engine.errors import DataError
from engine.evaluate.display import histogram_table
from pages._ui import current, job_panel, jobs, page_setup, plotly, set_current, workspace

page_setup("Data")
st.caption("Open a count matrix, check it, and tell the studio which columns are donors, "
           "cell types, conditions and batches.")

ws = workspace()


def open_path(path: str, *, name: str | None = None, delete_source: bool = False,
              cells_as_columns: bool = False, make_unique: bool = False,
              source: str | None = None) -> None:
    params = {"path": path, "name": name, "delete_source": delete_source,
              "cells_as_columns": cells_as_columns, "make_unique": make_unique,
              "source": source}
    st.session_state["data_job"] = jobs().submit(
        "import_dataset", params, title=f"Open {name or path}"
    )


def on_opened(record) -> None:
    set_current(dataset_id=record.result["dataset_id"], split_id=None)


def retry_unique(record) -> None:
    params = dict(record.params, make_unique=True)
    st.session_state["data_job"] = jobs().submit(
        "import_dataset", params, title=f"{record.title} (names made unique)"
    )
    st.rerun()


sample_tab, upload_tab, path_tab, stored_tab = st.tabs(
    ["Sample data", "Upload", "Path on the server", "In the workspace"]
)
cells_as_columns_help = "For CSV/TSV tables whose columns are cells and rows are genes."

with sample_tab:
    catalog = list_datasets()
    if not catalog:
        st.info("No sample datasets found. `make run` creates them in sample_data/.")
    else:
        labels = [f"{e.label}  ({e.size_mb:.1f} MB)" for e in catalog]
        choice = st.selectbox("Dataset", range(len(catalog)), format_func=lambda i: labels[i],
                              key="sample_choice")
        if st.button("Open sample", type="primary", key="open_sample"):
            entry = catalog[choice]
            open_path(str(entry.path), name=entry.label)

with upload_tab:
    limit = st.get_option("server.maxUploadSize")
    st.caption(
        f"`.h5ad`, zipped `.zarr` or 10x folder, 10x `.h5`, `.mtx` zip, CSV/TSV (optionally "
        f".gz), or a zip of `.npz` chunks with their metadata. Up to {limit} MB; larger files: "
        "open them by path in the next tab."
    )
    upload_orientation = st.checkbox("Cells are columns", key="upload_cells_as_columns",
                                     help=cells_as_columns_help)
    uploaded = st.file_uploader("Count matrix", key="uploader",
                                help=f"Files over {limit} MB: use 'Path on the server'.")
    if uploaded is not None and st.button("Open upload", type="primary", key="open_upload"):
        folder = ws.uploads_dir / uuid.uuid4().hex
        folder.mkdir(parents=True)
        target = folder / uploaded.name
        target.write_bytes(uploaded.getbuffer())
        open_path(str(target), name=uploaded.name, delete_source=True,
                  cells_as_columns=upload_orientation, source=f"upload: {uploaded.name}")

with path_tab:
    path_text = st.text_input("File or folder on the server", key="server_path",
                              placeholder="/data/my_study/filtered_feature_bc_matrix")
    path_orientation = st.checkbox("Cells are columns", key="path_cells_as_columns",
                                   help=cells_as_columns_help)
    if st.button("Open path", type="primary", key="open_path") and path_text.strip():
        open_path(path_text.strip(), cells_as_columns=path_orientation)

with stored_tab:
    stored = ws.list_datasets()
    if stored:
        names = {r.id: f"{r.name} · {r.n_cells:,} × {r.n_genes:,} · {r.id[:8]}" for r in stored}
        chosen = st.selectbox("Stored datasets", list(names), format_func=names.get,
                              key="stored_choice")
        if st.button("Make current", key="make_current"):
            set_current(dataset_id=chosen, split_id=None)
            st.rerun()
    else:
        st.caption("Nothing stored yet.")

job_panel("data_job", on_done=on_opened, retry=retry_unique)

dataset_id = current("dataset_id")
record = ws.get_dataset(dataset_id) if dataset_id else None
if record is None:
    st.info("Open a dataset above to see its summary.")
    st.stop()

st.header(record.name)
summary, qc = ws.dataset_summary(record.id)
cols = st.columns(4)
cols[0].metric("Cells", f"{record.n_cells:,}")
cols[1].metric("Genes", f"{record.n_genes:,}")
cols[2].metric("Zeros", f"{summary.get('sparsity', float('nan')) * 100:.1f} %")
cols[3].metric("Raw counts", "yes" if record.is_counts else "no")
if record.is_counts:
    st.caption(record.counts_message)
else:
    st.warning(record.counts_message)

if qc is not None:
    hist_cols = st.columns(3)
    panels = [("library_size", "Library size (counts per cell)"),
              ("n_detected", "Detected genes per cell"),
              ("mito_fraction", "Mitochondrial fraction")]
    for column, (name, title) in zip(hist_cols, panels, strict=True):
        with column:
            if name in qc:
                bars = histogram_table(qc[name].to_numpy())
                figure = px.bar(bars, x="centre", y="cells", title=title,
                                hover_data={"left": ":.3g", "right": ":.3g"})
                figure.update_traces(width=float((bars["right"] - bars["left"]).mean()))
                figure.update_layout(height=280, margin=dict(l=10, r=10, t=40, b=10),
                                     showlegend=False, xaxis_title=name, bargap=0)
                plotly(figure, key=f"hist-{name}")
            else:
                st.caption(f"{title}: no mitochondrial genes (MT-/mt-) in this dataset.")

obs_columns = pd.DataFrame(summary.get("obs_columns", []))
st.subheader("Cell metadata")
if obs_columns.empty:
    st.caption("This dataset has no cell metadata columns.")
else:
    st.dataframe(obs_columns, hide_index=True, width="stretch")

st.subheader("Column roles")
st.caption("Downstream steps use roles, not your column names. The donor role decides the "
           "unit of privacy and the train/test split.")
options = ["—"] + (obs_columns["column"].tolist() if not obs_columns.empty else [])
with st.form("roles"):
    role_cols = st.columns(len(ROLES))
    chosen_roles = {}
    for column, role in zip(role_cols, ROLES, strict=True):
        guess = record.roles.get(role)
        chosen = column.selectbox(role.replace("_", " "), options,
                                  index=options.index(guess) if guess in options else 0,
                                  key=f"role-{record.id}-{role}")
        chosen_roles[role] = None if chosen == "—" else chosen
    if st.form_submit_button("Save roles"):
        try:
            check_role_mapping(chosen_roles, options[1:])
        except DataError as error:
            st.error(str(error))
        else:
            record = ws.set_roles(record.id, chosen_roles)
            st.success("Roles saved with the dataset.")
if not record.roles.get("donor"):
    st.caption("No donor column: splits will be cell-level and labelled so.")
