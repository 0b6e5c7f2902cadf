"""Display helpers: histograms as tables, stratified downsampling, modality labels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from engine.evaluate.display import downsample_for_display, histogram_table, observed_modalities


def test_histogram_table_counts_every_finite_value() -> None:
    values = np.r_[np.arange(1000, dtype=float), np.nan, np.inf]
    table = histogram_table(values, bins=10)
    assert len(table) == 10 and table["cells"].sum() == 1000
    assert table["left"].iloc[0] == 0 and table["right"].iloc[-1] == 999
    assert histogram_table(np.array([np.nan]))["cells"].sum() == 0


def test_downsampling_keeps_every_level_its_share_and_the_selection() -> None:
    labels = np.array(["a"] * 150_000 + ["b"] * 49_990 + ["rare"] * 10)
    keep = np.zeros(len(labels), dtype=bool)
    keep[[3, 160_000]] = True
    rows = downsample_for_display(labels, max_points=20_000, seed=1, keep=keep)
    picked = pd.Series(labels[rows]).value_counts()
    assert 19_000 <= len(rows) <= 21_000
    assert abs(picked["a"] / len(rows) - 0.75) < 0.01
    assert picked["rare"] >= 1
    assert {3, 160_000} <= set(rows.tolist())
    assert np.array_equal(rows, downsample_for_display(labels, max_points=20_000, seed=1,
                                                       keep=keep))
    assert len(downsample_for_display(labels[:500], max_points=20_000)) == 500


def test_observed_modalities_names_each_combination() -> None:
    obs = pd.DataFrame({"has_rna": [True, True, False, False],
                        "has_atac": [False, True, True, False],
                        "has_adt": [True, False, False, False]})
    assert observed_modalities(obs).tolist() == ["RNA+ADT", "RNA+ATAC", "ATAC", "none"]
    assert observed_modalities(pd.DataFrame(index=range(2))).tolist() == ["RNA", "RNA"]


@pytest.mark.slow
def test_umap_preview_works_above_scanpy_exact_knn_size() -> None:
    """scanpy 1.11 + scipy 1.17 fail in sc.pp.neighbors above ~4k cells; we use umap-learn."""
    from engine.evaluate.embedding import umap_embedding
    from engine.generators.mock import generate_mock_dataset

    adata, _ = generate_mock_dataset("paired", n_cells=6000, n_genes=500, n_peaks=50, seed=0)
    coords = umap_embedding(adata, layer="counts_true", n_top_genes=300)
    assert coords.shape == (6000, 2) and np.isfinite(coords).all()
