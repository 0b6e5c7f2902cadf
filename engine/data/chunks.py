"""Read cells in chunks of rows and minibatches, for training neural generators on large data.

Two levels:

* a :class:`ChunkSource` reads one chunk of consecutive rows (cells) at a time from memory, a
  backed ``.h5ad`` file, an AnnData Zarr store or a folder of ``.npz`` chunks, so only one
  chunk's counts (plus the prefetched ones) are ever in memory;
* a :class:`TwoLevelLoader` shuffles the chunk order, permutes the rows within each chunk and
  cuts it into minibatches. With more than one chunk a background thread reads the next chunks
  while the consumer trains on the current one.

Shuffling is therefore *local*: a batch only ever holds cells of one chunk. With data stored
in a biologically meaningful order (all cells of a donor, then the next) every batch leans
towards the donors of its chunk; use a chunk size much larger than the batch size, or write the
chunks from a shuffled copy of the data (``write_npz_chunks(adata[perm], ...)``).

The ``.npz`` chunk format written by :func:`write_npz_chunks`::

    folder/manifest.json              {"format": "synthcell-npz-chunks", "version": 1,
                                       "n_obs", "n_vars", "chunk_size", "var_names",
                                       "obs_columns", "chunks": [{"matrix", "obs", "n_obs"}]}
    folder/chunk_00000.npz            scipy.sparse.save_npz of the chunk's CSR rows (counts, in
                                      the data's own dtype)
    folder/chunk_00000.obs.parquet    the chunk's obs rows, index = obs names

Reading it never unpickles anything (:func:`scipy.sparse.load_npz` loads with
``allow_pickle=False``; parquet holds no pickles).
"""

from __future__ import annotations

import contextlib
import json
import queue
import shutil
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from engine.errors import DataError

__all__ = [
    "MANIFEST_NAME",
    "PREFETCH_THREAD_PREFIX",
    "Batch",
    "ChunkSource",
    "H5adChunkSource",
    "InMemoryChunkSource",
    "NpzChunkSource",
    "TwoLevelLoader",
    "ZarrChunkSource",
    "gene_positions",
    "open_chunk_source",
    "write_npz_chunks",
]

MANIFEST_NAME = "manifest.json"
NPZ_FORMAT = "synthcell-npz-chunks"
NPZ_FORMAT_VERSION = 1
PREFETCH_THREAD_PREFIX = "chunk-prefetch"

# How often a blocked prefetch thread looks whether the consumer has stopped listening.
_PUT_POLL_S = 0.05
# A closing loader waits this long for the chunk read in flight; the thread is a daemon and
# exits by itself after that read, so a hung disk cannot hang the consumer forever.
_JOIN_TIMEOUT_S = 60.0


@dataclass
class Batch:
    """Some cells of a source: their counts, their obs rows and their positions in the source.

    ``X`` is a float32 :class:`scipy.sparse.csr_matrix` (cells × genes, restricted to the
    requested genes in the requested order), ``obs`` the requested obs columns indexed by obs
    names, ``rows`` the int64 positions of the cells in the source.
    """

    X: sp.csr_matrix
    obs: pd.DataFrame
    rows: np.ndarray

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def take(self, positions: np.ndarray) -> Batch:
        """Return the cells at ``positions`` (positions within this batch) as a new batch."""
        return Batch(X=self.X[positions], obs=self.obs.iloc[positions], rows=self.rows[positions])


