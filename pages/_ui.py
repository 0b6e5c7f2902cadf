"""Widgets shared by the pages: current selections, job panels, config forms, figure export.

No science here: everything computed comes from ``engine``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd
import streamlit as st

from engine.generators.base import FieldSpec
from engine.jobs import JobManager, JobRecord, get_manager
from engine.store import Workspace

EXPORT_FORMATS = ("png", "svg")


@st.cache_resource
def _workspace(root: str | None) -> Workspace:
    workspace = Workspace(root)
    workspace.clean_scratch(older_than_s=24 * 3600)  # leftovers of crashed writers, once
    return workspace


def workspace() -> Workspace:
    """Return the workspace of this app process."""
    from engine.settings import workspace_root

    return _workspace(str(workspace_root()))


def jobs() -> JobManager:
    """Return the job manager of the workspace (one per app process)."""
    return get_manager(workspace())


def current(kind: str) -> str | None:
    """Return the current ``dataset_id`` / ``split_id`` / ``run_key`` of this browser session,
    falling back to the workspace's last selection (so a reload finds it again)."""
    if kind not in st.session_state:
        st.session_state[kind] = workspace().state().get(kind)
    return st.session_state.get(kind)


def set_current(**values: str | None) -> None:
    """Set this session's current selections and remember them in the workspace."""
    for key, value in values.items():
        st.session_state[key] = value
    workspace().set_state(**values)


def privacy_settings() -> dict[str, Any]:
    """Return the Privacy page's settings of this session, falling back to the workspace's
    last ones (so they survive a page change and a reload)."""
    if "privacy_settings" not in st.session_state:
        st.session_state["privacy_settings"] = dict(
            workspace().state().get("privacy_settings") or {})
    return st.session_state["privacy_settings"]


def set_privacy_settings(values: dict[str, Any]) -> None:
    """Remember the Privacy page's settings for this session and in the workspace."""
    if values != st.session_state.get("privacy_settings"):
        st.session_state["privacy_settings"] = dict(values)
        workspace().set_state(privacy_settings=dict(values))


def require_dataset() -> Any:
    """Return the current dataset record, or say what is missing and stop the page."""
    ws = workspace()
    dataset_id = current("dataset_id")
    record = ws.get_dataset(dataset_id) if dataset_id else None
    if record is None:
        st.info("No dataset is open yet.")
        st.page_link("pages/data.py", label="Open a dataset on the Data page",
                     icon=":material/folder_open:")
        st.stop()
    return record


# The steps, in order: (file, title, icon). app.py registers them with st.navigation; every
# page draws the same links itself, so a page opened by a deep link (which Streamlit runs
# without app.py because the folder is called pages/) looks and works the same.
PAGES = (
    ("pages/data.py", "Data", ":material/folder_open:"),
    ("pages/split.py", "Split", ":material/call_split:"),
    ("pages/mock.py", "Mock data", ":material/science:"),
    ("pages/privacy.py", "Privacy", ":material/shield_lock:"),
    ("pages/train.py", "Train", ":material/model_training:"),
    ("pages/counterfactual.py", "Counterfactual", ":material/swap_horiz:"),
    ("pages/design.py", "Design", ":material/tune:"),
    ("pages/posterior.py", "Posterior", ":material/query_stats:"),
    ("pages/compare.py", "Compare", ":material/compare:"),
    ("pages/jobs.py", "Jobs", ":material/schedule:"),
)


def page_setup(title: str) -> None:
    """Start a page: wide layout, the step links and the current selection in the sidebar,
    and the page's title."""
    st.set_page_config(page_title=f"{title} · SynthCell Studio",
                       page_icon=":material/genetics:", layout="wide")
    st.session_state["_previous_page"] = st.session_state.get("_current_page")
    st.session_state["_current_page"] = title
    with st.sidebar:
        st.markdown("## SynthCell Studio")
        for path, label, icon in PAGES:
            st.page_link(path, label=label, icon=icon)
        st.divider()
    sidebar()
    st.title(title)


def sidebar() -> None:
    """Show the current dataset, split and run, and the number of active jobs."""
    ws = workspace()
    with st.sidebar:
        st.markdown("### Current selection")
        dataset_id = current("dataset_id")
        record = ws.get_dataset(dataset_id) if dataset_id else None
        st.caption(f"**Dataset:** {record.name if record else '—'}")
        split_id = current("split_id")
        split = ws.get_split(split_id) if split_id else None
        if split and record and split.dataset_id == record.id:
            st.caption(f"**Split:** {split.label}")
        else:
            st.caption("**Split:** —")
        run_key = current("run_key")
        run = ws.get_run(run_key) if run_key else None
        st.caption(f"**Synthetic run:** {f'{run.generator} · {run.key[:8]}' if run else '—'}")
        active = [j for j in jobs().list(limit=50) if j.is_active]
        st.caption(f"**Jobs running or queued:** {len(active)}")
        st.caption(f"Workspace: `{ws.root}`")
        st.selectbox("Figure export format (camera button)", EXPORT_FORMATS,
                     key="export_format")


