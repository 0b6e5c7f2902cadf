"""The posterior of the Bayesian NB model: effects with credible intervals, posterior-predictive
checks, held-out RMSE, their stored result, the ``posterior_checks`` task, the Posterior page
and the ``posterior`` CLI command.

One tiny model is fitted per module on simulated counts (600 cells × 40 genes drawn from the
model itself, K = 2): the first 400 cells train it, the last 200 are held out. A workspace
holding those cells, a 400 / 200 split and the fitted model as a run is built once and copied
into each test's workspace.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from engine.errors import UserFacingError
from engine.evaluate import posterior as PO
from engine.generators.bayes_nb import BayesNBConfig, BayesNBGenerator, simulate
from engine.jobs import JobManager, get_manager
from engine.store import RunRecord, Workspace
from engine.tasks import TASKS, posterior_checks
from tests.test_pages import REPO, ctx, run, texts, via_app, wait_done

pytestmark = pytest.mark.usefixtures("stop_job_managers")

N_CELLS, N_TRAIN, N_GENES, K = 600, 400, 40, 2


@pytest.fixture(scope="module")
def fitted() -> tuple[BayesNBGenerator, ad.AnnData, dict[str, np.ndarray]]:
    """(model fitted on the first 400 simulated cells, all 600 cells, the true parameters)."""
    cells, truth = simulate(N_CELLS, N_GENES, latent_factors=K, seed=0)
    model = BayesNBGenerator(BayesNBConfig(condition="condition", n_genes=N_GENES,
                                           latent_factors=K, max_steps=300, batch_size=128))
    model.fit(cells[:N_TRAIN].copy())
    return model, cells, truth


@pytest.fixture(scope="module")
def stored(fitted: tuple[BayesNBGenerator, ad.AnnData, dict[str, np.ndarray]],
           tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A workspace with the simulated cells as a dataset, a cell split (the model's 400
    training cells / 200 held out) and the fitted model stored as a ``bayes-nb`` run."""
    model, cells, _ = fitted
    root = tmp_path_factory.mktemp("posterior") / "workspace"
    ws = Workspace(root)
    record = ws.add_dataset(cells, name="simulated NB", source="simulate(600, 40)",
                            is_counts=True, counts_message="raw counts",
                            roles={"condition": "condition"})
    sides = np.where(np.arange(N_CELLS) < N_TRAIN, "train", "test")
    split = ws.save_split(record.id, split_frame=pd.DataFrame({"cell": cells.obs_names,
                                                               "side": sides}),
                          train=cells[:N_TRAIN].copy(), test=cells[N_TRAIN:].copy(),
                          unit="cell", label="cell-level split, 200 held out",
                          params={"test_cells": N_CELLS - N_TRAIN}, train_donors=[],
                          test_donors=[])
    config = dataclasses.asdict(model.config)
    key = ws.run_key(dataset_id=record.id, split_id=split.id, generator=model.name,
                     config=config, seed=0)
    with ws.building_run(key) as folder:
        model.save(folder / "model")
        ws.finish_run(folder, RunRecord(key=key, generator=model.name, config=config, seed=0,
                                        dataset_id=record.id, split_id=split.id,
                                        n_cells=N_TRAIN, n_genes=N_GENES))
    return root, {"dataset_id": record.id, "split_id": split.id, "run_key": key}


@pytest.fixture
def prepared(ws: Workspace, stored: tuple[Path, dict[str, str]]) -> dict[str, str]:
    """The stored workspace copied into this test's workspace, with the run current."""
    shutil.copytree(stored[0], ws.root, dirs_exist_ok=True)
    ws.set_state(dataset_id=stored[1]["dataset_id"], split_id=stored[1]["split_id"],
                 run_key=stored[1]["run_key"])
    return stored[1]


def array(values: Any) -> np.ndarray:
    """A plotly JSON array: a list, or the typed form {"dtype", "bdata" (base64)}."""
    if isinstance(values, dict):
        return np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"])
    return np.asarray(values)


@pytest.fixture
def manager(ws: Workspace) -> JobManager:
    return get_manager(ws)


