"""Read single-cell count data from the formats biologists actually have.

Every reader returns an in-memory :class:`anndata.AnnData` with cells in rows, genes in
columns, ``X`` as a :class:`scipy.sparse.csr_matrix` (``int32`` when every value is a whole
number that fits, ``int64`` for larger integers, ``float32`` otherwise) and string
``obs_names`` / ``var_names``. Anything wrong with the input is raised as
:class:`~engine.errors.DataError` with a sentence a biologist can act on.

Supported formats (keys of :data:`FORMATS`):

``h5ad``
    An AnnData ``.h5ad`` file.
``zarr``
    An AnnData Zarr store (a folder, or a ``.zip`` of it).
``10x_mtx``
    A 10x Genomics matrix folder: v1/v2 (``matrix.mtx``, ``genes.tsv``, ``barcodes.tsv``) or
    v3 (``matrix.mtx.gz``, ``features.tsv.gz``, ``barcodes.tsv.gz``); any mix of gzipped and
    plain files and a GEO-style common prefix (``GSM1_matrix.mtx.gz`` ...) are accepted. The
    folder may be given directly or through its parent when the parent holds exactly one such
    folder (``filtered_gene_bc_matrices/`` -> ``hg19/``). ``var_names`` are the gene symbols
    made unique (``-1``, ``-2`` ...), Ensembl IDs stay in ``var['gene_ids']``; only
    "Gene Expression" features are kept when a feature type column says so.
``10x_h5``
    A 10x Genomics HDF5 matrix (``.h5``, Cell Ranger v2 or v3 layout).
``csv``
    A table of counts: ``.csv``, ``.tsv``, ``.txt``, each optionally ``.gz``. By default one
    row per cell: the first column holds the cell names and the header row the gene names.
    ``cells_as_columns=True`` reads the transposed layout (one row per gene). The table is read
    in row chunks straight into a sparse matrix; the full dense table is never built.
``npz_chunks``
    The chunked layout of the "context-conditioned cycle autoencoder" research code: a folder
    of scipy sparse ``.npz`` count chunks (written by :func:`scipy.sparse.save_npz`), each with a
    per-cell metadata table aligned to its rows.

npz chunk naming convention
---------------------------
A chunk ``<name>.npz`` is paired with the metadata table whose stem matches it once the
words ``counts`` / ``expression`` / ``expr`` / ``matrix`` (in the chunk name) and
``metadata`` / ``meta`` / ``obs`` (in the table name) are removed, so both conventions work::

    human_counts_000.npz  +  human_metadata_000.parquet   (the research code's own naming)
    chunk_000.npz         +  chunk_000.csv                (same stem)

Tables may be ``.parquet``, ``.csv`` or ``.tsv`` (optionally ``.gz``); their number of rows must
equal the chunk's. Chunks are concatenated in natural order of their names (``2`` before
``10``). Gene names come from ``genes.txt`` (one per line), ``genes.tsv`` / ``features.tsv``
(10x style; gzipped allowed) or ``var.csv`` / ``var.parquet`` in the folder, else
``gene_0, gene_1, ...``. The research code writes metadata as pickles (``.pkl``); those are
refused without being opened, because unpickling a file can run arbitrary code.

Zip files of a Zarr store, a 10x folder, an npz chunk folder (or of any single supported file)
are extracted with :func:`extract_zip_safely` into a private temporary folder (inside
``workdir`` when given), read into memory and the folder is removed again, on success and on
failure alike.
"""

from __future__ import annotations

import contextlib
import gzip
import posixpath
import re
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from engine.errors import DataError

__all__ = [
    "FORMATS",
    "detect_format",
    "extract_zip_safely",
    "read_dataset",
    "read_upload",
]

FORMATS: dict[str, str] = {
    "h5ad": "AnnData file (.h5ad)",
    "zarr": "AnnData Zarr store (.zarr folder, or a .zip of it)",
    "10x_mtx": "10x Genomics matrix folder (matrix.mtx + genes/features.tsv + barcodes.tsv, "
    "or a .zip of it)",
    "10x_h5": "10x Genomics HDF5 matrix (.h5)",
    "csv": "Count table (.csv, .tsv, .txt, optionally .gz)",
    "npz_chunks": "Folder of sparse .npz count chunks with metadata tables (or a .zip of it)",
}

#: Default cap on the total uncompressed size of a zip (bytes): guards against zip bombs.
MAX_UNZIPPED_BYTES = 20 * 1024**3
#: Default cap on the number of entries in a zip.
MAX_ZIP_ENTRIES = 200_000

_TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz")
_PICKLE_SUFFIXES = (".pkl", ".pickle", ".pkl.gz", ".pickle.gz")
_KNOWN_SUFFIXES = (
    ".h5ad",
    ".h5",
    ".hdf5",
    ".zip",
    ".npz",
    ".mtx",
    ".mtx.gz",
    *_TABLE_SUFFIXES,
    *_PICKLE_SUFFIXES,
)
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGIC = b"PK\x03\x04"
_IGNORED_NAMES = ("__MACOSX", ".DS_Store", "Thumbs.db")
_INT32_MAX = np.iinfo(np.int32).max
#: Values per chunk when reading a text table (bounds the dense block parsed at once).
TABLE_CHUNK_VALUES = 8_000_000


# --------------------------------------------------------------------------- helpers


def _supported_sentence() -> str:
    """Return a sentence listing the supported formats."""
    return "Supported formats: " + "; ".join(FORMATS.values()) + "."


