"""Readers: every format on real data, and every bad input with its message."""

from __future__ import annotations

import gzip
import io
import pickle
import re
import shutil
import stat
import warnings
import zipfile
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
from conftest import KANG, PBMC3K_10X, PBMC3K_H5AD, PBMC_SMALL

from engine.data.readers import (
    FORMATS,
    detect_format,
    extract_zip_safely,
    read_dataset,
    read_upload,
)
from engine.errors import DataError

# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def small() -> ad.AnnData:
    """pbmc_small (80 cells x 230 genes, int32 CSR)."""
    return ad.read_h5ad(PBMC_SMALL)


def assert_same_counts(got: ad.AnnData, want: ad.AnnData) -> None:
    """Assert identical shape, names and values, and that X is CSR."""
    assert sp.isspmatrix_csr(got.X)
    assert got.shape == want.shape
    assert list(got.obs_names) == list(want.obs_names)
    assert list(got.var_names) == list(want.var_names)
    assert n_different(got.X, want.X) == 0


def n_different(a: sp.spmatrix, b: sp.spmatrix | np.ndarray) -> int:
    """Return how many entries differ between two matrices."""
    return int((sp.csr_matrix(a) != sp.csr_matrix(b)).nnz)


def write_10x_v3(adata: ad.AnnData, folder: Path, *, extra_feature: bool = False) -> Path:
    """Write ``adata`` as a Cell Ranger v3 folder (gzipped mtx/features/barcodes)."""
    folder.mkdir(parents=True)
    matrix = sp.csr_matrix(adata.X).T.tocoo()  # genes x cells
    ids = [f"ENSG{i:011d}" for i in range(adata.n_vars)]
    names = list(adata.var_names)
    types = ["Gene Expression"] * adata.n_vars
    if extra_feature:  # one antibody row that the reader must drop
        matrix = sp.vstack([matrix, sp.csr_matrix(np.ones((1, adata.n_obs), dtype=np.int64))])
        ids.append("CD3_TotalSeqB")
        names.append("CD3")
        types.append("Antibody Capture")
    with gzip.open(folder / "matrix.mtx.gz", "wb") as handle:
        scipy.io.mmwrite(handle, sp.coo_matrix(matrix), field="integer")
    features = pd.DataFrame({"id": ids, "name": names, "type": types})
    features.to_csv(folder / "features.tsv.gz", sep="\t", header=False, index=False)
    pd.Series(adata.obs_names).to_csv(
        folder / "barcodes.tsv.gz", sep="\t", header=False, index=False
    )
    return folder


def write_10x_h5(adata: ad.AnnData, path: Path) -> Path:
    """Write ``adata`` in the Cell Ranger v3 HDF5 layout."""
    csc = sp.csr_matrix(adata.X)  # cells x genes CSR == genes x cells CSC, as 10x stores it
    with h5py.File(path, "w") as handle:
        group = handle.create_group("matrix")
        group["data"] = csc.data.astype(np.int32)
        group["indices"] = csc.indices.astype(np.int64)
        group["indptr"] = csc.indptr.astype(np.int64)
        group["shape"] = np.array([adata.n_vars, adata.n_obs], dtype=np.int32)
        group["barcodes"] = np.array(adata.obs_names, dtype="S")
        features = group.create_group("features")
        features["id"] = np.array([f"ENSG{i:011d}" for i in range(adata.n_vars)], dtype="S")
        features["name"] = np.array(adata.var_names, dtype="S")
        features["feature_type"] = np.array(["Gene Expression"] * adata.n_vars, dtype="S")
        features["genome"] = np.array(["GRCh38"] * adata.n_vars, dtype="S")
    return path


def zip_folder(folder: Path, zip_path: Path, *, include_top: bool) -> Path:
    """Zip a folder's files, with or without the folder itself as top-level entry."""
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                base = folder.parent if include_top else folder
                archive.write(file, file.relative_to(base).as_posix())
    return zip_path


