"""Multimodal mock data: RNA, ATAC and ADT from one latent backbone, under six scenarios.

The mock generator makes data with a known truth, for demos, for testing the app end to end
and for checking integration or prediction methods against the answer. Every cell is first
simulated with *all* three modalities (the ground truth); a scenario then decides which
modalities each cell is observed with and zeroes the hidden entries of the observed
matrices. The truth is kept beside the observed data in the same AnnData.

The model (all draws from ``seed``):

* **Latent backbone.** 3 to 5 Gaussian cluster centres in ``latent_dim`` dimensions; each
  cell gets a cluster, a latent vector (its centre plus Gaussian noise) and a condition
  (``control`` or ``stimulated``, a shared latent shift). Technical effects are latent
  offsets too: per study (``dataset``, large, only in the hierarchical scenario), per
  ``batch`` and per ``donor``.
* **RNA** counts are negative binomial (a gamma-Poisson mixture, drawn exactly) with a
  log-linear mean ``log mu[i, g] = offset[i] + z[i] . W[g] + b[g]``: the per-cell offset
  fixes the library size (median ``1.25 * n_genes`` counts, i.e. 2,500 at 2,000 genes,
  log-normal spread, 5-95 % range about 0.45x-2.2x the median), ``b`` is a heavy-tailed
  gene bias and each gene has its own dispersion (``var = mu + phi[g] * mu**2``, median
  ``phi = dispersion``). About 83 % of entries are zero at the defaults.
* **ATAC** peaks are Bernoulli with ``logit p[i, j] = depth[i] + z[i] . U[j] + c[j]``; the
  typical peak is open in about 2-10 % of cells. Drawn in row chunks, never as one dense
  matrix, and stored as CSR ``uint8``.
* **ADT** intensities are exponentiated Gaussians ``exp(a[p] + z[i] . V[p] + noise)``,
  dense ``float32``.

Simulation runs in row chunks on a few threads; each chunk has its own random stream, so
the result depends only on the arguments, never on the number of threads. Non-hierarchical
scenarios with the same seed and sizes share the same ground truth; only the observation
pattern differs.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from engine.errors import DataError
from engine.memory import return_freed_memory

SCENARIOS: tuple[str, ...] = (
    "paired",
    "unpaired",
    "bridge",
    "mosaic",
    "prediction",
    "hierarchical",
)

SCENARIO_DESCRIPTIONS: dict[str, str] = {
    "paired": "Every cell has RNA and protein (ADT), as in CITE-seq; no ATAC.",
    "unpaired": "Half the cells have only RNA, the other half only ATAC; no cell has both.",
    "bridge": "Large RNA-only and ATAC-only cohorts joined by a small bridge of cells with both.",
    "mosaic": "Each cell keeps a random, non-empty subset of RNA, ATAC and ADT.",
    "prediction": "Training cells have both modalities; evaluation cells hide the target one.",
    "hierarchical": "Three studies with different modality mixes and clearly different batch "
    "effects: RNA+ADT, RNA+ATAC and RNA only.",
}

MODALITIES: tuple[str, ...] = ("rna", "atac", "adt")
PREDICTION_TARGETS: tuple[str, ...] = ("adt", "atac", "rna")
#: Which modality predicts which: the target's source modality in the prediction scenario.
PREDICTION_SOURCES: dict[str, str] = {"adt": "rna", "atac": "rna", "rna": "atac"}
#: The modality mix of each study in the hierarchical scenario.
HIERARCHICAL_STUDIES: dict[str, tuple[str, ...]] = {
    "study1": ("rna", "adt"),
    "study2": ("rna", "atac"),
    "study3": ("rna",),
}
CELL_TYPE_NAMES: tuple[str, ...] = ("type_A", "type_B", "type_C", "type_D", "type_E")
CONDITIONS: tuple[str, ...] = ("control", "stimulated")
SPLITS: tuple[str, ...] = ("train", "eval")

Progress = Callable[[float, str], None]

# Bounds shared by the argument checks and the form metadata: (min, max).
_LIMITS: dict[str, tuple[float, float]] = {
    "n_cells": (20, 2_000_000),
    "n_genes": (10, 100_000),
    "n_peaks": (10, 1_000_000),
    "n_proteins": (1, 1_000),
    "latent_dim": (2, 100),
    "n_donors": (1, 1_000),
    "n_clusters": (1, 1_000),
    "bridge_fraction": (0.001, 0.9),
    "mosaic_keep_prob": (0.05, 1.0),
    "eval_fraction": (0.01, 0.9),
    "dispersion": (0.01, 10.0),
    "seed": (0, 2**32 - 1),
}

# Model constants (documented in the module docstring).
_CENTRE_SD = 1.5  # cluster centres ~ N(0, 1.5^2) per latent dimension
_WITHIN_SD = 0.6  # cells around their centre
_CONDITION_SD = 0.5  # shift of "stimulated" cells
_DATASET_SD = 0.8  # per-study offset per dimension (hierarchical only; orthogonal offsets)
_BATCH_SD = 0.3
_DONOR_SD = 0.15
_LATENT_SD = math.hypot(_CENTRE_SD, _WITHIN_SD)  # overall scale of z per dimension
_RNA_EFFECT_SD = 1.5  # sd of z . W on the log scale (cell-type marker genes)
_GENE_BIAS_SD = 2.5  # heavy-tailed gene means: most genes low, a few high
_DISPERSION_SPREAD = 0.5  # sd of log dispersion across genes
_COUNTS_PER_GENE = 1.25  # median library size = 1.25 * n_genes (2,500 at 2,000 genes)
_LIBRARY_SD = 0.45
_ATAC_EFFECT_SD = 1.2
_ATAC_BASE_LOGIT = -3.6  # median peak opens in ~3 % of cells before latent effects
_ATAC_PEAK_SD = 0.8
_ATAC_DEPTH_SD = 0.4
_ADT_EFFECT_SD = 1.5
_ADT_BASE_MEAN, _ADT_BASE_SD = 4.0, 1.0
_ADT_NOISE_SD = 0.3

# NB draws by inverse transform where the mean is small and the tail light (see _sample_nb).
_NB_INVERSE_MAX_MEAN = 4.0
_NB_INVERSE_MAX_Q = 0.8  # P(k + 1) / P(k) tends to q: the walk ends quickly
_NB_INVERSE_MAX_STEPS = 400
# Row chunks of about this many matrix entries: small enough that temporaries are reused
# from the heap instead of being page-faulted afresh (which costs more than the arithmetic).
_RNA_CHUNK_ENTRIES = 1 << 18
_ATAC_CHUNK_ENTRIES = 1 << 20
# Random-stream keys: each part of the simulation has its own stream.
_STREAM_CELLS, _STREAM_RNA, _STREAM_ATAC, _STREAM_ADT = 0, 1, 2, 3
_STREAM_RNA_CHUNK, _STREAM_ATAC_CHUNK, _STREAM_MASKS = 4, 5, 6


_FORM_LIMITS: dict[str, tuple[float, float]] = {**_LIMITS, "n_clusters": (3, 5)}


def _meta(name: str, label: str, help: str, **extra: Any) -> dict[str, Any]:
    """Form metadata of one :class:`MockConfig` field, with its bounds as ``min``/``max``."""
    meta: dict[str, Any] = {"label": label, "help": help, **extra}
    if name in _FORM_LIMITS:
        meta["min"], meta["max"] = _FORM_LIMITS[name]
    return meta


@dataclass
class MockConfig:
    """The mock generator's options as a form: one field per keyword of
    :func:`generate_mock_dataset` with the same default, each with ``label`` and ``help``
    metadata plus ``min``/``max``/``step`` (numbers) or ``choices`` (choices)."""

    problem_type: str = field(
        default="paired",
        metadata=_meta(
            "problem_type",
            "Scenario",
            "Which modalities each cell is observed with. "
            + " ".join(f"{k}: {v}" for k, v in SCENARIO_DESCRIPTIONS.items()),
            choices=SCENARIOS,
        ),
    )
    n_cells: int = field(
        default=2000, metadata=_meta("n_cells", "Cells", "Number of cells.", step=100)
    )
    n_genes: int = field(
        default=2000, metadata=_meta("n_genes", "Genes", "Number of RNA genes.", step=100)
    )
    n_peaks: int = field(
        default=5000,
        metadata=_meta("n_peaks", "ATAC peaks", "Number of chromatin peaks.", step=1000),
    )
    n_proteins: int = field(
        default=30,
        metadata=_meta("n_proteins", "Proteins (ADT)", "Number of surface proteins.", step=1),
    )
    latent_dim: int = field(
        default=10,
        metadata=_meta(
            "latent_dim", "Latent dimensions", "Size of the shared latent space.", step=1
        ),
    )
    n_donors: int = field(
        default=6,
        metadata=_meta(
            "n_donors",
            "Donors",
            "Number of donors (the hierarchical scenario uses at least 3, one per study).",
            step=1,
        ),
    )
    n_clusters: int = field(
        default=4,
        metadata=_meta("n_clusters", "Cell types", "Number of latent clusters (3 to 5).", step=1),
    )
    bridge_fraction: float = field(
        default=0.05,
        metadata=_meta(
            "bridge_fraction",
            "Bridge fraction",
            "Bridge scenario: share of cells measured with both RNA and ATAC.",
            step=0.01,
        ),
    )
    mosaic_keep_prob: float = field(
        default=0.6,
        metadata=_meta(
            "mosaic_keep_prob",
            "Mosaic keep probability",
            "Mosaic scenario: chance that a cell keeps each modality.",
            step=0.05,
        ),
    )
    prediction_target: str = field(
        default="adt",
        metadata=_meta(
            "prediction_target",
            "Prediction target",
            "Prediction scenario: the modality hidden in evaluation cells (predicted from RNA; "
            "RNA itself is predicted from ATAC).",
            choices=PREDICTION_TARGETS,
        ),
    )
    eval_fraction: float = field(
        default=0.2,
        metadata=_meta(
            "eval_fraction",
            "Evaluation fraction",
            "Prediction scenario: share of cells whose target modality is hidden.",
            step=0.05,
        ),
    )
    dispersion: float = field(
        default=0.3,
        metadata=_meta(
            "dispersion",
            "RNA dispersion",
            "Median negative-binomial dispersion phi (variance = mu + phi * mu^2); "
            "larger is noisier.",
            step=0.05,
        ),
    )
    seed: int = field(
        default=0, metadata=_meta("seed", "Seed", "Same seed and options, same data.", step=1)
    )


def config_to_kwargs(cfg: MockConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Return the keyword arguments of :func:`generate_mock_dataset` for a config.

    ``cfg`` is a :class:`MockConfig` or a mapping with some of its fields (for example
    ``uns['mock_config']`` of an earlier result); missing fields take their defaults and
    unknown keys are ignored. The result always includes ``problem_type``.
    """
    values = asdict(cfg) if isinstance(cfg, MockConfig) else dict(cfg)
    names = {f.name for f in fields(MockConfig)}
    kwargs = asdict(MockConfig())
    kwargs.update({k: v for k, v in values.items() if k in names})
    return kwargs


