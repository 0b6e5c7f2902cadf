"""The comparison suite on real data: the floor holds, and known-bad synthetic data is caught
in the right direction by the right metrics."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from engine.data.split import apply_split, split_cells
from engine.errors import DataError
from engine.evaluate.suite import EvaluationResult, donor_halves, evaluate, shared_genes
from tests.conftest import KANG, PBMC3K_H5AD

pytestmark = pytest.mark.shared_data
ROLES = {"donor": "donor", "cell_type": "cell_type", "condition": "condition"}
MAX_CELLS = 600


@pytest.fixture(scope="module")
def kang_split() -> tuple[ad.AnnData, ad.AnnData]:
    adata = ad.read_h5ad(KANG)
    result = split_cells(adata.obs, donor_col="donor", stratify=["cell_type", "condition"],
                         test_fraction=0.5, seed=0)
    train, test = apply_split(adata, result)
    return train, test


def _run(test: ad.AnnData, synthetic: ad.AnnData, train: ad.AnnData | None = None,
         **kwargs) -> EvaluationResult:
    return evaluate(test, synthetic, train=train, roles=ROLES, max_cells=MAX_CELLS, seed=0,
                    **kwargs)


@pytest.fixture(scope="module")
def other_donors(kang_split) -> EvaluationResult:
    """Real cells of the training donors posing as synthetic: a perfect generator that
    reproduces donor-level variation reads at the floor."""
    train, test = kang_split
    return _run(test, train, audit=False)


def test_real_cells_of_other_donors_read_at_the_floor(other_donors: EvaluationResult) -> None:
    value, floor = other_donors.metric("classifier_auroc_gbt")
    assert 0.4 < floor < 0.75
    assert abs(value - floor) < 0.12
    value, floor = other_donors.metric("gene_mean_pearson")
    assert value > 0.95 and floor > 0.95
    assert other_donors.provenance["floor_unit"] == "donor"
    statuses = other_donors.metrics.set_index(["metric", "group"])["status"]
    assert (statuses.xs("all", level="group") == "poor").mean() < 0.2


def test_two_random_halves_of_one_dataset_read_at_half() -> None:
    adata = ad.read_h5ad(PBMC3K_H5AD)
    adata = adata[adata.obs["cell_type"].notna()].copy()
    order = np.random.default_rng(1).permutation(adata.n_obs)
    first, second = adata[np.sort(order[:1300])].copy(), adata[np.sort(order[1300:])].copy()
    result = evaluate(first, second, roles={"cell_type": "cell_type"}, max_cells=MAX_CELLS,
                      seed=0, audit=False)
    for name in ("classifier_auroc_gbt", "classifier_auroc_logreg"):
        value, floor = result.metric(name)
        assert abs(value - 0.5) < 0.08 and abs(floor - 0.5) < 0.08, name
    assert result.provenance["floor_unit"] == "cell"
    assert any("cell halves" in note for note in result.notes)


def test_shuffled_gene_identities_are_caught_by_genewise_not_by_ks(kang_split) -> None:
    train, test = kang_split
    shuffled = train.copy()
    shuffled.var_names = np.random.default_rng(0).permutation(train.var_names.to_numpy())
    result = _run(test, shuffled, audit=False)
    value, floor = result.metric("gene_mean_pearson")
    assert floor > 0.9 and value < 0.3
    value, floor = result.metric("ks_gene_mean")
    assert value < floor + 0.05  # blind to gene identity: why the design pairs them
    value, floor = result.metric("classifier_auroc_gbt")
    assert value > 0.9 > floor


def test_poisson_from_cell_type_means_has_too_few_zeros(kang_split) -> None:
    train, test = kang_split
    rng = np.random.default_rng(0)
    counts = train.X.tocsr()
    rows = []
    for cell_type in train.obs["cell_type"].astype(str):
        rows.append(cell_type)
    means = {t: np.asarray(counts[(train.obs["cell_type"] == t).to_numpy()].mean(axis=0)).ravel()
             for t in set(rows)}
    draws = sp.csr_matrix(np.vstack([rng.poisson(means[t]) for t in rows]).astype(np.int32))
    poisson = ad.AnnData(draws, obs=train.obs.copy(), var=train.var.copy())
    result = _run(test, poisson, audit=False)
    real_zero = 1 - test.X.nnz / (test.n_obs * test.n_vars)
    synthetic_zero = 1 - poisson.X.nnz / (poisson.n_obs * poisson.n_vars)
    assert synthetic_zero < real_zero  # the premise: Poisson around averages fills zeros
    value, floor = result.metric("ks_cell_zero_fraction")
    assert value > floor + 0.3
    value, floor = result.metric("classifier_auroc_gbt")
    assert value > floor + 0.2


def test_a_dropped_cell_type_is_caught_by_composition_and_coverage(kang_split) -> None:
    train, test = kang_split
    dropped = train[train.obs["cell_type"] != "CD4 T cells"].copy()  # the largest type
    result = _run(test, dropped, audit=False)
    value, floor = result.metric("composition_distance")
    assert value > floor + 0.1
    value, floor = result.metric("coverage")
    assert value < floor - 0.2
    labels = result.figures["umap"].query("source == 'synthetic'")["cell_type"]
    assert (labels == "CD4 T cells").mean() < 0.1  # the classifier finds few of them


def test_a_copy_of_the_training_cells_is_flagged_as_memorised(kang_split) -> None:
    train, test = kang_split
    result = _run(test, train.copy(), train=train)
    value, floor = result.metric("exact_copy_fraction")
    assert value == 1.0 and floor == 0.0
    # Distances use equal-sized subsamples of training and held-out cells, so only about
    # half the copies find their original; the signal is still far from the floor.
    value, floor = result.metric("median_dcr_ratio")
    assert value < floor - 0.2 and floor > 0.8
    value, floor = result.metric("fraction_closer_to_train")
    assert value > floor + 0.2
    assert result.audit is not None
    table = result.audit.table
    assert not table.empty
    assert table["auroc"].max() > 0.9


def test_result_round_trips_and_json_names_every_metric(other_donors, tmp_path: Path) -> None:
    other_donors.save(tmp_path / "evaluation")
    loaded = EvaluationResult.load(tmp_path / "evaluation")
    assert loaded.metrics.equals(other_donors.metrics)
    payload = json.loads((tmp_path / "evaluation" / "result.json").read_text())
    aurocs = [k for k in payload["metrics"] if "auroc" in k]
    assert "classifier_auroc_gbt" in aurocs
    assert set(payload["metrics"]["classifier_auroc_gbt"]) >= {"value", "floor"}
    assert loaded.figures["umap"].shape == other_donors.figures["umap"].shape


def test_per_type_rows_are_weighted_by_real_proportions(other_donors) -> None:
    rows = other_donors.metrics[other_donors.metrics["metric"] == "mmd"]
    groups = set(rows["group"])
    assert "per-type (weighted)" in groups and "CD4 T cells" in groups
    per_type = rows[~rows["group"].isin(["all", "per-type (weighted)"])]
    weighted = rows[rows["group"] == "per-type (weighted)"]["value"].iloc[0]
    assert per_type["value"].min() - 1e-9 <= weighted <= per_type["value"].max() + 1e-9


def test_no_shared_genes_is_a_sentence(kang_split) -> None:
    train, test = kang_split
    renamed = train.copy()
    renamed.var_names = [f"other{i}" for i in range(renamed.n_vars)]
    with pytest.raises(DataError, match="shares only 0 gene names"):
        shared_genes(test, renamed)


def test_donor_halves_are_disjoint_and_balanced() -> None:
    donors = np.repeat(["a", "b", "c", "d", "e"], [100, 90, 50, 40, 20])
    first, second, unit = donor_halves(donors, len(donors), np.random.default_rng(0))
    assert unit == "donor"
    assert not set(donors[first]) & set(donors[second])
    assert abs(len(first) - len(second)) <= 40
    first, second, unit = donor_halves(np.repeat(["a"], 10), 10, np.random.default_rng(0))
    assert unit == "cell" and len(first) == 5
