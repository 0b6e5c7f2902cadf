"""The Design page: it asks for a diffusion model when there is none, then designs cells toward
genes up / down (a job) and shows how well they meet the target and how real they stay, and
denoises chosen real cells (a job) with before / after views."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from engine.evaluate.design import DesignResult
from engine.jobs import JobManager, get_manager
from engine.store import Workspace
from engine.tasks import denoise, design, load_model, train_generator
from tests.test_pages import (
    ctx,
    import_kang,
    metrics,
    run,
    split_kang,
    texts,
    via_app,
    wait_done,
)

pytestmark = [pytest.mark.usefixtures("stop_job_managers"), pytest.mark.shared_data]

SMALL = {"train_steps": 150, "hidden": 64, "depth": 2, "n_genes": 500, "timesteps": 100,
         "sampling_steps": 10}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A workspace with Kang, a donor split and a small diffusion run (trained once per
    module; each test works on its own copy)."""
    root = tmp_path_factory.mktemp("design") / "workspace"
    ws = Workspace(root)
    dataset_id = import_kang(ws)
    split_id = split_kang(ws, dataset_id)
    run_key = train_generator({"generator": "diffusion", "dataset_id": dataset_id,
                               "split_id": split_id, "seed": 0, "config": SMALL},
                              ctx(ws))["run_key"]
    return root, {"dataset_id": dataset_id, "split_id": split_id, "run_key": run_key}


@pytest.fixture
def prepared(ws: Workspace, trained: tuple[Path, dict[str, str]]) -> dict[str, str]:
    """The trained workspace copied into this test's workspace, with Kang current."""
    shutil.copytree(trained[0], ws.root, dirs_exist_ok=True)
    ws.set_state(dataset_id=trained[1]["dataset_id"])
    return trained[1]


@pytest.fixture
def manager(ws: Workspace) -> JobManager:
    return get_manager(ws)


def test_page_asks_for_a_model_first(ws: Workspace) -> None:
    import_kang(ws)
    at = run(via_app("design"))
    assert at.title[0].value == "Design"
    assert any("No diffusion model of **kang_ifnb_pbmc_2k.h5ad** yet: train a "
               "Conditional diffusion (design, denoise) on the Train page." in t
               for t in texts(at.info))
    assert [e.proto.page for e in at.main.get("page_link")] == ["train"]
    assert not at.button  # nothing to design with


def test_page_designs_cells_and_shows_the_report(ws: Workspace, manager: JobManager,
                                                 prepared: dict[str, str]) -> None:
    run_key = prepared["run_key"]
    model = load_model(ws, run_key)
    genes = [str(g) for g in model.gene_names]
    up = "ISG15" if "ISG15" in genes else genes[0]
    down = next(g for g in ("CCL2", "CD74", *genes) if g in genes and g != up)
    at = run(via_app("design"))
    assert at.selectbox(key="dz_run").value == run_key
    assert len(at.get("plotly_chart")) == 1  # the training loss
    assert at.multiselect(key="dz_genes").options == genes
    assert at.selectbox(key="dz_start.cell_type").options[0] == "(any)"
    assert at.selectbox(key="dz_start.condition").options == ["(any)", "ctrl", "stim"]
    assert at.button(key="dz_go").disabled  # no gene yet

    at.multiselect(key="dz_genes").set_value([up, down])
    run(at)
    assert at.slider(key=f"dz_strength.{up}").value == 0.0
    assert at.button(key="dz_go").disabled  # genes picked, every slider at 0
    assert "Pick genes and move at least one slider away from 0." in texts(at.caption)
    at.slider(key=f"dz_strength.{up}").set_value(1.5)
    at.slider(key=f"dz_strength.{down}").set_value(-1.0)
    at.selectbox(key="dz_start.cell_type").set_value("CD14+ Monocytes")
    at.number_input(key="dz_n").set_value(120)
    run(at)
    assert not at.button(key="dz_go").disabled
    at.button(key="dz_go").click()
    run(at)
    job_id = at.session_state["dz_job"]
    params = manager.get(job_id).params
    assert params["up"] == [up] and params["down"] == [down]
    assert params["strengths"] == {up: 1.5, down: 1.0}
    assert params["start"] == {"cell_type": "CD14+ Monocytes"}
    assert params["n_cells"] == 120 and params["scale"] == 1.0 and params["run_key"] == run_key
    record = wait_done(manager, job_id)
    run(at)
    design_id = record.result["design_id"]
    assert at.session_state["dz_result"] == (run_key, design_id)
    stored_box = at.selectbox(key=f"dz_stored.{run_key}")
    assert stored_box.label == "Stored designs" and stored_box.value == design_id
    assert stored_box.options == [f"{up} ↑1.5, {down} ↓1 · CD14+ Monocytes · 120 cells"]
    folder = ws.evaluation_dir(run_key, design_id, kind="designs")
    stored = DesignResult.load(folder)
    share = stored.summary["share_meeting_all"]
    start_share = stored.summary["share_start_meeting_all"]
    # the design moves cells toward the target: more of them meet it than the start does
    assert share > start_share
    shown = metrics(at)
    assert shown["Cells meeting every target"] == f"{share:.1%}"
    assert shown["Nearest-real distance ratio"] == f"{stored.summary['nn_distance_ratio']:.2f}"
    assert f"**{share:.1%}** of the designed cells meet every requested gene's target" in " ".join(
        texts(at.caption))
    assert any(m.startswith(f"**120** cells toward **{up}** ↑ 1.5 sd, **{down}** ↓ 1 sd; "
                            "starting context: cell_type = CD14+ Monocytes")
               for m in texts(at.markdown))
    table = at.dataframe[0].value
    assert table["gene"].tolist() == [up, down]
    assert table["direction"].tolist() == ["up", "down"]
    assert np.allclose(table["share meeting"], stored.genes["share_meeting"])
    assert share <= table["share meeting"].min() + 1e-9  # all genes at once: at most each
    # training loss, cell types, violins, UMAP
    assert len(at.get("plotly_chart")) == 4
    assert at.selectbox(key="dz_color").options == ["real / start / designed", "cell type", up,
                                                  down]
    at.selectbox(key="dz_color").set_value(up)
    run(at)
    umap = json.loads(at.get("plotly_chart")[-1].proto.spec)
    assert umap["layout"]["coloraxis"]["colorbar"]["title"]["text"] == up
    assert [b.label for b in at.get("download_button")] == ["Download designed cells (.h5ad)"]
    designed = ad.read_h5ad(folder / "designed.h5ad")
    assert designed.n_obs == 120 and (designed.obs["cell_type"] == "CD14+ Monocytes").all()


