"""Where things live, from environment variables with defaults.

- ``SYNTHCELL_WORKSPACE``: the workspace folder (default ``./workspace``, git-ignored).
- ``SYNTHCELL_DATA_DIR``: an extra folder of datasets listed on the Data page
  (``make run`` points it at ``../shared/data`` when that exists).
- ``SYNTHCELL_CPU_JOBS``: how many CPU jobs run at once (default 1; GPU jobs: always 1).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA_DIR = REPO_ROOT / "sample_data"


def workspace_root() -> Path:
    """Return the workspace folder (not created here)."""
    return Path(os.environ.get("SYNTHCELL_WORKSPACE", REPO_ROOT / "workspace")).resolve()


def data_dirs() -> list[Path]:
    """Return the folders whose datasets the Data page lists: sample data first."""
    dirs = [SAMPLE_DATA_DIR]
    extra = os.environ.get("SYNTHCELL_DATA_DIR")
    if extra:
        dirs.extend(Path(p).resolve() for p in extra.split(os.pathsep) if p)
    return [d for d in dirs if d.is_dir()]


def cpu_job_slots() -> int:
    """Return how many CPU jobs may run at the same time."""
    try:
        return max(1, int(os.environ.get("SYNTHCELL_CPU_JOBS", "1")))
    except ValueError:
        return 1
