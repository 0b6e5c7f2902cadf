"""Dataset summary numbers and column-role guessing on the real datasets."""

from __future__ import annotations

import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import CITESEQ_2BATCH, KANG, PBMC3K_H5AD, PBMC_SMALL, ZHENG

from engine.data.roles import ROLES, guess_roles, validate_roles
from engine.data.summary import DatasetSummary, mito_mask, summarize

# --------------------------------------------------------------------------- summary


@pytest.fixture(scope="module")
def pbmc3k() -> ad.AnnData:
    """The 10x PBMC 3k raw counts (2700 x 32738)."""
    return ad.read_h5ad(PBMC3K_H5AD)


@pytest.mark.shared_data
def test_pbmc3k_numbers(pbmc3k: ad.AnnData) -> None:
    summary = summarize(pbmc3k, chunk_size=1000)  # three chunks
    assert isinstance(summary, DatasetSummary)
    assert (summary.n_cells, summary.n_genes) == (2700, 32738)
    assert summary.nnz == 2_286_884
    assert summary.sparsity == pytest.approx(1 - 2_286_884 / (2700 * 32738))
    assert summary.counts.is_counts
    np.testing.assert_array_equal(summary.library_size, np.asarray(pbmc3k.X.sum(axis=1)).ravel())
    np.testing.assert_array_equal(summary.n_detected, pbmc3k.X.getnnz(axis=1))
    assert summary.library_size.min() > 0

    is_mito = pbmc3k.var_names.str.startswith("MT-")
    assert summary.mito_genes == int(is_mito.sum()) == 13
    expected = np.asarray(pbmc3k.X[:, is_mito].sum(axis=1)).ravel() / summary.library_size
    assert summary.mito_fraction is not None
    np.testing.assert_allclose(summary.mito_fraction, expected, rtol=1e-12)
    # the Seurat tutorial QC keeps cells with percent.mt < 5: every kept cell must agree
    kept = pbmc3k.obs["seurat_tutorial_qc_pass"].to_numpy(dtype=bool)
    assert (summary.mito_fraction[kept] < 0.05).all()

    columns = summary.obs_columns.set_index("column")
    assert columns.loc["cell_type", "n_missing"] == 62
    assert columns.loc["cell_type", "n_levels"] == 9
    assert columns.loc["cell_type", "top_levels"].startswith("Naive CD4 T: 697, Memory CD4 T: 483")


@pytest.mark.shared_data
def test_backed_equals_in_memory(pbmc3k: ad.AnnData) -> None:
    backed = ad.read_h5ad(PBMC3K_H5AD, backed="r")
    try:
        on_disk = summarize(backed, chunk_size=700)
    finally:
        backed.file.close()
    in_memory = summarize(pbmc3k)
    np.testing.assert_array_equal(on_disk.library_size, in_memory.library_size)
    np.testing.assert_array_equal(on_disk.n_detected, in_memory.n_detected)
    assert on_disk.nnz == in_memory.nnz
    assert on_disk.counts == in_memory.counts


@pytest.mark.shared_data
def test_kang_obs_columns_and_no_mito() -> None:
    summary = summarize(ad.read_h5ad(KANG))
    assert summary.mito_fraction is None and summary.mito_genes == 0
    columns = summary.obs_columns.set_index("column")
    assert list(summary.obs_columns.columns) == [
        "column",
        "dtype",
        "n_levels",
        "top_levels",
        "n_missing",
    ]
    assert columns.loc["condition", "top_levels"] == "ctrl: 1000, stim: 1000"
    assert columns.loc["condition", "n_levels"] == 2
    assert columns.loc["donor", "n_levels"] == 8
    assert columns.loc["donor", "top_levels"].startswith("1015: 424, 1488: 387")
    assert columns.loc["sample", "n_levels"] == 16
    assert columns.loc["cell_type", "n_levels"] == 8
    assert columns.loc["multiplets", "top_levels"] == "singlet: 1917, ambs: 83"
    assert (columns["n_missing"] == 0).all()
    assert columns.loc["donor", "dtype"] == "category"


@pytest.mark.shared_data
def test_numeric_obs_columns_show_a_range() -> None:
    summary = summarize(ad.read_h5ad(PBMC_SMALL))
    columns = summary.obs_columns.set_index("column")
    assert columns.loc["nCount_RNA", "top_levels"].startswith("range ")
    assert columns.loc["groups", "top_levels"] == "g1: 44, g2: 36"


