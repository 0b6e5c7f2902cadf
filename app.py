"""SynthCell Studio: navigation and the shared sidebar. Each step lives in pages/."""

import streamlit as st

from pages._ui import sidebar

st.set_page_config(page_title="SynthCell Studio", page_icon=":material/genetics:", layout="wide")

navigation = st.navigation(
    [
        st.Page("pages/data.py", title="Data", icon=":material/folder_open:", default=True),
        st.Page("pages/split.py", title="Split", icon=":material/call_split:"),
        st.Page("pages/mock.py", title="Mock data", icon=":material/science:"),
        st.Page("pages/train.py", title="Train", icon=":material/model_training:"),
        st.Page("pages/compare.py", title="Compare", icon=":material/compare:"),
        st.Page("pages/jobs.py", title="Jobs", icon=":material/schedule:"),
    ]
)
sidebar()
navigation.run()
