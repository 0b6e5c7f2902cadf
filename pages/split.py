"""Split: train/test by donor, balanced in cell-type and condition composition."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from engine.data.split import SplitResult
from pages._ui import (
    current,
    job_panel,
    jobs,
    page_setup,
    plotly,
    require_dataset,
    set_current,
    workspace,
)

page_setup("Split")
st.caption("Generators train on the training donors only; every comparison uses the held-out "
           "donors. No donor is ever on both sides.")

ws = workspace()
record = require_dataset()
roles = record.roles
donor_col = roles.get("donor")
if donor_col:
    st.markdown(f"Unit: **donor** (column `{donor_col}`) — a donor-disjoint split.")
else:
    st.warning("This dataset has no donor role, so this is a **cell-level split**: cells of "
               "one donor can be on both sides, which flatters every comparison. Map a donor "
               "column on the Data page if there is one.")
    st.page_link("pages/data.py", label="Map column roles", icon=":material/folder_open:")

obs_columns = [c["column"] for c in ws.dataset_summary(record.id)[0].get("obs_columns", [])]
default_stratify = [c for c in (roles.get("cell_type"), roles.get("condition")) if c]
with st.form("split"):
    cols = st.columns(3)
    test_fraction = cols[0].slider("Test fraction of donors" if donor_col else
                                   "Test fraction of cells", 0.05, 0.5, 0.25, 0.05)
    seed = cols[1].number_input("Seed", min_value=0, value=0, step=1)
    stratify = cols[2].multiselect("Keep the composition of", [c for c in obs_columns
                                                                  if c != donor_col],
                                   default=default_stratify)
    if st.form_submit_button("Make split", type="primary"):
        st.session_state["split_job"] = jobs().submit(
            "split",
            {"dataset_id": record.id, "donor_col": donor_col, "stratify": stratify,
             "test_fraction": float(test_fraction), "seed": int(seed)},
            title=f"Split {record.name}",
        )

job_panel("split_job", on_done=lambda job: set_current(split_id=job.result["split_id"]))

splits = ws.list_splits(record.id)
split_id = current("split_id")
if split_id not in {s.id for s in splits}:
    split_id = splits[0].id if splits else None
if split_id is None:
    st.info("No split of this dataset yet.")
    st.stop()
if len(splits) > 1:
    labels = {s.id: f"{s.label} · test {s.params.get('test_fraction')} · seed "
                    f"{s.params.get('seed')} · {s.id[:8]}" for s in splits}
    split_id = st.selectbox("Split", list(labels), index=list(labels).index(split_id),
                            format_func=labels.get)
    set_current(split_id=split_id)
split = ws.get_split(split_id)

st.subheader(split.label)
cols = st.columns(4)
cols[0].metric("Training cells", f"{split.n_train:,}")
cols[1].metric("Test cells", f"{split.n_test:,}")
cols[2].metric("Training donors", len(split.train_donors) if split.unit == "donor" else "—")
cols[3].metric("Test donors", len(split.test_donors) if split.unit == "donor" else "—")
if split.unit == "donor":
    st.caption(f"Test donors: {', '.join(split.test_donors)}")

obs = ws.load_obs(record.id)
frame = pd.read_csv(ws.split_csv(split.id), dtype=str)
result = SplitResult.from_frame(frame, params=split.params)
if split.unit == "donor":
    per_donor = frame.groupby(["side", "donor"]).size().rename("cells").reset_index()
    figure = px.bar(per_donor, x="donor", y="cells", color="side", title="Cells per donor",
                    category_orders={"side": ["train", "test"]})
    figure.update_xaxes(type="category")  # donor ids are labels even when they look numeric
    plotly(figure, key="donor-bar")
balance = result.balance(obs, columns=[c for c in split.params.get("stratify", []) if c in obs])
for column in [c for c in split.params.get("stratify", []) if c in obs]:
    composition = result.composition(obs, column).reset_index(names=column)
    long = composition.melt(id_vars=column, var_name="side", value_name="fraction")
    figure = px.bar(long, x="side", y="fraction", color=column,
                    title=f"{column} composition per side (total-variation distance "
                          f"{balance.get(column, float('nan')):.3f})")
    plotly(figure, key=f"composition-{column}")
st.download_button("Download split.csv (cell id → side)", ws.split_csv(split.id).read_bytes,
                   file_name=f"split_{split.id}.csv", mime="text/csv")