def test_page_denoises_chosen_cells(ws: Workspace, manager: JobManager,
                                    prepared: dict[str, str]) -> None:
    run_key = prepared["run_key"]
    at = run(via_app("design"))
    types = ["B cells", "CD14+ Monocytes"]
    at.multiselect(key="dn_types").set_value(types)
    at.slider(key="dn_strength").set_value(0.3)
    run(at)
    obs = ws.load_obs(prepared["dataset_id"])
    n_chosen = int(obs["cell_type"].isin(types).sum())
    assert f"**{n_chosen:,}** cells chosen" in " ".join(texts(at.caption))
    at.button(key="dn_go").click()
    run(at)
    job_id = at.session_state["dn_job"]
    params = manager.get(job_id).params
    assert params["selection"] == {"cell_type": types}
    assert params["strength"] == pytest.approx(0.3) and params["run_key"] == run_key
    record = wait_done(manager, job_id)
    run(at)
    assert at.selectbox(key=f"dn_stored.{run_key}").value == record.result["denoise_id"]
    folder = ws.evaluation_dir(run_key, record.result["denoise_id"], kind="denoised")
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["step"] == 30 and summary["n_cells"] == n_chosen
    assert any(m.startswith(f"**{n_chosen:,}** cells noised to step **30** of 100")
               for m in texts(at.markdown))
    shown = metrics(at)
    assert shown["Zero entries · observed"] == f"{summary['zero_share_observed']:.1%}"
    assert shown["Zero entries · denoised"] == f"{summary['zero_share_denoised']:.1%}"
    assert shown["Cell-type silhouette · observed"] == f"{summary['silhouette_observed']:.3f}"
    assert shown["Cell-type silhouette · denoised"] == f"{summary['silhouette_denoised']:.3f}"
    # denoising fills in dropouts: fewer zero entries than observed
    assert summary["zero_share_denoised"] < summary["zero_share_observed"]
    # training loss, the before/after UMAP and the marker genes
    charts = at.get("plotly_chart")
    assert len(charts) == 3
    umap = json.loads(charts[1].proto.spec)
    assert {a["text"] for a in umap["layout"]["annotations"]} == {"observed", "denoised"}
    assert {t["name"] for t in umap["data"]} == set(types)
    markers = json.loads(charts[2].proto.spec)
    assert {t["name"] for t in markers["data"]} == {"observed", "denoised"}
    assert set(markers["data"][0]["x"]) == set(summary["marker_genes"])
    cells = ad.read_h5ad(folder / "denoised.h5ad")
    assert cells.n_obs == n_chosen and {"observed", "denoised"} <= set(cells.layers)
    assert sorted(pd.unique(cells.obs["cell_type"].astype(str))) == types
    assert [b.label for b in at.get("download_button")] == ["Download denoised cells (.h5ad)"]


