"""Privacy: what a private generator may spend, the accountant's total as the settings
move, and the privacy–utility curve as a job. The settings are used by the Train page."""

from __future__ import annotations

import json
from typing import Any

import streamlit as st

from engine.errors import UserFacingError
from engine.generators.base import config_from_dict, privacy_fields
from engine.generators.dp_nmf import STAGES, DPNMFConfig, plan_privacy
from engine.privacy.sweep import curve_figure, curve_frame, list_sweeps, load_sweep
from pages._ui import (
    current,
    job_panel,
    jobs,
    page_setup,
    plotly,
    privacy_settings,
    set_privacy_settings,
    workspace,
)

page_setup("Privacy")
st.caption("Differential privacy (DP) settings of the DP-NMF generator. Every release it makes "
           "is Gaussian noise calibrated to a clipped sum; one accountant (dp-accounting, "
           "privacy-loss distributions) composes them into the total (ε, δ) shown here, "
           "which is also what is stored with the run. The Train page uses these settings.")

FIELDS = {f.name: f for f in privacy_fields(DPNMFConfig)}
STAGE_TEXT = {"nmf": "NMF basis", "kmeans": "k-means", "sampling": "sampling statistics"}
saved = privacy_settings()
# Streamlit drops a widget's state when another page runs: on arrival, restore the settings.
arriving = st.session_state.get("_previous_page") != "Privacy"
for name, spec in FIELDS.items():
    if arriving or f"privacy.{name}" not in st.session_state:
        st.session_state[f"privacy.{name}"] = saved.get(name, spec.default)

ws = workspace()
dataset_id, split_id = current("dataset_id"), current("split_id")
dataset = ws.get_dataset(dataset_id) if dataset_id else None
split = ws.get_split(split_id) if split_id else None
if split is not None and (dataset is None or split.dataset_id != dataset.id):
    split = None
donor_col = (dataset.roles.get("donor") if dataset else None) or None
has_labels = bool(dataset and dataset.roles.get("cell_type"))


def number(name: str, *, fmt: str | None = None, container: Any = st) -> Any:
    """A number input for one privacy field (bounds and help from the config)."""
    spec = FIELDS[name]
    cast = int if spec.kind == "int" else float
    return container.number_input(
        spec.label, min_value=cast(spec.minimum) if spec.minimum is not None else None,
        max_value=cast(spec.maximum) if spec.maximum is not None else None,
        step=cast(spec.step) if spec.step else (1 if cast is int else None),
        format=fmt, help=spec.help, key=f"privacy.{name}")


def choice(name: str, *, container: Any = st, horizontal: bool = False) -> Any:
    """A radio for one privacy field with choices."""
    spec = FIELDS[name]
    return container.radio(spec.label, list(spec.choices), help=spec.help,
                           horizontal=horizontal, key=f"privacy.{name}")


# -- what is protected --------------------------------------------------------------------
st.subheader("What is protected")
units = ["donor", "cell"] if donor_col else ["cell"]
if arriving or "privacy.unit" not in st.session_state:
    st.session_state["privacy.unit"] = saved.get("unit", units[0])
if st.session_state["privacy.unit"] not in units:
    st.session_state["privacy.unit"] = units[0]
cols = st.columns(3)
unit = cols[0].radio("Privacy unit", units, key="privacy.unit", horizontal=True,
                     help="donor: adding or removing one donor's cells changes the output "
                     "distribution by at most the stated (ε, δ); cell: one cell.")
if unit == "donor":
    number("max_cells_per_unit", container=cols[1])
if split is not None:
    n_units = len(split.train_donors) if unit == "donor" else split.n_train
    cols[2].metric(f"Privacy units in the training split ({unit}s)", f"{n_units:,}")
else:
    st.session_state.setdefault("privacy.n_units", 1000)
    n_units = int(cols[2].number_input("Privacy units (no split open)", min_value=1,
                                       step=100, key="privacy.n_units"))
if unit == "donor":
    st.caption(f"Unit: the donor column **{donor_col}**; each donor keeps at most "
               f"{st.session_state['privacy.max_cells_per_unit']} random cells, so one donor "
               "moves every clipped sum by at most that many cells' bounds.")
elif donor_col:
    st.warning("Cell-level DP protects single cells, not donors: a donor's many cells "
               "together are not covered by the ε shown.")

# -- budget --------------------------------------------------------------------------------
st.subheader("Budget")
cols = st.columns([2, 2, 3])
dp = cols[0].selectbox(FIELDS["dp"].label, list(FIELDS["dp"].choices), key="privacy.dp",
                       help=FIELDS["dp"].help)
mode = choice("budget_mode", container=cols[1])
stages = list(STAGES) if dp == "all" else [] if dp == "none" else [dp]
with cols[2]:
    if mode == "total" or not stages:
        st.slider(FIELDS["epsilon_total"].label, 0.1, 20.0, step=0.1,
                  key="privacy.epsilon_total", help=FIELDS["epsilon_total"].help,
                  disabled=not stages)
    else:
        for stage in stages:
            st.slider(FIELDS[f"epsilon_{stage}"].label, 0.05, 10.0, step=0.05,
                      key=f"privacy.epsilon_{stage}", help=FIELDS[f"epsilon_{stage}"].help)
    number("delta", fmt="%.1e")