# --------------------------------------------------------------------------- checks


def _label(name: str) -> str:
    """The form label of an option with its keyword, e.g. ``Cells (n_cells)``."""
    meta = next(f.metadata for f in fields(MockConfig) if f.name == name)
    return f"{meta['label']} ({name})"


def _check_int(name: str, value: Any) -> int:
    lo, hi = _LIMITS[name]
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise DataError(
            f"{_label(name)} must be a whole number from {lo:,} to {hi:,}; got {value!r}."
        )
    if not lo <= value <= hi:
        raise DataError(f"{_label(name)} must be from {lo:,} to {hi:,}; got {value:,}.")
    return int(value)


def _check_float(name: str, value: Any) -> float:
    lo, hi = _LIMITS[name]
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise DataError(f"{_label(name)} must be a number from {lo} to {hi}; got {value!r}.")
    value = float(value)
    if not (math.isfinite(value) and lo <= value <= hi):
        raise DataError(f"{_label(name)} must be from {lo} to {hi}; got {value}.")
    return value


def _check_choice(name: str, value: Any, choices: tuple[str, ...], what: str) -> str:
    key = value.strip().lower() if isinstance(value, str) else value
    if key not in choices:
        raise DataError(f"Unknown {what} {value!r}. Choose one of: {', '.join(choices)}.")
    return key


