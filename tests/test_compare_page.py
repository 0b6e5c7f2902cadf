"""The Compare page, driven headless with ``AppTest``: what it needs, evaluating runs as
jobs, and what it shows of an evaluation (metrics beside their floor, the audit beside them).

State is prepared through the engine task functions; one test evaluates a real run through
the page's button (a job in a worker process), the others read hand-built evaluations saved
where the page looks for them.
"""

from __future__ import annotations

import json

import pytest

from engine.evaluate import figures as F
from engine.evaluate.report import write_report
from engine.evaluate.suite import EvaluationResult
from engine.jobs import JobManager, get_manager
from engine.privacy.audit import NOT_PRIVACY_SENTENCE
from engine.store import Workspace
from engine.tasks import train_generator
from tests.test_pages import (
    ctx,
    import_kang,
    page_links,
    run,
    split_kang,
    texts,
    via_app,
    wait_done,
)
from tests.test_report import FEASIBILITY, hand_result

MOCK = {"n_genes": 200, "n_peaks": 100, "n_proteins": 5}


# Every test here gets the shared `ws` fixture and stops the job managers it started.
pytestmark = pytest.mark.usefixtures("stop_job_managers")


@pytest.fixture
def manager(ws: Workspace) -> JobManager:
    return get_manager(ws)


def train_mock(ws: Workspace, dataset_id: str, split_id: str, *, seed: int = 0) -> str:
    params = {"generator": "mock", "config": MOCK, "seed": seed, "dataset_id": dataset_id,
              "split_id": split_id, "n_cells": 300}
    return train_generator(params, ctx(ws))["run_key"]


def store_hand_evaluation(ws: Workspace, run_key: str, split_id: str, *, seed: int = 0,
                          report: bool = True) -> EvaluationResult:
    """Save a hand-built evaluation where the evaluate task would have put it."""
    result = hand_result(seed=seed)
    result.metrics.loc[0, "value"] += seed / 100  # tell the runs apart
    result.provenance.update(run_key=run_key, split_id=split_id)
    with ws.building_evaluation(run_key, split_id) as folder:
        result.save(folder)
        if report:
            write_report(result, folder / "report.html", title=f"run {run_key[:8]}")
    return result


def downloads(at) -> list[str]:
    return [b.label for b in at.get("download_button")]


def dataframe(at, kind: str):
    """The key-metrics table (first), the audit table (has ``attack``) or the full metrics
    table (has ``description``)."""
    frames = list(at.dataframe)
    if kind == "key_metrics":
        return frames[0]
    column = {"audit": "attack", "metrics": "description"}[kind]
    return next(f for f in frames if column in f.value.columns)


def styles(dataframe) -> str:
    return dataframe.proto.arrow_data.styler.styles


# -- what the page needs -------------------------------------------------------------------------
def test_compare_page_without_dataset_links_to_data(ws: Workspace) -> None:
    at = run(via_app("compare"))
    assert at.title[0].value == "Compare"
    assert texts(at.info) == ["No dataset is open yet."]
    assert page_links(at) == [("Open a dataset on the Data page", "data")]
    assert not at.multiselect


@pytest.mark.shared_data
def test_compare_page_needs_a_split_and_a_run(ws: Workspace) -> None:
    dataset_id = import_kang(ws)
    at = run(via_app("compare"))
    assert texts(at.info) == ["Compare needs a split of **kang_ifnb_pbmc_2k.h5ad**: synthetic "
                              "cells are compared with its held-out donors, never with the "
                              "training cells."]
    assert page_links(at) == [("Make a split", "split")]
    assert not at.multiselect

    split_id = split_kang(ws, dataset_id)
    at = run(via_app("compare"))
    assert texts(at.info) == ["No synthetic runs of **kang_ifnb_pbmc_2k.h5ad** yet."]
    assert page_links(at) == [("Train a generator", "train")]
    split = ws.get_split(split_id)
    assert f"Held-out cells: {split.n_test:,} of **kang_ifnb_pbmc_2k.h5ad** ({split.label})." \
        in texts(at.caption)


