"""Jobs: every background job of this workspace, with progress, errors and cancel."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import streamlit as st

from pages._ui import jobs, page_setup

page_setup("Jobs")
st.caption("Every long action runs as a job in its own process; records stay on disk, so a "
           "reload or a restart of the app shows them.")


@st.fragment(run_every=1.0)
def job_table() -> None:
    records = jobs().list(limit=200)
    if not records:
        st.info("No jobs yet.")
        return
    table = pd.DataFrame(
        {
            "job": [r.id for r in records],
            "what": [r.title for r in records],
            "status": [r.status for r in records],
            "device": [r.device for r in records],
            "progress": [r.progress for r in records],
            "message": [r.error or r.message for r in records],
            "started": [dt.datetime.fromtimestamp(r.started).strftime("%H:%M:%S")
                        if r.started else "" for r in records],
            "seconds": [round(r.duration_s, 1) if r.duration_s is not None else None
                        for r in records],
        }
    )
    st.dataframe(table, hide_index=True, width="stretch",
                 column_config={"progress": st.column_config.ProgressColumn(
                     "progress", min_value=0.0, max_value=1.0)})
    active = [r for r in records if r.is_active]
    if active:
        choice = st.selectbox("Cancel a job", [r.id for r in active],
                              format_func=lambda i: next(r.title for r in active if r.id == i))
        if st.button("Cancel", key="cancel_selected"):
            jobs().cancel(choice)
    failed = [r for r in records if r.status == "failed" and r.traceback]
    if failed:
        with st.expander(f"Errors ({len(failed)})"):
            for r in failed[:10]:
                st.markdown(f"**{r.title}** — {r.error}")
                st.code(r.traceback, language="text")


job_table()