class ChunkSource:
    """Cells read chunk by chunk: chunk ``i`` is the consecutive rows ``chunk_bounds(i)``.

    Subclasses set the attributes in ``__init__`` (through :meth:`_set_layout`) and implement
    :meth:`_read_matrix` and :meth:`_read_obs`. A source may hold an open file: :meth:`close`
    (or ``with``) releases it.
    """

    n_obs: int
    var_names: pd.Index
    obs_columns: list[str]
    chunk_size: int
    description: str

    def _set_layout(self, *, var_names: pd.Index, obs_columns: Sequence[str],
                    chunk_lengths: Sequence[int], chunk_size: int, description: str) -> None:
        """Set the shared attributes; ``chunk_lengths`` are the rows of each chunk in order."""
        self.var_names = pd.Index(var_names).astype(str)
        self.obs_columns = [str(column) for column in obs_columns]
        self.chunk_size = int(chunk_size)
        self.description = description
        self._chunk_starts = np.concatenate([[0], np.cumsum(chunk_lengths, dtype=np.int64)])
        self.n_obs = int(self._chunk_starts[-1])

    @property
    def n_vars(self) -> int:
        return len(self.var_names)

    @property
    def n_chunks(self) -> int:
        return len(self._chunk_starts) - 1

    def chunk_bounds(self, i: int) -> tuple[int, int]:
        """Return ``(start, stop)``: chunk ``i`` holds the source rows ``start:stop``."""
        if not 0 <= i < self.n_chunks:
            raise IndexError(f"chunk {i} does not exist; {self.description} has "
                             f"{self.n_chunks} chunks")
        return int(self._chunk_starts[i]), int(self._chunk_starts[i + 1])

    def chunk_length(self, i: int) -> int:
        """Return the number of cells in chunk ``i``."""
        start, stop = self.chunk_bounds(i)
        return stop - start

    def read_chunk(self, i: int, *, genes: np.ndarray | None = None,
                   columns: Sequence[str] = ()) -> Batch:
        """Read chunk ``i`` from its storage and return it as a :class:`Batch` in source order.

        ``genes`` restricts ``X`` to those genes, in that order: positions (ints), a boolean
        mask over ``var_names`` or gene names. ``columns`` names the obs columns to return.
        Raises :class:`DataError` for a missing gene or column, or a chunk that cannot be read.
        """
        start, stop = self.chunk_bounds(i)
        columns = self._checked_columns(columns)
        positions = None if genes is None else gene_positions(genes, self.var_names)
        matrix = self._read_matrix(i, start, stop)
        if matrix.shape != (stop - start, self.n_vars):
            raise DataError(
                f"Chunk {i} of {self.description} holds a {matrix.shape[0]} × {matrix.shape[1]} "
                f"matrix where {stop - start} × {self.n_vars} was expected; the data is corrupt "
                "or was changed after it was opened."
            )
        obs = self._read_obs(i, start, stop, columns)
        return Batch(X=_float32_csr(matrix, positions), obs=obs,
                     rows=np.arange(start, stop, dtype=np.int64))

    def obs(self, columns: Sequence[str]) -> pd.DataFrame:
        """Return the obs of all cells, only ``columns``, indexed by obs names."""
        columns = self._checked_columns(columns)
        frames = [self._read_obs(i, *self.chunk_bounds(i), columns) for i in range(self.n_chunks)]
        if not frames:
            return pd.DataFrame(index=pd.Index([], dtype=object), columns=columns)
        return pd.concat(frames)

    def close(self) -> None:
        """Release any file this source opened (reads fail afterwards)."""

    def __enter__(self) -> ChunkSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.description}: {self.n_obs} cells × {self.n_vars} "
                f"genes in {self.n_chunks} chunks of up to {self.chunk_size})")

    def _checked_columns(self, columns: Sequence[str]) -> list[str]:
        if isinstance(columns, str):
            columns = [columns]
        columns = list(columns)
        missing = [column for column in columns if column not in self.obs_columns]
        if missing:
            raise DataError(
                f"{self.description} has no cell annotation column {_quoted(missing)}; "
                f"the columns are {_quoted(self.obs_columns) or 'none'}."
            )
        return columns

    def _read_matrix(self, i: int, start: int, stop: int) -> Any:
        """Return the counts of rows ``start:stop`` (sparse or dense, the stored dtype)."""
        raise NotImplementedError

    def _read_obs(self, i: int, start: int, stop: int, columns: list[str]) -> pd.DataFrame:
        """Return the obs rows ``start:stop``, only ``columns``, indexed by obs names."""
        raise NotImplementedError


