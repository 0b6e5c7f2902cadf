"""Tests of the chunked two-level loader: four source kinds on Kang, threads on synthetic data."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from engine.data.chunks import (
    MANIFEST_NAME,
    PREFETCH_THREAD_PREFIX,
    Batch,
    ChunkSource,
    H5adChunkSource,
    InMemoryChunkSource,
    NpzChunkSource,
    TwoLevelLoader,
    ZarrChunkSource,
    gene_positions,
    open_chunk_source,
    write_npz_chunks,
)
from engine.errors import DataError
from tests.conftest import KANG

KANG_CELLS = 600
CHUNK = 128  # 600 cells: four chunks of 128 and one of 88
BATCH = 50
COLUMNS = ["cell_type", "condition"]
SOURCE_KINDS = ["memory", "h5ad", "zarr", "npz"]

# anndata announces its future zarr default on every write_zarr; irrelevant here.
pytestmark = pytest.mark.filterwarnings("ignore:Writing zarr v2 data:UserWarning")


@pytest.fixture(scope="module")
def kang() -> ad.AnnData:
    """The first 600 Kang cells, all 9015 genes, integer counts in CSR."""
    return ad.read_h5ad(KANG)[:KANG_CELLS].copy()


@pytest.fixture(scope="module")
def kang_genes(kang: ad.AnnData) -> np.ndarray:
    """400 gene positions in a random (unsorted) order."""
    return np.random.default_rng(1).choice(kang.n_vars, 400, replace=False)


@pytest.fixture(scope="module")
def kang_stores(kang: ad.AnnData, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The Kang cells written as .h5ad, .zarr and an npz chunk folder."""
    folder = tmp_path_factory.mktemp("kang")
    kang.write_h5ad(folder / "kang.h5ad")
    kang.write_zarr(folder / "kang.zarr")
    write_npz_chunks(kang, folder / "kang_npz", chunk_size=CHUNK)
    return {"h5ad": folder / "kang.h5ad", "zarr": folder / "kang.zarr",
            "npz": folder / "kang_npz"}


@pytest.fixture
def kang_source(request: pytest.FixtureRequest, kang: ad.AnnData,
                kang_stores: dict[str, Path]) -> Any:
    """The Kang cells as the chunk source kind named by the test's parameter; closed after."""
    kind = request.param
    source = open_chunk_source(kang if kind == "memory" else kang_stores[kind], chunk_size=CHUNK)
    yield source
    source.close()


def _synthetic(n_obs: int = 1000, n_vars: int = 40, *, seed: int = 0) -> ad.AnnData:
    """Random sparse integer counts with a categorical and a numeric obs column."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(0.3, size=(n_obs, n_vars)).astype(np.int32)
    obs = pd.DataFrame({"group": pd.Categorical(rng.choice(["a", "b", "c"], n_obs)),
                        "depth": counts.sum(axis=1)},
                       index=[f"cell{i}" for i in range(n_obs)])
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_vars)])
    return ad.AnnData(sp.csr_matrix(counts), obs=obs, var=var)


def _same_counts(batch_X: sp.csr_matrix, expected: Any) -> bool:
    """Whether a batch's float32 CSR counts equal ``expected`` (integer counts) exactly."""
    expected = sp.csr_matrix(expected)
    return (isinstance(batch_X, sp.csr_matrix) and batch_X.dtype == np.float32
            and batch_X.shape == expected.shape and (batch_X != expected).nnz == 0)


def _epoch_rows(loader: TwoLevelLoader) -> np.ndarray:
    return np.concatenate([batch.rows for batch in loader])


def _live_loader_threads(join_s: float = 2.0) -> list[threading.Thread]:
    """Prefetch threads still alive after giving each ``join_s`` seconds to end."""
    threads = [t for t in threading.enumerate() if t.name.startswith(PREFETCH_THREAD_PREFIX)]
    for thread in threads:
        thread.join(join_s)
    return [thread for thread in threads if thread.is_alive()]


class _CountingSource(InMemoryChunkSource):
    """An in-memory source that counts its chunk reads and can fail on one chunk."""

    def __init__(self, adata: ad.AnnData, *, chunk_size: int, fail_on: int | None = None) -> None:
        super().__init__(adata, chunk_size=chunk_size)
        self.reads: list[int] = []
        self.fail_on = fail_on

    def _read_matrix(self, i: int, start: int, stop: int) -> Any:
        if i == self.fail_on:
            raise RuntimeError(f"disk on fire while reading chunk {i}")
        self.reads.append(i)
        return super()._read_matrix(i, start, stop)


