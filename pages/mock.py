"""Mock data: configure a multimodal scenario, generate it as a job, preview, make it current."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from engine.evaluate.display import downsample_for_display, observed_modalities
from engine.generators.base import config_fields
from engine.generators.mock import SCENARIO_DESCRIPTIONS, MockConfig
from pages._ui import (
    current,
    job_panel,
    jobs,
    page_setup,
    plotly,
    render_config_form,
    set_current,
    workspace,
)

page_setup("Mock data")
st.caption("Simulated cells with known truth: latent clusters drive RNA counts (negative "
           "binomial), ATAC peaks (logistic Bernoulli) and ADT proteins (log-normal); a "
           "scenario then hides modalities. Uses no real data.")

ws = workspace()
with st.form("mock"):
    values = render_config_form(config_fields(MockConfig), key="mock")
    submitted = st.form_submit_button("Generate", type="primary")
scenario = values.get("problem_type")
if scenario in SCENARIO_DESCRIPTIONS:
    st.caption(f"**{scenario}**: {SCENARIO_DESCRIPTIONS[scenario]}")
if submitted:
    st.session_state["mock_job"] = jobs().submit(
        "mock_dataset", values, title=f"Mock data: {scenario}"
    )
    st.session_state["mock_dataset"] = None

job_panel("mock_job", on_done=lambda job: st.session_state.update(
    mock_dataset=job.result["dataset_id"]))

mock_ids = [r.id for r in ws.list_datasets() if r.origin == "mock"]
dataset_id = st.session_state.get("mock_dataset") or (mock_ids[0] if mock_ids else None)
if dataset_id is None:
    st.info("Generate a scenario to preview it.")
    st.stop()
if len(mock_ids) > 1:
    names = {i: ws.get_dataset(i).name for i in mock_ids}
    dataset_id = st.selectbox("Preview", mock_ids, index=mock_ids.index(dataset_id)
                              if dataset_id in mock_ids else 0, format_func=names.get)
record = ws.get_dataset(dataset_id)
obs = ws.load_obs(dataset_id)
umap = ws.load_obsm(dataset_id, "X_umap")
st.subheader(record.name)
cols = st.columns(4)
cols[0].metric("Cells", f"{record.n_cells:,}")
cols[1].metric("Genes", f"{record.n_genes:,}")
modalities = observed_modalities(obs)
counts = modalities.value_counts()
cols[2].metric("Modality combinations", len(counts))
cols[3].metric("Clusters", obs["cluster"].nunique() if "cluster" in obs else "—")
st.dataframe(counts.rename("cells").rename_axis("observed modalities").reset_index(),
             hide_index=True)
if umap is not None:
    frame = pd.DataFrame({"UMAP 1": umap[:, 0], "UMAP 2": umap[:, 1],
                          "cluster": obs["cluster"].astype(str).to_numpy(),
                          "observed modalities": modalities.astype(str).to_numpy()})
    rows = downsample_for_display(frame["cluster"])
    if len(rows) < len(frame):
        st.caption(f"Showing {len(rows):,} of {len(frame):,} cells (stratified by cluster).")
    frame = frame.iloc[rows]
    left, right = st.columns(2)
    for column, colour in ((left, "cluster"), (right, "observed modalities")):
        with column:
            figure = px.scatter(frame, x="UMAP 1", y="UMAP 2", color=colour,
                                title=f"UMAP of the complete RNA profiles, by {colour}",
                                category_orders={colour: sorted(frame[colour].unique())},
                                render_mode="webgl")
            figure.update_traces(marker=dict(size=3))
            plotly(figure, key=f"umap-{colour}")
is_current = current("dataset_id") == dataset_id
if st.button("Make it the current dataset", disabled=is_current, key="mock_make_current"):
    set_current(dataset_id=dataset_id, split_id=None)
    st.rerun()
if is_current:
    st.caption("This is the current dataset.")
