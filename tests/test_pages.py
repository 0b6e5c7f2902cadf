"""The Streamlit pages, driven headless with ``AppTest``: what each page shows and does.

State is prepared through the engine (the task functions with a console context), then the
page runs against the same per-test workspace. Jobs a page submits run in real worker
processes; the tests wait for them through the workspace's job manager and rerun the page.
"""

from __future__ import annotations

import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from streamlit.testing.v1 import AppTest

from engine.cli import ConsoleContext
from engine.data.roles import ROLES
from engine.generators.mock import SCENARIO_DESCRIPTIONS, SCENARIOS
from engine.jobs import JobManager, JobRecord, get_manager, save_record
from engine.store import Workspace
from engine.tasks import import_dataset, split_dataset
from tests.conftest import KANG, PBMC_SMALL

REPO = Path(__file__).resolve().parents[1]
KANG_DONORS = 8
JOB_TIMEOUT_S = 120


# -- fixtures and helpers ------------------------------------------------------------------------
# Every test here gets the shared `ws` fixture and stops the job managers it started.
pytestmark = pytest.mark.usefixtures("stop_job_managers")


@pytest.fixture
def manager(ws: Workspace) -> JobManager:
    """The manager the pages use for this workspace (the same object)."""
    return get_manager(ws)


def ctx(ws: Workspace) -> ConsoleContext:
    return ConsoleContext(ws, quiet=True)


def page(name: str) -> AppTest:
    """A page as the app runs it: every page draws the step links, which need app.py's
    navigation to know the pages."""
    return via_app(name)


def via_app(name: str) -> AppTest:
    """The app with ``pages/<name>.py`` selected: pages that link to other pages need the
    navigation of app.py (``st.page_link`` only accepts pages it knows)."""
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60)
    at.switch_page(f"pages/{name}.py")
    return at


def run(at: AppTest) -> AppTest:
    """Run (or rerun) the page and fail on any exception it raised."""
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(elements) -> list[str]:
    return [e.value for e in elements]


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def as_int(text: str) -> int:
    return int(text.replace(",", ""))


def button(at: AppTest, label: str):
    matches = [b for b in at.button if b.label == label]
    assert len(matches) == 1, [b.label for b in at.button]
    return matches[0]


def wait_done(manager: JobManager, job_id: str, status: str = "done") -> JobRecord:
    record = manager.wait(job_id, timeout=JOB_TIMEOUT_S)
    assert record is not None
    assert record.status == status, (record.status, record.error, record.traceback)
    return record


def import_kang(ws: Workspace) -> str:
    return import_dataset({"path": str(KANG)}, ctx(ws))["dataset_id"]


def split_kang(ws: Workspace, dataset_id: str, **params) -> str:
    record = ws.get_dataset(dataset_id)
    params = {"dataset_id": dataset_id, "donor_col": record.roles.get("donor"),
              "stratify": ["cell_type"], "test_fraction": 0.25, "seed": 0, **params}
    return split_dataset(params, ctx(ws))["split_id"]


def role_box(at: AppTest, dataset_id: str, role: str):
    return at.selectbox(key=f"role-{dataset_id}-{role}")


def page_links(at: AppTest) -> list[tuple[str, str]]:
    """(label, url path) of each ``st.page_link`` in the page's body (not the sidebar's
    step links, which every page draws)."""
    return [(e.proto.label, e.proto.page) for e in at.main.get("page_link")]


# -- Data ----------------------------------------------------------------------------------------
def test_data_page_without_dataset_says_so(ws: Workspace) -> None:
    at = run(page("data"))
    assert texts(at.info) == ["Open a dataset above to see its summary."]
    assert not at.metric
    assert "Nothing stored yet." in texts(at.caption)
    assert [t.label for t in at.tabs] == ["Sample data", "Upload", "Path on the server",
                                          "In the workspace"]