def test_dense_explicit_zeros_and_symbol_column() -> None:
    values = np.array([[1, 0, 3], [0, 0, 0], [2, 5, 0]], dtype=np.float32)
    adata = ad.AnnData(X=values)
    adata.var_names = ["ENSG1", "ENSG2", "ENSG3"]
    adata.var["gene_symbols"] = ["MT-CO1", "CD3E", "MT-ND1"]
    summary = summarize(adata)
    np.testing.assert_array_equal(summary.library_size, [4, 0, 7])
    np.testing.assert_array_equal(summary.n_detected, [2, 0, 2])
    assert summary.mito_genes == 2
    np.testing.assert_allclose(summary.mito_fraction, [1.0, 0.0, 2 / 7])
    assert summary.sparsity == pytest.approx(5 / 9)

    stored_zero = sp.csr_matrix(values)
    stored_zero.data[0] = 0  # an explicit zero is stored but not detected
    summary = summarize(ad.AnnData(X=stored_zero))
    np.testing.assert_array_equal(summary.n_detected, [1, 0, 2])
    assert summary.nnz == 3


def test_mito_prefixes() -> None:
    mask = mito_mask(pd.Index(["MT-CO1", "mt-Nd1", "MTOR", "CD3E", "Mt-Co2"]))
    assert list(mask) == [True, True, False, False, True]


def test_million_cells_fast() -> None:
    n_cells, n_genes, per_row = 1_000_000, 2000, 20
    rng = np.random.default_rng(0)
    columns = np.sort(rng.choice(n_genes, per_row, replace=False)).astype(np.int32)
    matrix = sp.csr_matrix(
        (
            rng.integers(1, 30, size=n_cells * per_row, dtype=np.int32),
            np.tile(columns, n_cells),
            np.arange(0, (n_cells + 1) * per_row, per_row, dtype=np.int64),
        ),
        shape=(n_cells, n_genes),
    )
    adata = ad.AnnData(X=matrix)
    start = time.perf_counter()
    summary = summarize(adata)
    elapsed = time.perf_counter() - start
    assert elapsed < 20, f"summarize took {elapsed:.1f} s"
    assert summary.nnz == n_cells * per_row
    assert summary.library_size[:3].tolist() == matrix[:3].sum(axis=1).A1.tolist()


# --------------------------------------------------------------------------- roles


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (KANG, {"donor": "donor", "cell_type": "cell_type", "condition": "condition"}),
        (PBMC3K_H5AD, {"cell_type": "cell_type", "donor": None}),
        (ZHENG, {"cell_type": "cell_type", "donor": None, "batch": None}),
        (CITESEQ_2BATCH, {"batch": "batch", "cell_type": None}),
    ],
    ids=["kang", "pbmc3k", "zheng", "citeseq_2batch"],
)
def test_guess_roles_on_real_data(path: Path, expected: dict[str, str | None]) -> None:
    obs = ad.read_h5ad(path, backed="r").obs
    roles = guess_roles(obs)
    assert set(roles) == set(ROLES)
    for role, column in expected.items():
        assert roles[role] == column


def test_guess_roles_synonyms_and_priorities() -> None:
    n = 100
    obs = pd.DataFrame(
        {
            "Individual": [f"d{i % 4}" for i in range(n)],
            "cell-label": pd.Categorical([f"t{i % 3}" for i in range(n)]),
            "STIM": ["ctrl", "stim"] * (n // 2),
            "n_counts": np.linspace(100, 1000, n),
        }
    )
    assert guess_roles(obs) == {
        "donor": "Individual",
        "cell_type": "cell-label",
        "condition": "STIM",
        "batch": None,
    }
    # 'sample' loses to 'donor'; a float column is never a label; a unique id is not a donor
    obs = pd.DataFrame(
        {
            "sample": [f"s{i % 6}" for i in range(n)],
            "donor_id": [i % 3 for i in range(n)],
            "cell_type": np.linspace(0, 1, n),
            "patient": [f"p{i}" for i in range(n)],
            "Batch": ["b1"] * n,  # one level is fine for a batch
        }
    )
    roles = guess_roles(obs)
    assert roles == {"donor": "donor_id", "cell_type": None, "condition": None, "batch": "Batch"}


def test_guess_roles_uses_a_column_once() -> None:
    obs = pd.DataFrame({"sample": [f"s{i % 5}" for i in range(50)]})
    roles = guess_roles(obs)
    assert roles["donor"] == "sample"
    assert list(roles.values()).count("sample") == 1


@pytest.mark.shared_data
def test_validate_roles_warnings() -> None:
    obs = ad.read_h5ad(KANG, backed="r").obs.copy()
    assert validate_roles(obs, guess_roles(obs)) == []

    obs["donor"] = obs["donor"].astype(object)
    obs.loc[obs.index[:5], "donor"] = np.nan
    obs["one"] = "x"
    warnings = validate_roles(
        obs, {"donor": "donor", "cell_type": "one", "condition": "condition", "batch": "missing"}
    )
    text = " ".join(warnings)
    assert "5 cells have no donor in 'donor'" in text
    assert "cell type column 'one' has a single level" in text
    assert "batch column 'missing' is not in the cell metadata" in text

    warnings = validate_roles(obs, {"donor": "condition", "condition": "condition"})
    assert any("used both as donor and as condition" in w for w in warnings)
    obs["barcode"] = obs.index
    assert any("looks like a cell ID" in w for w in validate_roles(obs, {"donor": "barcode"}))