def _check_memory(*, n_cells: int, n_genes: int, n_peaks: int, n_proteins: int) -> None:
    """Raise DataError when the result would clearly not fit in the free memory."""
    # Observed + true copies: RNA ~20 % non-zero, 8 bytes per entry, three copies (X,
    # counts, counts_true); ATAC ~7 % non-zero, 5 bytes, two copies plus assembly; ADT 2x.
    need = n_cells * (n_genes * 0.2 * 8 * 3 + n_peaks * 0.07 * 5 * 3 + n_proteins * 4 * 2 + 512)
    try:
        import psutil

        free = psutil.virtual_memory().available
    except Exception:  # pragma: no cover - psutil is a pinned dependency
        return
    if need > free:
        raise DataError(
            f"Simulating {n_cells:,} cells with {n_genes:,} genes and {n_peaks:,} peaks needs "
            f"about {need / 2**30:,.1f} GB of memory, more than is free now "
            f"({free / 2**30:,.1f} GB). Use fewer cells, genes or peaks."
        )


# --------------------------------------------------------------------------- helpers


def _study_offsets(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """Latent offsets of ``n`` studies (n x d): mutually orthogonal where ``d >= n``, each of
    length ``_DATASET_SD * sqrt(d)``, so every pair of studies differs clearly."""
    draws = rng.normal(size=(d, n))
    if d >= n:
        draws = np.linalg.qr(draws)[0]
    else:
        draws /= np.linalg.norm(draws, axis=0, keepdims=True)
    return (draws * (_DATASET_SD * math.sqrt(d))).T


def _rng(seed: int, *key: int) -> np.random.Generator:
    """A random stream for one part of the simulation: depends only on seed and key."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _chunks(n: int, width: int, entries: int) -> list[tuple[int, int]]:
    """Row ranges of about ``entries`` entries for a matrix ``width`` columns wide."""
    rows = int(np.clip(entries // max(width, 1), 8, 16384))
    return [(s, min(s + rows, n)) for s in range(0, n, rows)]


def _single_threaded_blas() -> contextlib.AbstractContextManager[Any]:
    """A context in which BLAS uses one thread: the chunks already run in parallel, and
    idle BLAS threads spinning beside them cost more than they give."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _n_threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def _mask_to_csr_parts(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (row counts, int32 column indices, flat positions) of the True entries."""
    flat = np.flatnonzero(mask)
    cols = (flat % mask.shape[1]).astype(np.int32)
    return np.count_nonzero(mask, axis=1), cols, flat


_TRIM_EVERY = 32  # chunks copied between hand-backs of their memory (~0.3 GB at 2k genes)


def _assemble_csr(
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], shape: tuple[int, int]
) -> sp.csr_matrix:
    """Stack per-chunk (row nnz, column indices, data) into one CSR matrix, int32 indices
    whenever the matrix allows it. Empties ``parts`` as it goes, so at most one chunk is
    held twice; returns the matrix."""
    nnz = sum(p[1].size for p in parts)
    idx_dtype = np.int32 if max(nnz, shape[1]) < np.iinfo(np.int32).max else np.int64
    indptr = np.zeros(shape[0] + 1, dtype=idx_dtype)
    np.cumsum(np.concatenate([p[0] for p in parts]), out=indptr[1:])
    indices = np.empty(nnz, dtype=idx_dtype)
    data = np.empty(nnz, dtype=parts[0][2].dtype if parts else np.int32)
    at = 0
    for k in range(len(parts)):
        _, cols, values = parts[k]
        parts[k] = None  # type: ignore[call-overload]
        indices[at : at + cols.size] = cols
        data[at : at + cols.size] = values
        at += cols.size
        if k % _TRIM_EVERY == _TRIM_EVERY - 1:
            # the chunks just copied stay resident in the C heap unless handed back while
            # the output grows (200k DP-NMF cells: peak 3.02 GB without, 2.63 GB with)
            return_freed_memory()
    parts.clear()
    return_freed_memory()
    return sp.csr_matrix((data, indices, indptr), shape=shape, copy=False)