# -- effects -------------------------------------------------------------------------------------
def test_effects_table_matches_the_posterior_draws(fitted: Any) -> None:
    model, _, truth = fitted
    post = model.posterior
    table = PO.effects_table(model)
    assert len(table) == N_GENES * (len(model.levels) - 1)
    assert table["gene"].tolist() == list(model.gene_names)
    assert set(table["level"]) == {"c1"}
    draws = post.beta1[:, 0, :]
    assert np.allclose(table["mean"], draws.mean(axis=0))
    assert np.allclose(table["sd"], draws.std(axis=0, ddof=1))
    assert np.allclose(table["q05"], np.quantile(draws, 0.05, axis=0))
    assert np.allclose(table["q95"], np.quantile(draws, 0.95, axis=0))
    assert np.allclose(table["p_positive"], (draws > 0).mean(axis=0))
    assert np.allclose(table["pd"], np.maximum((draws > 0).mean(0), (draws < 0).mean(0)))
    assert table["pd"].between(0.5, 1.0).all()
    assert (table["q05"] <= table["mean"]).all() and (table["mean"] <= table["q95"]).all()
    assert np.array_equal(table["ci_excludes_zero"],
                          (table["q05"] > 0) | (table["q95"] < 0))
    assert np.allclose(table["phi_mean"], post.phi.mean(axis=0))
    assert np.allclose(table["dispersion_mean"], (1.0 / post.phi).mean(axis=0))
    assert np.allclose(table["beta0_mean"], post.beta0.mean(axis=0))
    # the model recovers the simulated effects
    assert np.corrcoef(table["mean"], truth["beta1"][0])[0, 1] > 0.9


def test_fit_summary_and_figures(fitted: Any) -> None:
    model, _, _ = fitted
    info = PO.fit_summary(model)
    assert info["latent_factors"] == K and info["gene_length_term"] is False
    assert info["gamma_mean"] is None and info["steps"] == model.fit_info["steps"]
    assert info["reference"] == "c0" and info["levels"] == ["c0", "c1"]
    table = PO.effects_table(model)
    top = PO.top_genes(table, "c1", 5)
    magnitudes = table.set_index("gene").loc[top, "mean"].abs()
    assert magnitudes.is_monotonic_decreasing
    assert magnitudes.min() >= table["mean"].abs().nlargest(5).min()

    forest = PO.forest_figure(table, ["gene1", top[0], "not a gene"], level="c1")
    assert set(forest.data[0].y) == {"gene1", top[0]}
    assert list(PO.forest_figure(table, level="c1").data[0].y) != []  # top 20 by default
    assert len(PO.forest_figure(table, level="c1").data[0].y) == 20
    volcano = PO.volcano_figure(table, level="c1", label_top=3)
    assert sum(len(t.x) for t in volcano.data[:2]) == N_GENES
    assert len(volcano.data[2].text) == 3
    dispersion = PO.dispersion_figure(table)
    assert dispersion.layout.xaxis.type == "log" and len(dispersion.data[0].x) == N_GENES
    elbo = PO.elbo_figure(model.history)
    assert len(elbo.data[0].x) == len(model.history["step"])


# -- checks ------------------------------------------------------------------------------------
def test_predictive_checks_cover_the_training_cells(fitted: Any) -> None:
    model, cells, _ = fitted
    train = cells[:N_TRAIN]
    checks, summary = PO.predictive_checks(model, train, n_draws=40, seed=0)
    assert len(checks) == 3 * N_GENES
    assert summary["n_cells"] == N_TRAIN and summary["n_draws"] == 40
    assert summary["latents"] == {"stored": N_TRAIN, "estimated": 0}
    assert (checks["low"] <= checks["median"]).all() and (checks["median"] <= checks["high"]).all()
    mean_rows = checks[checks["statistic"] == "mean"]
    assert np.allclose(mean_rows["observed"], np.asarray(train.X.mean(axis=0)).ravel())
    assert summary["coverage"]["mean"] >= 0.8
    assert summary["coverage"]["variance"] >= 0.8
    table = PO.coverage_table(checks)
    assert table["statistic"].tolist() == ["mean count", "variance of counts",
                                           "share of zero counts"]
    assert table.loc[0, "share_inside"] == pytest.approx(summary["coverage"]["mean"])
    # the checks have power: counts tripled behind the model's back fall outside
    tripled = train.copy()
    tripled.X = tripled.X * 3
    _, bad = PO.predictive_checks(model, tripled, n_draws=20, seed=0)
    assert bad["coverage"]["mean"] < 0.2
    # a subset of cells, and figures of the result
    _, small = PO.predictive_checks(model, train, n_draws=5, max_cells=50, seed=1)
    assert small["n_cells"] == 50
    assert len(PO.ppc_interval_figure(checks, ["gene0", "gene3"]).data) == 6
    assert len(PO.ppc_scatter_figure(checks).data) == 9
    with pytest.raises(UserFacingError, match="at least 2"):
        PO.predictive_checks(model, train, n_draws=1)


