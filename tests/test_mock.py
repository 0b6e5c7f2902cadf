"""Tests of the multimodal mock generator (engine.generators.mock); small sizes, fast."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from engine.errors import DataError, JobCancelled
from engine.generators import mock
from engine.generators.mock import (
    SCENARIO_DESCRIPTIONS,
    SCENARIOS,
    MockConfig,
    config_to_kwargs,
    generate_mock_dataset,
)

SMALL: dict[str, Any] = {"n_cells": 600, "n_genes": 80, "n_peaks": 150, "n_proteins": 8}
MODALITIES = ("rna", "atac", "adt")
CATEGORICAL = ("batch", "dataset", "donor", "cluster", "cell_type", "condition", "split")


def resolve(adata: ad.AnnData, location: str) -> Any:
    """Return the object a ``keys`` location such as ``"obsm/X_atac"`` points at."""
    if location == "X":
        return adata.X
    slot, key = location.split("/", 1)
    return getattr(adata, slot)[key]


def dense(matrix: Any) -> np.ndarray:
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


def has(adata: ad.AnnData, modality: str) -> np.ndarray:
    return adata.obs[f"has_{modality}"].to_numpy()


@pytest.fixture(scope="module")
def datasets() -> dict[str, tuple[ad.AnnData, dict[str, Any]]]:
    """One small dataset per scenario, shared by the tests of this module."""
    return {name: generate_mock_dataset(name, **SMALL) for name in SCENARIOS}


# --------------------------------------------------------------------------- structure


def test_scenarios_have_descriptions() -> None:
    assert set(SCENARIO_DESCRIPTIONS) == set(SCENARIOS) and len(SCENARIOS) == 6
    assert all(isinstance(text, str) and text for text in SCENARIO_DESCRIPTIONS.values())


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_shapes_keys_and_dtypes(scenario: str, datasets: dict) -> None:
    adata, keys = datasets[scenario]
    n, g, p, k = SMALL["n_cells"], SMALL["n_genes"], SMALL["n_peaks"], SMALL["n_proteins"]
    assert adata.shape == (n, g)
    for location in (keys["rna"], keys["rna_counts"], keys["truth"]["rna"]):
        matrix = resolve(adata, location)
        assert isinstance(matrix, sp.csr_matrix) and matrix.dtype == np.int32
        assert matrix.shape == (n, g)
    assert (adata.layers["counts"] != adata.X).nnz == 0
    assert adata.X is not adata.layers["counts"]
    for location in (keys["atac"], keys["truth"]["atac"]):
        matrix = resolve(adata, location)
        assert isinstance(matrix, sp.csr_matrix) and matrix.shape == (n, p)
        assert set(np.unique(matrix.data)) <= {1}
    for location in (keys["adt"], keys["truth"]["adt"]):
        matrix = resolve(adata, location)
        assert isinstance(matrix, np.ndarray) and matrix.dtype == np.float32
        assert matrix.shape == (n, k)
    assert resolve(adata, keys["latent"]).shape == (n, 10)
    assert resolve(adata, keys["latent_batch"]).shape == (n, 10)
    for modality, location in keys["masks"].items():
        assert resolve(adata, location).dtype == bool, modality
    for column in CATEGORICAL:
        assert isinstance(adata.obs[column].dtype, pd.CategoricalDtype), column
        assert resolve(adata, keys[column]) is not None
    assert list(adata.var_names[:2]) == ["gene_00001", "gene_00002"]
    assert len(adata.uns["adt_names"]) == k and len(adata.uns["atac_peak_names"]) == p
    assert adata.uns["mock_scenario"] == scenario == adata.uns["mock_config"]["problem_type"]
    assert adata.obs["cell_type"].nunique() == adata.obs["cluster"].nunique() == 4
    assert keys["modalities"] == [m for m in MODALITIES if has(adata, m).any()]
    for role, column in keys["roles"].items():
        assert column in adata.obs, role


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_hidden_entries_zero_and_truth_kept(scenario: str, datasets: dict) -> None:
    adata, keys = datasets[scenario]
    for modality in MODALITIES:
        observed = dense(resolve(adata, keys[modality]))
        truth = dense(resolve(adata, keys["truth"][modality]))
        mask = has(adata, modality)
        assert not observed[~mask].any(), f"{modality}: hidden entries must be zero"
        np.testing.assert_array_equal(observed[mask], truth[mask])
        if (~mask).any():
            # the truth of hidden cells is still there (ATAC rows may be empty by chance)
            assert (truth[~mask] != 0).any(axis=1).mean() > 0.9, modality


# --------------------------------------------------------------------------- scenarios


def test_paired_masks(datasets: dict) -> None:
    adata, _ = datasets["paired"]
    assert has(adata, "rna").all() and has(adata, "adt").all()
    assert not has(adata, "atac").any()
    assert adata.obsm["X_atac"].nnz == 0 and adata.obsm["X_atac_true"].nnz > 0


def test_unpaired_masks(datasets: dict) -> None:
    adata, _ = datasets["unpaired"]
    rna, atac = has(adata, "rna"), has(adata, "atac")
    assert not (rna & atac).any(), "no cell may have both RNA and ATAC"
    assert (rna | atac).all() and not has(adata, "adt").any()
    assert abs(rna.mean() - 0.5) < 0.05 and abs(atac.mean() - 0.5) < 0.05


@pytest.mark.parametrize("fraction", [0.05, 0.2])
def test_bridge_fraction(fraction: float) -> None:
    adata, _ = generate_mock_dataset(
        "bridge", **{**SMALL, "n_cells": 1000}, bridge_fraction=fraction
    )
    rna, atac = has(adata, "rna"), has(adata, "atac")
    both = rna & atac
    assert abs(both.mean() - fraction) < 0.01
    assert (rna & ~atac).mean() > 0.3 and (atac & ~rna).mean() > 0.3
    assert (rna | atac).all()
    assert adata.uns["mock_config"]["bridge_fraction"] == fraction


def test_mosaic_masks(datasets: dict) -> None:
    adata, _ = datasets["mosaic"]
    masks = np.column_stack([has(adata, m) for m in MODALITIES])
    assert masks.any(axis=1).all(), "every cell keeps at least one modality"
    combos = {tuple(row) for row in masks}
    assert len(combos) >= 6
    # P(keep) = p + (1 - p)^3 / 3 once empty cells are given one modality back
    expected = 0.6 + 0.4**3 / 3
    assert np.all(np.abs(masks.mean(axis=0) - expected) < 0.06)


@pytest.mark.parametrize(("target", "source"), [("adt", "rna"), ("atac", "rna"), ("rna", "atac")])
def test_prediction_masks(target: str, source: str) -> None:
    adata, keys = generate_mock_dataset(
        "prediction", **SMALL, prediction_target=target, eval_fraction=0.25
    )
    is_eval = (adata.obs["split"] == "eval").to_numpy()
    assert abs(is_eval.mean() - 0.25) < 0.01
    assert not has(adata, target)[is_eval].any(), "evaluation cells hide the target"
    assert has(adata, target)[~is_eval].all(), "training cells have the target"
    assert has(adata, source).all()
    assert keys["prediction"] == {"source": source, "target": target}
    assert set(adata.obs["split"].cat.categories) == {"train", "eval"}


def test_split_is_train_outside_prediction(datasets: dict) -> None:
    adata, _ = datasets["paired"]
    assert (adata.obs["split"] == "train").all()


def _log_norm(counts: sp.csr_matrix) -> np.ndarray:
    counts = counts.toarray().astype(float)
    return np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)


def test_hierarchical_studies_and_batch_shift() -> None:
    adata, _ = generate_mock_dataset("hierarchical", n_cells=3000, n_genes=200, n_peaks=50)
    obs = adata.obs
    studies = list(obs["dataset"].cat.categories)
    assert len(studies) == 3 and obs["dataset"].value_counts().min() > 100
    mixes = {
        study: tuple(has(adata, m)[(obs["dataset"] == study).to_numpy()].mean() for m in MODALITIES)
        for study in studies
    }
    assert mixes == {"study1": (1, 0, 1), "study2": (1, 1, 0), "study3": (1, 0, 0)}
    assert len(set(mixes.values())) == 3
    # batches and donors are nested in studies
    for column in ("batch", "donor"):
        assert (pd.crosstab(obs[column], obs["dataset"]) > 0).sum(axis=1).max() == 1

    # batch shift: within the largest cell type, study means differ far more than two
    # random halves of one study do
    expr = _log_norm(adata.layers["counts_true"])
    cell_type = obs["cluster"].value_counts().index[0]
    in_type = (obs["cluster"] == cell_type).to_numpy()
    means = {s: expr[in_type & (obs["dataset"] == s).to_numpy()].mean(axis=0) for s in studies}
    between = min(
        np.linalg.norm(means[a] - means[b]) for a, b in itertools.combinations(studies, 2)
    )
    rows = np.flatnonzero(in_type & (obs["dataset"] == studies[0]).to_numpy())
    rng = np.random.default_rng(0)
    rng.shuffle(rows)
    half = rows.size // 2
    within = np.linalg.norm(expr[rows[:half]].mean(axis=0) - expr[rows[half:]].mean(axis=0))
    assert between > 3 * within
    # and the technical latent offsets differ by study
    offset = adata.obsm["X_latent_batch"]
    centres = np.array([offset[(obs["dataset"] == s).to_numpy()].mean(axis=0) for s in studies])
    assert np.linalg.norm(centres[0] - centres[1]) > 1.0


def test_hierarchical_uses_at_least_three_donors() -> None:
    adata, _ = generate_mock_dataset("hierarchical", **SMALL, n_donors=1)
    assert adata.obs["donor"].nunique() == 3
    assert adata.uns["mock_config"]["n_donors"] == 3


# --------------------------------------------------------------------------- the model


def test_realistic_sparsity_and_library_sizes() -> None:
    adata, _ = generate_mock_dataset(
        "paired", n_cells=500, n_genes=2000, n_peaks=2000, n_proteins=10
    )
    counts = adata.layers["counts_true"]
    zeros = 1 - counts.nnz / np.prod(counts.shape)
    assert 0.8 <= zeros <= 0.95
    library = np.asarray(counts.sum(axis=1)).ravel()
    assert 1e3 <= np.median(library) <= 1e4
    assert np.percentile(library, 5) > 500 and np.percentile(library, 95) < 2e4
    peak_open = np.asarray(adata.obsm["X_atac_true"].mean(axis=0)).ravel()
    assert 0.02 <= np.median(peak_open) <= 0.10
    assert adata.obsm["X_atac_true"].dtype == np.uint8
    assert (adata.obsm["X_adt_true"] > 0).all()


def _true_mean(adata: ad.AnnData) -> np.ndarray:
    """The NB mean of every (cell, gene) from the stored ground-truth parameters."""
    z = adata.obsm["X_latent"].astype(float) + adata.obsm["X_latent_batch"].astype(float)
    eta = z @ adata.varm["true_loadings"].astype(float).T
    eta += adata.var["true_log_bias"].to_numpy(float)
    eta += adata.obs["true_log_offset"].to_numpy()[:, None]
    return np.exp(eta)


def test_rna_is_overdispersed_negative_binomial() -> None:
    adata, _ = generate_mock_dataset("paired", n_cells=3000, n_genes=300, n_peaks=20, seed=3)
    counts = adata.layers["counts_true"].toarray().astype(float)
    mu = _true_mean(adata)
    expressed = mu.mean(axis=0) >= 2.0
    assert expressed.sum() >= 20
    # the stored parameters give the mean of every gene
    totals = counts.sum(axis=0)[expressed] / mu.sum(axis=0)[expressed]
    assert np.median(np.abs(totals - 1)) < 0.03

    def pearson_ratio(x: np.ndarray) -> np.ndarray:
        # var/mean per gene with each cell's own mean removed (cluster, library, batch fixed)
        return (((x - mu) ** 2) / mu).mean(axis=0)[expressed]

    poisson = np.random.default_rng(0).poisson(mu).astype(float)
    assert 0.9 < np.median(pearson_ratio(poisson)) < 1.1  # what Poisson would give
    assert np.median(pearson_ratio(counts)) > 1.5
    # method-of-moments dispersion: E[(x - mu)^2 - x] = phi mu^2
    phi_hat = (((counts - mu) ** 2 - counts).sum(axis=0) / (mu**2).sum(axis=0))[expressed]
    phi = adata.var["true_dispersion"].to_numpy()[expressed]
    assert 0.8 < np.median(phi_hat / phi) < 1.25
    assert abs(np.median(phi) - 0.3) < 0.1


@pytest.mark.parametrize(
    ("mean", "phi"), [(0.05, 0.3), (0.7, 0.3), (3.0, 1.0), (3.0, 5.0), (25.0, 0.3)]
)
def test_nb_sampler_matches_numpy(mean: float, phi: float) -> None:
    rng = np.random.default_rng(1)
    mu = np.full((1000, 200), mean)
    size = np.full(200, 1 / phi)
    ours = mock._sample_nb(mu, size, rng).ravel()
    ref = rng.negative_binomial(1 / phi, (1 / phi) / (1 / phi + mean), size=ours.size)
    assert ours.dtype.kind == "i" and ours.min() >= 0
    assert abs(ours.mean() - mean) < 4 * np.sqrt((mean + phi * mean**2) / ours.size)
    assert abs(ours.var() / (mean + phi * mean**2) - 1) < 0.05
    for k in (0, 1, 2):
        assert abs((ours == k).mean() - (ref == k).mean()) < 0.006


def test_clusters_are_separable(datasets: dict) -> None:
    adata, _ = datasets["paired"]
    cluster = adata.obs["cluster"].cat.codes.to_numpy()
    for features in (np.log(adata.obsm["X_adt_true"]), adata.obsm["X_latent"]):
        centroids = np.array([features[cluster == k].mean(axis=0) for k in range(4)])
        nearest = np.argmin(((features[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
        assert (nearest == cluster).mean() > 0.9
        assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(centroids, 2)) > 1.0


def test_n_clusters_is_clipped() -> None:
    many, _ = generate_mock_dataset("paired", **SMALL, n_clusters=12)
    few, _ = generate_mock_dataset("paired", **SMALL, n_clusters=1)
    assert many.obs["cluster"].cat.categories.size == 5
    assert few.obs["cluster"].cat.categories.size == 3
    assert many.uns["mock_config"]["n_clusters"] == 5


# --------------------------------------------------------------------------- reproducibility


def _arrays(adata: ad.AnnData) -> dict[str, np.ndarray]:
    out = {"X": dense(adata.X), "counts_true": dense(adata.layers["counts_true"])}
    out.update({key: dense(value) for key, value in adata.obsm.items()})
    out.update({f"has_{m}": has(adata, m) for m in MODALITIES})
    out["cluster"] = adata.obs["cluster"].to_numpy()
    out["donor"] = adata.obs["donor"].to_numpy()
    return out


def test_same_seed_same_data_other_seed_other_data(
    datasets: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _arrays(datasets["mosaic"][0])
    monkeypatch.setattr(mock, "_n_threads", lambda: 1)  # thread count must not matter
    again = _arrays(generate_mock_dataset("mosaic", **SMALL)[0])
    for key, value in first.items():
        np.testing.assert_array_equal(value, again[key], err_msg=key)
    other = _arrays(generate_mock_dataset("mosaic", **SMALL, seed=1)[0])
    for key in ("X", "counts_true", "X_atac_true", "X_adt_true", "X_latent", "has_rna"):
        assert not np.array_equal(first[key], other[key]), key


def test_chunked_generation_matches_across_chunk_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many small chunks give data of the same law (and run through the assembly path)."""
    monkeypatch.setattr(mock, "_RNA_CHUNK_ENTRIES", 1000)
    monkeypatch.setattr(mock, "_ATAC_CHUNK_ENTRIES", 1000)
    seen: list[float] = []
    adata, _ = generate_mock_dataset("paired", **SMALL, progress=lambda f, m: seen.append(f))
    assert len(seen) > 50 and seen == sorted(seen) and seen[-1] == 1.0
    reference, _ = generate_mock_dataset("paired", **SMALL)
    np.testing.assert_array_equal(adata.obsm["X_latent"], reference.obsm["X_latent"])
    a, b = adata.layers["counts_true"], reference.layers["counts_true"]
    assert abs(a.sum() / b.sum() - 1) < 0.05 and abs(a.nnz / b.nnz - 1) < 0.05


