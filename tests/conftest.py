"""Shared fixtures: where the real data lives, and a private workspace per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SYNTHCELL_SHARED_DATA", REPO.parent / "shared" / "data"))

KANG = SHARED_DATA / "kang_ifnb_pbmc" / "kang_ifnb_pbmc_2k.h5ad"
PBMC3K_H5AD = SHARED_DATA / "pbmc3k" / "pbmc3k_raw.h5ad"
PBMC3K_10X = SHARED_DATA / "pbmc3k" / "filtered_gene_bc_matrices" / "hg19"
PBMC_SMALL = SHARED_DATA / "pbmc_small" / "pbmc_small.h5ad"
ZHENG = SHARED_DATA / "zheng2017_sorted_pbmc" / "zheng2017_sorted_pbmc_2k.h5ad"
CITESEQ_2BATCH = SHARED_DATA / "citeseq_10x_pbmc_2batch" / "citeseq_10x_pbmc_2batch_400.h5ad"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests that need ../shared/data when it is absent, saying so."""
    if SHARED_DATA.exists():
        return
    skip = pytest.mark.skip(reason=f"real data not found at {SHARED_DATA}")
    for item in items:
        if "shared_data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh workspace folder, also exported as SYNTHCELL_WORKSPACE."""
    ws = tmp_path / "workspace"
    ws.mkdir()
    monkeypatch.setenv("SYNTHCELL_WORKSPACE", str(ws))
    return ws


@pytest.fixture
def ws(workspace: Path):
    """The test's workspace as a :class:`engine.store.Workspace`."""
    from engine.store import Workspace

    return Workspace(workspace)


@pytest.fixture
def stop_job_managers(workspace: Path):
    """Stop the job managers (scheduler threads, workers) that a test's pages started."""
    from engine import jobs as engine_jobs

    before = set(engine_jobs._MANAGERS)
    yield
    for root in set(engine_jobs._MANAGERS) - before:
        engine_jobs._MANAGERS.pop(root).shutdown(kill_running=True)