def test_heldout_rmse_beats_the_baseline(fitted: Any) -> None:
    model, cells, _ = fitted
    table, summary = PO.heldout_rmse(model, cells[N_TRAIN:], cells[:N_TRAIN], seed=0)
    rmse = summary["rmse"]
    assert table["method"].tolist() == ["model", "model_without_factors", "baseline"]
    assert summary["n_cells"] == N_CELLS - N_TRAIN and summary["n_genes"] == N_GENES
    assert rmse["model"] < rmse["baseline"]
    assert rmse["model"] < rmse["model_without_factors"]
    # the baseline is the training cells' mean per level
    means = PO.level_means(model, cells[:N_TRAIN])
    assert means.shape == (2, N_GENES) and np.isfinite(means).all()


def test_result_save_load_round_trip(fitted: Any, tmp_path: Path) -> None:
    model, cells, _ = fitted
    result = PO.run_checks(model, cells[:N_TRAIN], cells[N_TRAIN:], n_draws=5, max_cells=60)
    assert result.summary["heldout"]["n_cells"] == 60
    result.save(tmp_path / "checks")
    assert sorted(p.name for p in (tmp_path / "checks").iterdir()) == [
        "checks.parquet", "rmse.csv", "summary.json"]
    loaded = PO.PosteriorChecks.load(tmp_path / "checks")
    pd.testing.assert_frame_equal(loaded.checks, result.checks)
    pd.testing.assert_frame_equal(loaded.rmse, result.rmse)
    assert loaded.summary == json.loads(json.dumps(result.summary))
    without = PO.run_checks(model, cells[:N_TRAIN], None, n_draws=3, max_cells=30)
    assert without.summary["heldout"] is None and without.rmse.empty


# -- the task ------------------------------------------------------------------------------------
def test_task_stores_checks_once_per_request(ws: Workspace, prepared: dict[str, str]) -> None:
    assert TASKS["posterior_checks"] is posterior_checks
    run_key = prepared["run_key"]
    params = {"run_key": run_key, "n_draws": 10, "max_cells": 100, "seed": 3}
    first = posterior_checks(params, ctx(ws))
    assert not first["cached"] and first["message"].startswith("Checked 100 training cells: ")
    assert "Held-out RMSE" in first["message"]
    folder = ws.evaluation_dir(run_key, first["posterior_id"], kind="posterior")
    result = PO.PosteriorChecks.load(folder)
    assert result.summary["request"] == {"seed": 3, "n_draws": 10, "max_cells": 100}
    assert result.summary["heldout"]["n_cells"] == 100
    again = posterior_checks(params, ctx(ws))
    assert again["cached"] and again["posterior_id"] == first["posterior_id"]

    with pytest.raises(UserFacingError, match="between 2 and 1,000 replicated"):
        posterior_checks({"run_key": run_key, "n_draws": 1}, ctx(ws))
    with pytest.raises(UserFacingError, match="no longer in the workspace"):
        posterior_checks({"run_key": "not-a-run"}, ctx(ws))
    # a run of a generator without a posterior is refused before any work
    other = RunRecord(key="mockrun", generator="mock", config={}, seed=0, dataset_id=None,
                      split_id=None)
    with ws.building_run(other.key) as folder:
        ws.finish_run(folder, other)
    with pytest.raises(UserFacingError, match="has no posterior to check; train a Bayesian "
                                              "negative binomial model"):
        posterior_checks({"run_key": "mockrun"}, ctx(ws))