def test_config_round_trip_reproduces(datasets: dict) -> None:
    adata, _ = datasets["bridge"]
    again, _ = generate_mock_dataset(**config_to_kwargs(adata.uns["mock_config"]))
    assert (again.X != adata.X).nnz == 0


# --------------------------------------------------------------------------- progress, errors


def test_progress_reports_and_cancels() -> None:
    seen: list[tuple[float, str]] = []
    generate_mock_dataset("paired", **SMALL, progress=lambda f, m: seen.append((f, m)))
    fractions = [f for f, _ in seen]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert all(isinstance(m, str) and m for _, m in seen)

    def cancel(fraction: float, message: str) -> None:
        if fraction > 0.1:
            raise JobCancelled

    with pytest.raises(JobCancelled):
        generate_mock_dataset("paired", **SMALL, progress=cancel)


def test_bad_scenario_lists_the_valid_ones() -> None:
    with pytest.raises(DataError) as info:
        generate_mock_dataset("multiome")
    message = str(info.value)
    assert "multiome" in message and all(name in message for name in SCENARIOS)


@pytest.mark.parametrize(
    "options",
    [
        {"n_cells": 5},
        {"n_cells": 100.5},
        {"n_genes": 0},
        {"n_peaks": -3},
        {"n_proteins": True},
        {"bridge_fraction": 1.5},
        {"eval_fraction": 0.0},
        {"mosaic_keep_prob": float("nan")},
        {"dispersion": -1.0},
        {"seed": -1},
        {"prediction_target": "protein"},
    ],
)
def test_bad_options_raise_a_sentence(options: dict[str, Any]) -> None:
    with pytest.raises(DataError) as info:
        generate_mock_dataset("prediction", **options)
    message = str(info.value)
    assert message.endswith(".") and len(message) > 20


