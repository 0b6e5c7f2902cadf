"""The Privacy page (live accountant, settings kept across pages), the privacy–utility sweep,
and the seed CLI and the Train page giving the same bytes for the same settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from engine.generators.dp_nmf import DPNMFConfig, plan_privacy
from engine.jobs import JobManager, get_manager
from engine.privacy.sweep import load_sweep, parse_epsilons, privacy_sweep
from engine.store import Workspace
from tests.test_pages import (
    REPO,
    button,
    ctx,
    import_kang,
    metrics,
    run,
    split_kang,
    texts,
    via_app,
    wait_done,
)

pytestmark = [pytest.mark.usefixtures("stop_job_managers"),
              pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")]


@pytest.fixture
def manager(ws: Workspace) -> JobManager:
    return get_manager(ws)


def test_accountant_total_follows_the_sliders_and_settings_reach_train(ws: Workspace) -> None:
    at = run(via_app("privacy"))
    assert any("not private" in e for e in texts(at.error))  # DP 'none' by default
    at.selectbox(key="privacy.dp").set_value("all")
    run(at)
    units = at.number_input(key="privacy.n_units").value  # no split open: asked for
    expected = plan_privacy(DPNMFConfig(dp="all", epsilon_total=4.0), n_units=units)
    assert float(metrics(at)["Total ε"]) == pytest.approx(expected.epsilon, rel=1e-2)
    assert metrics(at)["δ"] == f"{1 / (10 * units):.2g}"

    at.slider(key="privacy.epsilon_total").set_value(1.5)
    run(at)
    assert float(metrics(at)["Total ε"]) == pytest.approx(1.5, rel=1e-2)
    table = at.dataframe[0].value
    assert list(table["stage"]) == ["NMF basis", "k-means", "sampling statistics"]

    at.radio(key="privacy.budget_mode").set_value("per_stage")
    run(at)
    at.slider(key="privacy.epsilon_kmeans").set_value(0.5)
    run(at)
    plan = plan_privacy(DPNMFConfig(dp="all", budget_mode="per_stage", epsilon_kmeans=0.5),
                        n_units=units)
    assert float(metrics(at)["Total ε"]) == pytest.approx(plan.epsilon, rel=1e-2)
    assert ws.state()["privacy_settings"]["epsilon_kmeans"] == 0.5

    at.switch_page("pages/train.py")
    run(at)
    at.selectbox(key="generator").set_value("dp-nmf")
    run(at)
    assert any(i.startswith("Privacy: DP **all**, ε per stage, unit cell")
               for i in texts(at.info))
    assert not [n for n in at.number_input if n.key and n.key.endswith(".epsilon_total")]

    at.switch_page("pages/privacy.py")
    run(at)  # the values come back after the page change
    assert at.slider(key="privacy.epsilon_kmeans").value == 0.5
    assert at.selectbox(key="privacy.dp").value == "all"


def test_parse_epsilons_says_what_is_wrong() -> None:
    assert parse_epsilons("10, 1; 4, 4") == [1.0, 4.0, 10.0]
    for bad, words in (("1, x", "not a number"), ("-1", "positive"), ("", "at least one")):
        with pytest.raises(Exception, match=words):
            parse_epsilons(bad)


@pytest.mark.shared_data
def test_sweep_trains_compares_and_audits_each_budget_and_the_page_draws_it(
    ws: Workspace, manager: JobManager
) -> None:
    dataset_id = import_kang(ws)
    split_id = split_kang(ws, dataset_id, test_fraction=0.5)
    config = {"n_components": 6, "nmf_max_iter": 30, "dp": "all", "donor_key": "",
              "clusters_from": "kmeans"}
    result = privacy_sweep({"split_id": split_id, "epsilons": "2, 50", "config": config,
                            "max_cells": 600}, ctx(ws))
    curve = load_sweep(ws, result["sweep_id"])
    points = curve["points"]
    assert [p["epsilon_requested"] for p in points] == [None, 2.0, 50.0]
    assert points[0]["privacy_label"] == "not private" and points[0]["epsilon"] is None
    for point, budget in zip(points[1:], (2.0, 50.0), strict=True):
        assert point["epsilon"] == pytest.approx(budget, rel=1e-3)
        assert point["privacy_label"].startswith("DP (ε=") and "unit=cell" in point["privacy_label"]
    for point in points:
        assert 0.0 <= point["classifier_auroc_gbt"] <= 1.0
        assert 0.0 <= point["audit_auroc"] <= 1.0
        assert ws.get_run(point["run_key"]) is not None  # each point is a stored run
    # noise costs realism: without DP the cells are harder to tell from real ones than at ε=2
    assert points[0]["classifier_auroc_gbt"] < points[1]["classifier_auroc_gbt"]
    assert points[0]["tstr_relative_f1"] > points[1]["tstr_relative_f1"]
    again = privacy_sweep({"split_id": split_id, "epsilons": [50, 2], "config": config,
                           "max_cells": 600}, ctx(ws))
    assert again["cached"] and again["sweep_id"] == result["sweep_id"]

    at = run(via_app("privacy"))
    frame = at.dataframe[-1].value
    assert list(frame["budget"]) == ["no DP", "ε = 2", "ε = 50"]
    assert at.get("plotly_chart")
    # the page launches the same job
    at.selectbox(key="privacy.dp").set_value("all")
    run(at)
    at.text_input[0].set_value("3")
    button(at, "Run the curve").click()
    run(at)
    params = manager.get(at.session_state["sweep_job"]).params
    assert params["epsilons"] == "3" and params["split_id"] == split_id
    assert params["config"]["dp"] == "all"
    manager.cancel(at.session_state["sweep_job"])


@pytest.mark.shared_data
def test_seed_cli_and_train_page_write_the_same_counts(ws: Workspace, manager: JobManager,
                                                       tmp_path: Path) -> None:
    dataset_id = import_kang(ws)
    split_id = split_kang(ws, dataset_id)
    train_file = ws.split_dir(split_id) / "train.h5ad"
    sampler = {"sample_fraction": 0.8, "seed": 42, "n_components": 6, "nmf_batch_size": 512,
               "n_clusters": 5, "n_synth_samples": 300, "proportion_aware": True,
               "sampling_method": "zinb"}
    (tmp_path / "config.yaml").write_text(json.dumps({
        "dir_list": {"home": str(tmp_path)},
        "dataset_config": {"name": "kang", "train_count_file": str(train_file)},
        "nmf_sampler_config": sampler,
        "dp_config": {"eps_nmf": 2.0, "eps_kmeans": 1.0, "eps_summaries": 1.0},
    }))  # JSON is YAML
    done = subprocess.run([sys.executable, "-m", "engine", "--quiet", "run-singlecell-generator",
                           "--experiment_name", "same", "--dp", "all"], cwd=tmp_path,
                          capture_output=True, text=True, env={"PYTHONPATH": str(REPO),
                                                               "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    from_cli = ad.read_h5ad(json.loads(done.stdout)["output"])

    at = run(via_app("privacy"))
    at.selectbox(key="privacy.dp").set_value("all")
    at.radio(key="privacy.unit").set_value("cell")
    run(at)
    at.radio(key="privacy.budget_mode").set_value("per_stage")
    run(at)
    for stage, budget in (("nmf", 2.0), ("kmeans", 1.0), ("sampling", 1.0)):
        at.slider(key=f"privacy.epsilon_{stage}").set_value(budget)
    run(at)
    at.switch_page("pages/train.py")
    run(at)
    at.selectbox(key="generator").set_value("dp-nmf")
    run(at)
    for name in ("sample_fraction", "n_components", "nmf_batch_size", "n_clusters"):
        at.number_input(key=f"cfg.dp-nmf.{name}").set_value(sampler[name])
    # The seed tool spends eps_kmeans on k-means clusters; the page's default ("auto") would
    # take the cell types under dp=all, so the same run names k-means.
    at.selectbox(key="cfg.dp-nmf.clusters_from").set_value("kmeans")
    next(n for n in at.number_input if n.label == "Seed").set_value(42)
    next(n for n in at.number_input if n.label.startswith("Synthetic cells")).set_value(300)
    button(at, "Launch run").click()
    run(at)
    record = wait_done(manager, at.session_state["train_job"])
    from_page = ad.read_h5ad(ws.synthetic_path(record.result["run_key"]))

    for part in ("data", "indices", "indptr"):
        assert np.array_equal(getattr(from_cli.X, part), getattr(from_page.X, part)), part
    assert from_cli.uns["privacy"]["epsilon"] == pytest.approx(
        from_page.uns["privacy"]["epsilon"])
    assert list(from_cli.obs["cell_type"]) == list(from_page.obs["cell_type"])
