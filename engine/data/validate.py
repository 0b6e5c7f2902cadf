"""Check that a dataset is usable: counts, finite values, unique names.

The generators model raw integer counts, so :func:`validate_dataset` refuses empty matrices,
NaN / infinite / negative values and duplicated names with a :class:`~engine.errors.DataError`
whose message says what is wrong and what to do, and :func:`check_counts` says whether ``X``
holds raw counts (and if not, which layer does). Everything works chunk by chunk on sparse
data (in memory or backed on disk); the full matrix is never densified.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from engine.errors import DataError

__all__ = [
    "CountsCheck",
    "check_counts",
    "iter_row_chunks",
    "make_names_unique",
    "use_counts_layer",
    "validate_dataset",
]

#: Layer names tried first when looking for raw counts, in this order.
COUNT_LAYER_NAMES = ("counts", "raw_counts", "count", "umi", "umis", "raw")
_VALUE_BLOCK = 16_000_000  # values examined at once inside a chunk (bounds temporaries)
_DENSE_CHUNK_VALUES = 20_000_000  # values per dense row chunk
_RAW_ADVICE = "load the raw count matrix (often in layers['counts'] or .raw)"


@dataclass
class CountsCheck:
    """Whether ``X`` holds raw counts, with the evidence.

    Attributes
    ----------
    is_counts
        True when every stored value is a finite, non-negative whole number (and some are
        non-zero).
    message
        One or two sentences for the user, e.g. "X holds raw integer counts.".
    max_value
        Largest finite value in ``X`` (0.0 if none).
    fraction_integer
        Fraction of the finite non-zero values that are whole numbers (1.0 if none).
    layer_with_counts
        When ``X`` is not counts: the name of a layer, or ``'raw'`` for ``.raw``, that does
        hold raw counts; None otherwise.
    """

    is_counts: bool
    message: str
    max_value: float
    fraction_integer: float
    layer_with_counts: str | None = None


def iter_row_chunks(
    matrix: Any, *, chunk_size: int = 100_000
) -> Iterator[tuple[int, sp.csr_matrix]]:
    """Iterate over a matrix in row chunks, each as CSR.

    Works on scipy sparse matrices (CSR chunks are zero-copy views; other sparse formats are
    converted to CSR once), NumPy arrays, h5py datasets and AnnData's backed sparse datasets
    (only one chunk is read from disk at a time). Dense inputs use smaller chunks so that a
    chunk holds at most ~20 million values.

    Returns
    -------
    An iterator of ``(first_row, chunk)`` pairs, ``chunk`` being a ``scipy.sparse.csr_matrix``.
    """
    n_rows, n_cols = (int(n) for n in matrix.shape)
    if sp.issparse(matrix):
        csr = matrix if matrix.format == "csr" else sp.csr_matrix(matrix)
        indptr = csr.indptr
        for start in range(0, n_rows, chunk_size):
            stop = min(start + chunk_size, n_rows)
            lo, hi = int(indptr[start]), int(indptr[stop])
            view = sp.csr_matrix(
                (csr.data[lo:hi], csr.indices[lo:hi], indptr[start : stop + 1] - lo),
                shape=(stop - start, n_cols),
                copy=False,
            )
            yield start, view
        return
    dense = isinstance(matrix, np.ndarray) or not hasattr(matrix, "format")
    step = chunk_size
    if dense:
        step = max(1, min(chunk_size, _DENSE_CHUNK_VALUES // max(n_cols, 1)))
    for start in range(0, n_rows, step):
        stop = min(start + step, n_rows)
        block = matrix[start:stop]
        yield start, block if sp.isspmatrix_csr(block) else sp.csr_matrix(block)


@dataclass
class _ValueScan:
    """Running statistics over the stored values of a matrix (filled chunk by chunk)."""

    n_nonzero: int = 0
    n_finite_nonzero: int = 0
    n_integer: int = 0
    n_nan: int = 0
    n_inf: int = 0
    n_negative: int = 0
    max_value: float = 0.0
    example_non_integer: float | None = None
    example_negative: float | None = None
    first_nan: tuple[int, int] | None = None
    first_inf: tuple[int, int] | None = None
    first_negative: tuple[int, int] | None = None

    def add(self, chunk: sp.csr_matrix, first_row: int) -> None:
        """Add the values of one CSR row chunk starting at global row ``first_row``."""
        data = chunk.data
        integer_dtype = np.issubdtype(data.dtype, np.integer) or data.dtype == np.bool_
        for lo in range(0, data.size, _VALUE_BLOCK):
            block = data[lo : lo + _VALUE_BLOCK]
            nonzero = block != 0
            n_nonzero = int(np.count_nonzero(nonzero))
            self.n_nonzero += n_nonzero
            if integer_dtype:
                finite_nonzero = nonzero
                n_finite = n_nonzero
            else:
                finite = np.isfinite(block)
                if not finite.all():
                    nan = np.isnan(block)
                    n_nan = int(np.count_nonzero(nan))
                    n_inf = int(block.size - np.count_nonzero(finite)) - n_nan
                    if n_nan and self.first_nan is None:
                        self.first_nan = _position(chunk, lo + int(np.argmax(nan)), first_row)
                    if n_inf and self.first_inf is None:
                        pos = lo + int(np.argmax(~finite & ~nan))
                        self.first_inf = _position(chunk, pos, first_row)
                    self.n_nan += n_nan
                    self.n_inf += n_inf
                    finite_nonzero = finite & nonzero
                    n_finite = int(np.count_nonzero(finite_nonzero))
                else:
                    finite_nonzero = nonzero
                    n_finite = n_nonzero
            self.n_finite_nonzero += n_finite
            if not n_finite:
                continue
            values = block[finite_nonzero] if n_finite != block.size else block
            negative = values < 0
            n_negative = int(np.count_nonzero(negative))
            if n_negative:
                self.n_negative += n_negative
                if self.first_negative is None:
                    index = int(np.argmax(negative))
                    self.example_negative = float(values[index])
                    pos = lo + int(np.flatnonzero(finite_nonzero)[index])
                    self.first_negative = _position(chunk, pos, first_row)
            self.max_value = max(self.max_value, float(values.max()))
            if integer_dtype:
                self.n_integer += n_finite
            else:
                whole = values == np.round(values)
                n_whole = int(np.count_nonzero(whole))
                self.n_integer += n_whole
                if n_whole != n_finite and self.example_non_integer is None:
                    self.example_non_integer = float(values[int(np.argmin(whole))])

    @property
    def fraction_integer(self) -> float:
        """Fraction of finite non-zero values that are whole numbers (1.0 if none)."""
        if not self.n_finite_nonzero:
            return 1.0
        return self.n_integer / self.n_finite_nonzero

    @property
    def is_counts(self) -> bool:
        """True for finite, non-negative whole numbers with at least one non-zero."""
        return (
            self.n_nonzero > 0
            and self.n_nan == 0
            and self.n_inf == 0
            and self.n_negative == 0
            and self.n_integer == self.n_finite_nonzero
        )


def _position(chunk: sp.csr_matrix, data_index: int, first_row: int) -> tuple[int, int]:
    """Return the global (row, column) of position ``data_index`` of a CSR chunk's data."""
    row = int(np.searchsorted(chunk.indptr, data_index, side="right")) - 1
    return first_row + row, int(chunk.indices[data_index])