@pytest.mark.shared_data
def test_data_page_summarises_kang_and_saves_roles(ws: Workspace) -> None:
    dataset_id = import_kang(ws)  # also makes it the workspace's current dataset
    at = run(page("data"))

    adata = ad.read_h5ad(KANG)
    zeros = 100 * (1 - adata.X.nnz / (adata.n_obs * adata.n_vars))
    assert metrics(at) == {"Cells": "2,000", "Genes": "9,015", "Zeros": f"{zeros:.1f} %",
                           "Raw counts": "yes"}
    assert not at.warning and not at.error
    assert at.header[0].value == "kang_ifnb_pbmc_2k.h5ad"
    # the obs-column table lists every metadata column
    table = at.dataframe[0].value
    assert set(table["column"]) == set(adata.obs.columns)
    # roles are pre-filled with the guesses
    roles = {role: role_box(at, dataset_id, role).value for role in ROLES}
    assert roles == {"donor": "donor", "cell_type": "cell_type", "condition": "condition",
                     "batch": "—"}
    assert role_box(at, dataset_id, "batch").options == ["—", *adata.obs.columns]
    assert "No donor column: splits will be cell-level and labelled so." not in texts(at.caption)

    # choosing a batch column and saving stores it with the dataset
    role_box(at, dataset_id, "batch").set_value("sample")
    button(at, "Save roles").click()
    run(at)
    assert "Roles saved with the dataset." in texts(at.success)
    assert ws.get_dataset(dataset_id).roles == {
        "donor": "donor", "cell_type": "cell_type", "condition": "condition", "batch": "sample"
    }

    # one column for two roles: a sentence, and nothing saved
    role_box(at, dataset_id, "condition").set_value("donor")
    button(at, "Save roles").click()
    run(at)
    assert texts(at.error) == ["Each column can take one role only; pick different columns."]
    assert "Roles saved with the dataset." not in texts(at.success)
    assert ws.get_dataset(dataset_id).roles["condition"] == "condition"

    # unmapping the donor says that splits become cell-level
    role_box(at, dataset_id, "condition").set_value("condition")
    role_box(at, dataset_id, "donor").set_value("—")
    button(at, "Save roles").click()
    run(at)
    assert ws.get_dataset(dataset_id).roles["donor"] is None
    assert "No donor column: splits will be cell-level and labelled so." in texts(at.caption)


def test_data_page_open_path_with_bad_file_fails_with_a_sentence(
    ws: Workspace, manager: JobManager, tmp_path: Path
) -> None:
    bad = tmp_path / "x.h5ad"
    bad.write_text("this is not an h5ad file\n")
    at = run(page("data"))
    at.text_input(key="server_path").set_value(f"  {bad}  ")
    at.button(key="open_path").click()
    run(at)
    job_id = at.session_state["data_job"]
    assert manager.get(job_id).params["path"] == str(bad)  # the path is stripped

    record = wait_done(manager, job_id, "failed")
    run(at)
    assert texts(at.error) == [record.error]
    assert "could not be read as an AnnData (.h5ad) file" in record.error
    assert "Traceback" not in record.error and "Error:" not in record.error
    assert [e.label for e in at.expander] == ["Details for a bug report"]
    assert not [b for b in at.button if b.label == "Make the names unique and open it"]
    # nothing stored, nothing half-written, no current dataset
    assert ws.list_datasets() == []
    assert list((ws.root / ".tmp").iterdir()) == []
    assert "dataset_id" not in ws.state()
    assert texts(at.info) == ["Open a dataset above to see its summary."]
    assert bad.exists()  # a path on the server is never deleted


@pytest.mark.shared_data
def test_data_page_shows_the_roles_of_the_dataset_made_current(
    ws: Workspace, tmp_path: Path
) -> None:
    """Regression: the role boxes kept the previous dataset's choices (same widget keys)."""
    kang_id = import_kang(ws)
    subset = ad.read_h5ad(KANG)[:500].copy()
    path = tmp_path / "kang_500.h5ad"
    subset.write_h5ad(path)
    other_id = import_dataset({"path": str(path)}, ctx(ws))["dataset_id"]
    other_roles = {"donor": "sample", "cell_type": "geo_cluster", "condition": "condition",
                   "batch": None}
    ws.set_roles(other_id, other_roles)
    ws.set_state(dataset_id=kang_id)

    at = run(page("data"))
    assert role_box(at, kang_id, "donor").value == "donor"
    at.selectbox(key="stored_choice").set_value(other_id)
    at.button(key="make_current").click()
    run(at)
    assert at.header[0].value == "kang_500.h5ad"
    assert metrics(at)["Cells"] == "500"
    assert {role: role_box(at, other_id, role).value for role in ROLES} == {
        "donor": "sample", "cell_type": "geo_cluster", "condition": "condition", "batch": "—"
    }
    button(at, "Save roles").click()
    run(at)
    assert ws.get_dataset(other_id).roles == other_roles
    assert ws.get_dataset(kang_id).roles["donor"] == "donor"