class _RowRangeSource(ChunkSource):
    """A source whose ``X`` can be sliced by a row range and whose obs is held in memory."""

    def __init__(self, X: Any, obs: pd.DataFrame, var_names: pd.Index, *, chunk_size: int,
                 description: str) -> None:
        _check_chunk_size(chunk_size)
        self.X = X
        self._obs = obs
        n_obs = int(X.shape[0])
        lengths = [min(chunk_size, n_obs - start) for start in range(0, n_obs, chunk_size)]
        self._set_layout(var_names=var_names, obs_columns=list(obs.columns),
                         chunk_lengths=lengths, chunk_size=chunk_size, description=description)
        if len(obs) != self.n_obs or X.shape[1] != self.n_vars:
            raise DataError(f"{description} is inconsistent: X is {X.shape[0]} × {X.shape[1]} "
                            f"but there are {len(obs)} cells and {self.n_vars} genes.")

    def _read_matrix(self, i: int, start: int, stop: int) -> Any:
        try:
            return self.X[start:stop]
        except Exception as exc:  # h5py, zarr and numcodecs raise many unrelated types
            raise DataError(f"Cells {start}-{stop - 1} of {self.description} could not be read "
                            f"({exc}); the file may be corrupt or truncated.") from exc

    def _read_obs(self, i: int, start: int, stop: int, columns: list[str]) -> pd.DataFrame:
        return self._obs.iloc[start:stop][columns]

    def obs(self, columns: Sequence[str]) -> pd.DataFrame:
        """Return the obs of all cells, only ``columns``, indexed by obs names."""
        return self._obs[self._checked_columns(columns)]


class InMemoryChunkSource(_RowRangeSource):
    """An in-memory AnnData; chunks are row slices of its ``X`` (CSC is converted to CSR once)."""

    def __init__(self, adata: anndata.AnnData, *, chunk_size: int = 8192) -> None:
        X = adata.X
        if X is None:
            raise DataError("The data has no count matrix (X is empty).")
        if sp.issparse(X) and X.format != "csr":
            X = sp.csr_matrix(X)
        self.adata = adata
        super().__init__(X, _string_index(adata.obs), adata.var_names, chunk_size=chunk_size,
                         description="the data in memory")


class H5adChunkSource(_RowRangeSource):
    """A backed (``backed='r'``) ``.h5ad`` file; each chunk read loads only its rows of ``X``.

    ``adata`` is the backed AnnData (obs and var in memory, X on disk); ``X`` the on-disk
    matrix. ``X`` must be CSR or dense: a CSC matrix has no row ranges to read.
    """

    def __init__(self, source: anndata.AnnData | str | Path, *, chunk_size: int = 8192) -> None:
        if isinstance(source, anndata.AnnData):
            adata, self._owns_file = source, False
            description = f"'{Path(str(source.filename)).name}'"
        else:
            path = Path(source)
            description = f"'{path.name}'"
            try:
                adata = anndata.read_h5ad(path, backed="r")
            except Exception as exc:  # h5py/anndata raise OSError, KeyError, ValueError ...
                raise DataError(f"{description} could not be opened as an AnnData .h5ad file "
                                f"({exc}); it may be corrupt or not an .h5ad file.") from exc
            self._owns_file = True
        self.adata = adata
        try:
            X = adata.X
            _check_row_readable(X, description)
            super().__init__(X, _string_index(adata.obs), adata.var_names,
                             chunk_size=chunk_size, description=description)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._owns_file and self.adata.isbacked:
            self.adata.file.close()


class ZarrChunkSource(_RowRangeSource):
    """An AnnData Zarr store (``AnnData.write_zarr``); ``X`` is read lazily by row range.

    ``group`` is the opened zarr group, ``X`` an anndata sparse dataset (CSR) or a zarr array.
    obs and var are read into memory when the store is opened.
    """

    def __init__(self, path: str | Path, *, chunk_size: int = 8192) -> None:
        import zarr

        path = Path(path)
        description = f"'{path.name}'"
        try:
            self.group = zarr.open_group(str(path), mode="r")
            X_elem = self.group["X"]
            X = (anndata.io.sparse_dataset(X_elem) if isinstance(X_elem, zarr.Group)
                 else X_elem)
            obs = anndata.io.read_elem(self.group["obs"])
            var_names = anndata.io.read_elem(self.group["var"]).index
        except Exception as exc:  # zarr, anndata and numcodecs raise many unrelated types
            raise DataError(f"{description} could not be opened as an AnnData Zarr store "
                            f"({exc}); it may be corrupt or not written by anndata.") from exc
        _check_row_readable(X, description)
        super().__init__(X, _string_index(obs), var_names, chunk_size=chunk_size,
                         description=description)