def _scan(matrix: Any, *, chunk_size: int = 100_000) -> _ValueScan:
    """Return the value statistics of a whole matrix, read chunk by chunk."""
    scan = _ValueScan()
    for first_row, chunk in iter_row_chunks(matrix, chunk_size=chunk_size):
        scan.add(chunk, first_row)
    return scan


def _plural(n: int) -> str:
    """Return ``'s'`` unless ``n`` is 1."""
    return "" if n == 1 else "s"


def _format_value(value: float | None) -> str:
    """Return a short human form of a number (``0.47``, ``-1.2``, ``3.1e+05``)."""
    return "?" if value is None else f"{value:.3g}"


def _where_counts_advice(layer: str | None) -> str:
    """Return the advice sentence pointing at a counts layer, or at where counts usually are."""
    if layer == "raw":
        return "adata.raw holds raw counts: use it instead."
    if layer is not None:
        return f"The layer '{layer}' holds raw counts: use it instead."
    return f"The generators model raw counts; {_RAW_ADVICE}."


def _counts_check(scan: _ValueScan, layer: str | None, *, what: str = "X") -> CountsCheck:
    """Return the CountsCheck describing ``scan`` (``layer`` = a layer that holds counts)."""
    advice = _where_counts_advice(layer)
    if scan.n_nonzero == 0:
        message = f"{what} holds no non-zero values, so there are no counts to model."
    elif scan.n_nan or scan.n_inf:
        message = (
            f"{what} holds missing (NaN) or infinite values, which raw counts never have. " + advice
        )
    elif scan.n_negative:
        message = (
            f"{what} holds negative values (e.g. {_format_value(scan.example_negative)}): the "
            "data looks scaled or centred. " + advice
        )
    elif scan.n_integer != scan.n_finite_nonzero:
        message = (
            f"{what} holds non-integer values (e.g. {_format_value(scan.example_non_integer)}):"
            " the data looks normalised or log-transformed. " + advice
        )
    else:
        message = f"{what} holds raw integer counts."
    return CountsCheck(
        is_counts=scan.is_counts,
        message=message,
        max_value=float(scan.max_value),
        fraction_integer=float(scan.fraction_integer),
        layer_with_counts=None if scan.is_counts else layer,
    )