@pytest.mark.shared_data
def test_data_page_offers_the_fix_for_duplicate_gene_names(
    ws: Workspace, manager: JobManager, tmp_path: Path
) -> None:
    adata = ad.read_h5ad(PBMC_SMALL)
    names = adata.var_names.to_numpy().copy()
    names[1] = names[0]
    adata.var_names = names
    path = tmp_path / "duplicated.h5ad"
    adata.write_h5ad(path)

    at = run(page("data"))
    at.text_input(key="server_path").set_value(str(path))
    at.button(key="open_path").click()
    run(at)
    failed = wait_done(manager, at.session_state["data_job"], "failed")
    assert failed.error_fix == "make_unique"
    run(at)
    assert texts(at.error) == [failed.error]
    assert names[0] in failed.error
    assert ws.list_datasets() == []

    button(at, "Make the names unique and open it").click()
    run(at)
    retry_id = at.session_state["data_job"]
    assert retry_id != failed.id
    assert manager.get(retry_id).params["make_unique"] is True
    done = wait_done(manager, retry_id)
    run(at)
    dataset_id = done.result["dataset_id"]
    assert texts(at.success) == ["Opened duplicated.h5ad: 80 cells × 230 genes."]
    assert not at.error
    assert ws.state()["dataset_id"] == at.session_state["dataset_id"] == dataset_id
    assert at.session_state["split_id"] is None
    assert metrics(at)["Cells"] == "80" and metrics(at)["Genes"] == "230"
    stored = ws.load_dataset(dataset_id, backed=True)
    assert stored.var_names.is_unique
    assert path.exists()  # only uploads are deleted after opening


@pytest.mark.shared_data
def test_data_page_warns_about_normalised_data(ws: Workspace, tmp_path: Path) -> None:
    adata = ad.read_h5ad(PBMC_SMALL)
    adata.X = adata.X.astype(np.float32)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    path = tmp_path / "pbmc_small_log1p.h5ad"
    adata.write_h5ad(path)
    dataset_id = import_dataset({"path": str(path)}, ctx(ws))["dataset_id"]
    record = ws.get_dataset(dataset_id)
    assert not record.is_counts

    at = run(page("data"))
    assert metrics(at)["Cells"] == "80"
    assert metrics(at)["Genes"] == "230"
    assert metrics(at)["Raw counts"] == "no"
    assert texts(at.warning) == [record.counts_message]
    assert record.counts_message  # a sentence, not an empty box
    assert "No donor column: splits will be cell-level and labelled so." in texts(at.caption)


# -- Split ---------------------------------------------------------------------------------------
def test_split_page_without_dataset_links_to_data(ws: Workspace) -> None:
    at = run(via_app("split"))
    assert at.title[0].value == "Split"
    assert texts(at.info) == ["No dataset is open yet."]
    assert page_links(at) == [("Open a dataset on the Data page", "data")]
    assert not at.metric and not at.slider


@pytest.mark.shared_data
def test_split_page_makes_a_donor_split_as_a_job(ws: Workspace, manager: JobManager) -> None:
    dataset_id = import_kang(ws)
    at = run(page("split"))
    assert "Unit: **donor** (column `donor`) — a donor-disjoint split." in texts(at.markdown)
    assert texts(at.info) == ["No split of this dataset yet."]
    assert at.slider[0].label == "Test fraction of donors"
    assert at.slider[0].value == 0.25
    assert at.multiselect[0].value == ["cell_type", "condition"]
    assert "donor" not in at.multiselect[0].options

    button(at, "Make split").click()
    run(at)
    job_id = at.session_state["split_job"]
    assert manager.get(job_id).params == {
        "dataset_id": dataset_id, "donor_col": "donor", "stratify": ["cell_type", "condition"],
        "test_fraction": 0.25, "seed": 0,
    }
    record = wait_done(manager, job_id)
    run(at)

    split_id = record.result["split_id"]
    split = ws.get_split(split_id)
    assert ws.state()["split_id"] == split_id == at.session_state["split_id"]
    assert texts(at.success) == [record.result["message"]]
    shown = metrics(at)
    assert as_int(shown["Training cells"]) + as_int(shown["Test cells"]) == 2000
    assert as_int(shown["Training cells"]) == split.n_train
    assert shown["Training donors"] == "6" and shown["Test donors"] == "2"
    caption = next(c for c in texts(at.caption) if c.startswith("Test donors: "))
    listed = caption.removeprefix("Test donors: ").split(", ")
    assert len(listed) == 2 and listed == split.test_donors
    # donor-disjoint, as the page says: the listed donors' cells are all on the test side
    frame = pd.read_csv(ws.split_csv(split_id), dtype=str)
    sides = frame.groupby("donor")["side"].unique()
    assert len(sides) == KANG_DONORS
    assert all(len(s) == 1 for s in sides)
    assert sorted(d for d, s in sides.items() if s[0] == "test") == sorted(listed)
    assert at.subheader[0].value == split.label
    assert [b.label for b in at.get("download_button")] == [
        "Download split.csv (cell id → side)"]


