"""The Counterfactual page: it asks for a model when there is none, then picks cells by
metadata, sets a new condition, runs the job and shows the analysis."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from engine.jobs import JobManager, get_manager
from engine.store import Workspace
from engine.tasks import train_generator
from tests.test_pages import ctx, import_kang, run, split_kang, texts, via_app, wait_done

pytestmark = [pytest.mark.usefixtures("stop_job_managers"), pytest.mark.shared_data]


@pytest.fixture
def manager(ws: Workspace) -> JobManager:
    return get_manager(ws)


def test_page_asks_for_a_model_first(ws: Workspace) -> None:
    import_kang(ws)
    at = run(via_app("counterfactual"))
    assert any("No counterfactual model of **kang_ifnb_pbmc_2k.h5ad** yet" in t
               for t in texts(at.info))


def test_page_makes_and_shows_a_counterfactual(ws: Workspace, manager: JobManager) -> None:
    dataset_id = import_kang(ws)
    split_id = split_kang(ws, dataset_id)
    trained = train_generator({"generator": "cae", "dataset_id": dataset_id,
                               "split_id": split_id, "seed": 0,
                               "config": {"epochs": 4, "n_genes": 600,
                                          "ensemble_size": 2}}, ctx(ws))
    at = run(via_app("counterfactual"))
    assert at.selectbox(key="cf_run").value == trained["run_key"]
    # head norms and losses over training (of the two members' mean model), and one
    # context's per-gene contributions
    assert "The model is the mean of **2** members trained with seeds 0–1" in " ".join(
        texts(at.caption))
    assert len(at.get("plotly_chart")) == 3
    assert at.selectbox(key="cf_head_field").options == ["condition", "cell_type"]
    at.selectbox(key="cf_head_value").set_value("stim")
    run(at)
    assert "Per-gene contribution of the **condition** head for **stim**" in " ".join(
        texts(at.caption))
    at.multiselect(key="cf_sel.cell_type").set_value(["CD14+ Monocytes"])
    at.multiselect(key="cf_sel.condition").set_value(["ctrl"])
    run(at)
    n_ctrl_mono = int(((ws.load_obs(dataset_id)["cell_type"] == "CD14+ Monocytes")
                       & (ws.load_obs(dataset_id)["condition"] == "ctrl")).sum())
    assert f"**{n_ctrl_mono:,}** cells selected" in " ".join(texts(at.caption))
    go = at.button(key="cf_go")
    assert go.disabled  # no new context chosen yet
    at.selectbox(key="cf_set.condition").set_value("stim")
    run(at)
    at.button(key="cf_go").click()
    run(at)
    job_id = at.session_state["cf_job"]
    params = manager.get(job_id).params
    assert params["changes"] == {"condition": "stim"}
    assert params["selection"] == {"cell_type": ["CD14+ Monocytes"], "condition": ["ctrl"]}
    record = wait_done(manager, job_id)
    run(at)
    assert record.result["counterfactual_id"] == at.session_state["cf_result"][1]
    assert any(m.startswith(f"**{n_ctrl_mono:,}** cells, **condition** → **stim**")
               for m in texts(at.markdown))
    closeness = at.dataframe[0].value
    assert list(closeness.index) == ["counterfactual", "cells unchanged (baseline)"]
    assert np.isfinite(closeness.to_numpy(dtype=float)).all()
    # shift UMAP, top genes, heatmap and head contributions below the three model plots
    assert len(at.get("plotly_chart")) == 7
    labels = [b.label for b in at.get("download_button")]
    assert labels == ["Download counterfactual cells (.h5ad)", "Download changed genes (.csv)"]
    folder = ws.evaluation_dir(trained["run_key"], record.result["counterfactual_id"],
                               kind="counterfactuals")
    cells = ad.read_h5ad(folder / "cells.h5ad")
    assert cells.n_obs == n_ctrl_mono and (cells.obs["condition"] == "stim").all()
    assert {"predicted", "source"} <= set(cells.layers)
