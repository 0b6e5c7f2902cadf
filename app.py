"""SynthCell Studio: registers the steps in pages/ with st.navigation (links drawn by each
page, see pages/_ui.py) and runs the one the URL names."""

import streamlit as st

from pages._ui import PAGES

navigation = st.navigation(
    [st.Page(path, title=title, icon=icon, default=i == 0)
     for i, (path, title, icon) in enumerate(PAGES)],
    position="hidden",
)
navigation.run()