def dense_frame(adata: ad.AnnData) -> pd.DataFrame:
    """Return X as a dense cells x genes frame (only for the tiny fixture)."""
    return pd.DataFrame(adata.X.toarray(), index=adata.obs_names, columns=adata.var_names)


def write_npz_chunks(
    adata: ad.AnnData,
    folder: Path,
    *,
    sizes: list[int],
    chunk_name: str,
    meta_name: str,
    meta_suffix: str,
) -> Path:
    """Write ``adata`` as npz chunks + metadata tables + genes.txt; return the folder."""
    folder.mkdir(parents=True)
    start = 0
    for number, size in zip([1, 2, 10, 11], sizes, strict=False):
        part = adata[start : start + size]
        sp.save_npz(folder / f"{chunk_name.format(number)}.npz", sp.csr_matrix(part.X))
        meta = part.obs.copy()
        target = folder / f"{meta_name.format(number)}{meta_suffix}"
        if meta_suffix == ".parquet":
            meta.to_parquet(target)
        else:
            meta.to_csv(target)
        start += size
    (folder / "genes.txt").write_text("\n".join(adata.var_names) + "\n")
    return folder


def leftovers(folder: Path) -> list[str]:
    """Return every entry left inside ``folder`` (recursively)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --------------------------------------------------------------------------- formats


def test_formats_cover_the_supported_list() -> None:
    assert set(FORMATS) == {"h5ad", "zarr", "10x_mtx", "10x_h5", "csv", "npz_chunks"}
    assert all(isinstance(label, str) and label for label in FORMATS.values())


@pytest.mark.shared_data
@pytest.mark.parametrize("path", [KANG, PBMC3K_H5AD, PBMC_SMALL], ids=["kang", "pbmc3k", "small"])
def test_h5ad_real_files(path: Path) -> None:
    want = ad.read_h5ad(path)
    assert detect_format(path) == "h5ad"
    got = read_dataset(path)
    assert_same_counts(got, want)
    assert got.X.dtype == np.int32
    pd.testing.assert_frame_equal(got.obs, want.obs)


@pytest.mark.shared_data
def test_10x_v1_folder_equals_h5ad() -> None:
    assert detect_format(PBMC3K_10X) == "10x_mtx"
    got = read_dataset(PBMC3K_10X)
    want = ad.read_h5ad(PBMC3K_H5AD)
    assert got.shape == (2700, 32738)
    assert got.X.nnz == 2_286_884
    assert sp.isspmatrix_csr(got.X) and got.X.dtype == np.int32
    assert list(got.obs_names) == list(want.obs_names)
    assert list(got.var["gene_ids"]) == list(want.var["gene_ids"])
    assert got.var_names.is_unique
    for cell in (0, 1, 1234, 2699):
        np.testing.assert_array_equal(got.X[cell].toarray(), want.X[cell].toarray())
    assert n_different(got.X, want.X) == 0


@pytest.mark.shared_data
def test_10x_parent_folder_is_resolved() -> None:
    parent = PBMC3K_10X.parent
    assert detect_format(parent) == "10x_mtx"
    assert read_dataset(parent).shape == (2700, 32738)


@pytest.mark.shared_data
def test_10x_v3_gz_folder(small: ad.AnnData, tmp_path: Path) -> None:
    folder = write_10x_v3(small, tmp_path / "filtered_feature_bc_matrix", extra_feature=True)
    assert detect_format(folder) == "10x_mtx"
    got = read_dataset(folder)
    assert_same_counts(got, small)  # the antibody feature was dropped
    assert got.var["gene_ids"].iloc[0] == "ENSG00000000000"
    assert "CD3" not in got.var_names


@pytest.mark.shared_data
@pytest.mark.parametrize("include_top", [True, False], ids=["with-folder", "flat"])
def test_zip_of_10x_folder(small: ad.AnnData, tmp_path: Path, include_top: bool) -> None:
    folder = write_10x_v3(small, tmp_path / "src" / "filtered_feature_bc_matrix")
    archive = zip_folder(folder, tmp_path / "tenx.zip", include_top=include_top)
    assert detect_format(archive) == "10x_mtx"
    work = tmp_path / "work"
    got = read_dataset(archive, workdir=work)
    assert_same_counts(got, small)
    assert leftovers(work) == []  # the extraction folder is gone


@pytest.mark.shared_data
@pytest.mark.parametrize("zarr_format", [2, 3], ids=["zarr-v2", "zarr-v3"])
def test_zarr_folder_and_zip(small: ad.AnnData, tmp_path: Path, zarr_format: int) -> None:
    store = tmp_path / "small.zarr"
    with ad.settings.override(zarr_write_format=zarr_format), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "v2 will no longer be the default"
        small.write_zarr(store)
    assert detect_format(store) == "zarr"
    got = read_dataset(store)
    assert_same_counts(got, small)
    pd.testing.assert_frame_equal(got.obs, small.obs)

    flat = zip_folder(store, tmp_path / "flat.zip", include_top=False)
    nested = zip_folder(store, tmp_path / "nested.zarr.zip", include_top=True)
    for archive in (flat, nested):
        assert detect_format(archive) == "zarr"
        got = read_dataset(archive, workdir=tmp_path / "work")
        assert_same_counts(got, small)
        assert list(got.obs["groups"]) == list(small.obs["groups"])
    assert leftovers(tmp_path / "work") == []


@pytest.mark.shared_data
def test_10x_h5_v3_layout(small: ad.AnnData, tmp_path: Path) -> None:
    path = write_10x_h5(small, tmp_path / "filtered_feature_bc_matrix.h5")
    assert detect_format(path) == "10x_h5"
    got = read_dataset(path)
    assert_same_counts(got, small)
    assert got.X.dtype == np.int32
    assert got.var["gene_ids"].iloc[-1] == f"ENSG{small.n_vars - 1:011d}"


@pytest.mark.shared_data
@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".csv.gz", ".tsv.gz", ".txt"])
@pytest.mark.parametrize("cells_as_columns", [False, True], ids=["cells-rows", "cells-columns"])
def test_tables_both_orientations(
    small: ad.AnnData, tmp_path: Path, suffix: str, cells_as_columns: bool
) -> None:
    frame = dense_frame(small)
    if cells_as_columns:
        frame = frame.T
    path = tmp_path / f"counts{suffix}"
    frame.to_csv(path, sep="," if ".csv" in suffix else "\t")
    assert detect_format(path) == "csv"
    got = read_dataset(path, cells_as_columns=cells_as_columns)
    assert_same_counts(got, small)
    assert got.X.dtype == np.int32


def test_dtypes_are_tidied(tmp_path: Path) -> None:
    whole = np.array([[0.0, 2.0, 0.0], [1.0, 0.0, 7.0]])
    ad.AnnData(X=whole).write_h5ad(tmp_path / "dense.h5ad")
    got = read_dataset(tmp_path / "dense.h5ad")
    assert sp.isspmatrix_csr(got.X) and got.X.dtype == np.int32
    np.testing.assert_array_equal(got.X.toarray(), whole)
    assert list(got.obs_names) == ["0", "1"]

    ad.AnnData(X=sp.csc_matrix(np.log1p(whole))).write_h5ad(tmp_path / "log.h5ad")
    got = read_dataset(tmp_path / "log.h5ad")
    assert sp.isspmatrix_csr(got.X) and got.X.dtype == np.float32
    np.testing.assert_allclose(got.X.toarray(), np.log1p(whole), rtol=1e-6)


def test_table_read_in_several_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.data.readers as readers

    rng = np.random.default_rng(0)
    values = rng.poisson(0.3, size=(500, 40)).astype(float)
    values[3, 5] = 0.5  # one non-integer: X must stay float32
    frame = pd.DataFrame(
        values, index=[f"c{i}" for i in range(500)], columns=[f"g{j}" for j in range(40)]
    )
    path = tmp_path / "counts.csv"
    frame.to_csv(path)
    blocks: list[int] = []
    original = readers.sp.vstack

    def counting_vstack(parts, **kwargs):  # type: ignore[no-untyped-def]
        blocks.append(len(parts))
        return original(parts, **kwargs)

    monkeypatch.setattr(readers, "TABLE_CHUNK_VALUES", 41 * 64)  # 64 rows per chunk
    monkeypatch.setattr(readers.sp, "vstack", counting_vstack)
    got = read_dataset(path)
    assert blocks == [8]  # 500 rows (41 fields with the names) in chunks of 64
    assert got.X.dtype == np.float32
    np.testing.assert_allclose(got.X.toarray(), values.astype(np.float32))
    assert list(got.obs_names[:2]) == ["c0", "c1"]


def test_table_with_text_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "counts.csv"
    path.write_text("cell,CD3E,cell_type\nc1,1,T\nc2,0,B\n")
    with pytest.raises(DataError, match=r"text where counts are expected.*cell_type"):
        read_dataset(path)


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("chunk_name", "meta_name", "meta_suffix"),
    [
        ("chunk_{:03d}", "chunk_{:03d}", ".csv"),
        ("human_counts_{}", "human_metadata_{}", ".parquet"),
    ],
    ids=["same-stem-csv", "counts-metadata-parquet"],
)
def test_npz_chunks(
    small: ad.AnnData, tmp_path: Path, chunk_name: str, meta_name: str, meta_suffix: str
) -> None:
    folder = write_npz_chunks(
        small,
        tmp_path / "chunks",
        sizes=[30, 25, 25],
        chunk_name=chunk_name,
        meta_name=meta_name,
        meta_suffix=meta_suffix,
    )
    assert detect_format(folder) == "npz_chunks"
    got = read_dataset(folder)
    assert_same_counts(got, small)
    assert list(got.obs["groups"]) == list(small.obs["groups"])
    assert list(got.obs["nCount_RNA"]) == list(small.obs["nCount_RNA"])

    archive = zip_folder(folder, tmp_path / "chunks.zip", include_top=True)
    assert_same_counts(read_dataset(archive, workdir=tmp_path / "work"), small)
    assert leftovers(tmp_path / "work") == []


def test_npz_chunks_natural_order_and_default_gene_names(tmp_path: Path) -> None:
    folder = tmp_path / "chunks"
    folder.mkdir()
    for number in (10, 2):  # "chunk_2" must come before "chunk_10"
        sp.save_npz(folder / f"chunk_{number}.npz", sp.csr_matrix(np.full((2, 3), number)))
        pd.DataFrame({"part": [number, number]}).to_csv(folder / f"chunk_{number}.csv", index=False)
    got = read_dataset(folder)
    assert list(got.obs["part"]) == [2, 2, 10, 10]
    assert list(got.var_names) == ["gene_0", "gene_1", "gene_2"]
    assert list(got.obs_names) == ["0", "1", "2", "3"]


def test_single_npz_file_is_not_taken_for_a_zip(tmp_path: Path) -> None:
    matrix = sp.csr_matrix(np.array([[1, 0, 2], [0, 3, 0]], dtype=np.int32))
    sp.save_npz(tmp_path / "counts.npz", matrix)
    assert detect_format(tmp_path / "counts.npz") == "npz_chunks"
    got = read_dataset(tmp_path / "counts.npz")
    assert n_different(got.X, matrix) == 0
    content = (tmp_path / "counts.npz").read_bytes()
    work = tmp_path / "uploads"
    assert n_different(read_upload("chunk.npz", content, workdir=work).X, matrix) == 0
    assert leftovers(work) == []


# --------------------------------------------------------------------------- bad input


def test_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "data.loom"
    path.write_bytes(b"not a dataset")
    with pytest.raises(DataError, match="not in a format we can read") as info:
        read_dataset(path)
    assert "h5ad" in str(info.value) and "10x" in str(info.value)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.md").write_text("hello")
    with pytest.raises(DataError, match="Supported formats"):
        detect_format(folder)
    with pytest.raises(DataError, match="does not exist"):
        read_dataset(tmp_path / "missing.h5ad")


@pytest.mark.shared_data
def test_truncated_h5ad(tmp_path: Path) -> None:
    content = PBMC_SMALL.read_bytes()
    path = tmp_path / "cut.h5ad"
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(DataError, match="corrupt or truncated") as info:
        read_dataset(path)
    assert info.value.__cause__ is not None  # chained from the library error


def test_garbage_zip(tmp_path: Path) -> None:
    path = tmp_path / "data.zip"
    path.write_bytes(b"PK\x03\x04" + b"\x00garbage" * 100)
    work = tmp_path / "work"
    with pytest.raises(DataError, match="corrupt or truncated"):
        read_dataset(path, workdir=work)
    assert leftovers(work) == []
    path.write_bytes(b"this is not a zip at all")
    with pytest.raises(DataError, match="corrupt or truncated"):
        read_dataset(path, workdir=work)
    assert leftovers(work) == []


def test_bad_mtx(tmp_path: Path) -> None:
    folder = tmp_path / "tenx"
    folder.mkdir()
    (folder / "matrix.mtx").write_text("%%MatrixMarket matrix coordinate integer general\nnope\n")
    (folder / "genes.tsv").write_text("ENSG1\tA\nENSG2\tB\n")
    (folder / "barcodes.tsv").write_text("c1\nc2\n")
    with pytest.raises(DataError, match="corrupt or truncated"):
        read_dataset(folder)
    scipy.io.mmwrite(folder / "matrix.mtx", sp.coo_matrix(np.ones((3, 2), dtype=int)))
    with pytest.raises(DataError, match=r"3 genes but 'genes\.tsv' lists 2"):
        read_dataset(folder)


def test_metadata_rows_mismatch(tmp_path: Path) -> None:
    folder = tmp_path / "chunks"
    folder.mkdir()
    sp.save_npz(folder / "chunk_0.npz", sp.csr_matrix(np.ones((4, 3))))
    pd.DataFrame({"cell_type": list("abc")}).to_csv(folder / "chunk_0.csv", index=False)
    with pytest.raises(DataError) as info:
        read_dataset(folder)
    message = str(info.value)
    assert "chunk_0.csv" in message and "3 rows" in message and "4 cells" in message


def test_npz_chunks_that_do_not_fit_together(tmp_path: Path) -> None:
    folder = tmp_path / "chunks"
    folder.mkdir()
    sp.save_npz(folder / "x_counts_1.npz", sp.csr_matrix(np.ones((2, 3))))
    (folder / "genes.txt").write_text("A\nB\n")
    with pytest.raises(
        DataError, match=re.escape("'genes.txt' lists 2 genes but the count chunks have 3")
    ):
        read_dataset(folder)
    sp.save_npz(folder / "x_counts_2.npz", sp.csr_matrix(np.ones((2, 4))))
    with pytest.raises(
        DataError, match=re.escape("'x_counts_2.npz' has 4 genes but the first chunk has 3")
    ):
        read_dataset(folder)
    (folder / "x_counts_2.npz").unlink()
    (folder / "genes.txt").write_text("A\nB\nC\n")
    pd.DataFrame({"id": ["a", "b"]}).to_parquet(folder / "x_metadata_1.parquet")
    sp.save_npz(folder / "x_counts_3.npz", sp.csr_matrix(np.ones((1, 3))))
    with pytest.raises(DataError, match=re.escape("'x_counts_3.npz' has no metadata table")):
        read_dataset(folder)
    (folder / "x_counts_3.npz").unlink()
    got = read_dataset(folder)
    assert list(got.var_names) == ["A", "B", "C"] and list(got.obs["id"]) == ["a", "b"]
    np.savez(folder / "x_counts_4.npz", values=np.ones((2, 3)))  # not save_npz
    with pytest.raises(DataError, match="not a scipy sparse matrix saved with"):
        read_dataset(folder)


class _CreatesFileWhenUnpickled:
    """Unpickling this object opens (creates) a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


