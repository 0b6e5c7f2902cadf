"""Unit tests of the workspace store (engine/store.py): atomic writes, ids, runs, state."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from engine import store
from engine.store import (
    RunRecord,
    Workspace,
    atomic_write_json,
    fingerprint_adata,
    read_json,
    write_h5ad_atomic,
)


def toy(n_cells: int = 12, n_genes: int = 7, seed: int = 0) -> ad.AnnData:
    """A small counts dataset with obs columns and an embedding."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(1.0, size=(n_cells, n_genes)).astype(np.int32)
    counts[0, 0] = 5  # never an all-zero row 0
    obs = pd.DataFrame(
        {
            "donor": pd.Categorical([f"d{i % 3}" for i in range(n_cells)]),
            "score": np.linspace(0, 1, n_cells),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)])
    adata = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)
    adata.obsm["X_umap"] = rng.normal(size=(n_cells, 2)).astype(np.float32)
    return adata


def add(ws: Workspace, adata: ad.AnnData, name: str = "toy") -> store.DatasetRecord:
    return ws.add_dataset(
        adata, name=name, source="memory", is_counts=True,
        counts_message="X holds raw integer counts.", roles={"donor": "donor"},
    )


def listing(folder: Path) -> list[str]:
    """Every name under ``folder`` (hidden files included), sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --------------------------------------------------------------------------- atomic writes
def test_atomic_write_json_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "meta.json"
    payload = {"n": np.int64(3), "x": np.array([1.5, 2.0]), "p": Path("/a/b"), "t": (1, 2)}
    atomic_write_json(path, payload)
    atomic_write_json(path, {**payload, "n": 4})
    assert listing(tmp_path) == ["sub", "sub/meta.json"]
    assert read_json(path) == {"n": 4, "x": [1.5, 2.0], "p": "/a/b", "t": [1, 2]}


def test_atomic_write_json_keeps_old_content_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.json"
    atomic_write_json(path, {"version": 1})
    old = path.read_bytes()

    # 1. a value that cannot be written: nothing is touched
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        atomic_write_json(path, {"version": 2, "bad": object()})
    assert path.read_bytes() == old and listing(tmp_path) == ["state.json"]

    # 2. the disk fills up half-way through writing the temporary file
    real_fdopen = os.fdopen
    written: list[str] = []

    class HalfWriter:
        def __init__(self, handle) -> None:  # type: ignore[no-untyped-def]
            self.handle = handle

        def __enter__(self) -> HalfWriter:
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.close()

        def write(self, text: str) -> None:
            self.handle.write(text[: len(text) // 2])
            self.handle.flush()
            written.extend(p.name for p in tmp_path.iterdir())
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(
        store.os, "fdopen", lambda fd, *a, **k: HalfWriter(real_fdopen(fd, *a, **k))
    )
    with pytest.raises(OSError, match="No space left"):
        atomic_write_json(path, {"version": 3, "padding": "x" * 1000})
    monkeypatch.undo()
    assert len(written) == 2  # the half-written temporary file existed beside the target...
    assert path.read_bytes() == old and listing(tmp_path) == ["state.json"]  # ...and is gone

    # 3. interrupted (Ctrl-C) just before the rename
    def interrupted(src: str, dst: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(store.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_json(path, {"version": 4})
    monkeypatch.undo()
    assert path.read_bytes() == old and listing(tmp_path) == ["state.json"]
    assert read_json(path) == {"version": 1}


def test_read_json_default_when_missing_or_corrupt(tmp_path: Path) -> None:
    assert read_json(tmp_path / "missing.json", {"d": 1}) == {"d": 1}
    (tmp_path / "bad.json").write_text('{"cut": ')
    assert read_json(tmp_path / "bad.json") is None


def test_write_h5ad_atomic_leaves_no_temp_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.h5ad"
    write_h5ad_atomic(toy(), target)
    old = target.read_bytes()
    bad = toy()
    bad.uns["unwritable"] = object()
    with pytest.raises(Exception):  # noqa: B017 - anndata's own error type
        write_h5ad_atomic(bad, target)
    assert target.read_bytes() == old and listing(tmp_path) == ["out.h5ad"]


# --------------------------------------------------------------------------- fingerprint
def test_fingerprint_dense_equals_sparse_and_sees_one_count() -> None:
    adata = toy()
    dense = adata.X.toarray()
    base = fingerprint_adata(adata)
    variants = {
        "dense int": dense,
        "dense float": dense.astype(np.float64),
        "csc": sp.csc_matrix(dense),
        "csr int64": sp.csr_matrix(dense.astype(np.int64)),
    }
    for label, matrix in variants.items():
        other = ad.AnnData(X=matrix, obs=adata.obs, var=adata.var)
        assert fingerprint_adata(other) == base, label
    explicit_zero = adata.X.copy()
    explicit_zero.data[explicit_zero.data == 1] = 0  # stored zeros change nothing...
    same_values = ad.AnnData(X=sp.csr_matrix(dense * (dense != 1)), obs=adata.obs, var=adata.var)
    assert fingerprint_adata(ad.AnnData(X=explicit_zero, obs=adata.obs, var=adata.var)) == (
        fingerprint_adata(same_values)
    )
    assert len(base) == 24

    changed = dense.copy()
    changed[7, 3] += 1
    assert fingerprint_adata(ad.AnnData(X=changed, obs=adata.obs, var=adata.var)) != base
    renamed = adata.copy()
    renamed.var_names = [*adata.var_names[:-1], "other"]
    assert fingerprint_adata(renamed) != base
    assert fingerprint_adata(adata[:, ::-1].copy()) != base  # same values, other gene order


def test_fingerprint_does_not_depend_on_chunk_size() -> None:
    adata = toy()
    base = fingerprint_adata(adata)
    for chunk_rows in (1, 3, 7, adata.n_obs):
        assert fingerprint_adata(adata, chunk_rows=chunk_rows) == base, chunk_rows


# --------------------------------------------------------------------------- datasets
def test_add_dataset_twice_returns_the_same_id_without_rewriting(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    adata = toy()
    first = add(ws, adata)
    assert first.id == fingerprint_adata(adata)[:16]
    folder = ws.dataset_dir(first.id)
    data_stat = (folder / "data.h5ad").stat()
    meta = (folder / "meta.json").read_bytes()
    time.sleep(0.01)

    dense_copy = ad.AnnData(X=adata.X.toarray(), obs=adata.obs, var=adata.var)
    second = add(ws, dense_copy, name="another name")
    assert second.id == first.id and second.name == "toy"  # the stored record
    again = (folder / "data.h5ad").stat()
    assert (again.st_ino, again.st_mtime_ns) == (data_stat.st_ino, data_stat.st_mtime_ns)
    assert (folder / "meta.json").read_bytes() == meta
    assert [r.id for r in ws.list_datasets()] == [first.id]
    assert listing(ws.root / ".tmp") == []
    assert sorted(p.name for p in folder.iterdir()) == ["data.h5ad", "meta.json"]

    stored = ws.load_dataset(first.id)
    assert (stored.X != adata.X).nnz == 0 and list(stored.obs_names) == list(adata.obs_names)
    assert ws.get_dataset("0000000000000000") is None


def test_failure_while_adding_a_dataset_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = Workspace(tmp_path / "ws")

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "atomic_write_json", broken)  # fails after data.h5ad is written
    with pytest.raises(OSError):
        add(ws, toy())
    assert listing(ws.root / "datasets") == [] and listing(ws.root / ".tmp") == []


def test_load_obs_and_obsm_read_only_those_parts(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    adata = toy()
    record = add(ws, adata)
    with h5py.File(ws.dataset_path(record.id), "r+") as handle:
        # break the matrix: a CSR group without data, so any read of X fails
        del handle["X"]
        broken = handle.create_group("X")
        broken.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                             "shape": np.array(adata.shape)})
    with pytest.raises(Exception):  # noqa: B017 - whatever anndata raises for a broken X
        ws.load_dataset(record.id)

    obs = ws.load_obs(record.id)
    pd.testing.assert_frame_equal(obs, adata.obs, check_names=False)
    assert isinstance(obs["donor"].dtype, pd.CategoricalDtype)
    np.testing.assert_array_equal(ws.load_obsm(record.id, "X_umap"), adata.obsm["X_umap"])
    assert ws.load_obsm(record.id, "X_pca") is None


def test_set_roles_persists(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    record = add(ws, toy())
    roles = {"donor": "donor", "cell_type": None, "condition": "score", "batch": None}
    updated = ws.set_roles(record.id, roles)
    assert updated.roles == roles
    reread = Workspace(tmp_path / "ws").get_dataset(record.id)
    assert reread is not None and reread.roles == roles
    assert (reread.name, reread.fingerprint, reread.created) == (
        record.name, record.fingerprint, record.created
    )
    assert not [p for p in ws.dataset_dir(record.id).iterdir() if p.name.startswith(".")]
    with pytest.raises(KeyError):
        ws.set_roles("nope", roles)


# --------------------------------------------------------------------------- state
def test_state_set_and_unset(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    assert ws.state() == {}
    ws.set_state(dataset_id="abc", split_id="def")
    ws.set_state(run_key="ghi")
    assert Workspace(tmp_path / "ws").state() == {
        "dataset_id": "abc", "split_id": "def", "run_key": "ghi"
    }
    ws.set_state(split_id=None, run_key="jkl", missing=None)
    assert ws.state() == {"dataset_id": "abc", "run_key": "jkl"}
    assert json.loads((ws.root / "state.json").read_text()) == ws.state()
    assert [p.name for p in ws.root.iterdir() if p.is_file()] == ["state.json"]
    (ws.root / "state.json").write_text("{broken")
    assert ws.state() == {}  # a corrupt file is not fatal
    ws.set_state(dataset_id="x")
    assert ws.state() == {"dataset_id": "x"}


# --------------------------------------------------------------------------- runs
def test_run_key_changes_with_inputs_and_is_stable_otherwise(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    record = add(ws, toy())
    base = {
        "dataset_id": record.id, "split_id": "s1", "generator": "mock",
        "config": {"n_genes": 100, "dispersion": 0.3}, "seed": 0,
    }
    key = ws.run_key(**base)
    assert len(key) == 16
    assert ws.run_key(**base) == key
    assert Workspace(tmp_path / "ws").run_key(**base) == key
    assert ws.run_key(**{**base, "config": {"dispersion": 0.3, "n_genes": 100}}) == key
    assert ws.run_key(**{**base, "seed": np.int64(0)}) == key
    changed = [
        {"config": {"n_genes": 101, "dispersion": 0.3}},
        {"config": {"n_genes": 100, "dispersion": 0.3, "extra": True}},
        {"seed": 1},
        {"split_id": "s2"},
        {"split_id": None},
        {"generator": "other"},
        {"dataset_id": None},
        {"dataset_id": "not-stored"},
    ]
    keys = {ws.run_key(**{**base, **change}) for change in changed}
    assert key not in keys and len(keys) == len(changed)
    # a dataset is named by its content: the key follows its fingerprint, not the folder name
    other = add(ws, toy(seed=1))
    assert ws.run_key(**{**base, "dataset_id": other.id}) not in keys | {key}


def test_building_run_failure_leaves_no_run_and_no_scratch(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    for error in (RuntimeError("fit diverged"), KeyboardInterrupt()):
        with pytest.raises(type(error)), ws.building_run("k1") as folder:
            assert folder.parent == ws.root / ".tmp"
            (folder / "model").mkdir()
            (folder / "synthetic.h5ad").write_bytes(b"partial")
            raise error
        assert not ws.run_dir("k1").exists()
        assert listing(ws.root / ".tmp") == [] and listing(ws.root / "runs") == []
        assert ws.get_run("k1") is None and ws.list_runs() == []


def test_building_run_success_and_existing_run_kept(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    with ws.building_run("k1") as folder:
        (folder / "synthetic.h5ad").write_bytes(b"first")
        ws.finish_run(folder, RunRecord(key="k1", generator="mock", config={}, seed=0,
                                        dataset_id=None, split_id=None, n_cells=3))
    assert ws.synthetic_path("k1").read_bytes() == b"first"
    run = ws.get_run("k1")
    assert run is not None and run.n_cells == 3 and run.size_bytes == len(b"first")
    assert [r.key for r in ws.list_runs()] == ["k1"]

    with ws.building_run("k1") as folder:  # a second writer of the same run loses quietly
        (folder / "synthetic.h5ad").write_bytes(b"second")
    assert ws.synthetic_path("k1").read_bytes() == b"first"
    assert listing(ws.root / ".tmp") == []


def test_clean_scratch_removes_only_old_leftovers(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    old, fresh = ws.scratch_dir(), ws.scratch_dir()
    (old / "half.h5ad").write_bytes(b"x")
    stale = time.time() - 7200
    os.utime(old, (stale, stale))
    assert ws.clean_scratch() == 1
    assert not old.exists() and fresh.exists()

