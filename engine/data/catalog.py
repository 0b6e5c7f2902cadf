"""The datasets the Data page offers: sample data and the configured data folders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.settings import data_dirs

MAX_DEPTH = 4


@dataclass(frozen=True)
class CatalogEntry:
    """One openable dataset on disk."""

    label: str
    path: Path
    size_mb: float


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


def _is_10x_folder(path: Path) -> bool:
    return any((path / name).exists() for name in ("matrix.mtx", "matrix.mtx.gz"))


def list_datasets(folders: list[Path] | None = None) -> list[CatalogEntry]:
    """Return the ``.h5ad`` files, ``.zarr`` stores and 10x matrix folders found in the
    sample-data folder and the configured data folders (``SYNTHCELL_DATA_DIR``)."""
    entries: list[CatalogEntry] = []
    for root in folders if folders is not None else data_dirs():
        stack = [(root, 0)]
        while stack:
            folder, depth = stack.pop()
            for path in sorted(folder.iterdir()):
                if path.name.startswith("."):
                    continue
                relative = f"{root.name}/{path.relative_to(root)}"
                is_h5ad = path.is_file() and path.suffix == ".h5ad"
                is_store = path.is_dir() and (path.suffix == ".zarr" or _is_10x_folder(path))
                if is_h5ad or is_store:
                    entries.append(CatalogEntry(relative, path, _size_mb(path)))
                elif path.is_dir() and depth < MAX_DEPTH:
                    stack.append((path, depth + 1))
    return sorted(entries, key=lambda e: (not e.label.startswith("sample_data"), e.label))