@pytest.mark.shared_data
def test_split_page_without_donor_role_warns_cell_level(ws: Workspace) -> None:
    dataset_id = import_kang(ws)
    ws.set_roles(dataset_id, {"donor": None, "cell_type": "cell_type",
                              "condition": "condition", "batch": None})
    at = run(via_app("split"))
    assert len(at.warning) == 1
    assert "no donor role, so this is a **cell-level split**" in at.warning[0].value
    assert page_links(at) == [("Map column roles", "data")]
    assert at.slider[0].label == "Test fraction of cells"
    assert "donor" in at.multiselect[0].options

    split_kang(ws, dataset_id, donor_col=None)
    run(at)
    shown = metrics(at)
    assert as_int(shown["Training cells"]) + as_int(shown["Test cells"]) == 2000
    assert as_int(shown["Test cells"]) == 500
    assert shown["Training donors"] == "—" and shown["Test donors"] == "—"
    assert not [c for c in texts(at.caption) if c.startswith("Test donors:")]


@pytest.mark.shared_data
def test_split_page_switches_between_splits(ws: Workspace) -> None:
    dataset_id = import_kang(ws)
    first = split_kang(ws, dataset_id, seed=0)
    second = split_kang(ws, dataset_id, seed=1, test_fraction=0.5)  # now the current one
    at = run(via_app("split"))
    chooser = at.selectbox[0]
    assert chooser.label == "Split"
    assert chooser.value == second
    assert metrics(at)["Test donors"] == "4"

    chooser.set_value(first)
    run(at)
    assert ws.state()["split_id"] == first == at.session_state["split_id"]
    assert metrics(at)["Test donors"] == "2"
    assert as_int(metrics(at)["Test cells"]) == ws.get_split(first).n_test
    caption = next(c for c in texts(at.caption) if c.startswith("Test donors: "))
    assert caption == "Test donors: " + ", ".join(ws.get_split(first).test_donors)


# -- Mock data -----------------------------------------------------------------------------------
def test_mock_page_generates_previews_and_makes_current(
    ws: Workspace, manager: JobManager
) -> None:
    at = run(page("mock"))
    scenario = at.selectbox(key="mock.problem_type")
    assert scenario.options == list(SCENARIOS)
    assert scenario.value == "paired"
    assert f"**paired**: {SCENARIO_DESCRIPTIONS['paired']}" in texts(at.caption)
    assert texts(at.info) == ["Generate a scenario to preview it."]

    scenario.set_value("mosaic")
    for field, value in (("n_cells", 300), ("n_genes", 200), ("n_peaks", 300),
                         ("n_proteins", 10)):
        at.number_input(key=f"mock.{field}").set_value(value)
    button(at, "Generate").click()
    run(at)
    job_id = at.session_state["mock_job"]
    params = manager.get(job_id).params
    assert params["problem_type"] == "mosaic"
    assert (params["n_cells"], params["n_genes"], params["n_peaks"]) == (300, 200, 300)
    record = wait_done(manager, job_id)
    run(at)

    dataset_id = record.result["dataset_id"]
    assert at.session_state["mock_dataset"] == dataset_id
    assert texts(at.success) == [record.result["message"]]
    shown = metrics(at)
    assert shown["Cells"] == "300" and shown["Genes"] == "200"
    obs = ws.load_obs(dataset_id)
    assert shown["Clusters"] == str(obs["cluster"].nunique())
    table = at.dataframe[0].value
    assert list(table.columns) == ["observed modalities", "cells"]
    assert table["cells"].sum() == 300
    assert shown["Modality combinations"] == str(len(table))
    assert len(table) > 1  # mosaic: cells keep different subsets
    assert "none" not in set(table["observed modalities"])  # subsets are non-empty
    assert len(at.get("plotly_chart")) == 2  # UMAP by cluster and by observed modalities
    # The task itself already wrote the workspace state (store_dataset does that for every
    # dataset); clear both selections to see what the button does.
    ws.set_state(dataset_id=None)
    at.session_state["dataset_id"] = None
    run(at)
    make_current = at.button(key="mock_make_current")
    assert not make_current.disabled
    make_current.click()
    run(at)
    assert ws.state()["dataset_id"] == dataset_id
    assert at.session_state["dataset_id"] == dataset_id
    assert at.button(key="mock_make_current").disabled
    assert "This is the current dataset." in texts(at.caption)