# -- evaluating ----------------------------------------------------------------------------------
@pytest.mark.shared_data
def test_compare_page_evaluates_a_run_as_a_job(ws: Workspace, manager: JobManager) -> None:
    dataset_id = import_kang(ws)
    split_id = split_kang(ws, dataset_id)
    run_key = train_mock(ws, dataset_id, split_id)  # the current run
    at = run(via_app("compare"))
    chooser = at.multiselect(key="compare_runs")
    assert chooser.value == [run_key]
    assert chooser.format_func(run_key) == f"Multimodal mock · {run_key[:8]} (not private)"
    assert f"Not evaluated on this split yet: {chooser.format_func(run_key)}." in texts(
        at.caption)
    assert texts(at.info) == ["None of the selected runs is evaluated on this split yet: "
                              "press **Evaluate**."]
    assert not at.get("plotly_chart")

    at.button(key="evaluate").click()
    run(at)
    job_id = at.session_state[f"evaluate_job.{run_key}.{split_id}"]
    assert manager.get(job_id).kind == "evaluate"
    assert manager.get(job_id).params == {"run_key": run_key, "split_id": split_id}
    record = wait_done(manager, job_id)
    run(at)

    assert record.result["message"] in texts(at.success)
    assert at.button(key="evaluate").label == "Evaluate 0 runs"
    assert at.button(key="evaluate").disabled
    folder = ws.evaluation_dir(run_key, split_id)
    stored = EvaluationResult.load(folder)
    # the run and its privacy label at the top of the detail view
    assert f"Multimodal mock · {run_key[:8]} (not private)" in texts(at.subheader)
    assert ":red-badge[:material/lock_open: not private]" in texts(at.markdown)
    # utility beside the audit, the sentence always there
    assert {"#### Utility", "#### Privacy audit (membership inference)"} <= set(
        texts(at.markdown))
    assert texts(at.warning) == [NOT_PRIVACY_SENTENCE]
    if stored.audit.feasibility:
        assert stored.audit.feasibility in texts(at.info)
    key_metrics = dataframe(at, "key_metrics").value
    assert set(key_metrics["metric"]) == set(F.KEY_METRICS) & set(stored.metrics["metric"])
    assert list(key_metrics.columns) == ["metric", "value", "floor", "better", "status"]
    audit = dataframe(at, "audit").value
    assert list(audit.columns) == ["attack", "AUROC", "AUROC floor", "TPR at 1 % FPR",
                                   "ε lower bound"]
    assert list(audit["attack"]) == list(F.audit_table(stored.audit.table)["attack"])
    assert [e.label for e in at.expander] == ["Every audit number"]
    # every overall metric, with its floor and a traffic-light colour
    table = dataframe(at, "metrics")
    shown = table.value
    overall = stored.metrics[stored.metrics["group"].isin(["all", "per-type (weighted)"])]
    assert len(shown) == len(overall)
    assert shown["floor"].notna().any()
    for status in set(shown["status"]):
        assert F.STATUS_BACKGROUNDS[status] in styles(table)
    # the summary chart, the pictures, the report
    assert at.get("plotly_chart")
    assert [t.label for t in at.tabs] == ["Joint UMAP", "Distributions", "Mean–variance",
                                          "Gene–gene correlation", "Markers", "Attack ROC"]
    assert downloads(at) == ["Download metrics (CSV)", "Download report (HTML)"]
    assert (folder / "report.html").exists()
    assert any(c.startswith("Joint UMAP of ") for c in texts(at.caption))
    for note in stored.notes:
        assert note in texts(at.caption)