def _find_counts_layer(adata: anndata.AnnData, *, chunk_size: int) -> str | None:
    """Return the first layer (or ``'raw'``) holding raw counts, None if there is none."""
    names = list(adata.layers.keys())
    ordered = [n for n in COUNT_LAYER_NAMES if n in names]
    ordered += [n for n in names if n not in ordered]
    for name in ordered:
        if _scan(adata.layers[name], chunk_size=chunk_size).is_counts:
            return name
    if adata.raw is not None and _scan(adata.raw.X, chunk_size=chunk_size).is_counts:
        return "raw"
    return None


def check_counts(adata: anndata.AnnData, *, chunk_size: int = 100_000) -> CountsCheck:
    """Say whether ``adata.X`` holds raw integer counts.

    Only the stored values are examined (``X.data`` chunk by chunk for sparse data; dense and
    backed matrices in row chunks). When ``X`` is not counts, the layers and ``.raw`` are
    examined too, to point the user at one that is.

    Returns
    -------
    A :class:`CountsCheck`; nothing is modified.
    """
    scan = _scan(adata.X, chunk_size=chunk_size)
    layer = None if scan.is_counts else _find_counts_layer(adata, chunk_size=chunk_size)
    return _counts_check(scan, layer)


def _name_at(index: pd.Index, position: int) -> str:
    """Return the name at ``position`` of an obs/var index, as a string."""
    return str(index[position])


def _duplicates_message(adata: anndata.AnnData) -> str | None:
    """Return a sentence about duplicated cell and/or gene names, or None if all unique."""
    parts = []
    for index, label in ((adata.obs_names, "cell"), (adata.var_names, "gene")):
        duplicated = index.duplicated()
        n = int(duplicated.sum())
        if n:
            example = str(index[int(np.argmax(duplicated))])
            parts.append(f"{n:,} {label} name{'s' if n > 1 else ''} (e.g. '{example}')")
    if not parts:
        return None
    return (
        " and ".join(parts)
        + (" occur" if len(parts) > 1 or "names" in parts[0] else " occurs")
        + " more than once. Make the names unique (a suffix -1, -2, ... is added to the"
        " repeats) to continue."
    )


