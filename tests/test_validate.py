"""Validation: counts check, each refusal with its sentence, and the fixes it offers."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from conftest import KANG, PBMC_SMALL

from engine.data.validate import (
    CountsCheck,
    check_counts,
    iter_row_chunks,
    make_names_unique,
    use_counts_layer,
    validate_dataset,
)
from engine.errors import DataError


@pytest.fixture
def small() -> ad.AnnData:
    """A fresh copy of pbmc_small (80 x 230 int32 counts) per test."""
    return ad.read_h5ad(PBMC_SMALL)


def toy(values: np.ndarray) -> ad.AnnData:
    """Return a tiny AnnData with named cells c0.. and genes g0.. around ``values``."""
    adata = ad.AnnData(X=sp.csr_matrix(values))
    adata.obs_names = [f"c{i}" for i in range(values.shape[0])]
    adata.var_names = [f"g{j}" for j in range(values.shape[1])]
    return adata


def n_different(a: sp.spmatrix, b: sp.spmatrix) -> int:
    """Return how many entries differ between two sparse matrices."""
    return int((sp.csr_matrix(a) != sp.csr_matrix(b)).nnz)


@pytest.mark.shared_data
def test_real_counts_pass() -> None:
    adata = ad.read_h5ad(KANG)
    check = validate_dataset(adata, require_counts=True)
    assert isinstance(check, CountsCheck)
    assert check.is_counts
    assert check.message == "X holds raw integer counts."
    assert check.max_value == float(adata.X.max())
    assert check.fraction_integer == 1.0
    assert check.layer_with_counts is None


@pytest.mark.shared_data
def test_normalised_data_is_recognised(small: ad.AnnData) -> None:
    counts = small.X.copy()
    small.X = np.log1p(counts.astype(np.float32))
    check = check_counts(small)
    assert not check.is_counts
    assert "normalised" in check.message and "log" in check.message
    assert "layers['counts']" in check.message
    assert 0.0 <= check.fraction_integer < 0.2
    assert check.max_value == pytest.approx(float(np.log1p(counts.max())), rel=1e-6)
    assert check.layer_with_counts is None
    # without require_counts it is a finding, not an error
    assert not validate_dataset(small).is_counts
    with pytest.raises(DataError, match="normalised or log-transformed") as info:
        validate_dataset(small, require_counts=True)
    assert info.value.fix is None


@pytest.mark.shared_data
def test_counts_found_in_layer_and_raw(small: ad.AnnData) -> None:
    counts = small.X.copy()
    normalised = small.copy()
    normalised.X = np.log1p(counts.astype(np.float32))
    normalised.layers["counts"] = counts
    check = check_counts(normalised)
    assert check.layer_with_counts == "counts"
    assert "layer 'counts' holds raw counts" in check.message
    with pytest.raises(DataError, match="layer 'counts' holds raw counts: use it") as info:
        validate_dataset(normalised, require_counts=True)
    assert info.value.fix is None  # the only fix the UI offers as a button is make_unique
    fixed = use_counts_layer(normalised, "counts")
    assert sp.isspmatrix_csr(fixed.X)
    assert n_different(fixed.X, counts) == 0
    assert validate_dataset(fixed, require_counts=True).is_counts
    assert "counts" not in fixed.layers and "counts" in normalised.layers  # original untouched

    with_raw = small.copy()
    with_raw.raw = small.copy()
    with_raw.X = np.log1p(counts.astype(np.float32))
    assert check_counts(with_raw).layer_with_counts == "raw"
    assert n_different(use_counts_layer(with_raw, "raw").X, counts) == 0
    with pytest.raises(DataError, match="no layer 'spliced'"):
        use_counts_layer(with_raw, "spliced")


def test_empty_matrices() -> None:
    with pytest.raises(DataError, match="empty: it has 0 cells and 3 genes"):
        validate_dataset(ad.AnnData(X=sp.csr_matrix((0, 3), dtype=np.float32)))
    with pytest.raises(DataError, match="empty: it has 2 cells and 0 genes"):
        validate_dataset(ad.AnnData(X=sp.csr_matrix((2, 0), dtype=np.float32)))
    with pytest.raises(DataError, match="only zeros"):
        validate_dataset(toy(np.zeros((3, 4))))


def test_nan_inf_negative_each_their_sentence() -> None:
    values = np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0]])
    nan = values.copy()
    nan[1, 2] = np.nan
    with pytest.raises(DataError, match=r"X contains 1 NaN \(missing\) value,") as info:
        validate_dataset(toy(nan))
    assert "cell 'c1', gene 'g2'" in str(info.value)

    inf = values.copy()
    inf[0, 0], inf[1, 1] = np.inf, -np.inf
    with pytest.raises(DataError, match="X contains 2 infinite values, the first in cell 'c0'"):
        validate_dataset(toy(inf))

    negative = values.copy()
    negative[1, 1] = -0.8
    with pytest.raises(DataError, match="X contains 1 negative value ") as info:
        validate_dataset(toy(negative))
    message = str(info.value)
    assert "-0.8" in message and "scaled" in message and "cell 'c1', gene 'g1'" in message
    assert not check_counts(toy(negative)).is_counts


@pytest.mark.shared_data
def test_duplicated_names_offer_make_unique(small: ad.AnnData) -> None:
    names = list(small.var_names)
    names[5] = names[4]
    small.var_names = names
    cells = list(small.obs_names)
    cells[1] = cells[0]
    small.obs_names = cells
    with pytest.raises(DataError) as info:
        validate_dataset(small)
    assert info.value.fix == "make_unique"
    message = str(info.value)
    assert "1 cell name" in message and "1 gene name" in message
    assert names[4] in message and "unique" in message
    fixed = make_names_unique(small)
    assert fixed is small
    assert small.obs_names.is_unique and small.var_names.is_unique
    assert validate_dataset(small).is_counts


def test_integers_as_float_are_counts() -> None:
    check = check_counts(toy(np.array([[1.0, 0.0], [5.0, 2.0]], dtype=np.float32)))
    assert check.is_counts and check.max_value == 5.0


def test_dense_and_backed_matrices(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    values = rng.poisson(1.0, size=(300, 20)).astype(np.float32)
    values[250, 3] = 2.5
    dense = ad.AnnData(X=values)
    check = check_counts(dense, chunk_size=64)
    assert not check.is_counts and "2.5" in check.message
    expected_fraction = 1 - 1 / np.count_nonzero(values)
    assert check.fraction_integer == pytest.approx(expected_fraction)

    ad.AnnData(X=sp.csr_matrix(values)).write_h5ad(tmp_path / "x.h5ad")
    backed = ad.read_h5ad(tmp_path / "x.h5ad", backed="r")
    try:
        backed_check = check_counts(backed, chunk_size=64)
    finally:
        backed.file.close()
    assert backed_check == check


def test_iter_row_chunks_covers_every_row() -> None:
    matrix = sp.random(1000, 30, density=0.1, format="csr", random_state=0)
    parts = list(iter_row_chunks(matrix, chunk_size=300))
    assert [start for start, _ in parts] == [0, 300, 600, 900]
    assert n_different(sp.vstack([chunk for _, chunk in parts]), matrix) == 0
    dense_parts = list(iter_row_chunks(matrix.toarray(), chunk_size=300))
    assert n_different(sp.vstack([chunk for _, chunk in dense_parts]), matrix) == 0
    csc_parts = list(iter_row_chunks(matrix.tocsc(), chunk_size=999))
    assert len(csc_parts) == 2