# -- Train ---------------------------------------------------------------------------------------
def test_train_page_lists_the_mock_generator(ws: Workspace) -> None:
    at = run(page("train"))
    generator = at.selectbox(key="generator")
    assert generator.options == ["Multimodal mock", "DP-NMF (CAMDA blue team)",
                                 "Cycle autoencoder (counterfactual)",
                                 "Conditional diffusion (design, denoise)",
                                 "Bayesian negative binomial (PyMC, ADVI)"]
    assert generator.value == "mock"
    capabilities = next(m for m in texts(at.markdown) if m.startswith("`modalities"))
    assert capabilities == "`modalities: rna, atac, adt` `not private` `trains without a split`"
    assert texts(at.info) == ["No runs yet."]
    # the run's seed is the only seed on the page
    keys = [n.key for n in at.number_input if n.key and n.key.startswith("cfg.mock.")]
    # run-level settings (seed, number of cells) are asked once, not in the config form
    assert "cfg.mock.n_genes" in keys
    assert "cfg.mock.seed" not in keys and "cfg.mock.n_cells" not in keys
    assert [n.label for n in at.number_input].count("Seed") == 1
    assert not button(at, "Launch run").disabled  # the mock needs no real data


def test_train_page_shows_the_bayesian_models_form(ws: Workspace) -> None:
    at = run(page("train"))
    at.selectbox(key="generator").set_value("bayes-nb")
    run(at)
    capabilities = next(m for m in texts(at.markdown) if m.startswith("`modalities"))
    assert capabilities == "`modalities: rna` `conditional` `counterfactual` `posterior` " \
        "`not private`"
    labels = {w.label for w in [*at.number_input, *at.text_input, *at.selectbox]}
    assert {"Condition column", "Reference level", "Latent factors K", "Gene-length table",
            "Variational family", "Cells per minibatch"} <= labels
    keys = {w.key for w in [*at.number_input, *at.text_input] if w.key}
    assert "cfg.bayes-nb.condition_key" not in keys  # a column name comes from the roles
    assert button(at, "Launch run").disabled  # it learns from real cells: no split yet


@pytest.mark.shared_data
def test_train_page_launches_a_run_on_a_split(ws: Workspace, manager: JobManager) -> None:
    dataset_id = import_kang(ws)
    split_id = split_kang(ws, dataset_id)
    split = ws.get_split(split_id)
    at = run(via_app("train"))  # the page links to Compare
    assert f"Training cells: {split.n_train:,} of **kang_ifnb_pbmc_2k.h5ad** ({split.label})." \
        in texts(at.caption)

    for field, value in (("n_genes", 200), ("n_peaks", 300), ("n_proteins", 10)):
        at.number_input(key=f"cfg.mock.{field}").set_value(value)
    seed = next(n for n in at.number_input if n.label == "Seed")
    seed.set_value(7)
    n_cells = next(n for n in at.number_input if n.label.startswith("Synthetic cells"))
    n_cells.set_value(300)
    button(at, "Launch run").click()
    run(at)
    job_id = at.session_state["train_job"]
    params = manager.get(job_id).params
    assert params["seed"] == 7 and params["n_cells"] == 300
    assert params["dataset_id"] == dataset_id and params["split_id"] == split_id
    assert "seed" not in params["config"] and "n_cells" not in params["config"]
    record = wait_done(manager, job_id)
    run(at)

    run_key = record.result["run_key"]
    assert ws.state()["run_key"] == run_key
    table = at.dataframe[0].value
    assert len(table) == 1
    row = table.iloc[0]
    assert row["run"] == run_key
    assert row["generator"] == "Multimodal mock"
    assert row["cells"] == 300 and row["status"] == "done"
    assert row["privacy"] == "not private"  # gene names come from the training cells
    path = ws.synthetic_path(run_key)
    assert path.exists()
    synthetic = ad.read_h5ad(path)
    assert synthetic.shape == (300, 200)
    assert synthetic.uns["synthcell"]["seed"] == 7
    assert synthetic.uns["synthcell"]["split_id"] == split_id
    assert set(synthetic.var_names) <= set(ws.load_split_side(split_id, "train").var_names)
    assert any(m.startswith(f"Selected run `{run_key}`") for m in texts(at.markdown))
    assert [b.label for b in at.get("download_button")] == ["Download synthetic .h5ad"]
    assert at.button(key="open_run").disabled  # already the current run