class _RecordingMatrix:
    """Wraps an on-disk matrix and records every index it is read with."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.shape = inner.shape
        self.keys: list[Any] = []

    def __getitem__(self, key: Any) -> Any:
        self.keys.append(key)
        return self.inner[key]


# --- one epoch over every source kind ------------------------------------------------------


@pytest.mark.shared_data
@pytest.mark.parametrize("kang_source", SOURCE_KINDS, indirect=True)
def test_epoch_covers_every_cell_once_with_exact_counts_and_obs(
        kang_source: ChunkSource, kang: ad.AnnData, kang_genes: np.ndarray) -> None:
    assert (kang_source.n_obs, kang_source.n_chunks, kang_source.chunk_size) == (600, 5, CHUNK)
    assert list(kang_source.var_names) == list(kang.var_names)
    loader = TwoLevelLoader(kang_source, batch_size=BATCH, genes=kang_genes, columns=COLUMNS,
                            seed=3)
    batches = list(loader)

    rows = np.concatenate([batch.rows for batch in batches])
    assert rows.dtype == np.int64
    np.testing.assert_array_equal(np.sort(rows), np.arange(KANG_CELLS))
    assert len(batches) == len(loader) == 4 * 3 + 2
    # Batches never mix chunks: 128 -> 50, 50, 28 and 88 -> 50, 38.
    assert all(np.unique(batch.rows // CHUNK).size == 1 for batch in batches)
    assert Counter(len(batch) for batch in batches) == {BATCH: 9, 28: 4, 38: 1}

    expected_obs = kang.obs[COLUMNS]
    for batch in batches:
        assert isinstance(batch.X, sp.csr_matrix) and batch.X.dtype == np.float32
        expected = kang.X[batch.rows][:, kang_genes]
        assert _same_counts(batch.X, expected)
        pd.testing.assert_frame_equal(batch.obs, expected_obs.iloc[batch.rows])
    pd.testing.assert_frame_equal(kang_source.obs(COLUMNS), expected_obs)


@pytest.mark.shared_data
@pytest.mark.parametrize("kind", ["h5ad", "zarr"])
def test_disk_sources_read_only_the_chunk_row_range(kind: str, kang: ad.AnnData,
                                                    kang_stores: dict[str, Path]) -> None:
    with open_chunk_source(kang_stores[kind], chunk_size=CHUNK) as source:
        assert isinstance(source, H5adChunkSource if kind == "h5ad" else ZarrChunkSource)
        assert not sp.issparse(source.X) and not isinstance(source.X, np.ndarray)
        source.X = _RecordingMatrix(source.X)
        chunk = source.read_chunk(2, columns=["cell_type"])
        assert source.X.keys == [slice(256, 384)]
        assert chunk.X.shape == (CHUNK, kang.n_vars)
        np.testing.assert_array_equal(chunk.rows, np.arange(256, 384))
        assert _same_counts(chunk.X, kang.X[256:384])
        if kind == "h5ad":
            assert source.adata.isbacked and not sp.issparse(source.adata.X)
    if kind == "h5ad":
        assert not source.adata.file.is_open


@pytest.mark.shared_data
def test_npz_folder_from_a_backed_h5ad_keeps_integer_counts(kang: ad.AnnData,
                                                            kang_stores: dict[str, Path],
                                                            tmp_path: Path) -> None:
    backed = ad.read_h5ad(kang_stores["h5ad"], backed="r")
    try:
        folder = write_npz_chunks(backed, tmp_path / "chunks", chunk_size=256)
    finally:
        backed.file.close()
    stored = sp.load_npz(folder / "chunk_00002.npz")
    assert stored.dtype == kang.X.dtype and stored.shape == (KANG_CELLS - 512, kang.n_vars)
    assert (stored != kang.X[512:]).nnz == 0


# --- order and batching ----------------------------------------------------------------------


def test_epochs_differ_and_the_same_seed_repeats_them() -> None:
    source = open_chunk_source(_synthetic(), chunk_size=100)
    loader = TwoLevelLoader(source, batch_size=32, seed=5)
    first, second = _epoch_rows(loader), _epoch_rows(loader)
    for rows in (first, second):
        np.testing.assert_array_equal(np.sort(rows), np.arange(1000))
    assert not np.array_equal(first, second)
    again = TwoLevelLoader(source, batch_size=32, seed=5)
    np.testing.assert_array_equal(_epoch_rows(again), first)
    np.testing.assert_array_equal(_epoch_rows(again), second)
    resumed = TwoLevelLoader(source, batch_size=32, seed=5)
    resumed.set_epoch(1)
    np.testing.assert_array_equal(_epoch_rows(resumed), second)
    assert resumed.epoch == 2
    assert not np.array_equal(_epoch_rows(TwoLevelLoader(source, batch_size=32, seed=6)), first)


def test_without_shuffle_batches_follow_the_source_order() -> None:
    source = open_chunk_source(_synthetic(), chunk_size=100)
    loader = TwoLevelLoader(source, batch_size=32, shuffle=False)
    batches = list(loader)
    np.testing.assert_array_equal(np.concatenate([b.rows for b in batches]), np.arange(1000))
    assert [len(b) for b in batches[:4]] == [32, 32, 32, 4]


def test_drop_last_keeps_only_full_batches() -> None:
    source = open_chunk_source(_synthetic(), chunk_size=100)
    loader = TwoLevelLoader(source, batch_size=32, drop_last=True, seed=1)
    batches = list(loader)
    assert len(batches) == len(loader) == 10 * 3
    assert {len(batch) for batch in batches} == {32}
    rows = np.concatenate([batch.rows for batch in batches])
    assert np.unique(rows).size == rows.size == 10 * 96


def test_genes_by_position_mask_or_name_select_the_same_columns() -> None:
    adata = _synthetic(n_obs=50)
    source = open_chunk_source(adata)
    wanted = np.array([7, 2, 30])
    names = adata.var_names[wanted].to_numpy()
    mask = np.isin(np.arange(adata.n_vars), wanted)
    np.testing.assert_array_equal(gene_positions(names, source.var_names), wanted)
    np.testing.assert_array_equal(gene_positions(mask, source.var_names), [2, 7, 30])
    by_name = source.read_chunk(0, genes=names)
    assert _same_counts(by_name.X, adata.X[:, wanted])
    with pytest.raises(DataError, match=r"not in the data, e\.g\. 'CD3E'"):
        gene_positions(np.array(["gene1", "CD3E"]), source.var_names)
    with pytest.raises(DataError, match="between 0 and 39"):
        gene_positions(np.array([40]), source.var_names)
    with pytest.raises(DataError, match="no cell annotation column 'donor'"):
        TwoLevelLoader(source, batch_size=8, columns=["donor"])


@pytest.mark.parametrize("kind", ["memory", "h5ad", "zarr"])
def test_dense_counts_are_read_by_row_range_too(kind: str, tmp_path: Path) -> None:
    adata = _synthetic(n_obs=300)
    dense = adata.copy()
    dense.X = adata.X.toarray()
    if kind == "h5ad":
        dense.write_h5ad(tmp_path / "dense.h5ad")
    elif kind == "zarr":
        dense.write_zarr(tmp_path / "dense.zarr")
    target = {"memory": dense, "h5ad": tmp_path / "dense.h5ad", "zarr": tmp_path / "dense.zarr"}
    with open_chunk_source(target[kind], chunk_size=128) as source:
        chunk = source.read_chunk(2, genes=np.array([3, 1]), columns=["depth"])
    assert chunk.X.shape == (300 - 256, 2) and chunk.X.dtype == np.float32
    assert _same_counts(chunk.X, adata.X[256:][:, [3, 1]])
    np.testing.assert_array_equal(chunk.obs["depth"], adata.obs["depth"].iloc[256:])


# --- the prefetch thread ---------------------------------------------------------------------


def test_a_single_chunk_is_read_once_and_needs_no_thread() -> None:
    source = _CountingSource(_synthetic(n_obs=200), chunk_size=8192)
    loader = TwoLevelLoader(source, batch_size=64)
    for _ in range(3):
        for _batch in loader:
            assert _live_loader_threads(join_s=0) == []
    assert source.reads == [0]


def test_prefetch_thread_reads_ahead_but_only_prefetch_chunks() -> None:
    source = _CountingSource(_synthetic(), chunk_size=100)
    loader = TwoLevelLoader(source, batch_size=50, prefetch=2)
    for _batch in loader:
        assert len(_live_loader_threads(join_s=0)) == 1
        time.sleep(0.3)  # a slow consumer: the thread fills the queue and waits
        # The chunk being consumed, two in the queue and one read waiting for room.
        assert len(source.reads) <= 1 + 2 + 1
        break
    assert _live_loader_threads() == []


def test_an_error_in_a_chunk_read_reaches_the_consumer() -> None:
    source = _CountingSource(_synthetic(), chunk_size=100, fail_on=3)
    loader = TwoLevelLoader(source, batch_size=50, shuffle=False)
    seen: list[Batch] = []
    with pytest.raises(RuntimeError, match="disk on fire while reading chunk 3"):
        for batch in loader:
            seen.append(batch)
    np.testing.assert_array_equal(np.concatenate([b.rows for b in seen]), np.arange(300))
    assert _live_loader_threads() == []


def test_breaking_early_and_abandoning_iterators_leave_no_thread() -> None:
    source = open_chunk_source(_synthetic(), chunk_size=100)
    loader = TwoLevelLoader(source, batch_size=50, prefetch=1)
    for _ in range(3):
        for _batch in loader:
            break
    iterator = iter(loader)
    next(iterator)
    del iterator
    assert _live_loader_threads() == []
    assert len(_epoch_rows(loader)) == 1000  # the loader still works after all that


# --- the npz chunk folder --------------------------------------------------------------------


def test_write_npz_chunks_is_atomic_and_round_trips(tmp_path: Path) -> None:
    adata = _synthetic(n_obs=250)
    folder = write_npz_chunks(adata, tmp_path / "chunks", chunk_size=100)
    assert [p.name for p in tmp_path.iterdir()] == ["chunks"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "chunk_00000.npz", "chunk_00000.obs.parquet", "chunk_00001.npz",
        "chunk_00001.obs.parquet", "chunk_00002.npz", "chunk_00002.obs.parquet", MANIFEST_NAME]
    source = open_chunk_source(folder, chunk_size=7)  # the chunking on disk wins
    assert isinstance(source, NpzChunkSource)
    assert [source.chunk_length(i) for i in range(source.n_chunks)] == [100, 100, 50]
    pd.testing.assert_frame_equal(source.obs(["group", "depth"]), adata.obs)
    chunk = source.read_chunk(2, columns=["group"])
    assert _same_counts(chunk.X, adata.X[200:])

    with pytest.raises(FileExistsError):
        write_npz_chunks(adata, folder)
    write_npz_chunks(adata[:30], folder, chunk_size=10, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["chunks"]
    assert open_chunk_source(folder).n_chunks == 3


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    save_npz = sp.save_npz
    calls: list[object] = []

    def failing_save(path: Any, matrix: Any, **kwargs: Any) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError("No space left on device")
        save_npz(path, matrix, **kwargs)

    monkeypatch.setattr(sp, "save_npz", failing_save)
    with pytest.raises(OSError, match="No space left"):
        write_npz_chunks(_synthetic(n_obs=250), tmp_path / "chunks", chunk_size=100)
    assert list(tmp_path.iterdir()) == []


def test_a_corrupt_chunk_file_gives_a_data_error_in_read_and_loader(tmp_path: Path) -> None:
    folder = write_npz_chunks(_synthetic(), tmp_path / "chunks", chunk_size=100)
    (folder / "chunk_00004.npz").write_bytes(b"PK\x03\x04 this is not a zip archive")
    source = open_chunk_source(folder)
    with pytest.raises(DataError, match=r"The chunk file 'chunk_00004.npz' .* is corrupt") as info:
        source.read_chunk(4)
    assert str(info.value).endswith("write the chunks again.")
    with pytest.raises(DataError, match=r"chunk_00004\.npz"):
        _epoch_rows(TwoLevelLoader(source, batch_size=50))
    assert _live_loader_threads() == []


_TRIPWIRE: list[str] = []


def _tripwire_fired() -> list[str]:
    _TRIPWIRE.append("unpickled")
    return _TRIPWIRE


class _Tripwire:
    """An object whose unpickling leaves a trace in ``_TRIPWIRE``."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _tripwire_fired, ()