def test_pickle_metadata_refused_without_opening(tmp_path: Path) -> None:
    folder = tmp_path / "chunks"
    folder.mkdir()
    marker = tmp_path / "pwned.txt"
    sp.save_npz(folder / "human_counts_0.npz", sp.csr_matrix(np.ones((2, 3))))
    (folder / "human_metadata_0.pkl").write_bytes(pickle.dumps(_CreatesFileWhenUnpickled(marker)))
    with pytest.raises(DataError) as info:
        read_dataset(folder)
    message = str(info.value)
    assert "arbitrary code" in message and "to_parquet" in message
    assert "human_metadata_0.pkl" in message
    assert not marker.exists()
    with pytest.raises(DataError, match="arbitrary code"):
        read_dataset(folder / "human_metadata_0.pkl")
    assert not marker.exists()


def _zip_with(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
    return path


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ("../escaped.txt", "outside"),
        ("/tmp/absolute.txt", "absolute path"),
        ("a/../../escaped.txt", "outside"),
    ],
    ids=["dotdot", "absolute", "nested-dotdot"],
)
def test_zip_slip_refused(tmp_path: Path, entry: str, words: str) -> None:
    archive = _zip_with(tmp_path / "evil.zip", {"ok.txt": b"fine", entry: b"evil"})
    dest = tmp_path / "box" / "dest"
    with pytest.raises(DataError, match=words):
        extract_zip_safely(archive, dest)
    assert not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path / "box" / "escaped.txt").exists()
    assert not dest.exists()
    assert leftovers(tmp_path) == ["evil.zip"]
    work = tmp_path / "work"
    with pytest.raises(DataError):
        read_dataset(archive, workdir=work)
    assert leftovers(work) == []