# -- the page ------------------------------------------------------------------------------------
def test_page_asks_for_a_bayesian_run_first(ws: Workspace) -> None:
    at = run(via_app("posterior"))
    assert at.title[0].value == "Posterior"
    assert texts(at.info) == ["No Bayesian model in the workspace yet: train a **Bayesian "
                              "negative binomial** model on the Train page."]
    assert [e.proto.page for e in at.main.get("page_link")] == ["train"]


def test_page_shows_the_posterior_and_stored_checks(ws: Workspace,
                                                    prepared: dict[str, str]) -> None:
    run_key = prepared["run_key"]
    model = BayesNBGenerator.load(ws.run_dir(run_key) / "model")
    at = run(via_app("posterior"))
    assert at.selectbox(key="po_run").value == run_key
    markdown = " ".join(texts(at.markdown))
    assert "**K = 2 latent factors.** The per-cell, per-gene term w is low rank, w = U·V" in (
        markdown)
    assert "**Gene-length term:** left out: no gene-length table was supplied." in markdown
    assert "condition **condition** with reference level **c0**" in markdown
    shown = {m.label: m.value for m in at.metric}
    assert shown["Optimiser steps"] == f"{model.fit_info['steps']:,}"
    assert shown["Inference"] == "mean-field ADVI"
    assert not [s for s in at.selectbox if s.key == "po_level"]  # two levels: no picker
    table = PO.effects_table(model)
    genes = at.multiselect(key=f"po_genes.{run_key}.c1")
    assert genes.value == PO.top_genes(table, "c1", 20)
    assert [c.key for c in at.get("plotly_chart")] == ["po_elbo", "po_forest", "po_volcano",
                                                       "po_dispersion"]
    forest = json.loads(at.get("plotly_chart")[1].proto.spec)
    assert set(forest["data"][0]["y"]) == set(genes.value)
    assert [b.label for b in at.get("download_button")] == [
        "Download the effects table (CSV)", "Download the posterior (NetCDF, ArviZ)"]
    assert "Run the checks" in [b.label for b in at.button]
    assert len(at.dataframe) == 1  # the effects; no checks stored yet

    genes.set_value(["gene0", "gene1"])
    run(at)
    forest = json.loads(at.get("plotly_chart")[1].proto.spec)
    assert set(forest["data"][0]["y"]) == {"gene0", "gene1"}

    result = posterior_checks({"run_key": run_key, "n_draws": 10, "max_cells": 200},
                              ctx(ws))
    at = run(via_app("posterior"))
    stored = PO.PosteriorChecks.load(ws.evaluation_dir(run_key, result["posterior_id"],
                                                       kind="posterior"))
    assert at.selectbox(key=f"po_stored.{run_key}").value == result["posterior_id"]
    assert len(at.dataframe) == 3  # the effects, the coverage and the held-out RMSE
    coverage = at.dataframe[1].value
    assert coverage["share_inside"].tolist() == pytest.approx(
        list(stored.summary["checks"]["coverage"].values()))
    rmse = at.dataframe[2].value
    assert rmse["rmse"].tolist() == pytest.approx(stored.rmse["rmse"].tolist())
    assert [c.key for c in at.get("plotly_chart")] == [
        "po_elbo", "po_forest", "po_volcano", "po_dispersion", "po_ppc_genes_fig",
        "po_ppc_scatter"]
    dispersion = json.loads(at.get("plotly_chart")[3].proto.spec)
    assert dispersion["layout"]["xaxis"]["title"]["text"] == "observed mean count per cell"


def three_levels(model: BayesNBGenerator) -> BayesNBGenerator:
    """The fitted model with a made-up third level c2 whose effects are −2 × those of c1 (a
    posterior with three levels without another fit)."""
    view = copy.copy(model)
    view.levels = ["c0", "c1", "c2"]
    view.level_share = np.array([0.4, 0.3, 0.3])
    view.posterior = dataclasses.replace(
        model.posterior, beta1=np.concatenate([model.posterior.beta1,
                                               -2.0 * model.posterior.beta1], axis=1))
    view.inference_data = None  # written anew from the posterior above
    return view


