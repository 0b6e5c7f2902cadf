"""Train: pick a generator from the registry, set its config, launch a run, browse runs."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import streamlit as st

from engine.generators.base import form_fields, privacy_fields
from engine.generators.registry import list_generators
from pages._ui import (
    current,
    job_panel,
    jobs,
    page_setup,
    privacy_settings,
    render_config_form,
    set_current,
    workspace,
)

page_setup("Train")
st.caption("Runs are keyed by a content hash of dataset, split, generator, config and seed: "
           "asking for a run that exists returns it at once.")

ws = workspace()
generators = list_generators()
labels = {g.name: g.label for g in generators}
name = st.selectbox("Generator", list(labels), format_func=labels.get, key="generator")
generator = next(g for g in generators if g.name == name)
st.markdown(generator.description)
st.markdown(" ".join(f"`{label}`" for label in generator.capabilities.as_labels()))

dataset_id = current("dataset_id")
dataset = ws.get_dataset(dataset_id) if dataset_id else None
split_id = current("split_id")
split = ws.get_split(split_id) if split_id else None
if split is not None and (dataset is None or split.dataset_id != dataset.id):
    split = None
needs_data = generator.capabilities.needs_training_data
if needs_data and split is None:
    st.info(f"{generator.label} learns from real cells: it needs a dataset and a split.")
    st.page_link("pages/split.py", label="Make a split", icon=":material/call_split:")
elif split is not None:
    st.caption(f"Training cells: {split.n_train:,} of **{dataset.name}** ({split.label}).")
if needs_data and dataset is not None and not dataset.is_counts:
    st.warning(dataset.counts_message)

private_fields = [f.name for f in privacy_fields(generator.config_class)]
private_values: dict = {}
if private_fields:
    saved = privacy_settings()
    private_values = {k: saved[k] for k in private_fields if k in saved}
    if saved.get("unit") == "cell":
        private_values["donor_key"] = ""  # protect cells even when a donor column exists
    dp_choice = private_values.get("dp", "none")
    budget = (f"total ε {private_values.get('epsilon_total', 4.0):g}"
              if private_values.get("budget_mode", "total") == "total" else "ε per stage")
    st.info(f"Privacy: DP **{dp_choice}**" + (f", {budget}, unit {saved.get('unit', 'donor')}"
                                              if dp_choice != "none" else " (not private)")
            + ". Set on the Privacy page.")
    st.page_link("pages/privacy.py", label="Privacy settings", icon=":material/shield_lock:")

with st.form("train"):
    values = render_config_form(form_fields(generator.config_class), key=f"cfg.{name}")
    cols = st.columns(2)
    seed = cols[0].number_input("Seed", min_value=0, value=0, step=1)
    n_cells = cols[1].number_input("Synthetic cells (0: as many as the training cells)",
                                   min_value=0, value=0, step=100)
    launch = st.form_submit_button("Launch run", type="primary",
                                   disabled=needs_data and split is None)
if launch:
    st.session_state["train_job"] = jobs().submit(
        "train",
        {"generator": name, "config": {**values, **private_values}, "seed": int(seed),
         "dataset_id": dataset.id if dataset else None,
         "split_id": split.id if split else None, "n_cells": int(n_cells) or None},
        title=f"Train {generator.label}",
    )

job_panel("train_job", on_done=lambda job: set_current(run_key=job.result["run_key"]))

st.subheader("Runs")
runs = ws.list_runs()
if not runs:
    st.info("No runs yet.")
    st.stop()
table = pd.DataFrame(
    {
        "run": [r.key for r in runs],
        "generator": [labels.get(r.generator, r.generator) for r in runs],
        "settings": [", ".join(f"{k}={v}" for k, v in list(r.config.items())[:4]) for r in runs],
        "privacy": [r.privacy_label for r in runs],
        "status": [r.status for r in runs],
        "cells": [r.n_cells for r in runs],
        "seconds": [r.duration_s for r in runs],
        "size (MB)": [round(r.size_bytes / 1e6, 2) for r in runs],
        "created": [dt.datetime.fromtimestamp(r.created).strftime("%Y-%m-%d %H:%M") for r in runs],
    }
)
event = st.dataframe(table, hide_index=True, width="stretch", on_select="rerun",
                     selection_mode="single-row", key="runs_table")
selected = event.selection.rows if event and event.selection else []
run = runs[selected[0]] if selected else next((r for r in runs if r.key == current("run_key")),
                                              runs[0])
st.markdown(f"Selected run `{run.key}` ({labels.get(run.generator, run.generator)}, "
            f"{run.n_cells:,} cells × {run.n_genes:,} genes, {run.privacy_label}).")
cols = st.columns(3)
cols[2].page_link("pages/compare.py", label="Compare with held-out cells",
                  icon=":material/compare:")
if cols[0].button("Open as the current synthetic dataset", key="open_run",
                  disabled=current("run_key") == run.key):
    set_current(run_key=run.key)
    st.rerun()
path = ws.synthetic_path(run.key)
if path.exists():
    # A callable defers reading the file until the button is clicked.
    cols[1].download_button("Download synthetic .h5ad", path.read_bytes,
                            file_name=f"synthetic_{run.generator}_{run.key[:8]}.h5ad",
                            mime="application/octet-stream", key="download_run")