class NpzChunkSource(ChunkSource):
    """A folder written by :func:`write_npz_chunks`; chunk ``i`` is the file pair it lists.

    The chunking is the one on disk: ``chunk_size`` comes from the manifest.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        description = f"the chunk folder '{self.folder.name}'"
        manifest = _read_manifest(self.folder, description)
        self.chunks: list[dict[str, Any]] = manifest["chunks"]
        self._set_layout(var_names=pd.Index(manifest["var_names"]),
                         obs_columns=manifest["obs_columns"],
                         chunk_lengths=[chunk["n_obs"] for chunk in self.chunks],
                         chunk_size=manifest["chunk_size"], description=description)
        if self.n_obs != manifest["n_obs"] or self.n_vars != manifest["n_vars"]:
            raise DataError(f"The manifest of {description} contradicts itself: its chunks add "
                            f"up to {self.n_obs} cells × {self.n_vars} genes, not "
                            f"{manifest['n_obs']} × {manifest['n_vars']}.")

    def _read_matrix(self, i: int, start: int, stop: int) -> Any:
        name = self.chunks[i]["matrix"]
        try:
            return sp.load_npz(self.folder / name)
        except Exception as exc:  # zipfile, numpy and scipy raise many unrelated types
            raise DataError(f"The chunk file '{name}' in '{self.folder}' is corrupt or "
                            f"unreadable ({exc}); write the chunks again.") from exc

    def _read_obs(self, i: int, start: int, stop: int, columns: list[str]) -> pd.DataFrame:
        name = self.chunks[i]["obs"]
        try:
            obs = pd.read_parquet(self.folder / name, columns=columns)
        except Exception as exc:  # pyarrow raises many unrelated types
            raise DataError(f"The cell annotation file '{name}' in '{self.folder}' is corrupt "
                            f"or unreadable ({exc}); write the chunks again.") from exc
        if len(obs) != stop - start:
            raise DataError(f"The cell annotation file '{name}' in '{self.folder}' has "
                            f"{len(obs)} rows where {stop - start} were expected; write the "
                            "chunks again.")
        obs.index = obs.index.astype(str)
        return obs


def open_chunk_source(source: anndata.AnnData | str | Path, *,
                      chunk_size: int = 8192) -> ChunkSource:
    """Return a :class:`ChunkSource` over ``source``, reading nothing but its layout yet.

    ``source`` is an AnnData (in memory, or backed: then read from its file), a path to an
    ``.h5ad`` file (opened backed), an AnnData ``.zarr`` store or a folder written by
    :func:`write_npz_chunks` (whose own chunking wins over ``chunk_size``). Raises
    :class:`DataError` for a missing, unknown or corrupt source.
    """
    _check_chunk_size(chunk_size)
    if isinstance(source, anndata.AnnData):
        if source.isbacked:
            return H5adChunkSource(source, chunk_size=chunk_size)
        return InMemoryChunkSource(source, chunk_size=chunk_size)
    path = Path(source)
    if not path.exists():
        raise DataError(f"'{path}' does not exist. Check the path and try again.")
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            return NpzChunkSource(path)
        if (path / "zarr.json").is_file() or (path / ".zgroup").is_file():
            return ZarrChunkSource(path, chunk_size=chunk_size)
        raise DataError(f"The folder '{path.name}' is neither an AnnData Zarr store nor a chunk "
                        f"folder (it has no {MANIFEST_NAME}).")
    if path.suffix.lower() == ".h5ad" or _is_hdf5(path):
        return H5adChunkSource(path, chunk_size=chunk_size)
    raise DataError(f"'{path.name}' cannot be read in chunks: give an .h5ad file, an AnnData "
                    ".zarr store or a folder written by write_npz_chunks.")


def write_npz_chunks(adata: anndata.AnnData, folder: str | Path, *, chunk_size: int = 8192,
                     overwrite: bool = False) -> Path:
    """Write ``adata`` as a chunk folder at ``folder`` and return its path.

    Writes ``manifest.json``, ``chunk_NNNNN.npz`` (the CSR rows, counts in their own dtype) and
    ``chunk_NNNNN.obs.parquet`` (all obs columns) per ``chunk_size`` cells. Everything is written
    into a hidden temporary folder beside ``folder`` that is renamed into place at the end, so
    ``folder`` is either complete or absent; on failure the temporary folder is removed. A
    backed ``adata`` is read chunk by chunk. An existing ``folder`` raises
    :class:`FileExistsError` unless ``overwrite``. Raises :class:`DataError` when obs cannot be
    stored as parquet.
    """
    _check_chunk_size(chunk_size)
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"'{folder}' already exists; choose another folder or pass "
                              "overwrite=True.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    source = open_chunk_source(adata, chunk_size=chunk_size)
    partial = folder.parent / f".{folder.name}.partial-{uuid.uuid4().hex}"
    partial.mkdir()
    try:
        chunks = []
        for i in range(source.n_chunks):
            start, stop = source.chunk_bounds(i)
            names = {"matrix": f"chunk_{i:05d}.npz", "obs": f"chunk_{i:05d}.obs.parquet"}
            sp.save_npz(partial / names["matrix"],
                        sp.csr_matrix(source._read_matrix(i, start, stop)))
            _write_obs_parquet(source._read_obs(i, start, stop, source.obs_columns),
                               partial / names["obs"])
            chunks.append({**names, "n_obs": stop - start})
        manifest = {"format": NPZ_FORMAT, "version": NPZ_FORMAT_VERSION,
                    "n_obs": source.n_obs, "n_vars": source.n_vars, "chunk_size": chunk_size,
                    "var_names": source.var_names.tolist(), "obs_columns": source.obs_columns,
                    "chunks": chunks}
        (partial / MANIFEST_NAME).write_text(json.dumps(manifest), encoding="utf-8")
        _move_into_place(partial, folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return folder


class TwoLevelLoader:
    """Minibatches of cells, one epoch per iteration: chunks from disk, batches from a chunk.

    Each ``iter(loader)`` is one epoch. With ``shuffle``, the chunk order and the row order
    within each chunk are drawn from ``numpy.random.default_rng([seed, epoch])``, where the
    epoch counter starts at 0 and grows by one per started epoch (:meth:`set_epoch` sets it,
    e.g. to resume training): a new loader with the same seed repeats the same epochs. Each
    chunk gives ``ceil(n / batch_size)`` batches (``floor`` with ``drop_last``); batches never
    mix chunks. With more than one chunk a daemon thread reads up to ``prefetch`` chunks ahead
    into a bounded queue; an error in it is raised in the consumer, and leaving the loop early
    (``break``, an exception, closing the iterator) stops it. A single chunk is read once and
    kept, with no thread.
    """

    def __init__(self, source: ChunkSource, *, batch_size: int, genes: np.ndarray | None = None,
                 columns: Sequence[str] = (), shuffle: bool = True, seed: int = 0,
                 prefetch: int = 2, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, not {prefetch}")
        self.source = source
        self.batch_size = int(batch_size)
        self.genes = None if genes is None else gene_positions(genes, source.var_names)
        self.columns = source._checked_columns(columns)
        self.shuffle = shuffle
        self.seed = seed
        self.prefetch = int(prefetch)
        self.drop_last = drop_last
        self._epoch = 0
        self._single_chunk: Batch | None = None

    @property
    def epoch(self) -> int:
        """The epoch the next iteration runs."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration run epoch ``epoch`` (its order depends on seed and epoch)."""
        self._epoch = int(epoch)

    def __len__(self) -> int:
        """Return the number of batches in one epoch."""
        lengths = [self.source.chunk_length(i) for i in range(self.source.n_chunks)]
        if self.drop_last:
            return sum(length // self.batch_size for length in lengths)
        return sum(-(-length // self.batch_size) for length in lengths)

    def __iter__(self) -> Iterator[Batch]:
        """Yield the batches of the next epoch and advance the epoch counter."""
        rng = np.random.default_rng([self.seed, self._epoch])
        self._epoch += 1
        n_chunks = self.source.n_chunks
        order = rng.permutation(n_chunks) if self.shuffle else np.arange(n_chunks)
        if n_chunks == 1:
            if self._single_chunk is None:
                self._single_chunk = self._read(0)
            yield from self._batches(self._single_chunk, rng)
            return
        if n_chunks > 1:
            yield from self._prefetched_batches(order, rng)

    def _read(self, i: int) -> Batch:
        return self.source.read_chunk(int(i), genes=self.genes, columns=self.columns)

    def _batches(self, chunk: Batch, rng: np.random.Generator) -> Iterator[Batch]:
        """Yield ``chunk``'s rows in batches, permuted when shuffling."""
        order = rng.permutation(len(chunk)) if self.shuffle else np.arange(len(chunk))
        stop = len(chunk) - len(chunk) % self.batch_size if self.drop_last else len(chunk)
        for start in range(0, stop, self.batch_size):
            yield chunk.take(order[start:start + self.batch_size])

    def _prefetched_batches(self, order: np.ndarray, rng: np.random.Generator) -> Iterator[Batch]:
        """Yield the batches of the chunks in ``order``, read ahead by a daemon thread."""
        chunks: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(order, chunks, stop), daemon=True,
                                  name=f"{PREFETCH_THREAD_PREFIX}-{uuid.uuid4().hex[:8]}")
        thread.start()
        try:
            while True:
                item = chunks.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                yield from self._batches(item, rng)
        finally:
            stop.set()
            with contextlib.suppress(queue.Empty):
                while True:  # frees a producer blocked on a full queue at once
                    chunks.get_nowait()
            thread.join(timeout=_JOIN_TIMEOUT_S)

    def _produce(self, order: np.ndarray, chunks: queue.Queue[Any],
                 stop: threading.Event) -> None:
        """Read the chunks in ``order`` into ``chunks``, then ``_END``; on error a ``_Failure``."""
        try:
            for i in order:
                if stop.is_set() or not _put(chunks, self._read(i), stop):
                    return
            _put(chunks, _END, stop)
        except BaseException as error:
            _put(chunks, _Failure(error), stop)


# --- helpers ---------------------------------------------------------------------------------

_END = object()


@dataclass
class _Failure:
    error: BaseException


def _put(chunks: queue.Queue[Any], item: object, stop: threading.Event) -> bool:
    """Put ``item`` into ``chunks`` once there is room; return False if ``stop`` came first."""
    while not stop.is_set():
        try:
            chunks.put(item, timeout=_PUT_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def gene_positions(genes: np.ndarray | Sequence[Any], var_names: pd.Index) -> np.ndarray:
    """Return ``genes`` as int64 column positions into ``var_names``, in the given order.

    ``genes`` may be positions, a boolean mask over all genes or gene names. Raises
    :class:`DataError` for unknown names, out-of-range positions or a mask of the wrong length.
    """
    genes = np.asarray(genes)
    n_vars = len(var_names)
    if genes.dtype == bool:
        if genes.shape != (n_vars,):
            raise DataError(f"The gene mask has {genes.size} entries but the data has "
                            f"{n_vars} genes.")
        return np.flatnonzero(genes).astype(np.int64)
    if genes.size == 0:
        return np.zeros(0, dtype=np.int64)
    if np.issubdtype(genes.dtype, np.integer):
        if genes.min() < 0 or genes.max() >= n_vars:
            raise DataError(f"Gene positions must lie between 0 and {n_vars - 1}; got "
                            f"{genes.min()} to {genes.max()}.")
        return genes.astype(np.int64)
    if not var_names.is_unique:
        raise DataError("The gene names are not unique, so genes cannot be chosen by name; "
                        "choose them by position or make the names unique.")
    positions = var_names.get_indexer(genes.astype(str))
    missing = genes[positions < 0]
    if missing.size:
        raise DataError(f"{missing.size} of the chosen genes are not in the data, e.g. "
                        f"{_quoted(missing[:5].tolist())}.")
    return positions.astype(np.int64)


def _float32_csr(matrix: Any, genes: np.ndarray | None) -> sp.csr_matrix:
    """Return ``matrix`` (sparse or dense) restricted to columns ``genes`` as float32 CSR."""
    matrix = sp.csr_matrix(matrix) if sp.issparse(matrix) else np.asarray(matrix)
    if genes is not None:
        matrix = matrix[:, genes]
    return sp.csr_matrix(matrix, dtype=np.float32)


def _check_row_readable(X: Any, description: str) -> None:
    """Raise :class:`DataError` unless ``X`` (on disk) can be read by row range cheaply."""
    if X is None:
        raise DataError(f"{description} has no count matrix (X is empty).")
    if getattr(X, "format", None) == "csc":
        raise DataError(
            f"{description} stores its counts by gene (CSC), so reading a range of cells would "
            "read the whole matrix each time. Load it, convert X to CSR "
            "(adata.X = adata.X.tocsr()) and save it again, or pass the AnnData in memory."
        )
    if sp.issparse(X) and X.format != "csr":
        raise DataError(f"{description} stores its counts as '{X.format}', which cannot be "
                        "read by cells; convert X to CSR.")


def _string_index(obs: pd.DataFrame) -> pd.DataFrame:
    """Return ``obs`` with its index (the obs names) as strings, copying only if needed."""
    if pd.api.types.infer_dtype(obs.index, skipna=False) in ("string", "empty"):
        return obs
    obs = obs.copy()
    obs.index = obs.index.astype(str)
    return obs


def _read_manifest(folder: Path, description: str) -> dict[str, Any]:
    """Return the checked manifest of a chunk folder; its listed files must exist."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"The {MANIFEST_NAME} of {description} is unreadable ({exc}); write "
                        "the chunks again.") from exc
    required = ("n_obs", "n_vars", "chunk_size", "var_names", "obs_columns", "chunks")
    if (not isinstance(manifest, dict) or manifest.get("format") != NPZ_FORMAT
            or any(key not in manifest for key in required)):
        raise DataError(f"The {MANIFEST_NAME} of {description} is not a chunk manifest written "
                        "by write_npz_chunks.")
    if manifest.get("version") != NPZ_FORMAT_VERSION:
        raise DataError(f"{description} was written in chunk format version "
                        f"{manifest.get('version')}, which this version cannot read.")
    for chunk in manifest["chunks"]:
        for key in ("matrix", "obs"):
            name = chunk.get(key)
            if not isinstance(name, str) or Path(name).name != name:
                raise DataError(f"The {MANIFEST_NAME} of {description} lists an invalid chunk "
                                f"file name {name!r}.")
            if not (folder / name).is_file():
                raise DataError(f"The chunk file '{name}' listed in {description} is missing; "
                                "write the chunks again.")
    return manifest


def _write_obs_parquet(obs: pd.DataFrame, path: Path) -> None:
    """Write ``obs`` (index = obs names) to ``path`` as parquet."""
    if obs.index.name in obs.columns:
        obs = obs.rename_axis(None)
    try:
        obs.to_parquet(path)
    except Exception as exc:  # pyarrow raises ArrowTypeError, ArrowInvalid, ValueError ...
        raise DataError(f"The cell annotations cannot be stored as parquet ({exc}); make each "
                        "obs column a single type (numbers, text or categories).") from exc


def _move_into_place(partial: Path, folder: Path) -> None:
    """Rename ``partial`` to ``folder``, replacing an existing ``folder`` only at the end."""
    if not folder.exists():
        partial.rename(folder)
        return
    old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex}"
    folder.rename(old)
    partial.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _is_hdf5(path: Path) -> bool:
    with contextlib.suppress(OSError), path.open("rb") as handle:
        return handle.read(8) == b"\x89HDF\r\n\x1a\n"
    return False


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, not {chunk_size}")


def _quoted(names: Sequence[object]) -> str:
    return ", ".join(f"'{name}'" for name in names)