def test_effects_and_the_page_with_three_levels(ws: Workspace, prepared: dict[str, str],
                                                fitted: Any) -> None:
    model = three_levels(fitted[0])
    table = PO.effects_table(model)
    assert table["level"].tolist() == ["c1"] * N_GENES + ["c2"] * N_GENES
    c1, c2 = table[table["level"] == "c1"], table[table["level"] == "c2"]
    assert np.allclose(c2["mean"], -2.0 * c1["mean"].to_numpy())
    assert np.allclose(c2["pd"], c1["pd"].to_numpy())
    assert PO.top_genes(table, "c2", 20) == PO.top_genes(table, "c1", 20)
    ranked = PO.ranked_effects(table, "c2")
    assert (ranked["level"] == "c2").all() and ranked["pd"].is_monotonic_decreasing

    key = "threelevels00000"
    record = RunRecord(key=key, generator=model.name, config=dataclasses.asdict(model.config),
                       seed=0, dataset_id=prepared["dataset_id"],
                       split_id=prepared["split_id"], n_cells=N_TRAIN, n_genes=N_GENES)
    with ws.building_run(key) as folder:
        model.save(folder / "model")
        ws.finish_run(folder, record)
    at = via_app("posterior")
    at.session_state["run_key"] = key
    run(at)
    assert at.selectbox(key="po_run").value == key
    level = at.selectbox(key="po_level")
    assert level.options == ["c1", "c2"] and level.value == "c1"
    assert "the effects of **c1**, **c2** are measured against it" in " ".join(
        texts(at.markdown))
    level.set_value("c2")
    run(at)
    genes = at.multiselect(key=f"po_genes.{key}.c2").value
    assert genes == PO.top_genes(table, "c2", 20)
    forest = json.loads(at.get("plotly_chart")[1].proto.spec)["data"][0]
    assert np.allclose(array(forest["x"]), c2.set_index("gene").loc[forest["y"], "mean"])


def test_page_runs_the_checks_as_a_job(ws: Workspace, manager: JobManager,
                                       prepared: dict[str, str]) -> None:
    run_key = prepared["run_key"]
    at = run(via_app("posterior"))
    at.number_input(key="po_draws").set_value(5)
    at.number_input(key="po_cells").set_value(50)
    at.button(key="po_go").click()
    run(at)
    job_id = at.session_state["po_job"]
    assert manager.get(job_id).params == {"run_key": run_key, "n_draws": 5, "max_cells": 50,
                                          "seed": 0}
    record = wait_done(manager, job_id)
    run(at)
    assert at.session_state["po_result"] == (run_key, record.result["posterior_id"])
    assert record.result["message"] in texts(at.success)
    assert any(m.startswith("**50** training cells, **5** replicated datasets")
               for m in texts(at.markdown))


# -- the CLI -------------------------------------------------------------------------------------
def cli(root: Path, *args: object, expect: int = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "engine", "--workspace", str(root), "--quiet",
                           *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == expect, (proc.stdout, proc.stderr)
    return proc


def test_cli_posterior_prints_the_numbers(ws: Workspace, prepared: dict[str, str]) -> None:
    run_key = prepared["run_key"]
    out = json.loads(cli(ws.root, "posterior", "--run", run_key, "--draws", 8,
                         "--max-cells", 80).stdout)
    assert out["run_key"] == run_key and not out["cached"]
    assert set(out["coverage"]) == {"mean", "variance", "zero_fraction"}
    assert all(0.0 <= v <= 1.0 for v in out["coverage"].values())
    assert out["cells_checked"] == 80 and out["replicates"] == 8 and out["genes"] == N_GENES
    assert set(out["heldout_rmse"]) == {"model", "model_without_factors", "baseline"}
    assert out["heldout_cells"] == 80
    stored = PO.PosteriorChecks.load(Path(out["folder"]))
    assert out["coverage"]["mean"] == round(stored.summary["checks"]["coverage"]["mean"], 4)

    bad = cli(ws.root, "posterior", "--run", "nope", expect=2)
    assert "error: That run is no longer in the workspace; train it again." in (
        bad.stderr.splitlines())
    assert "Traceback" not in bad.stderr and bad.stdout == ""