def test_options_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        generate_mock_dataset("paired", 100)  # type: ignore[misc]


# --------------------------------------------------------------------------- config, h5ad


def test_mock_config_mirrors_the_function() -> None:
    signature = inspect.signature(generate_mock_dataset)
    defaults = {name: p.default for name, p in signature.parameters.items() if name != "progress"}
    config = MockConfig()
    assert dataclasses.asdict(config) == defaults
    for f in dataclasses.fields(MockConfig):
        assert f.metadata["label"] and f.metadata["help"], f.name
        if isinstance(f.default, str):
            assert f.default in f.metadata["choices"], f.name
        else:
            assert f.metadata["min"] <= f.default <= f.metadata["max"], f.name
    kwargs = config_to_kwargs(MockConfig(problem_type="mosaic", n_cells=300))
    assert kwargs["problem_type"] == "mosaic" and kwargs["n_cells"] == 300
    assert set(kwargs) == set(defaults)
    assert config_to_kwargs({"n_cells": 50, "unknown": 1})["n_cells"] == 50


@pytest.mark.parametrize("scenario", ["mosaic", "hierarchical"])
def test_h5ad_round_trip(scenario: str, datasets: dict, tmp_path: Path) -> None:
    adata, _ = datasets[scenario]
    path = tmp_path / f"{scenario}.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    for key, value in _arrays(adata).items():
        np.testing.assert_array_equal(value, _arrays(back)[key], err_msg=key)
    assert sp.issparse(back.obsm["X_atac"]) and isinstance(back.obsm["X_adt"], np.ndarray)
    assert back.uns["mock_config"] == adata.uns["mock_config"]
    assert back.uns["mock_scenario"] == scenario
    assert back.uns["mock_keys"]["masks"] == adata.uns["mock_keys"]["masks"]
    assert list(back.uns["atac_peak_names"]) == list(adata.uns["atac_peak_names"])
    for column in CATEGORICAL:
        assert isinstance(back.obs[column].dtype, pd.CategoricalDtype)