def _mask_rows(matrix: sp.csr_matrix, keep: np.ndarray) -> sp.csr_matrix:
    """Return a new CSR matrix equal to ``matrix`` with the rows where ``keep`` is False
    emptied (the observed version of a ground-truth matrix)."""
    row_nnz = np.diff(matrix.indptr)
    entry_keep = np.repeat(keep, row_nnz)
    indptr = np.zeros_like(matrix.indptr)
    np.cumsum(np.where(keep, row_nnz, 0), out=indptr[1:])
    return sp.csr_matrix(
        (matrix.data[entry_keep], matrix.indices[entry_keep], indptr),
        shape=matrix.shape,
        copy=False,
    )


def _names(prefix: str, n: int, *, start: int = 1, width: int = 5) -> np.ndarray:
    digits = max(width, len(str(n)))
    return np.array([f"{prefix}{i:0{digits}d}" for i in range(start, start + n)], dtype=object)


def _categorical(values: np.ndarray, categories: list[str] | tuple[str, ...]) -> pd.Categorical:
    return pd.Categorical.from_codes(np.asarray(values, dtype=np.int64), categories=categories)


# --------------------------------------------------------------------------- chunk work

_local = threading.local()


def _buffer(name: str, shape: tuple[int, int], dtype: type) -> np.ndarray:
    """A per-thread scratch array reused across chunks (no fresh page faults per chunk)."""
    key = (name, dtype)
    store: dict[Any, np.ndarray] = getattr(_local, "buffers", None) or {}
    _local.buffers = store
    buf = store.get(key)
    size = shape[0] * shape[1]
    if buf is None or buf.size < size:
        buf = np.empty(size, dtype=dtype)
        store[key] = buf
    return buf[:size].reshape(shape)