with st.expander("Clipping bounds, iterations and the DP basis"):
    cols = st.columns(3)
    choice("nmf_dp_method", container=cols[0])
    number("dp_basis_genes", container=cols[0])
    number("kmeans_iterations", container=cols[0])
    number("nmf_dp_steps", container=cols[0])
    number("nmf_dp_learning_rate", container=cols[0])
    number("gradient_clip", container=cols[1])
    number("w_l2_bound", container=cols[1])
    number("profile_l2_bound", container=cols[1])
    number("detection_l2_bound", container=cols[2])
    number("log_library_max", container=cols[2])
    number("target_sum", container=cols[2])
    st.caption("Every bound is a constant chosen before seeing the data: a cell's statistic "
               "is scaled down to it when larger, so one cell (or one donor's capped cells) "
               "can move a released sum by at most the bound (times the cap).")

values = {name: st.session_state[f"privacy.{name}"] for name in FIELDS}
values["unit"] = unit
set_privacy_settings(values)


@st.cache_data(show_spinner="Asking the accountant…", max_entries=256)
def _plan(config_json: str, n_units: int, n_labels: int) -> dict[str, Any]:
    config = config_from_dict(DPNMFConfig, json.loads(config_json))
    return plan_privacy(config, n_units=n_units, n_labels=n_labels).to_dict()


# -- the accountant's total ----------------------------------------------------------------
st.subheader("What the accountant says")
config_values = {k: v for k, v in values.items() if k != "unit"}
if not stages:
    st.error("not private: with DP 'none' the synthetic cells carry no privacy guarantee.")
else:
    try:
        plan = _plan(json.dumps(config_values, sort_keys=True), n_units, int(has_labels))
    except UserFacingError as exc:
        st.error(str(exc))
        st.stop()
    cols = st.columns(4)
    cols[0].metric("Total ε", f"{plan['epsilon']:.3g}")
    cols[1].metric("δ", f"{plan['delta']:.2g}")
    cols[2].metric("Unit", unit)
    cols[3].metric("Releases", sum(r["count"] for r in plan["releases"]))
    if n_units < 100:
        st.warning(f"Only {n_units:,} privacy units: δ = {plan['delta']:.2g} is a large "
                   "chance of failure, and noise big enough to hide one of so few units "
                   "leaves little of the data's signal.")
    st.dataframe(
        {"stage": [STAGE_TEXT[s] for s in plan["stages"]],
         "noise multiplier (σ / sensitivity)": [round(plan["multipliers"][s], 3)
                                                for s in plan["stages"]],
         "ε of this stage alone": [round(plan["stage_epsilon"][s], 3)
                                   for s in plan["stages"]]},
        hide_index=True)
    if dp != "all":
        st.warning(f"Only the {STAGE_TEXT[dp]} is noised: the other stages see the data "
                   "without noise, so the run as a whole is labelled not private.")
    with st.expander("Every release the accountant composes"):
        st.dataframe(plan["releases"], hide_index=True)

# -- privacy-utility curve -----------------------------------------------------------------
st.subheader("Privacy–utility curve")
st.caption("A job trains DP-NMF with these settings at each total ε (and once without DP), "
           "compares each run with the held-out cells (the Compare suite) and audits it with "
           "membership attacks. Each point is a run you can open on the Compare page.")
if split is None:
    st.info("The curve compares with held-out donors: make a split first.")
    st.page_link("pages/split.py", label="Make a split", icon=":material/call_split:")
    st.stop()
with st.form("sweep"):
    epsilons = st.text_input("Total ε values", value="1, 4, 10")
    launch = st.form_submit_button("Run the curve", type="primary", disabled=not stages)
if launch:
    sweep_config = {**config_values, "dp": dp}
    if unit == "cell":
        sweep_config["donor_key"] = ""
    st.session_state["sweep_job"] = jobs().submit(
        "privacy_sweep",
        {"split_id": split.id, "dataset_id": split.dataset_id, "epsilons": epsilons,
         "config": sweep_config, "seed": 0},
        title="Privacy–utility curve")


def _remember(job: Any) -> None:
    st.session_state["sweep_id"] = job.result["sweep_id"]


job_panel("sweep_job", on_done=_remember)
curves = [c for c in list_sweeps(ws) if c["split_id"] == split.id]
if not curves:
    st.info("No curve for this split yet.")
    st.stop()
chosen = st.session_state.get("sweep_id")
curve = (load_sweep(ws, chosen) if chosen else None) or curves[0]
plotly(curve_figure(curve), key="curve")
st.dataframe(curve_frame(curve), hide_index=True)
st.caption(f"Curve {curve['sweep_id']}: DP '{curve['dp']}' on {curve['split_label']}; the "
           "audit AUROC is the strongest of three membership attacks (0.5 means the "
           "attacker learnt nothing about who was in the training data).")