def test_a_chunk_holding_pickles_is_refused_without_unpickling(tmp_path: Path) -> None:
    folder = write_npz_chunks(_synthetic(n_obs=20), tmp_path / "chunks", chunk_size=10)
    with (folder / "chunk_00001.npz").open("wb") as handle:
        np.savez(handle, format=np.array("csr"), shape=np.array([10, 40]),
                 data=np.array([_Tripwire()], dtype=object), indices=np.array([0]),
                 indptr=np.array([0, 1] + [1] * 9))
    with pytest.raises(DataError, match="corrupt or unreadable"):
        open_chunk_source(folder).read_chunk(1)
    assert _TRIPWIRE == []


def test_unknown_missing_or_corrupt_sources_give_data_errors(tmp_path: Path) -> None:
    (tmp_path / "counts.txt").write_text("gene,cell\n")
    (tmp_path / "broken.h5ad").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    (tmp_path / "empty").mkdir()
    bad_manifest = tmp_path / "bad_manifest"
    bad_manifest.mkdir()
    (bad_manifest / MANIFEST_NAME).write_text("{not json")
    csc = _synthetic(n_obs=30)
    csc.X = sp.csc_matrix(csc.X)
    csc.write_h5ad(tmp_path / "csc.h5ad")
    cases = {"counts.txt": "cannot be read in chunks", "missing.h5ad": "does not exist",
             "broken.h5ad": "could not be opened as an AnnData .h5ad file",
             "empty": "neither an AnnData Zarr store nor a chunk folder",
             "bad_manifest": "manifest.json of the chunk folder 'bad_manifest' is unreadable",
             "csc.h5ad": "stores its counts by gene"}
    for name, message in cases.items():
        with pytest.raises(DataError, match=re.escape(message)) as info:
            open_chunk_source(tmp_path / name)
        assert str(info.value).rstrip().endswith("."), name