def test_page_shows_a_failed_design_as_a_sentence(ws: Workspace, manager: JobManager,
                                                  prepared: dict[str, str]) -> None:
    job_id = manager.submit("design", {"run_key": prepared["run_key"], "up": ["NOT_A_GENE"],
                                       "down": []}, title="Design NOT_A_GENE ↑1")
    wait_done(manager, job_id, status="failed")
    at = via_app("design")
    at.session_state["dz_job"] = job_id
    run(at)
    errors = texts(at.error)
    assert len(errors) == 1 and errors[0].startswith("The model does not include NOT_A_GENE")
    # the shared job panel folds the worker's traceback away under an expander
    assert [e.label for e in at.expander if e.label.startswith("Details")] == [
        "Details for a bug report"]
    assert "dz_result" not in at.session_state


def test_a_fresh_session_shows_the_stored_results(ws: Workspace, manager: JobManager,
                                                   prepared: dict[str, str]) -> None:
    """Results outlive the session (a browser reload): a new session on the same workspace
    lists the run's stored designs and denoisings, newest first, and shows the newest one's
    report, or the one the session made, without submitting a job."""
    run_key = prepared["run_key"]
    genes = [str(g) for g in load_model(ws, run_key).gene_names]
    up = "ISG15" if "ISG15" in genes else genes[0]
    down = next(g for g in ("CCL2", "CD74", *genes) if g in genes and g != up)
    older = design({"run_key": run_key, "up": [up], "down": [down],
                    "strengths": {up: 1.5, down: 1.0}, "start": {"cell_type": "CD14+ Monocytes"},
                    "n_cells": 120, "scale": 1.0}, ctx(ws))["design_id"]
    newer = design({"run_key": run_key, "up": [up], "n_cells": 60, "scale": 0.8, "seed": 1},
                   ctx(ws))["design_id"]
    summary_path = ws.evaluation_dir(run_key, older, kind="designs") / "summary.json"
    os.utime(summary_path, (1_600_000_000, 1_600_000_000))  # surely the older one
    denoise_id = denoise({"run_key": run_key, "selection": {"cell_type": ["B cells"]},
                          "strength": 0.2, "max_cells": 150}, ctx(ws))["denoise_id"]

    at = run(via_app("design"))
    box = at.selectbox(key=f"dz_stored.{run_key}")
    assert box.label == "Stored designs"
    assert box.options == [f"{up} ↑1 · any start · 60 cells · guidance 0.8 · seed 1",
                           f"{up} ↑1.5, {down} ↓1 · CD14+ Monocytes · 120 cells"]
    assert box.value == newer  # the newest by default
    assert any(m.startswith(f"**60** cells toward **{up}** ↑ 1 sd; starting context: any")
               for m in texts(at.markdown))
    box.set_value(older)
    run(at)
    stored = DesignResult.load(ws.evaluation_dir(run_key, older, kind="designs"))
    shown = metrics(at)
    assert shown["Cells meeting every target"] == f"{stored.summary['share_meeting_all']:.1%}"
    assert shown["Nearest-real distance ratio"] == f"{stored.summary['nn_distance_ratio']:.2f}"
    assert any(m.startswith(f"**120** cells toward **{up}** ↑ 1.5 sd, **{down}** ↓ 1 sd")
               for m in texts(at.markdown))
    assert at.dataframe[0].value["gene"].tolist() == [up, down]
    # training loss; the design's cell types, violins and UMAP; the denoising's UMAP (one
    # cell type: no marker genes)
    assert [c.key for c in at.get("plotly_chart")] == ["dz_loss", "dz_types", "dz_violins",
                                                       "dz_umap", "dn_umap"]

    denoised = at.selectbox(key=f"dn_stored.{run_key}")
    assert denoised.label == "Stored denoisings" and denoised.value == denoise_id
    summary = json.loads((ws.evaluation_dir(run_key, denoise_id, kind="denoised")
                          / "summary.json").read_text())
    assert denoised.options == [f"B cells · strength 0.2 · {summary['n_cells']:,} cells"]
    assert shown["Zero entries · denoised"] == f"{summary['zero_share_denoised']:.1%}"
    assert [b.label for b in at.get("download_button")] == [
        "Download designed cells (.h5ad)", "Download denoised cells (.h5ad)"]
    assert "dz_job" not in at.session_state and "dn_job" not in at.session_state
    assert manager.list() == []  # nothing was submitted

    # a session that made the older design shows that one, not the newest
    at = via_app("design")
    at.session_state["dz_result"] = (run_key, older)
    run(at)
    assert at.selectbox(key=f"dz_stored.{run_key}").value == older
    assert metrics(at)["Cells meeting every target"] == (
        f"{stored.summary['share_meeting_all']:.1%}")