def _rna_chunk(
    seed: int,
    chunk: int,
    z_eff: np.ndarray,
    loadings: np.ndarray,
    gene_bias: np.ndarray,
    log_library: np.ndarray,
    size: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Simulate RNA counts for one row chunk.

    Returns (row nnz, int32 column indices, int32 counts, per-cell log offset).
    """
    rng = _rng(seed, _STREAM_RNA_CHUNK, chunk)
    eta = z_eff @ loadings.T
    eta += gene_bias
    top = eta.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(eta - top).sum(axis=1))
    offset = log_library - log_norm
    eta += offset[:, None]
    mu = np.exp(eta, out=eta)
    counts = _sample_nb(mu, size, rng)
    mask = counts != 0
    row_nnz, cols, flat = _mask_to_csr_parts(mask)
    return row_nnz, cols, counts.ravel()[flat].astype(np.int32), offset


def _sample_nb(mu: np.ndarray, size: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw negative-binomial counts with mean ``mu`` (cells x genes) and per-gene size
    ``size = 1 / dispersion``, so that ``var = mu + mu**2 / size``.

    Exact and fast where counts are sparse: entries with a small mean are drawn by inverse
    transform from one uniform each (most stop at zero after a single comparison; the
    others walk up the NB probabilities, which fall quickly when ``mu`` is small); entries
    with a large mean or a very heavy tail are drawn as gamma-Poisson mixtures.
    Returns an int64 array shaped like ``mu``.
    """
    out = np.zeros(mu.shape, dtype=np.int64)
    q = mu / (mu + size)  # P(k + 1) / P(k) tends to q as k grows
    direct = (mu > _NB_INVERSE_MAX_MEAN) | (q > _NB_INVERSE_MAX_Q)
    rows, cols = np.nonzero(direct)
    if rows.size:
        shape_ = size[cols]
        out[rows, cols] = rng.poisson(rng.gamma(shape_, mu[rows, cols] / shape_))
    u = rng.random(mu.shape)
    p0 = np.log1p(-q)
    p0 *= size
    np.exp(p0, out=p0)  # P(X = 0)
    rows, cols = np.nonzero((u >= p0) & ~direct)
    u, q, pmf = u[rows, cols], q[rows, cols], p0[rows, cols]
    s = size[cols]
    cdf = pmf.copy()
    k = 0
    while rows.size:
        k += 1
        pmf *= q * ((s + (k - 1)) / k)
        cdf += pmf
        out[rows, cols] = k
        go_on = u >= cdf
        if k >= _NB_INVERSE_MAX_STEPS:  # only rounding can leave entries here
            break
        rows, cols, u, s, q, pmf, cdf = (a[go_on] for a in (rows, cols, u, s, q, pmf, cdf))
    return out


def _atac_chunk(
    seed: int, chunk: int, design: np.ndarray, coef: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw binary peaks for one row chunk.

    ``design @ coef`` is minus the logit of every (cell, peak) pair of the chunk.
    Returns (row nnz, int32 column indices, uint8 ones).
    """
    rng = _rng(seed, _STREAM_ATAC_CHUNK, chunk)
    shape = (design.shape[0], coef.shape[1])
    x = _buffer("x", shape, np.float32)
    u = _buffer("u", shape, np.float32)
    mask = _buffer("mask", shape, np.bool_)
    np.matmul(design, coef, out=x)  # -logit
    with np.errstate(over="ignore", invalid="ignore"):
        np.exp(x, out=x)  # e = (1 - p) / p
        rng.random(out=u, dtype=np.float32)
        # u < p = 1 / (1 + e)  <=>  u * (1 + e) < 1
        np.multiply(x, u, out=x)
        x += u
        np.less(x, 1.0, out=mask)
    row_nnz, cols, _ = _mask_to_csr_parts(mask)
    return row_nnz, cols, np.ones(cols.size, dtype=np.uint8)


_Job = tuple[Callable[..., Any], tuple[Any, ...], float, str]


def _run_jobs(jobs: list[_Job], report: Progress, *, start: float, stop: float) -> list[Any]:
    """Run ``(function, args, cost, message)`` jobs on a thread pool with single-threaded
    BLAS; call ``report`` in job order with the fraction of cost done, scaled to
    ``start..stop``. Returns the results in job order. If ``report`` raises, pending jobs
    are cancelled and the exception propagates."""
    total = sum(job[2] for job in jobs) or 1.0
    done = 0.0
    results: list[Any] = []
    with _single_threaded_blas():
        pool = ThreadPoolExecutor(max_workers=_n_threads(), thread_name_prefix="mock")
        try:
            futures = [pool.submit(func, *args) for func, args, _, _ in jobs]
            for (_, _, cost, message), future in zip(jobs, futures, strict=True):
                results.append(future.result())
                done += cost
                report(start + (stop - start) * done / total, message)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return results


# --------------------------------------------------------------------------- scenarios


def _scenario_masks(
    problem_type: str,
    *,
    n_cells: int,
    dataset_codes: np.ndarray,
    datasets: list[str],
    bridge_fraction: float,
    mosaic_keep_prob: float,
    prediction_target: str,
    eval_fraction: float,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Return ({modality: observed mask}, split codes: 0 train, 1 eval)."""
    has = {m: np.zeros(n_cells, dtype=bool) for m in MODALITIES}
    split = np.zeros(n_cells, dtype=np.int8)
    if problem_type == "paired":
        has["rna"][:] = True
        has["adt"][:] = True
    elif problem_type in ("unpaired", "bridge"):
        order = rng.permutation(n_cells)
        n_bridge = 0
        if problem_type == "bridge":
            n_bridge = int(np.clip(round(bridge_fraction * n_cells), 1, n_cells - 2))
        n_rna_only = (n_cells - n_bridge) // 2
        both, rna_only = order[:n_bridge], order[n_bridge : n_bridge + n_rna_only]
        atac_only = order[n_bridge + n_rna_only :]
        has["rna"][both] = has["atac"][both] = True
        has["rna"][rna_only] = True
        has["atac"][atac_only] = True
    elif problem_type == "mosaic":
        keep = rng.random((n_cells, len(MODALITIES))) < mosaic_keep_prob
        empty = np.flatnonzero(~keep.any(axis=1))
        keep[empty, rng.integers(0, len(MODALITIES), size=empty.size)] = True
        for j, m in enumerate(MODALITIES):
            has[m] = keep[:, j].copy()
    elif problem_type == "prediction":
        source = PREDICTION_SOURCES[prediction_target]
        n_eval = int(np.clip(round(eval_fraction * n_cells), 1, n_cells - 1))
        eval_cells = rng.permutation(n_cells)[:n_eval]
        split[eval_cells] = 1
        has[source][:] = True
        has[prediction_target][:] = split == 0
    else:  # hierarchical
        for code, name in enumerate(datasets):
            in_study = dataset_codes == code
            for m in HIERARCHICAL_STUDIES[name]:
                has[m] |= in_study
    return has, split


# --------------------------------------------------------------------------- main entry


def generate_mock_dataset(
    problem_type: str = "paired",
    *,
    n_cells: int = 2000,
    n_genes: int = 2000,
    n_peaks: int = 5000,
    n_proteins: int = 30,
    latent_dim: int = 10,
    n_donors: int = 6,
    n_clusters: int = 4,
    bridge_fraction: float = 0.05,
    mosaic_keep_prob: float = 0.6,
    prediction_target: str = "adt",
    eval_fraction: float = 0.2,
    dispersion: float = 0.3,
    seed: int = 0,
    progress: Progress | None = None,
) -> tuple[ad.AnnData, dict[str, Any]]:
    """Simulate a multimodal single-cell dataset with a known ground truth.

    Parameters
    ----------
    problem_type
        One of :data:`SCENARIOS` (see :data:`SCENARIO_DESCRIPTIONS`): which modalities each
        cell is observed with. ``paired``: RNA + ADT everywhere, no ATAC. ``unpaired``: an
        RNA-only and an ATAC-only half. ``bridge``: RNA-only and ATAC-only cohorts plus
        ``bridge_fraction`` of cells with both. ``mosaic``: each modality kept with
        probability ``mosaic_keep_prob`` per cell; a cell left with none gets one at random.
        ``prediction``: the source modality (RNA; ATAC when the target is RNA) everywhere,
        the target in training cells only. ``hierarchical``: three studies (``dataset``),
        study1 RNA + ADT, study2 RNA + ATAC, study3 RNA only, each with its own large
        latent offset.
    n_cells, n_genes, n_peaks, n_proteins
        Matrix sizes. Median library size is ``1.25 * n_genes`` counts (2,500 at 2,000 genes),
        so sparsity does not depend on ``n_genes``.
    latent_dim
        Dimensions of the shared latent space.
    n_donors
        Donors; the hierarchical scenario uses at least 3 (one per study). Donors are dealt
        to studies in turn and, within a study, to two batches in turn.
    n_clusters
        Number of latent clusters (cell types); clipped to 3..5.
    bridge_fraction, mosaic_keep_prob, prediction_target, eval_fraction
        Scenario options (used only by their scenario).
    dispersion
        Median negative-binomial dispersion ``phi`` of the genes (``var = mu + phi mu^2``);
        genes scatter log-normally around it.
    seed
        Same arguments and seed give identical arrays.
    progress
        Optional ``progress(fraction, message)``; called once per simulated chunk. An
        exception it raises (e.g. :class:`engine.errors.JobCancelled`) stops the run.

    Returns
    -------
    (adata, keys)
        ``adata`` holds, for ``n_cells`` cells and ``n_genes`` genes:

        * ``X`` and ``layers['counts']``: observed RNA counts (CSR int32; rows of cells
          without RNA are empty); ``layers['counts_true']``: RNA counts of every cell.
        * ``obsm['X_atac']`` (CSR uint8, 0/1) and ``obsm['X_adt']`` (dense float32):
          observed ATAC and ADT, hidden rows zero; ``obsm['X_atac_true']`` and
          ``obsm['X_adt_true']``: the ground truth.
        * ``obsm['X_latent']``: biological latent vectors (cluster + condition);
          ``obsm['X_latent_batch']``: the technical offsets (study + batch + donor) added to
          them before any modality is drawn.
        * ``obs``: ``has_rna``, ``has_atac``, ``has_adt`` (bool); categorical ``batch``,
          ``dataset``, ``donor``, ``cluster`` ("0".."K-1"), ``cell_type`` ("type_A"...),
          ``condition`` ("control"/"stimulated"),
          ``split`` ("train"/"eval"; all "train" outside the prediction scenario); and
          ``true_log_offset`` (float, the per-cell offset of the RNA mean).
        * ``var``: gene names ``gene_00001``...; ``true_log_bias`` and
          ``true_dispersion``; ``varm['true_loadings']`` (genes x latent_dim), so that
          ``mu = exp(true_log_offset + (X_latent + X_latent_batch) @ true_loadings.T +
          true_log_bias)``.
        * ``uns``: ``adt_names``, ``atac_peak_names``, ``mock_scenario``, ``mock_config``
          (the arguments as used, JSON-able; ``generate_mock_dataset(**mock_config)``
          reproduces the data) and ``mock_keys`` (a copy of ``keys``).

        ``keys`` says where everything lives as ``"slot"`` or ``"slot/key"`` strings:
        ``rna``, ``rna_counts``, ``atac``, ``adt``, ``masks`` (per modality), ``truth``
        (per modality and ``latent``), ``latent``, ``latent_batch``, ``cluster``,
        ``cell_type``, ``batch``, ``dataset``, ``donor``, ``condition``, ``split``,
        ``adt_names``, ``atac_names``, ``config``, ``scenario``, ``roles`` (column roles
        for the Data page), ``modalities`` (those observed in at least one cell) and, in the
        prediction scenario, ``prediction`` (source, target).

    Raises
    ------
    DataError
        An unknown scenario or prediction target, a size or fraction out of range (the
        message says which values are allowed), or sizes whose result would not fit in the
        free memory.
    """
    problem_type = _check_choice("problem_type", problem_type, SCENARIOS, "mock scenario")
    prediction_target = _check_choice(
        "prediction_target", prediction_target, PREDICTION_TARGETS, "prediction target"
    )
    n_cells = _check_int("n_cells", n_cells)
    n_genes = _check_int("n_genes", n_genes)
    n_peaks = _check_int("n_peaks", n_peaks)
    n_proteins = _check_int("n_proteins", n_proteins)
    latent_dim = _check_int("latent_dim", latent_dim)
    n_donors = _check_int("n_donors", n_donors)
    n_clusters = int(np.clip(_check_int("n_clusters", n_clusters), 3, 5))
    bridge_fraction = _check_float("bridge_fraction", bridge_fraction)
    mosaic_keep_prob = _check_float("mosaic_keep_prob", mosaic_keep_prob)
    eval_fraction = _check_float("eval_fraction", eval_fraction)
    dispersion = _check_float("dispersion", dispersion)
    seed = _check_int("seed", seed)
    hierarchical = problem_type == "hierarchical"
    if hierarchical:
        n_donors = max(n_donors, len(HIERARCHICAL_STUDIES))
    _check_memory(n_cells=n_cells, n_genes=n_genes, n_peaks=n_peaks, n_proteins=n_proteins)
    config: dict[str, Any] = {
        "problem_type": problem_type,
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_peaks": n_peaks,
        "n_proteins": n_proteins,
        "latent_dim": latent_dim,
        "n_donors": n_donors,
        "n_clusters": n_clusters,
        "bridge_fraction": bridge_fraction,
        "mosaic_keep_prob": mosaic_keep_prob,
        "prediction_target": prediction_target,
        "eval_fraction": eval_fraction,
        "dispersion": dispersion,
        "seed": seed,
    }
    report = progress if progress is not None else (lambda fraction, message: None)
    report(0.0, "Drawing the latent backbone")

    # ---- cells: clusters, conditions, donors, studies, batches, latent vectors
    rng = _rng(seed, _STREAM_CELLS)
    d = latent_dim
    centres = rng.normal(0.0, _CENTRE_SD, size=(n_clusters, d))
    weights = rng.dirichlet(np.full(n_clusters, 8.0))
    cluster = rng.choice(n_clusters, size=n_cells, p=weights)
    condition = rng.integers(0, 2, size=n_cells)
    condition_shift = rng.normal(0.0, _CONDITION_SD, size=d)
    z = centres[cluster] + rng.normal(0.0, _WITHIN_SD, size=(n_cells, d))
    z += condition[:, None] * condition_shift
    z = z.astype(np.float32)

    datasets = list(HIERARCHICAL_STUDIES) if hierarchical else ["study1"]
    donor_dataset = np.arange(n_donors) % len(datasets)
    donor_batch = np.zeros(n_donors, dtype=np.int64)  # batch index within its study
    batch_names: list[str] = []
    for k, name in enumerate(datasets):
        members = np.flatnonzero(donor_dataset == k)
        n_b = 2 if members.size >= 2 else 1
        donor_batch[members] = len(batch_names) + np.arange(members.size) % n_b
        batch_names += [f"{name}_batch{b + 1}" for b in range(n_b)]
    donor = rng.choice(n_donors, size=n_cells, p=rng.dirichlet(np.full(n_donors, 10.0)))
    dataset_shift = _study_offsets(len(datasets), d, rng) if hierarchical else np.zeros((1, d))
    batch_shift = rng.normal(0.0, _BATCH_SD, size=(len(batch_names), d))
    donor_shift = rng.normal(0.0, _DONOR_SD, size=(n_donors, d))
    batch = donor_batch[donor]
    dataset = donor_dataset[donor]
    z_batch = (dataset_shift[dataset] + batch_shift[batch] + donor_shift[donor]).astype(np.float32)
    z_eff = z.astype(np.float64) + z_batch.astype(np.float64)

    # ---- modality parameters (each from its own stream)
    scale = 1.0 / (_LATENT_SD * math.sqrt(d))
    rng_rna = _rng(seed, _STREAM_RNA)
    loadings = rng_rna.normal(0.0, _RNA_EFFECT_SD * scale, size=(n_genes, d)).astype(np.float32)
    gene_bias = rng_rna.normal(0.0, _GENE_BIAS_SD, size=n_genes).astype(np.float32)
    gene_dispersion = (
        dispersion * np.exp(rng_rna.normal(0.0, _DISPERSION_SPREAD, size=n_genes))
    ).astype(np.float32)
    log_library = np.log(_COUNTS_PER_GENE * n_genes) + rng_rna.normal(
        0.0, _LIBRARY_SD, size=n_cells
    )
    nb_size = 1.0 / gene_dispersion.astype(np.float64)

    rng_atac = _rng(seed, _STREAM_ATAC)
    peak_loadings = rng_atac.normal(0.0, _ATAC_EFFECT_SD * scale, size=(n_peaks, d))
    peak_bias = rng_atac.normal(_ATAC_BASE_LOGIT, _ATAC_PEAK_SD, size=n_peaks)
    cell_depth = rng_atac.normal(0.0, _ATAC_DEPTH_SD, size=n_cells)
    # -logit = [z_eff, depth, 1] @ [-U; -1; -c]^T: one matmul per chunk gives all logits.
    atac_design = np.hstack([z_eff, cell_depth[:, None], np.ones((n_cells, 1))]).astype(np.float32)
    atac_coef = np.ascontiguousarray(
        -np.vstack([peak_loadings.T, np.ones((1, n_peaks)), peak_bias[None, :]]),
        dtype=np.float32,
    )

    rng_adt = _rng(seed, _STREAM_ADT)
    protein_loadings = rng_adt.normal(0.0, _ADT_EFFECT_SD * scale, size=(n_proteins, d))
    protein_base = rng_adt.normal(_ADT_BASE_MEAN, _ADT_BASE_SD, size=n_proteins)
    log_adt = z_eff @ protein_loadings.T + protein_base
    log_adt += rng_adt.normal(0.0, _ADT_NOISE_SD, size=log_adt.shape)
    adt_true = np.exp(log_adt).astype(np.float32)

    # ---- RNA and ATAC in row chunks on a few threads
    loadings64 = loadings.astype(np.float64)
    bias64 = gene_bias.astype(np.float64)
    rna_chunks = _chunks(n_cells, n_genes, _RNA_CHUNK_ENTRIES)
    atac_chunks = _chunks(n_cells, n_peaks, _ATAC_CHUNK_ENTRIES)
    # Relative cost per entry (measured): an NB draw costs ~8x a Bernoulli draw.
    jobs: list[_Job] = [
        (
            _rna_chunk,
            (seed, i, z_eff[s:e], loadings64, bias64, log_library[s:e], nb_size),
            (e - s) * n_genes * 8.0,
            f"RNA counts: cells {e:,} of {n_cells:,}",
        )
        for i, (s, e) in enumerate(rna_chunks)
    ] + [
        (
            _atac_chunk,
            (seed, i, atac_design[s:e], atac_coef),
            (e - s) * n_peaks * 1.0,
            f"ATAC peaks: cells {e:,} of {n_cells:,}",
        )
        for i, (s, e) in enumerate(atac_chunks)
    ]
    results = _run_jobs(jobs, report, start=0.02, stop=0.9)
    atac_parts = results[len(rna_chunks) :]
    rna_results = results[: len(rna_chunks)]
    del results

    report(0.9, "Packaging the AnnData")
    log_offset = np.concatenate([r[3] for r in rna_results])
    rna_parts = [r[:3] for r in rna_results]
    del rna_results
    rna_true = _assemble_csr(rna_parts, (n_cells, n_genes))
    atac_true = _assemble_csr(atac_parts, (n_cells, n_peaks))

    # ---- scenario: who is observed with what
    has, split = _scenario_masks(
        problem_type,
        n_cells=n_cells,
        dataset_codes=dataset,
        datasets=datasets,
        bridge_fraction=bridge_fraction,
        mosaic_keep_prob=mosaic_keep_prob,
        prediction_target=prediction_target,
        eval_fraction=eval_fraction,
        rng=_rng(seed, _STREAM_MASKS),
    )
    rna_obs = _mask_rows(rna_true, has["rna"])
    atac_obs = _mask_rows(atac_true, has["atac"])
    adt_obs = adt_true * has["adt"][:, None].astype(np.float32)

    # ---- packaging
    cell_names = _names("cell_", n_cells, width=6)
    cluster_names = [str(k) for k in range(n_clusters)]
    donor_names = [f"donor{k + 1}" for k in range(n_donors)]
    obs = pd.DataFrame(
        {
            "batch": _categorical(batch, batch_names),
            "dataset": _categorical(dataset, datasets),
            "donor": _categorical(donor, donor_names),
            "cluster": _categorical(cluster, cluster_names),
            "cell_type": _categorical(cluster, list(CELL_TYPE_NAMES[:n_clusters])),
            "condition": _categorical(condition, CONDITIONS),
            "split": _categorical(split, SPLITS),
            "has_rna": has["rna"],
            "has_atac": has["atac"],
            "has_adt": has["adt"],
            "true_log_offset": log_offset,
        },
        index=pd.Index(cell_names, name="cell"),
    )
    var = pd.DataFrame(
        {"true_log_bias": gene_bias, "true_dispersion": gene_dispersion},
        index=pd.Index(_names("gene_", n_genes), name="gene"),
    )
    modalities = [m for m in MODALITIES if has[m].any()]
    keys: dict[str, Any] = {
        "rna": "X",
        "rna_counts": "layers/counts",
        "atac": "obsm/X_atac",
        "adt": "obsm/X_adt",
        "masks": {m: f"obs/has_{m}" for m in MODALITIES},
        "truth": {
            "rna": "layers/counts_true",
            "atac": "obsm/X_atac_true",
            "adt": "obsm/X_adt_true",
            "latent": "obsm/X_latent",
        },
        "latent": "obsm/X_latent",
        "latent_batch": "obsm/X_latent_batch",
        "cluster": "obs/cluster",
        "cell_type": "obs/cell_type",
        "batch": "obs/batch",
        "dataset": "obs/dataset",
        "donor": "obs/donor",
        "condition": "obs/condition",
        "split": "obs/split",
        "adt_names": "uns/adt_names",
        "atac_names": "uns/atac_peak_names",
        "config": "uns/mock_config",
        "scenario": "uns/mock_scenario",
        "roles": {
            "donor": "donor",
            "cell_type": "cell_type",
            "condition": "condition",
            "batch": "batch",
        },
        "modalities": modalities,
    }
    if problem_type == "prediction":
        keys["prediction"] = {
            "source": PREDICTION_SOURCES[prediction_target],
            "target": prediction_target,
        }
    adata = ad.AnnData(
        X=rna_obs,
        obs=obs,
        var=var,
        layers={"counts": rna_obs.copy(), "counts_true": rna_true},
        obsm={
            "X_atac": atac_obs,
            "X_adt": adt_obs,
            "X_atac_true": atac_true,
            "X_adt_true": adt_true,
            "X_latent": z,
            "X_latent_batch": z_batch,
        },
        varm={"true_loadings": loadings},
        uns={
            "adt_names": _names("adt_", n_proteins, width=2).astype(str),
            "atac_peak_names": _names("peak_", n_peaks, width=6).astype(str),
            "mock_scenario": problem_type,
            "mock_config": config,
            "mock_keys": copy.deepcopy(keys),
        },
    )
    report(1.0, f"Simulated {n_cells:,} cells ({problem_type})")
    return adata, keys