def render_config_form(fields: list[FieldSpec], *, key: str) -> dict[str, Any]:
    """Render one widget per config field; return the values chosen."""
    values: dict[str, Any] = {}
    columns = st.columns(2)
    for i, spec in enumerate(fields):
        widget_key = f"{key}.{spec.name}"
        with columns[i % 2]:
            if spec.kind == "choice":
                options = list(spec.choices)
                values[spec.name] = st.selectbox(
                    spec.label, options, index=options.index(spec.default), help=spec.help or None,
                    key=widget_key,
                )
            elif spec.kind == "bool":
                values[spec.name] = st.checkbox(spec.label, value=spec.default,
                                                help=spec.help or None, key=widget_key)
            elif spec.kind in ("int", "float"):
                cast = int if spec.kind == "int" else float
                values[spec.name] = st.number_input(
                    spec.label,
                    value=cast(spec.default),
                    min_value=cast(spec.minimum) if spec.minimum is not None else None,
                    max_value=cast(spec.maximum) if spec.maximum is not None else None,
                    step=cast(spec.step) if spec.step is not None else (1 if cast is int else None),
                    help=spec.help or None,
                    key=widget_key,
                )
            else:
                values[spec.name] = st.text_input(spec.label, value=str(spec.default),
                                                  help=spec.help or None, key=widget_key)
    return values


def job_panel(
    state_key: str,
    *,
    on_done: Callable[[JobRecord], None] | None = None,
    retry: Callable[[JobRecord], None] | None = None,
) -> JobRecord | None:
    """Show the job whose id is in ``st.session_state[state_key]``: live progress and metric
    curves while it runs (polled), a cancel button, its error (traceback folded away) or its
    result. ``on_done`` runs once when the job has finished well; ``retry`` is offered when
    the error carries a fix (e.g. make names unique)."""
    job_id = st.session_state.get(state_key)
    if not job_id:
        return None
    record = jobs().get(job_id)
    if record is None:
        return None
    if record.is_active:
        _live_job(state_key, job_id)
        return record
    _finished_job(record, state_key, on_done=on_done, retry=retry)
    return record


@st.fragment(run_every=0.5)
def _live_job(state_key: str, job_id: str) -> None:
    record = jobs().get(job_id)
    if record is None:
        return
    if not record.is_active:
        st.rerun()
    st.progress(record.progress, text=f"{record.title}: {record.message}")
    columns = st.columns([1, 4])
    if columns[0].button("Cancel", key=f"cancel-{job_id}"):
        jobs().cancel(job_id)
    if record.started:
        columns[1].caption(f"running for {record.duration_s:.0f} s · job {job_id}")
    else:
        columns[1].caption(f"queued · job {job_id}")
    if record.metrics:
        st.line_chart(pd.DataFrame({k: pd.Series(v) for k, v in record.metrics.items()}))


def _finished_job(
    record: JobRecord,
    state_key: str,
    *,
    on_done: Callable[[JobRecord], None] | None,
    retry: Callable[[JobRecord], None] | None,
) -> None:
    if record.status == "done":
        handled = st.session_state.setdefault("_handled_jobs", set())
        if record.id not in handled:
            handled.add(record.id)
            if on_done is not None:
                on_done(record)
        st.success(record.result.get("message", f"{record.title}: done"))
    elif record.status == "failed":
        st.error(record.error or "The job failed.")
        if record.error_fix and retry is not None and st.button(
            "Make the names unique and open it", key=f"fix-{record.id}"
        ):
            retry(record)
        if record.traceback:
            with st.expander("Details for a bug report"):
                st.code(record.traceback, language="text")
    elif record.status == "cancelled":
        st.warning(f"{record.title}: cancelled.")
    elif record.status == "interrupted":
        st.warning(f"{record.title}: interrupted — the app stopped while it ran. Start it again.")


def plotly(figure: Any, *, key: str | None = None, **kwargs: Any) -> Any:
    """Show a plotly figure; its camera button exports PNG or SVG (sidebar choice)."""
    config = {
        "displaylogo": False,
        "toImageButtonOptions": {"format": st.session_state.get("export_format", "png"),
                                 "scale": 2},
    }
    return st.plotly_chart(figure, width="stretch", config=config, key=key, **kwargs)
