"""SynthCell Studio: navigation and the shared sidebar. Each step lives in pages/."""

import streamlit as st

from pages._ui import sidebar

st.set_page_config(page_title="SynthCell Studio", page_icon="🧬", layout="wide")

navigation = st.navigation(
    [
        st.Page("pages/data.py", title="Data", icon="📂", default=True),
        st.Page("pages/split.py", title="Split", icon="✂️"),
        st.Page("pages/mock.py", title="Mock data", icon="🧪"),
        st.Page("pages/train.py", title="Train", icon="🏋️"),
        st.Page("pages/jobs.py", title="Jobs", icon="⏱️"),
    ]
)
sidebar()
navigation.run()