def test_zip_symlink_refused(tmp_path: Path) -> None:
    archive = tmp_path / "link.zip"
    info = zipfile.ZipInfo("link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match="symbolic link"):
        extract_zip_safely(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_zip_bomb_cap(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        handle.writestr("zeros.csv", b"0" * 5_000_000)
    with pytest.raises(DataError, match="GiB allowed"):
        extract_zip_safely(archive, tmp_path / "dest", max_total_bytes=1_000_000)
    assert leftovers(tmp_path) == ["bomb.zip"]
    dest = extract_zip_safely(archive, tmp_path / "dest")
    assert (dest / "zeros.csv").stat().st_size == 5_000_000


@pytest.mark.shared_data
def test_read_upload_bytes_and_file_object(small: ad.AnnData, tmp_path: Path) -> None:
    work = tmp_path / "uploads"
    got = read_upload("../My data.h5ad", PBMC_SMALL.read_bytes(), workdir=work)
    assert_same_counts(got, small)
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb") as handle:
        handle.write(dense_frame(small).to_csv().encode())
    buffer.seek(0)
    got = read_upload("counts.csv.gz", buffer, workdir=work)
    assert_same_counts(got, small)
    assert leftovers(work) == []


@pytest.mark.shared_data
def test_read_upload_failure_leaves_nothing(tmp_path: Path) -> None:
    work = tmp_path / "uploads"
    content = PBMC_SMALL.read_bytes()
    with pytest.raises(DataError, match="corrupt or truncated"):
        read_upload("cut.h5ad", content[:5000], workdir=work)
    with pytest.raises(DataError, match="corrupt or truncated"):
        read_upload("junk.zip", b"PK\x03\x04junk", workdir=work)
    with pytest.raises(DataError, match="arbitrary code"):
        read_upload("meta.pkl", b"\x80\x04N.", workdir=work)
    assert leftovers(work) == []


@pytest.mark.shared_data
def test_zip_of_single_h5ad(small: ad.AnnData, tmp_path: Path) -> None:
    archive = tmp_path / "one.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.write(PBMC_SMALL, "pbmc_small.h5ad")
        handle.writestr("__MACOSX/._pbmc_small.h5ad", b"junk")
    assert detect_format(archive) == "h5ad"
    assert_same_counts(read_dataset(archive, workdir=tmp_path / "w"), small)
    shutil.rmtree(tmp_path / "w")
