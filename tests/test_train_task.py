"""The train task against the generator interface, with a tiny generator defined here."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from engine.cli import ConsoleContext
from engine.errors import UserFacingError
from engine.generators.base import Capabilities, Generator, no_progress
from engine.generators.registry import REGISTRY
from engine.store import Workspace, write_h5ad_atomic
from engine.tasks import import_dataset, split_dataset, train_generator


@dataclasses.dataclass
class MeanConfig:
    scale: float = dataclasses.field(default=1.0, metadata={"min": 0.1, "max": 10.0})


class MeanPoisson(Generator):
    """Poisson draws around the training genes' means (a test generator)."""

    name = "test-mean-poisson"
    label = "Mean Poisson (test)"
    description = "test only"
    config_class = MeanConfig
    capabilities = Capabilities()

    def fit(self, train, *, progress=no_progress):
        self.means = np.asarray(train.X.mean(axis=0)).ravel() * self.config.scale
        self.genes = list(train.var_names)
        self.n = train.n_obs

    def sample(self, n=None, *, contexts=None, seed=0, progress=no_progress):
        rng = np.random.default_rng(seed)
        counts = rng.poisson(self.means, size=(n or self.n, len(self.means)))
        out = ad.AnnData(sp.csr_matrix(counts.astype(np.int32)))
        out.var_names = self.genes
        return out

    def _state(self, folder: Path) -> None:
        np.savez(folder / "state.npz", means=self.means, genes=np.asarray(self.genes),
                 n=self.n)

    def _restore(self, folder: Path) -> None:
        state = np.load(folder / "state.npz", allow_pickle=False)
        self.means, self.genes, self.n = state["means"], list(state["genes"]), int(state["n"])


@pytest.fixture(autouse=True)
def registered():
    REGISTRY[MeanPoisson.name] = MeanPoisson
    yield
    REGISTRY.pop(MeanPoisson.name, None)


def _dataset(tmp_path: Path, *, normalised: bool) -> Path:
    rng = np.random.default_rng(0)
    counts = rng.poisson(2.0, size=(120, 30)).astype(np.float32)
    matrix = np.log1p(counts) if normalised else counts
    adata = ad.AnnData(sp.csr_matrix(matrix))
    adata.obs_names = [f"c{i}" for i in range(120)]
    adata.var_names = [f"g{i}" for i in range(30)]
    adata.obs["donor"] = pd.Categorical([f"d{i % 6}" for i in range(120)])
    path = tmp_path / ("norm.h5ad" if normalised else "counts.h5ad")
    write_h5ad_atomic(adata, path)
    return path


def _split(ws: Workspace, path: Path) -> tuple[str, str]:
    context = ConsoleContext(ws, quiet=True)
    dataset_id = import_dataset({"path": str(path)}, context)["dataset_id"]
    split_id = split_dataset({"dataset_id": dataset_id, "donor_col": "donor",
                              "test_fraction": 0.34, "seed": 0}, context)["split_id"]
    return dataset_id, split_id


def test_train_saves_a_run_with_provenance_and_reloads(workspace: Path, tmp_path: Path) -> None:
    ws = Workspace(workspace)
    dataset_id, split_id = _split(ws, _dataset(tmp_path, normalised=False))
    context = ConsoleContext(ws, quiet=True)
    params = {"generator": MeanPoisson.name, "config": {"scale": 2.0}, "seed": 3,
              "dataset_id": dataset_id, "split_id": split_id}
    result = train_generator(params, context)
    assert result["cached"] is False
    run = ws.get_run(result["run_key"])
    split = ws.get_split(split_id)
    assert run.n_cells == split.n_train and run.config == {"scale": 2.0}
    synthetic = ws.load_synthetic(run.key)
    provenance = synthetic.uns["synthcell"]
    assert provenance["split_label"] == split.label and "donor-disjoint" in split.label
    assert provenance["privacy_label"] == "not private" and provenance["seed"] == 3
    train = ws.load_split_side(split_id, "train")
    ratio = synthetic.X.mean() / train.X.mean()
    assert 1.8 < ratio < 2.2  # the config reached the generator
    reloaded = MeanPoisson.load(ws.run_dir(run.key) / "model")
    assert reloaded.config.scale == 2.0 and np.allclose(reloaded.means, train.X.mean(0).A1 * 2)
    assert train_generator(params, context)["cached"] is True
    other_seed = train_generator({**params, "seed": 4}, context)
    assert other_seed["run_key"] != result["run_key"]


def test_a_generator_that_models_counts_refuses_normalised_data(
    workspace: Path, tmp_path: Path
) -> None:
    ws = Workspace(workspace)
    dataset_id, split_id = _split(ws, _dataset(tmp_path, normalised=True))
    with pytest.raises(UserFacingError, match=r"models raw counts.*normalised or log-transformed"):
        train_generator({"generator": MeanPoisson.name, "dataset_id": dataset_id,
                         "split_id": split_id}, ConsoleContext(ws, quiet=True))
    assert ws.list_runs() == []
    assert list((workspace / ".tmp").iterdir()) == []


def test_bad_config_and_missing_split_are_sentences(workspace: Path, tmp_path: Path) -> None:
    ws = Workspace(workspace)
    context = ConsoleContext(ws, quiet=True)
    with pytest.raises(UserFacingError, match="make a split"):
        train_generator({"generator": MeanPoisson.name}, context)
    with pytest.raises(UserFacingError, match="at most 10"):
        train_generator({"generator": MeanPoisson.name, "config": {"scale": 50}}, context)


@pytest.mark.shared_data
def test_dp_nmf_trains_from_the_registry_with_roles_as_its_column_keys(workspace: Path) -> None:
    from tests.conftest import KANG

    ws = Workspace(workspace)
    context = ConsoleContext(ws, quiet=True)
    dataset_id = import_dataset({"path": str(KANG)}, context)["dataset_id"]
    split_id = split_dataset({"dataset_id": dataset_id, "donor_col": "donor",
                              "stratify": ["cell_type"], "test_fraction": 0.5, "seed": 0},
                             context)["split_id"]
    result = train_generator({"generator": "dp-nmf", "dataset_id": dataset_id,
                              "split_id": split_id, "seed": 1,
                              "config": {"n_components": 8, "sampling_method": "poisson"}},
                             context)
    run = ws.get_run(result["run_key"])
    assert run.config["donor_key"] == "donor" and run.config["cell_type_key"] == "cell_type"
    assert run.privacy_label == "not private"
    synthetic = ws.load_synthetic(run.key)
    assert synthetic.n_obs == ws.get_split(split_id).n_train
    assert set(synthetic.obs["cell_type"]) <= set(ws.load_obs(dataset_id)["cell_type"])
    assert synthetic.X.dtype == np.int32 and synthetic.X.min() >= 0
