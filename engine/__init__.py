"""SynthCell Studio engine: data, generators, privacy, evaluation, jobs and the workspace.

Nothing here imports streamlit; every page calls into this package and every job it
starts can be run headless with ``python -m engine``.
"""

__version__ = "0.1.0"