# -- showing evaluations ---------------------------------------------------------------------------
@pytest.mark.shared_data
def test_compare_page_shows_evaluated_runs_side_by_side(ws: Workspace) -> None:
    dataset_id = import_kang(ws)
    split_id = split_kang(ws, dataset_id)
    first = train_mock(ws, dataset_id, split_id, seed=1)
    second = train_mock(ws, dataset_id, split_id, seed=2)  # the current run
    third = train_mock(ws, dataset_id, split_id, seed=3)
    store_hand_evaluation(ws, first, split_id, seed=1)
    store_hand_evaluation(ws, second, split_id, seed=2, report=False)
    ws.set_state(run_key=second)

    at = via_app("compare")
    run(at)
    assert at.multiselect(key="compare_runs").value == [second]
    at.multiselect(key="compare_runs").set_value([first, second, third])
    run(at)
    # one run still to evaluate, the button says so
    assert at.button(key="evaluate").label == "Evaluate 1 run"
    assert not at.button(key="evaluate").disabled
    assert "Not evaluated on this split yet: Multimodal mock · " f"{third[:8]} (not private)." \
        in texts(at.caption)
    # the summary chart compares both evaluated runs (value bars, floor ticks)
    summary = json.loads(at.get("plotly_chart")[0].proto.spec)
    bars = [t for t in summary["data"] if t["type"] == "bar" and t["x"][0] is not None]
    assert bars[0]["x"] == [f"mock · {first[:8]}", f"mock · {second[:8]}"]
    assert bars[0]["y"] == pytest.approx([0.92, 0.93])  # the AUROC of each hand-built run
    assert "noise floor (real vs real)" in {t.get("name") for t in summary["data"]}
    # the detail view starts on the current run and switches
    detail = at.selectbox(key="compare_detail")
    assert detail.options == [detail.format_func(k) for k in (first, second)]
    assert detail.value == second
    assert texts(at.warning) == [NOT_PRIVACY_SENTENCE]
    assert FEASIBILITY in texts(at.info)
    assert "Attacks see the PCA features only." in texts(at.caption)
    assert NOT_PRIVACY_SENTENCE not in texts(at.caption)  # said once, not twice
    assert "12 of 20 real genes are in the synthetic data." in texts(at.caption)
    assert downloads(at) == ["Download metrics (CSV)"]  # no report.html stored for it
    table = dataframe(at, "metrics")
    assert list(table.value["metric"]) == ["classifier_auroc_gbt", "mmd", "gene_mean_pearson",
                                           "ks_library_size"]
    assert list(table.value["status"]) == ["poor", "good", "fair", "n/a"]
    for status in ("good", "fair", "poor", "n/a"):
        assert F.STATUS_BACKGROUNDS[status] in styles(table)

    at.toggle(key="compare_per_type").set_value(True)
    detail.set_value(first)
    run(at)
    assert at.selectbox(key="compare_detail").value == first
    assert len(dataframe(at, "metrics").value) == 5  # the B-cell row too
    assert downloads(at) == ["Download metrics (CSV)", "Download report (HTML)"]
    assert f"Multimodal mock · {first[:8]} (not private)" in texts(at.subheader)

    # the UMAP: colour by a gene, side by side; properties without the paired ones
    assert at.selectbox(key="compare_umap_color").options == [
        "real / synthetic", "cell type", "condition", "donor", "a gene"]
    at.selectbox(key="compare_umap_color").set_value("gene")
    at.toggle(key="compare_umap_side").set_value(True)
    run(at)
    assert at.selectbox(key="compare_umap_gene").value == "G0"  # the first real marker
    assert "Joint UMAP of 60 real cells and 40 synthetic cells." in texts(at.caption)
    assert at.selectbox(key="compare_property").options == [
        F.property_label("library_size"), F.property_label("gene_mean")]

    at.multiselect(key="compare_runs").set_value([])
    run(at)
    assert texts(at.info) == ["Pick one or more runs to compare."]
    assert not at.get("plotly_chart")


@pytest.mark.shared_data
def test_compare_page_warns_about_runs_of_another_split(ws: Workspace) -> None:
    dataset_id = import_kang(ws)
    old_split = split_kang(ws, dataset_id, seed=0)
    run_key = train_mock(ws, dataset_id, old_split)
    split_kang(ws, dataset_id, seed=1)  # now the current split
    at = run(via_app("compare"))
    assert at.multiselect(key="compare_runs").value == [run_key]
    assert len(at.warning) == 1
    assert "was trained on another split" in at.warning[0].value
