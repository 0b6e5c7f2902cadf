"""The workspace on disk: datasets, splits, runs and job records.

The store is the only code that decides paths. Every write is atomic: files are written
to a temporary name and renamed; folders are built under ``.tmp/`` and renamed into place,
so a crash or an error never leaves a half-written dataset, split or run behind.

Layout::

    <root>/datasets/<dataset_id>/data.h5ad, meta.json
    <root>/splits/<split_id>/split.csv, train.h5ad, test.h5ad, meta.json
    <root>/runs/<run_key>/config.json, model/, synthetic.h5ad, metrics.json, privacy.json,
                          log.txt, meta.json
    <root>/jobs/<job_id>/job.json, log.txt
    <root>/uploads/      files received from the browser, removed once imported
    <root>/state.json    the last selected dataset / split / run, so a reload finds them
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from engine.settings import workspace_root

H5AD_COMPRESSION = "gzip"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(payload, indent=2, default=_json_default))


def read_json(path: Path, default: Any = None) -> Any:
    """Read JSON from ``path``; return ``default`` when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def write_h5ad_atomic(adata: ad.AnnData, path: Path) -> None:
    """Write ``adata`` to ``path`` (gzip-compressed .h5ad) through a temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        adata.write_h5ad(tmp, compression=H5AD_COMPRESSION)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | tuple):
        return list(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def stable_hash(payload: Any, *, length: int = 16) -> str:
    """Return a short sha256 of ``payload``'s canonical JSON (sorted keys)."""
    text = json.dumps(payload, sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def fingerprint_adata(adata: ad.AnnData, *, chunk_rows: int = 200_000) -> str:
    """Return a content hash of a dataset: shape, cell and gene names, and every count.

    The matrix is hashed in row chunks in CSR form, so equal data in dense or sparse form
    hash alike and no dense copy of the whole matrix is made. Row lengths, column indices
    and values go to three separate hashes, so the result does not depend on ``chunk_rows``.
    """
    header = hashlib.sha256()
    header.update(f"{adata.n_obs}x{adata.n_vars}".encode())
    header.update("\x00".join(map(str, adata.obs_names)).encode())
    header.update("\x00".join(map(str, adata.var_names)).encode())
    row_lengths, indices, values = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    matrix = adata.X
    for start in range(0, adata.n_obs, chunk_rows):
        block = matrix[start : start + chunk_rows]
        block = sp.csr_matrix(block) if not sp.issparse(block) else block.tocsr()
        block.sum_duplicates()
        block.eliminate_zeros()
        row_lengths.update(np.diff(block.indptr).astype(np.int64).tobytes())
        indices.update(block.indices.astype(np.int64).tobytes())
        values.update(block.data.astype(np.float64).tobytes())
    combined = hashlib.sha256()
    for part in (header, row_lengths, indices, values):
        combined.update(part.digest())
    return combined.hexdigest()[:24]


@dataclass
class DatasetRecord:
    """What the workspace knows about one dataset (``meta.json``)."""

    id: str
    name: str
    source: str
    fingerprint: str
    n_cells: int
    n_genes: int
    is_counts: bool
    counts_message: str
    roles: dict[str, str | None] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    origin: str = "file"  # file | upload | mock | split
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class SplitRecord:
    """A saved donor (or cell) split of one dataset."""

    id: str
    dataset_id: str
    unit: str
    label: str
    params: dict[str, Any]
    n_train: int
    n_test: int
    train_donors: list[str]
    test_donors: list[str]
    created: float = field(default_factory=time.time)


@dataclass
class RunRecord:
    """One generator run: its key, inputs, status and outputs."""

    key: str
    generator: str
    config: dict[str, Any]
    seed: int
    dataset_id: str | None
    split_id: str | None
    status: str = "done"
    privacy_label: str = "not private"
    privacy: dict[str, Any] = field(default_factory=dict)
    n_cells: int = 0
    n_genes: int = 0
    duration_s: float = 0.0
    size_bytes: int = 0
    created: float = field(default_factory=time.time)
    job_id: str | None = None


def _read_h5ad_element(path: Path, key: str) -> Any:
    """Read one element (``obs``, ``obsm/X_umap``, ...) of an .h5ad file without the rest."""
    import h5py
    from anndata.io import read_elem

    with h5py.File(path, "r") as handle:
        if key not in handle:
            return None
        return read_elem(handle[key])


def _from_dict(cls: type, payload: dict[str, Any]) -> Any:
    known = {k: v for k, v in payload.items() if k in cls.__dataclass_fields__}
    return cls(**known)


class Workspace:
    """The workspace folder and every read and write into it."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root).resolve() if root is not None else workspace_root()
        for sub in ("datasets", "splits", "runs", "jobs", "uploads", ".tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # -- folders -----------------------------------------------------------------------
    @property
    def jobs_dir(self) -> Path:
        return self.root / "jobs"

    @property
    def uploads_dir(self) -> Path:
        return self.root / "uploads"

    def scratch_dir(self) -> Path:
        """Return a new empty folder under ``.tmp/`` for work in progress."""
        path = self.root / ".tmp" / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    @contextlib.contextmanager
    def _building(self, final: Path) -> Iterator[Path]:
        """Yield a scratch folder that becomes ``final`` on success and vanishes on error."""
        scratch = self.scratch_dir()
        try:
            yield scratch
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                shutil.rmtree(scratch, ignore_errors=True)
                return
            os.replace(scratch, final)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise

    def clean_scratch(self, *, older_than_s: float = 3600.0) -> int:
        """Remove leftovers of crashed writers from ``.tmp/`` and stale uploads from
        ``uploads/`` (older than ``older_than_s``); return how many were removed."""
        removed = 0
        now = time.time()
        for folder in (self.root / ".tmp", self.uploads_dir):
            for path in folder.iterdir():
                if now - path.stat().st_mtime > older_than_s:
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
                    removed += 1
        return removed

    # -- state -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Return the last selections (dataset, split, run) saved in ``state.json``."""
        return read_json(self.root / "state.json", {}) or {}

    def set_state(self, **values: Any) -> None:
        """Update ``state.json`` with ``values`` (None removes a key)."""
        state = self.state()
        for key, value in values.items():
            if value is None:
                state.pop(key, None)
            else:
                state[key] = value
        atomic_write_json(self.root / "state.json", state)

    # -- datasets ----------------------------------------------------------------------
    def dataset_dir(self, dataset_id: str) -> Path:
        return self.root / "datasets" / dataset_id

    def add_dataset(
        self,
        adata: ad.AnnData,
        *,
        name: str,
        source: str,
        is_counts: bool,
        counts_message: str,
        roles: dict[str, str | None] | None = None,
        origin: str = "file",
        notes: dict[str, Any] | None = None,
    ) -> DatasetRecord:
        """Store ``adata`` as a dataset; return its record.

        Writes ``datasets/<id>/data.h5ad`` and ``meta.json``. The id is the content
        fingerprint, so adding the same data twice returns the stored record.
        """
        fingerprint = fingerprint_adata(adata)
        dataset_id = fingerprint[:16]
        existing = self.get_dataset(dataset_id)
        if existing is not None:
            return existing
        record = DatasetRecord(
            id=dataset_id,
            name=name,
            source=source,
            fingerprint=fingerprint,
            n_cells=int(adata.n_obs),
            n_genes=int(adata.n_vars),
            is_counts=is_counts,
            counts_message=counts_message,
            roles=dict(roles or {}),
            origin=origin,
            notes=dict(notes or {}),
        )
        with self._building(self.dataset_dir(dataset_id)) as folder:
            adata.write_h5ad(folder / "data.h5ad", compression=H5AD_COMPRESSION)
            atomic_write_json(folder / "meta.json", asdict(record))
        return record

    def get_dataset(self, dataset_id: str) -> DatasetRecord | None:
        """Return the record of ``dataset_id`` or None."""
        meta = read_json(self.dataset_dir(dataset_id) / "meta.json")
        return _from_dict(DatasetRecord, meta) if meta else None

    def list_datasets(self) -> list[DatasetRecord]:
        """Return every stored dataset, newest first."""
        records = [self.get_dataset(p.name) for p in (self.root / "datasets").iterdir()]
        return sorted((r for r in records if r), key=lambda r: r.created, reverse=True)

    def dataset_path(self, dataset_id: str) -> Path:
        return self.dataset_dir(dataset_id) / "data.h5ad"

    def load_dataset(self, dataset_id: str, *, backed: bool = False) -> ad.AnnData:
        """Read the stored AnnData of ``dataset_id`` (``backed='r'`` keeps X on disk)."""
        return ad.read_h5ad(self.dataset_path(dataset_id), backed="r" if backed else None)

    def load_obs(self, dataset_id: str) -> pd.DataFrame:
        """Read only the cell metadata (``obs``) of a stored dataset, not its matrix."""
        return _read_h5ad_element(self.dataset_path(dataset_id), "obs")

    def load_obsm(self, dataset_id: str, key: str) -> np.ndarray | None:
        """Read one ``obsm`` entry of a stored dataset (None when absent)."""
        return _read_h5ad_element(self.dataset_path(dataset_id), f"obsm/{key}")

    def dataset_summary(self, dataset_id: str) -> tuple[dict[str, Any], pd.DataFrame | None]:
        """Return the stored ``summary.json`` and per-cell QC table of a dataset."""
        folder = self.dataset_dir(dataset_id)
        summary = read_json(folder / "summary.json", {}) or {}
        qc_path = folder / "qc.parquet"
        return summary, (pd.read_parquet(qc_path) if qc_path.exists() else None)

    def set_roles(self, dataset_id: str, roles: dict[str, str | None]) -> DatasetRecord:
        """Save the column-role mapping with the dataset; return the updated record."""
        record = self.get_dataset(dataset_id)
        if record is None:
            raise KeyError(dataset_id)
        record.roles = dict(roles)
        atomic_write_json(self.dataset_dir(dataset_id) / "meta.json", asdict(record))
        return record

    def delete_dataset(self, dataset_id: str) -> None:
        """Remove a dataset folder (its splits and runs stay until removed)."""
        shutil.rmtree(self.dataset_dir(dataset_id), ignore_errors=True)

    # -- splits ------------------------------------------------------------------------
    def split_dir(self, split_id: str) -> Path:
        return self.root / "splits" / split_id

    def split_id_for(self, dataset_id: str, params: dict[str, Any]) -> str:
        """Return the id a split of ``dataset_id`` with ``params`` has (content hash)."""
        record = self.get_dataset(dataset_id)
        fingerprint = record.fingerprint if record else dataset_id
        return stable_hash({"dataset": fingerprint, "split": params})

    def save_split(
        self,
        dataset_id: str,
        *,
        split_frame: pd.DataFrame,
        train: ad.AnnData,
        test: ad.AnnData,
        unit: str,
        label: str,
        params: dict[str, Any],
        train_donors: list[str],
        test_donors: list[str],
    ) -> SplitRecord:
        """Store a split: ``split.csv`` (cell id -> side), ``train.h5ad``, ``test.h5ad``."""
        split_id = self.split_id_for(dataset_id, params)
        existing = self.get_split(split_id)
        if existing is not None:
            return existing
        record = SplitRecord(
            id=split_id,
            dataset_id=dataset_id,
            unit=unit,
            label=label,
            params=params,
            n_train=int(train.n_obs),
            n_test=int(test.n_obs),
            train_donors=[str(d) for d in train_donors],
            test_donors=[str(d) for d in test_donors],
        )
        with self._building(self.split_dir(split_id)) as folder:
            split_frame.to_csv(folder / "split.csv", index=False)
            train.write_h5ad(folder / "train.h5ad", compression=H5AD_COMPRESSION)
            test.write_h5ad(folder / "test.h5ad", compression=H5AD_COMPRESSION)
            atomic_write_json(folder / "meta.json", asdict(record))
        return record

    def get_split(self, split_id: str) -> SplitRecord | None:
        """Return the record of ``split_id`` or None."""
        meta = read_json(self.split_dir(split_id) / "meta.json")
        return _from_dict(SplitRecord, meta) if meta else None

    def list_splits(self, dataset_id: str | None = None) -> list[SplitRecord]:
        """Return stored splits (of one dataset when given), newest first."""
        records = [self.get_split(p.name) for p in (self.root / "splits").iterdir()]
        records = [r for r in records if r and (dataset_id is None or r.dataset_id == dataset_id)]
        return sorted(records, key=lambda r: r.created, reverse=True)

    def load_split_side(self, split_id: str, side: str, *, backed: bool = False) -> ad.AnnData:
        """Read the ``train`` or ``test`` AnnData of a split (``backed``: open it read-only
        on disk, for generators that read it chunk by chunk)."""
        if side not in ("train", "test"):
            raise ValueError(f"side must be 'train' or 'test', not {side!r}")
        path = self.split_dir(split_id) / f"{side}.h5ad"
        return ad.read_h5ad(path, backed="r") if backed else ad.read_h5ad(path)

    def split_csv(self, split_id: str) -> Path:
        return self.split_dir(split_id) / "split.csv"

    # -- runs --------------------------------------------------------------------------
    def run_dir(self, key: str) -> Path:
        return self.root / "runs" / key

    def run_key(
        self,
        *,
        dataset_id: str | None,
        split_id: str | None,
        generator: str,
        config: dict[str, Any],
        seed: int,
    ) -> str:
        """Return the content hash that names a run of these inputs."""
        record = self.get_dataset(dataset_id) if dataset_id else None
        return stable_hash(
            {
                "dataset": record.fingerprint if record else dataset_id,
                "split": split_id,
                "generator": generator,
                "config": config,
                "seed": int(seed),
            }
        )

    def get_run(self, key: str) -> RunRecord | None:
        """Return the finished run stored under ``key`` or None."""
        meta = read_json(self.run_dir(key) / "meta.json")
        return _from_dict(RunRecord, meta) if meta else None

    def list_runs(self) -> list[RunRecord]:
        """Return every stored run, newest first."""
        records = [self.get_run(p.name) for p in (self.root / "runs").iterdir()]
        return sorted((r for r in records if r), key=lambda r: r.created, reverse=True)

    @contextlib.contextmanager
    def building_run(self, key: str) -> Iterator[Path]:
        """Yield a scratch folder for a run; it becomes ``runs/<key>`` only on success."""
        with self._building(self.run_dir(key)) as folder:
            yield folder

    def finish_run(self, folder: Path, record: RunRecord) -> None:
        """Write a run's ``meta.json`` (with its size on disk) into its scratch folder."""
        record.size_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        atomic_write_json(folder / "meta.json", asdict(record))

    def synthetic_path(self, key: str) -> Path:
        return self.run_dir(key) / "synthetic.h5ad"

    def load_synthetic(self, key: str) -> ad.AnnData:
        """Read the synthetic AnnData of a run."""
        return ad.read_h5ad(self.synthetic_path(key))

    def evaluation_dir(self, key: str, split_id: str | None, kind: str = "evaluation") -> Path:
        """Where the evaluation (or audit) of run ``key`` against a split's held-out cells is
        cached: ``runs/<key>/<kind>/<split_id>/``."""
        return self.run_dir(key) / kind / (split_id or "no-split")

    def stored_results(self, key: str, kind: str) -> dict[str, dict[str, Any]]:
        """{result id: summary} of run ``key``'s stored results of ``kind`` (designs,
        denoised, posterior, …), newest first: the folders ``runs/<key>/<kind>/<id>/`` that
        hold a readable ``summary.json``."""
        base = self.run_dir(key) / kind
        found = []
        for path in (base.glob("*/summary.json") if base.is_dir() else []):
            try:
                found.append((path.stat().st_mtime_ns, path.parent.name,
                              json.loads(path.read_text())))
            except (OSError, ValueError):  # removed meanwhile, or half written by hand
                continue
        found.sort(key=lambda item: (item[0], item[1]), reverse=True)
        return {result_id: summary for _, result_id, summary in found}

    @contextlib.contextmanager
    def building_evaluation(self, key: str, split_id: str | None,
                            kind: str = "evaluation") -> Iterator[Path]:
        """Yield a scratch folder that becomes the evaluation folder only on success."""
        with self._building(self.evaluation_dir(key, split_id, kind)) as folder:
            yield folder

    def delete_run(self, key: str) -> None:
        shutil.rmtree(self.run_dir(key), ignore_errors=True)