def _lower_suffix(path: Path) -> str:
    """Return the known (possibly double, e.g. ``.csv.gz``) suffix of ``path``, lower-case."""
    name = path.name.lower()
    for suffix in sorted(_KNOWN_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _pickle_error(path: Path) -> DataError:
    """Return the DataError refusing to unpickle ``path``."""
    return DataError(
        f"'{path.name}' is a Python pickle, which is not opened here because unpickling a file "
        "can run arbitrary code. Convert it once in a Python session you trust (open it with "
        f"pandas.read_pickle, then `.to_parquet('{_stem(path)}.parquet')`) and load the "
        "Parquet file instead."
    )


def _stem(path: Path) -> str:
    """Return the file name without its known suffix (``a.csv.gz`` -> ``a``)."""
    suffix = _lower_suffix(path)
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name


def _corrupt_error(path: Path, label: str) -> DataError:
    """Return the DataError for a file that a library failed to parse."""
    return DataError(
        f"'{path.name}' could not be read as {label}: the file looks corrupt or truncated "
        "(for example an interrupted download or upload). Export or download it again."
    )


@contextlib.contextmanager
def _reading(path: Path, label: str) -> Iterator[None]:
    """Turn any library failure while reading ``path`` into a DataError (chained ``from``)."""
    try:
        yield
    except DataError:
        raise
    except MemoryError as exc:
        raise DataError(
            f"'{path.name}' is too large to load into the memory of this machine. "
            "Subsample the cells first, or use a machine with more memory."
        ) from exc
    except Exception as exc:  # library errors vary widely: h5py, zarr, pandas, scipy
        raise _corrupt_error(path, label) from exc


def _natural_key(text: str) -> list[object]:
    """Return a sort key that orders embedded numbers numerically (``2`` before ``10``)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _visible_children(folder: Path) -> list[Path]:
    """Return the entries of ``folder`` that are not hidden or OS clutter, sorted."""
    return sorted(
        (
            child
            for child in folder.iterdir()
            if not child.name.startswith(".") and child.name not in _IGNORED_NAMES
        ),
        key=lambda p: _natural_key(p.name),
    )


def _read_magic(path: Path, n: int = 8) -> bytes:
    """Return the first ``n`` bytes of ``path`` (empty if unreadable)."""
    try:
        with path.open("rb") as handle:
            return handle.read(n)
    except OSError:
        return b""


def _hdf5_kind(path: Path) -> str | None:
    """Return ``'10x_h5'`` or ``'h5ad'`` for an HDF5 file by its groups, None if neither."""
    import h5py

    with _reading(path, "an HDF5 file"), h5py.File(path, "r") as handle:
        keys = set(handle.keys())
        if "matrix" in keys:
            return "10x_h5"
        if "X" in keys or "obs" in keys:
            return "h5ad"
        # Cell Ranger v2: one group per genome holding barcodes/data/indices/indptr/shape
        for key in keys:
            node = handle[key]
            if isinstance(node, h5py.Group) and {"barcodes", "data", "indptr"} <= set(node):
                return "10x_h5"
    return None


# --------------------------------------------------------------------------- detection


_MTX_RE = re.compile(r"^(?P<prefix>.*?)matrix\.mtx(?:\.gz)?$", re.IGNORECASE)


def _find_10x_files(folder: Path) -> tuple[Path, Path, Path] | None:
    """Return (matrix, features/genes, barcodes) paths of a 10x mtx folder, or None."""
    if not folder.is_dir():
        return None
    files = {child.name: child for child in folder.iterdir() if child.is_file()}
    for name in sorted(files):
        match = _MTX_RE.match(name)
        if not match or name.startswith("."):
            continue
        prefix = match.group("prefix")
        features = next(
            (
                files[f"{prefix}{base}{gz}"]
                for base in ("features.tsv", "genes.tsv")
                for gz in (".gz", "")
                if f"{prefix}{base}{gz}" in files
            ),
            None,
        )
        barcodes = next(
            (
                files[f"{prefix}barcodes.tsv{gz}"]
                for gz in (".gz", "")
                if f"{prefix}barcodes.tsv{gz}" in files
            ),
            None,
        )
        if features is not None and barcodes is not None:
            return files[name], features, barcodes
    return None


def _resolve_10x_folder(folder: Path) -> Path | None:
    """Return the 10x mtx folder: ``folder`` itself or its only child that is one."""
    if _find_10x_files(folder) is not None:
        return folder
    candidates = [c for c in _visible_children(folder) if c.is_dir() and _find_10x_files(c)]
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        names = ", ".join(c.name for c in candidates)
        raise DataError(
            f"'{folder.name}' holds several 10x matrix folders ({names}). "
            "Choose one of them and load it on its own."
        )
    return None


def _is_zarr_folder(folder: Path) -> bool:
    """Return True if ``folder`` looks like the root of a Zarr group (v2 or v3)."""
    return (
        (folder / ".zgroup").is_file()
        or (folder / "zarr.json").is_file()
        or folder.name.lower().endswith(".zarr")
    )


def _detect_folder(folder: Path) -> str | None:
    """Return the format of a folder, or None if it is not one we read."""
    if _is_zarr_folder(folder):
        return "zarr"
    if _resolve_10x_folder(folder) is not None:
        return "10x_mtx"
    if any(child.suffix.lower() == ".npz" for child in folder.iterdir() if child.is_file()):
        return "npz_chunks"
    return None


def _detect_zip_listing(path: Path) -> str:
    """Return the format of a zip's contents from its file names (nothing is extracted)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if not n.endswith("/")]
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise _corrupt_error(path, "a zip archive") from exc
    names = [n for n in names if not any(part in _IGNORED_NAMES for part in n.split("/"))]
    base = [posixpath.basename(n).lower() for n in names]
    if any(b in (".zgroup", "zarr.json") for b in base):
        return "zarr"
    if any(_MTX_RE.match(b) for b in base):
        return "10x_mtx"
    if any(b.endswith(".npz") for b in base):
        return "npz_chunks"
    if len(names) == 1:
        inner = Path(names[0])
        suffix = _lower_suffix(inner)
        if suffix == ".h5ad":
            return "h5ad"
        if suffix in (".h5", ".hdf5"):
            return "10x_h5"
        if suffix in _TABLE_SUFFIXES:
            return "csv"
    raise DataError(
        f"The zip '{path.name}' does not hold a dataset in a format we know. "
        + _supported_sentence()
    )


def detect_format(path: Path) -> str:
    """Detect the format of a data file or folder.

    Parameters
    ----------
    path
        A file or a folder. For a ``.zip`` only the list of entry names is read (nothing is
        extracted) and the format of its contents is returned.

    Returns
    -------
    A key of :data:`FORMATS`.

    Raises
    ------
    DataError
        If the path does not exist, is a pickle, or is not in a supported format.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"'{path}' does not exist. Check the path and try again.")
    if path.is_dir():
        fmt = _detect_folder(path)
        if fmt is None:
            raise DataError(
                f"The folder '{path.name}' does not hold a dataset in a format we know. "
                + _supported_sentence()
            )
        return fmt
    suffix = _lower_suffix(path)
    magic = _read_magic(path)
    if suffix in _PICKLE_SUFFIXES:
        raise _pickle_error(path)
    if _is_zip(path):
        return _detect_zip_listing(path)
    if suffix == ".h5ad":
        return "h5ad"
    if suffix in (".h5", ".hdf5") or magic.startswith(_HDF5_MAGIC):
        kind = _hdf5_kind(path) if magic.startswith(_HDF5_MAGIC) else None
        if kind is None:
            raise DataError(
                f"'{path.name}' is not a 10x Genomics HDF5 matrix or an AnnData file "
                "(or it is corrupt). " + _supported_sentence()
            )
        return kind
    if suffix in _TABLE_SUFFIXES:
        return "csv"
    if suffix == ".npz":
        return "npz_chunks"
    if suffix in (".mtx", ".mtx.gz") and _resolve_10x_folder(path.parent) is not None:
        return "10x_mtx"
    raise DataError(f"'{path.name}' is not in a format we can read. " + _supported_sentence())


# --------------------------------------------------------------------------- zip


def _zip_target(name: str, dest: Path) -> Path:
    """Return where a zip entry goes inside ``dest``, refusing absolute and escaping paths."""
    clean = name.replace("\\", "/")
    if clean.startswith("/") or re.match(r"^[A-Za-z]:", clean):
        raise DataError(
            f"The zip holds an entry with an absolute path ('{name}'), which could overwrite "
            "files outside the upload folder; it was not extracted. Re-create the zip from "
            "the data folder itself."
        )
    normal = posixpath.normpath(clean)
    if normal == ".." or normal.startswith("../"):
        raise DataError(
            f"The zip holds an entry ('{name}') that points outside the folder it is "
            "extracted to, which could overwrite other files; it was not extracted. "
            "Re-create the zip from the data folder itself."
        )
    target = (dest / normal).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise DataError(
            f"The zip holds an entry ('{name}') that points outside the folder it is "
            "extracted to; it was not extracted. Re-create the zip from the data folder itself."
        )
    return target


def extract_zip_safely(
    zip_path: Path,
    dest: Path,
    *,
    max_total_bytes: int = MAX_UNZIPPED_BYTES,
    max_entries: int = MAX_ZIP_ENTRIES,
) -> Path:
    """Extract a zip archive into ``dest``, refusing anything unsafe.

    Every entry is checked before anything is written: absolute paths, ``..`` that escape
    ``dest``, symbolic links, encrypted entries, more than ``max_entries`` entries, and a
    declared uncompressed total above ``max_total_bytes`` are refused. While extracting, the
    bytes actually written are counted too, so a zip whose headers lie cannot exceed the cap.
    Files are first written into a temporary sibling folder that is renamed to ``dest`` at the
    end and removed on any failure, so nothing half-extracted is ever left. macOS clutter
    (``__MACOSX/``, ``.DS_Store``) is skipped.

    Parameters
    ----------
    zip_path
        The archive.
    dest
        The folder to extract into; it must not exist yet or be empty.
    max_total_bytes
        Cap on the total uncompressed size (zip-bomb guard).
    max_entries
        Cap on the number of entries.

    Returns
    -------
    ``dest``, now holding the extracted files.

    Raises
    ------
    DataError
        If the archive is corrupt, unsafe, too large, or ``dest`` is not empty.
    """
    zip_path = Path(zip_path)
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DataError(f"Cannot extract into '{dest}': the folder is not empty.")
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise _corrupt_error(zip_path, "a zip archive") from exc
    with archive:
        infos = [
            info
            for info in archive.infolist()
            if not any(part in _IGNORED_NAMES for part in info.filename.split("/"))
        ]
        if len(infos) > max_entries:
            raise DataError(
                f"The zip '{zip_path.name}' holds {len(infos):,} entries, more than the "
                f"{max_entries:,} allowed. Zip only the data folder."
            )
        total = 0
        for info in infos:
            _zip_target(info.filename, dest)  # raises on absolute / escaping paths
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise DataError(
                    f"The zip holds a symbolic link ('{info.filename}'), which is refused "
                    "because it could point at files outside the upload. Zip the real files."
                )
            if info.flag_bits & 0x1:
                raise DataError(
                    f"The zip '{zip_path.name}' is password-protected. Upload an unencrypted zip."
                )
            total += info.file_size
        if total > max_total_bytes:
            raise DataError(
                f"The zip '{zip_path.name}' would unpack to {total / 1024**3:.1f} GiB, more "
                f"than the {max_total_bytes / 1024**3:.1f} GiB allowed. Upload a smaller "
                "dataset or the files themselves."
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(dest.parent).free
        if total > free:
            raise DataError(
                f"The zip '{zip_path.name}' needs {total / 1024**3:.1f} GiB of disk space to "
                f"unpack, but only {free / 1024**3:.1f} GiB are free. Free some space first."
            )
        staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.partial-"))
        try:
            written = 0
            for info in infos:
                target = _zip_target(info.filename, staging)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as source, target.open("wb") as sink:
                    while block := source.read(1024 * 1024):
                        written += len(block)
                        if written > max_total_bytes:
                            raise DataError(
                                f"The zip '{zip_path.name}' unpacks to more than the "
                                f"{max_total_bytes / 1024**3:.1f} GiB allowed (its headers "
                                "understate the size). Upload the files themselves."
                            )
                        sink.write(block)
            if dest.exists():
                dest.rmdir()
            staging.rename(dest)
        except DataError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        except Exception as exc:  # zlib.error, BadZipFile (CRC), EOFError, OSError ...
            shutil.rmtree(staging, ignore_errors=True)
            raise _corrupt_error(zip_path, "a zip archive") from exc
    return dest


def _find_dataset_root(folder: Path, *, depth: int = 0) -> Path:
    """Return the dataset (file or folder) inside an extracted zip."""
    if _detect_folder(folder) is not None:
        return folder
    children = _visible_children(folder)
    readable = [
        c
        for c in children
        if (c.is_dir() and depth < 4)
        or (c.is_file() and _lower_suffix(c) in (".h5ad", ".h5", ".hdf5", *_TABLE_SUFFIXES))
        or (c.is_file() and _lower_suffix(c) in (*_PICKLE_SUFFIXES, ".zip"))
    ]
    if len(readable) == 1:
        child = readable[0]
        if child.is_dir():
            return _find_dataset_root(child, depth=depth + 1)
        if _lower_suffix(child) == ".zip":
            raise DataError(
                f"The zip holds another zip ('{child.name}'). Unzip the outer one and "
                "upload the inner zip instead."
            )
        if _lower_suffix(child) in _PICKLE_SUFFIXES:
            raise _pickle_error(child)
        return child
    dirs = [c for c in readable if c.is_dir() and _detect_folder(c) is not None]
    if len(readable) > 1 and len(dirs) == 1 and all(c.is_dir() for c in readable):
        return dirs[0]
    if len(readable) > 1:
        names = ", ".join(c.name for c in readable[:5])
        raise DataError(
            f"The zip holds several items ({names}) and it is not clear which one is the "
            "dataset. Zip one dataset at a time."
        )
    raise DataError("The zip does not hold a dataset in a format we know. " + _supported_sentence())


# --------------------------------------------------------------------------- finishing


def _tidy_matrix(matrix: sp.spmatrix | sp.sparray | np.ndarray) -> sp.csr_matrix:
    """Return ``matrix`` as canonical CSR, int32/int64 when integral, else float32."""
    csr = sp.csr_matrix(matrix) if sp.issparse(matrix) else sp.csr_matrix(np.asarray(matrix))
    if csr.dtype == np.bool_:
        csr = csr.astype(np.int32)
    if not csr.has_canonical_format:
        csr.sum_duplicates()
    data = csr.data
    if np.issubdtype(data.dtype, np.integer):
        big = data.size and (data.max() > _INT32_MAX or data.min() < -_INT32_MAX)
        target = np.int64 if big else np.int32
        return csr if csr.dtype == target else csr.astype(target)
    if np.issubdtype(data.dtype, np.floating):
        finite = np.isfinite(data).all()
        if finite and data.size and np.abs(data).max() <= _INT32_MAX and _all_integral(data):
            return csr.astype(np.int32)
        return csr if csr.dtype == np.float32 else csr.astype(np.float32)
    raise DataError(
        f"The count matrix holds values of type '{data.dtype}', not numbers. "
        "Export the counts as a numeric matrix."
    )


def _all_integral(data: np.ndarray, *, block: int = 16_000_000) -> bool:
    """Return True if every value of the float array ``data`` is a whole number."""
    for start in range(0, data.size, block):
        part = data[start : start + block]
        if not np.array_equal(part, np.round(part)):
            return False
    return True


def _finish(adata: anndata.AnnData) -> anndata.AnnData:
    """Return ``adata`` with CSR ``X`` (see :func:`_tidy_matrix`) and string indices."""
    if adata.X is None:
        raise DataError(
            "The file holds no count matrix (its X is empty). Export it again with the counts in X."
        )
    adata.X = _tidy_matrix(adata.X)
    adata.obs_names = pd.Index(adata.obs_names.astype(str))
    adata.var_names = pd.Index(adata.var_names.astype(str))
    adata.obs.columns = adata.obs.columns.astype(str)
    adata.var.columns = adata.var.columns.astype(str)
    return adata


# --------------------------------------------------------------------------- readers


def _read_h5ad(path: Path, *, cells_as_columns: bool = False) -> anndata.AnnData:
    """Return the AnnData stored in an ``.h5ad`` file (fully in memory)."""
    if path.is_dir():
        raise DataError(f"'{path.name}' is a folder, not an .h5ad file.")
    with _reading(path, "an AnnData (.h5ad) file"):
        return anndata.read_h5ad(path)


def _read_zarr(path: Path, *, cells_as_columns: bool = False) -> anndata.AnnData:
    """Return the AnnData stored in a Zarr folder (fully in memory)."""
    with _reading(path, "an AnnData Zarr store"):
        return anndata.read_zarr(path)


def _open_text(path: Path) -> BinaryIO:
    """Return a binary handle on ``path``, transparently un-gzipping ``.gz`` files."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return path.open("rb")


def _read_lines_table(path: Path) -> pd.DataFrame:
    """Return a header-less tab/comma separated table (10x genes/barcodes files)."""
    with _open_text(path) as handle:
        first = handle.readline().decode("utf-8", errors="replace")
    sep = "\t" if "\t" in first else ("," if "," in first else "\t")
    return pd.read_csv(
        path, sep=sep, header=None, dtype=str, keep_default_na=False, compression="infer"
    )


def _keep_gene_expression(adata: anndata.AnnData) -> anndata.AnnData:
    """Return only 'Gene Expression' features when a feature-type column says so."""
    for column in ("feature_types", "feature_type"):
        if column in adata.var:
            keep = (adata.var[column].astype(str) == "Gene Expression").to_numpy()
            if keep.any() and not keep.all():
                return adata[:, keep].copy()
    return adata


def _read_10x_mtx(path: Path, *, cells_as_columns: bool = False) -> anndata.AnnData:
    """Return the AnnData of a 10x mtx folder (v1/v2/v3; symbols made unique as var_names)."""
    import scipy.io

    folder = path.parent if path.is_file() else path
    resolved = _resolve_10x_folder(folder)
    if resolved is None:
        raise DataError(
            f"'{folder.name}' is not a 10x matrix folder: it needs matrix.mtx, "
            "genes.tsv or features.tsv, and barcodes.tsv (each optionally .gz)."
        )
    files = _find_10x_files(resolved)
    assert files is not None
    matrix_path, features_path, barcodes_path = files
    with _reading(matrix_path, "a Matrix Market (.mtx) file"):
        genes_by_cells = scipy.io.mmread(matrix_path)
    with _reading(features_path, "a 10x features/genes table"):
        features = _read_lines_table(features_path)
    with _reading(barcodes_path, "a 10x barcodes table"):
        barcodes = _read_lines_table(barcodes_path)
    n_genes, n_cells = genes_by_cells.shape
    if len(features) != n_genes:
        raise DataError(
            f"'{matrix_path.name}' has {n_genes:,} genes but '{features_path.name}' lists "
            f"{len(features):,}. The files do not belong together; export the folder again."
        )
    if len(barcodes) != n_cells:
        raise DataError(
            f"'{matrix_path.name}' has {n_cells:,} cells but '{barcodes_path.name}' lists "
            f"{len(barcodes):,}. The files do not belong together; export the folder again."
        )
    with _reading(matrix_path, "a Matrix Market (.mtx) file"):
        matrix = sp.csr_matrix(genes_by_cells.T)
    symbols = features.iloc[:, 1] if features.shape[1] > 1 else features.iloc[:, 0]
    var = pd.DataFrame(
        index=anndata.utils.make_index_unique(pd.Index(symbols.astype(str).to_numpy()))
    )
    var["gene_ids"] = features.iloc[:, 0].to_numpy()
    if features.shape[1] > 2:
        var["feature_types"] = features.iloc[:, 2].to_numpy()
    obs = pd.DataFrame(index=pd.Index(barcodes.iloc[:, 0].astype(str).to_numpy()))
    adata = anndata.AnnData(X=matrix, obs=obs, var=var)
    return _keep_gene_expression(adata)


def _read_10x_h5(path: Path, *, cells_as_columns: bool = False) -> anndata.AnnData:
    """Return the AnnData of a 10x HDF5 matrix (symbols made unique, gene_ids kept)."""
    import scanpy as sc

    with _reading(path, "a 10x Genomics HDF5 matrix"):
        adata = sc.read_10x_h5(path, gex_only=False)
    adata = _keep_gene_expression(adata)
    adata.var_names_make_unique()
    return adata


def _sniff_separator(path: Path) -> str:
    """Return the field separator of a text table from its first line."""
    with _reading(path, "a text table"), _open_text(path) as handle:
        first = handle.readline().decode("utf-8", errors="replace")
    if not first.strip():
        raise DataError(f"'{path.name}' is empty: it has no header row with gene names.")
    if "\t" in first:
        return "\t"
    if "," in first:
        return ","
    if ";" in first:
        return ";"
    return r"\s+"


def _read_table(path: Path, *, cells_as_columns: bool = False) -> anndata.AnnData:
    """Return the AnnData of a delimited count table, read in row chunks into CSR.

    By default rows are cells (first column = cell names, header = gene names); with
    ``cells_as_columns=True`` rows are genes and columns cells.
    """
    sep = _sniff_separator(path)
    with _reading(path, "a text table"), _open_text(path) as handle:
        header = handle.readline().decode("utf-8", errors="replace").rstrip("\r\n")
    n_columns = max(1, len(re.split(sep, header.strip()) if sep == r"\s+" else header.split(sep)))
    rows_per_chunk = max(1, TABLE_CHUNK_VALUES // n_columns)
    blocks: list[sp.csr_matrix] = []
    row_names: list[np.ndarray] = []
    column_names: pd.Index | None = None
    engine = "python" if sep == r"\s+" else "c"
    label = "a text table"
    try:
        reader = pd.read_csv(
            path,
            sep=sep,
            index_col=0,
            chunksize=rows_per_chunk,
            compression="infer",
            engine=engine,
        )
        with reader:
            for chunk in reader:
                if column_names is None:
                    column_names = chunk.columns
                non_numeric = [c for c in chunk.columns if not _is_numeric(chunk[c])]
                if non_numeric:
                    raise DataError(
                        f"'{path.name}' holds text where counts are expected (column "
                        f"'{non_numeric[0]}'). Check that the first column holds the "
                        + ("gene" if cells_as_columns else "cell")
                        + " names, the header row the "
                        + ("cell" if cells_as_columns else "gene")
                        + " names, and that no annotation columns are mixed in."
                    )
                values = chunk.to_numpy(dtype=np.float64, na_value=np.nan)
                blocks.append(sp.csr_matrix(values))
                row_names.append(chunk.index.astype(str).to_numpy())
    except DataError:
        raise
    except (pd.errors.EmptyDataError, StopIteration) as exc:
        raise DataError(f"'{path.name}' is empty: it holds no rows of counts.") from exc
    except MemoryError as exc:
        raise DataError(
            f"'{path.name}' is too large to load into the memory of this machine."
        ) from exc
    except Exception as exc:
        raise _corrupt_error(path, label) from exc
    if column_names is None or not blocks:
        raise DataError(f"'{path.name}' is empty: it holds no rows of counts.")
    matrix = sp.vstack(blocks, format="csr")
    names = np.concatenate(row_names) if row_names else np.array([], dtype=str)
    columns = pd.Index(column_names.astype(str))
    if cells_as_columns:
        matrix = matrix.T.tocsr()
        obs = pd.DataFrame(index=columns)
        var = pd.DataFrame(index=pd.Index(names))
    else:
        obs = pd.DataFrame(index=pd.Index(names))
        var = pd.DataFrame(index=columns)
    return anndata.AnnData(X=matrix, obs=obs, var=var)


def _is_numeric(series: pd.Series) -> bool:
    """Return True if a table column holds numbers (or only missing values)."""
    return pd.api.types.is_numeric_dtype(series) or bool(series.isna().all())


# npz chunks ---------------------------------------------------------------------------

_CHUNK_WORDS = re.compile(r"(?:^|[_.\-])(?:counts|expression|expr|matrix)(?=$|[_.\-])", re.I)
_META_WORDS = re.compile(r"(?:^|[_.\-])(?:metadata|meta|obs)(?=$|[_.\-])", re.I)
_META_SUFFIXES = (".parquet", ".pq", ".csv", ".tsv", ".csv.gz", ".tsv.gz")
_GENE_FILES = (
    "genes.txt",
    "genes.txt.gz",
    "genes.tsv",
    "genes.tsv.gz",
    "features.tsv",
    "features.tsv.gz",
    "var.csv",
    "var.csv.gz",
    "var.parquet",
)
_CELL_ID_COLUMNS = ("", "index", "cell", "cell_id", "cellid", "barcode", "barcodes", "obs_names")


def _chunk_key(stem: str, words: re.Pattern[str]) -> str:
    """Return the pairing key of a file stem with the role words (counts/metadata) removed."""
    key = words.sub("_", stem)
    return re.sub(r"[_.\-]+", "_", key).strip("_").lower()


def _suffix_of(path: Path, suffixes: tuple[str, ...]) -> str | None:
    """Return which of ``suffixes`` ``path`` ends with (lower-case), or None."""
    name = path.name.lower()
    for suffix in sorted(suffixes, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return None


def _read_metadata_table(path: Path) -> pd.DataFrame:
    """Return a per-cell metadata table from Parquet/CSV/TSV, its cell-id column as index."""
    suffix = _suffix_of(path, _META_SUFFIXES) or ""
    with _reading(path, "a metadata table"):
        if suffix in (".parquet", ".pq"):
            table = pd.read_parquet(path)
        else:
            sep = "\t" if suffix.startswith(".tsv") else ","
            table = pd.read_csv(path, sep=sep, compression="infer")
    if isinstance(table.index, pd.RangeIndex) and len(table.columns):
        first = str(table.columns[0])
        if first.startswith("Unnamed: 0") or first.strip().lower() in _CELL_ID_COLUMNS:
            table = table.set_index(table.columns[0])
            table.index.name = None
    return table


def _read_gene_names(folder: Path, n_genes: int) -> pd.DataFrame:
    """Return ``var`` for an npz chunk folder: from a genes file if present, else gene_i."""
    for name in _GENE_FILES:
        path = folder / name
        if not path.is_file():
            continue
        with _reading(path, "a gene list"):
            if name.startswith("var."):
                table = _read_metadata_table(path)
                if isinstance(table.index, pd.RangeIndex):
                    column = next(
                        (
                            c
                            for c in table.columns
                            if str(c).lower()
                            in (
                                "gene",
                                "gene_name",
                                "gene_symbol",
                                "feature_name",
                                "symbol",
                                "name",
                            )
                        ),
                        table.columns[0] if len(table.columns) else None,
                    )
                    if column is not None:
                        table = table.set_index(column)
                var = table
                var.index = var.index.astype(str)
            elif name.startswith("genes.txt"):
                with _open_text(path) as handle:
                    lines = [ln.decode("utf-8").strip() for ln in handle]
                var = pd.DataFrame(index=pd.Index([ln for ln in lines if ln]))
            else:
                table = _read_lines_table(path)
                symbols = table.iloc[:, 1] if table.shape[1] > 1 else table.iloc[:, 0]
                var = pd.DataFrame(index=pd.Index(symbols.astype(str).to_numpy()))
                if table.shape[1] > 1:
                    var["gene_ids"] = table.iloc[:, 0].to_numpy()
        if len(var) != n_genes:
            raise DataError(
                f"'{name}' lists {len(var):,} genes but the count chunks have {n_genes:,} "
                "columns. Use the gene list that was written with these chunks."
            )
        var.index.name = None
        return var
    return pd.DataFrame(index=pd.Index([f"gene_{i}" for i in range(n_genes)]))


def _read_npz_chunks(path: Path, *, cells_as_columns: bool = False) -> anndata.AnnData:
    """Return the AnnData of an npz chunk folder (or of one ``.npz`` chunk file).

    Chunks are stacked in natural name order; each chunk's metadata table becomes its
    rows of ``obs`` (see the module docstring for the naming convention).
    """
    folder = path.parent if path.is_file() else path
    files = [c for c in folder.iterdir() if c.is_file() and not c.name.startswith(".")]
    chunks = sorted(
        (c for c in files if c.suffix.lower() == ".npz"), key=lambda p: _natural_key(p.name)
    )
    if path.is_file():
        chunks = [path]
    if not chunks:
        raise DataError(f"The folder '{folder.name}' holds no .npz count chunks.")
    safe_tables: dict[str, Path] = {}
    pickles: dict[str, Path] = {}
    for candidate in files:
        meta_suffix = _suffix_of(candidate, _META_SUFFIXES)
        pickle_suffix = _suffix_of(candidate, _PICKLE_SUFFIXES)
        if candidate.name.lower() in _GENE_FILES:
            continue
        if meta_suffix:
            stem = candidate.name[: -len(meta_suffix)]
            safe_tables.setdefault(_chunk_key(stem, _META_WORDS), candidate)
        elif pickle_suffix:
            stem = candidate.name[: -len(pickle_suffix)]
            pickles.setdefault(_chunk_key(stem, _META_WORDS), candidate)

    matrices: list[sp.csr_matrix] = []
    tables: list[pd.DataFrame | None] = []
    n_genes: int | None = None
    for chunk in chunks:
        key = _chunk_key(chunk.stem, _CHUNK_WORDS)
        try:
            matrix = sp.load_npz(chunk)  # np.load(allow_pickle=False) inside: never unpickles
        except ValueError as exc:
            if "pickle" in str(exc).lower() or "sparse" in str(exc).lower():
                raise DataError(
                    f"'{chunk.name}' is not a scipy sparse matrix saved with "
                    "scipy.sparse.save_npz. Save each chunk with save_npz."
                ) from exc
            raise _corrupt_error(chunk, "a sparse .npz chunk") from exc
        except Exception as exc:
            raise _corrupt_error(chunk, "a sparse .npz chunk") from exc
        matrix = sp.csr_matrix(matrix)
        if n_genes is None:
            n_genes = matrix.shape[1]
        elif matrix.shape[1] != n_genes:
            raise DataError(
                f"'{chunk.name}' has {matrix.shape[1]:,} genes but the first chunk has "
                f"{n_genes:,}. All chunks must share the same genes in the same order."
            )
        table_path = safe_tables.get(key)
        if table_path is None and (key in pickles or (pickles and not safe_tables)):
            raise _pickle_error(pickles.get(key, next(iter(pickles.values()), chunk)))
        table = None
        if table_path is not None:
            table = _read_metadata_table(table_path)
            if len(table) != matrix.shape[0]:
                raise DataError(
                    f"The metadata table '{table_path.name}' has {len(table):,} rows but its "
                    f"count chunk '{chunk.name}' has {matrix.shape[0]:,} cells. Each table "
                    "must have exactly one row per cell of its chunk, in the same order."
                )
        matrices.append(matrix)
        tables.append(table)

    assert n_genes is not None
    have = [t is not None for t in tables]
    if any(have) and not all(have):
        missing = next(c.name for c, ok in zip(chunks, have, strict=True) if not ok)
        raise DataError(
            f"The count chunk '{missing}' has no metadata table while other chunks do. "
            "Add its table (e.g. a .parquet or .csv named like the chunk) or remove the chunk."
        )
    n_cells = sum(m.shape[0] for m in matrices)
    if all(have):
        obs = pd.concat([t for t in tables if t is not None], axis=0)
        if isinstance(obs.index, pd.RangeIndex) or all(
            isinstance(t.index, pd.RangeIndex) for t in tables if t is not None
        ):
            obs.index = pd.Index([str(i) for i in range(n_cells)])
        obs.index = obs.index.astype(str)
        obs.index.name = None
    else:
        obs = pd.DataFrame(index=pd.Index([str(i) for i in range(n_cells)]))
    matrix = sp.vstack(matrices, format="csr") if len(matrices) > 1 else matrices[0]
    adata = anndata.AnnData(X=matrix, obs=obs, var=_read_gene_names(folder, n_genes))
    adata.strings_to_categoricals()
    return adata


_READERS: dict[str, Callable[..., anndata.AnnData]] = {
    "h5ad": _read_h5ad,
    "zarr": _read_zarr,
    "10x_mtx": _read_10x_mtx,
    "10x_h5": _read_10x_h5,
    "csv": _read_table,
    "npz_chunks": _read_npz_chunks,
}


# --------------------------------------------------------------------------- public


def _is_zip(path: Path) -> bool:
    """Return True for a ``.zip`` file, or a zip archive with an unknown suffix.

    ``.npz`` files are zip archives too but are read as count chunks, not extracted.
    """
    if not path.is_file():
        return False
    suffix = _lower_suffix(path)
    if suffix == ".zip":
        return True
    return suffix not in _KNOWN_SUFFIXES and _read_magic(path).startswith(_ZIP_MAGIC)


def read_dataset(
    path: str | Path,
    *,
    cells_as_columns: bool = False,
    fmt: str | None = None,
    workdir: Path | None = None,
) -> anndata.AnnData:
    """Read a dataset in any supported format into memory.

    Parameters
    ----------
    path
        A file or folder in one of the :data:`FORMATS`, or a ``.zip`` of one.
    cells_as_columns
        Only for count tables: the rows are genes and the columns cells.
    fmt
        Force a format (a key of :data:`FORMATS`) instead of detecting it.
    workdir
        Where a ``.zip`` is extracted (into a private temporary folder, removed after
        reading); the system temporary folder if None.

    Returns
    -------
    An in-memory AnnData with ``X`` as CSR (``int32`` for whole numbers, else ``float32``)
    and string ``obs_names`` / ``var_names``. Other slots (``obs``, ``var``, ``layers``,
    ``raw``, ``obsm``, ``uns``) are kept as the format stores them.

    Raises
    ------
    DataError
        For unknown formats, corrupt or truncated files, unsafe zips, pickled metadata,
        and inconsistent inputs; the message says what to do.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"'{path}' does not exist. Check the path and try again.")
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"'{fmt}' is not a format we can read. " + _supported_sentence())
    if _is_zip(path):
        return _read_zip(path, cells_as_columns=cells_as_columns, fmt=fmt, workdir=workdir)
    fmt = fmt or detect_format(path)
    adata = _READERS[fmt](path, cells_as_columns=cells_as_columns)
    return _finish(adata)


def _read_zip(
    path: Path, *, cells_as_columns: bool, fmt: str | None, workdir: Path | None
) -> anndata.AnnData:
    """Extract a zip into a private temporary folder, read its dataset, remove the folder."""
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=workdir, prefix=".unzip-"))
    try:
        contents = extract_zip_safely(path, scratch / "contents")
        root = _find_dataset_root(contents)
        if _is_zip(root):
            raise DataError(
                f"The zip holds another zip ('{root.name}'). Unzip the outer one and "
                "upload the inner zip instead."
            )
        inner_fmt = fmt or detect_format(root)
        return _finish(_READERS[inner_fmt](root, cells_as_columns=cells_as_columns))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _safe_upload_suffix(name: str) -> str:
    """Return the (possibly double) suffix of an uploaded file name, stripped to safe chars."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    suffix = _lower_suffix(Path(base or "upload"))
    return re.sub(r"[^a-z0-9.]", "", suffix)[:16]


def read_upload(
    name: str,
    data: bytes | BinaryIO,
    *,
    workdir: Path,
    cells_as_columns: bool = False,
) -> anndata.AnnData:
    """Read an uploaded file (bytes or a binary file object, e.g. Streamlit's UploadedFile).

    The upload is written into a private temporary folder inside ``workdir``, under a name
    that keeps the original suffix (``.h5ad``, ``.csv.gz``, ``.zip`` ...), read with
    :func:`read_dataset` (a zip is extracted in that folder too), and the folder is removed
    again whether reading succeeds or fails (the returned AnnData lives in memory).

    Parameters
    ----------
    name
        The uploaded file's name; only its suffix is used.
    data
        The file's bytes or a readable binary file object.
    workdir
        Folder for the temporary file (created if missing).
    cells_as_columns
        Only for count tables: the rows are genes and the columns cells.

    Returns
    -------
    The dataset, as :func:`read_dataset` returns it.

    Raises
    ------
    DataError
        As :func:`read_dataset`.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    suffix = _safe_upload_suffix(name)
    if suffix in _PICKLE_SUFFIXES:
        raise _pickle_error(Path(name.replace("\\", "/").rsplit("/", 1)[-1]))
    scratch = Path(tempfile.mkdtemp(dir=workdir, prefix=".upload-"))
    temp_path = scratch / f"upload{suffix}"
    try:
        with temp_path.open("wb") as sink:
            if isinstance(data, bytes | bytearray | memoryview):
                sink.write(data)
            else:
                with contextlib.suppress(AttributeError, OSError):
                    data.seek(0)
                shutil.copyfileobj(data, sink, length=1024 * 1024)
        return read_dataset(temp_path, cells_as_columns=cells_as_columns, workdir=scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