# -- Jobs ----------------------------------------------------------------------------------------
def test_jobs_page_without_jobs(ws: Workspace) -> None:
    at = run(page("jobs"))
    assert texts(at.info) == ["No jobs yet."]


def test_jobs_page_lists_jobs_with_status_and_cancels(ws: Workspace,
                                                      manager: JobManager) -> None:
    now = time.time()
    for age, (job_id, status, extra) in enumerate((
        ("20250101-000000-aaaaaa", "done",
         {"progress": 1.0, "message": "stored 10 cells", "result": {"message": "ok"}}),
        ("20250101-000001-bbbbbb", "failed",
         {"progress": 0.3, "message": "failed", "error": "That file is not a count matrix.",
          "traceback": "Traceback (most recent call last):\nDataError: not counts"}),
    )):
        record = JobRecord(id=job_id, kind="import_dataset", params={}, title=f"Job {status}",
                           status=status, created=now - 100 + age, started=now - 90,
                           finished=now - 80, **extra)
        (ws.jobs_dir / job_id).mkdir()
        save_record(ws.jobs_dir / job_id, record)

    at = run(page("jobs"))
    table = at.dataframe[0].value
    assert list(table["status"]) == ["failed", "done"]  # newest first
    by_title = table.set_index("what")
    assert by_title.loc["Job done", "status"] == "done"
    assert by_title.loc["Job done", "progress"] == 1.0
    assert by_title.loc["Job done", "message"] == "stored 10 cells"
    assert by_title.loc["Job failed", "status"] == "failed"
    assert by_title.loc["Job failed", "message"] == "That file is not a count matrix."
    assert by_title.loc["Job done", "seconds"] == 10.0
    assert [e.label for e in at.expander] == ["Errors (1)"]
    assert "**Job failed** — That file is not a count matrix." in texts(at.markdown)
    assert not at.main.selectbox  # nothing to cancel

    # a running job can be cancelled from the page
    job_id = manager.submit("tests.job_tasks:count", {"steps": 400, "delay": 0.05},
                            title="long count")
    deadline = time.monotonic() + 60
    while manager.get(job_id).status != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    run(at)
    table = at.dataframe[0].value
    assert len(table) == 3
    assert table.iloc[0]["what"] == "long count"  # newest first
    assert table.iloc[0]["status"] == "running"
    assert at.main.selectbox[0].label == "Cancel a job"
    assert at.main.selectbox[0].value == job_id
    at.button(key="cancel_selected").click()
    run(at)
    assert wait_done(manager, job_id, "cancelled").status == "cancelled"
    run(at)
    assert at.dataframe[0].value.set_index("job").loc[job_id, "status"] == "cancelled"
    assert not at.main.selectbox


# -- the app -------------------------------------------------------------------------------------
@pytest.mark.shared_data
def test_app_navigation_and_sidebar(ws: Workspace) -> None:
    dataset_id = import_kang(ws)
    split_id = split_kang(ws, dataset_id)
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60)
    run(at)
    assert at.title[0].value == "Data"  # the default page
    sidebar = at.sidebar
    assert "### Current selection" in texts(sidebar.markdown)
    captions = texts(sidebar.caption)
    assert "**Dataset:** kang_ifnb_pbmc_2k.h5ad" in captions
    assert f"**Split:** {ws.get_split(split_id).label}" in captions
    assert "**Synthetic run:** —" in captions
    assert "**Jobs running or queued:** 0" in captions
    assert f"Workspace: `{ws.root}`" in captions
    assert sidebar.selectbox(key="export_format").options == ["png", "svg"]

    at.switch_page("pages/split.py")
    run(at)
    assert at.title[0].value == "Split"
    assert as_int(metrics(at)["Test cells"]) == ws.get_split(split_id).n_test
