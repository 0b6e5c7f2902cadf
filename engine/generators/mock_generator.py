"""The multimodal mock generator as a registry generator (a baseline for every comparison).

It simulates cells from latent clusters (see :mod:`engine.generators.mock`). With
``match_training_genes`` and a training set, it borrows two things from the training cells:
the gene names, assigned by rank of mean expression (the mock's most expressed gene gets
the name of the training set's most expressed gene, and so on), and the number of cells.
That makes its output comparable gene by gene with real data; it is labelled "not private"
because the gene ranking comes from the training cells.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from engine.generators.base import Capabilities, Generator, Progress, no_progress
from engine.generators.mock import MockConfig, config_to_kwargs, generate_mock_dataset
from engine.generators.registry import register


@dataclass
class MockGeneratorConfig(MockConfig):
    """The mock's scenario options plus how it uses the training cells."""

    match_training_genes: bool = field(
        default=True,
        metadata={
            "label": "Use the training genes' names",
            "help": "Name the mock genes after the training genes, matched by rank of mean "
            "expression, so the Compare page can compare gene by gene (not private).",
        },
    )


def _gene_rank_names(train: ad.AnnData, n_genes: int) -> np.ndarray:
    """Return the ``n_genes`` most expressed training genes' names, most expressed first."""
    matrix = train.X if sp.issparse(train.X) else sp.csr_matrix(train.X)
    means = np.asarray(matrix.mean(axis=0)).ravel()
    order = np.argsort(-means, kind="stable")[:n_genes]
    return np.asarray(train.var_names)[order]


@register
class MockGenerator(Generator):
    """Simulated multimodal cells with a known truth; a floor any real generator must beat."""

    name = "mock"
    label = "Multimodal mock"
    description = (
        "Simulates cells from 3–5 latent clusters: RNA counts from a log-linear negative "
        "binomial, ATAC peaks and ADT proteins alongside; a scenario hides modalities. "
        "Learns nothing about expression from real cells: a baseline."
    )
    config_class = MockGeneratorConfig
    capabilities = Capabilities(needs_training_data=False, modalities=("rna", "atac", "adt"))

    def __init__(self, config: MockGeneratorConfig | None = None) -> None:
        super().__init__(config)
        self.gene_names: np.ndarray | None = None
        self.n_train_cells: int | None = None

    @property
    def privacy_label(self) -> str:
        return "not private" if self.gene_names is not None else "uses no real data"

    def fit(self, train: ad.AnnData | None, *, progress: Progress = no_progress) -> None:
        """Remember the training genes' names by expression rank and the training size."""
        if train is None or not self.config.match_training_genes:
            progress(1.0, "nothing to learn")
            return
        n_genes = min(int(self.config.n_genes), train.n_vars)
        self.gene_names = _gene_rank_names(train, n_genes)
        self.n_train_cells = int(train.n_obs)
        progress(1.0, f"took {n_genes} gene names from {train.n_obs} training cells")

    def sample(
        self,
        n: int | None = None,
        *,
        contexts: pd.DataFrame | None = None,
        seed: int = 0,
        progress: Progress = no_progress,
    ) -> ad.AnnData:
        """Simulate ``n`` cells (default: as many as the training cells, else the config's).

        Returns the mock AnnData (RNA counts in ``X``; ATAC and ADT in ``obsm``); with
        training genes, ``var_names`` are those genes, ordered as the mock's by mean.
        """
        kwargs = config_to_kwargs(self.config)
        kwargs["seed"] = int(seed)
        if n is not None:
            kwargs["n_cells"] = int(n)
        elif self.n_train_cells is not None:
            kwargs["n_cells"] = self.n_train_cells
        if self.gene_names is not None:
            kwargs["n_genes"] = len(self.gene_names)
        adata, keys = generate_mock_dataset(**kwargs, progress=progress)
        if self.gene_names is not None:
            means = np.asarray(adata.layers["counts_true"].mean(axis=0)).ravel()
            names = np.empty(len(means), dtype=object)
            names[np.argsort(-means, kind="stable")] = self.gene_names
            adata.var["mock_gene"] = adata.var_names.to_numpy()
            adata.var_names = pd.Index(names.astype(str))
        adata.uns["mock_keys"] = json.dumps(keys)
        return adata

    def _state(self, folder: Path) -> None:
        state = {"gene_names": None if self.gene_names is None else self.gene_names.tolist(),
                 "n_train_cells": self.n_train_cells}
        (folder / "state.json").write_text(json.dumps(state))

    def _restore(self, folder: Path) -> None:
        state = json.loads((folder / "state.json").read_text())
        names = state.get("gene_names")
        self.gene_names = None if names is None else np.asarray(names, dtype=object)
        self.n_train_cells = state.get("n_train_cells")