def validate_dataset(adata: anndata.AnnData, *, require_counts: bool = False) -> CountsCheck:
    """Check that a dataset can be used, raising a DataError that says what to do if not.

    Refused, in this order: an empty matrix (0 cells, 0 genes, or no non-zero value), NaN
    values, infinite values, negative values, duplicated cell or gene names
    (``fix="make_unique"``, see :func:`make_names_unique`) and, when ``require_counts``,
    values that are not whole numbers. For negative and non-integer values the message names
    the layer (or ``.raw``) that holds raw counts when there is one; pass it to
    :func:`use_counts_layer`.

    Returns
    -------
    The :class:`CountsCheck` of ``X``; ``adata`` is not modified.

    Raises
    ------
    DataError
        For the problems listed above.
    """
    n_cells, n_genes = adata.n_obs, adata.n_vars
    if n_cells == 0 or n_genes == 0:
        raise DataError(
            f"The dataset is empty: it has {n_cells:,} cells and {n_genes:,} genes. "
            "Check that you picked the right file (and, for a table, the right orientation)."
        )
    scan = _scan(adata.X)
    if scan.n_nonzero == 0:
        raise DataError(
            f"The count matrix holds only zeros ({n_cells:,} cells × {n_genes:,} genes). "
            "Check that you picked the right file."
        )
    if scan.n_nan:
        row, col = scan.first_nan or (0, 0)
        raise DataError(
            f"X contains {scan.n_nan:,} NaN (missing) value{_plural(scan.n_nan)}, the first in "
            f"cell '{_name_at(adata.obs_names, row)}', gene '{_name_at(adata.var_names, col)}'. "
            "Counts are never missing: replace them with 0 if they mean 'not detected', "
            "or export the count matrix again."
        )
    if scan.n_inf:
        row, col = scan.first_inf or (0, 0)
        raise DataError(
            f"X contains {scan.n_inf:,} infinite value{_plural(scan.n_inf)}, the first in cell "
            f"'{_name_at(adata.obs_names, row)}', gene '{_name_at(adata.var_names, col)}'. "
            "Counts are always finite: export the raw count matrix again."
        )
    layer: str | None = None
    if scan.n_negative or not scan.is_counts:
        layer = _find_counts_layer(adata, chunk_size=100_000)
    if scan.n_negative:
        row, col = scan.first_negative or (0, 0)
        raise DataError(
            f"X contains {scan.n_negative:,} negative value{_plural(scan.n_negative)} (e.g. "
            f"{_format_value(scan.example_negative)} in cell "
            f"'{_name_at(adata.obs_names, row)}', gene '{_name_at(adata.var_names, col)}'): "
            "counts cannot be negative, so the data looks scaled or batch-corrected. "
            + _where_counts_advice(layer)
        )
    duplicates = _duplicates_message(adata)
    if duplicates:
        raise DataError(duplicates, fix="make_unique")
    check = _counts_check(scan, layer)
    if require_counts and not check.is_counts:
        raise DataError(check.message)
    return check


def make_names_unique(adata: anndata.AnnData) -> anndata.AnnData:
    """Make cell and gene names unique in place (repeats get ``-1``, ``-2``, ... suffixes).

    Returns
    -------
    The same ``adata``, with ``obs_names`` and ``var_names`` rewritten.
    """
    if adata.obs_names.has_duplicates:
        adata.obs_names_make_unique()
    if adata.var_names.has_duplicates:
        adata.var_names_make_unique()
    return adata


def use_counts_layer(adata: anndata.AnnData, layer: str) -> anndata.AnnData:
    """Return a dataset whose ``X`` is the given layer, or ``.raw`` for ``layer='raw'``.

    For a layer, the new object shares ``obs``, ``var``, ``obsm``, ``varm``, ``obsp``, ``uns``
    and the other layers with ``adata`` (the old ``X`` is dropped); for ``'raw'`` it is
    ``adata.raw.to_adata()`` (the genes of ``.raw``, which may be more than those of ``X``).
    ``X`` is returned as CSR.

    Returns
    -------
    A new AnnData; ``adata`` is not modified.

    Raises
    ------
    DataError
        If the layer does not exist.
    """
    if layer == "raw" and "raw" not in adata.layers:
        if adata.raw is None:
            raise DataError("This dataset has no .raw matrix to take the counts from.")
        new = adata.raw.to_adata()
    else:
        if layer not in adata.layers:
            available = ", ".join(f"'{n}'" for n in adata.layers) or "none"
            raise DataError(
                f"This dataset has no layer '{layer}' (layers: {available}). "
                "Pick one of its layers."
            )
        new = anndata.AnnData(
            X=adata.layers[layer],
            obs=adata.obs,
            var=adata.var,
            uns=adata.uns,
            obsm=dict(adata.obsm),
            varm=dict(adata.varm),
            obsp=dict(adata.obsp),
            layers={k: v for k, v in adata.layers.items() if k != layer},
        )
    if sp.issparse(new.X):
        if new.X.format != "csr":
            new.X = sp.csr_matrix(new.X)
    elif new.X is not None:
        new.X = sp.csr_matrix(np.asarray(new.X))
    return new
