"""Realism metrics: hand-computed values on toy inputs and the expected behaviour of each metric
on samples that are the same, shifted, shuffled or copied."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from engine.evaluate import metrics as m

COUNTS = np.array([[1, 0, 3], [0, 0, 6], [2, 2, 0], [1, 0, 3]], dtype=float)


def _clusters(
    n: int, *, n_types: int = 4, dim: int = 10, spread: float = 6.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters: points (n × dim) and their labels."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(0, spread, (n_types, dim))
    labels = rng.integers(0, n_types, n)
    return centres[labels] + rng.normal(size=(n, dim)), np.array([f"t{i}" for i in labels])


def _typed_counts(n: int, *, n_genes: int = 300, seed: int = 0) -> tuple[sp.csr_matrix, np.ndarray]:
    """Negative-binomial counts for 4 cell types, each with its own 20 up-regulated genes."""
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(7).lognormal(-0.5, 1.0, n_genes)
    labels = rng.integers(0, 4, n)
    mu = np.tile(base, (n, 1))
    for t in range(4):
        mu[labels == t, t * 20:(t + 1) * 20] *= 8.0
    mu *= rng.lognormal(0, 0.3, (n, 1))
    counts = rng.negative_binomial(5, 5 / (5 + mu)).astype(float)
    return sp.csr_matrix(counts), np.array([f"type{i}" for i in labels])


def _lognorm(counts: sp.csr_matrix) -> sp.csr_matrix:
    lib = np.asarray(counts.sum(axis=1)).ravel()
    out = sp.csr_matrix(sp.diags(1e4 / np.maximum(lib, 1)) @ counts)
    out.data = np.log1p(out.data)
    return out


# ------------------------------------------------------------------------------ data properties


def test_gene_properties_match_hand_computation() -> None:
    props = m.gene_properties(sp.csr_matrix(COUNTS))
    logcpm = np.log2(1 + 1e6 * COUNTS / COUNTS.sum(axis=1, keepdims=True))
    np.testing.assert_allclose(props["gene_mean"], logcpm.mean(axis=0))
    np.testing.assert_allclose(props["gene_variance"], logcpm.var(axis=0, ddof=1))
    np.testing.assert_allclose(props["gene_zero_fraction"], [0.25, 0.75, 0.25])
    assert props["mean_variance"].shape == (3, 2)
    np.testing.assert_allclose(props["mean_zero_fraction"][:, 1], [0.25, 0.75, 0.25])
    # gene 1 is seen once: 2 counts in a cell of library 4 → log2(1 + 500000), mean over 4 cells
    assert props["gene_mean"][1] == pytest.approx(np.log2(1 + 1e6 * 2 / 4) / 4)
    # with one mean bin, the scaled variance is the variance z-scored across all genes
    one_bin = m.gene_properties(COUNTS, n_bins=1)["gene_scaled_variance"]
    var = props["gene_variance"]
    np.testing.assert_allclose(one_bin, (var - var.mean()) / var.std(ddof=1))


def test_cell_properties_match_hand_computation() -> None:
    props = m.cell_properties(sp.csr_matrix(COUNTS))
    np.testing.assert_allclose(props["library_size"], [4, 6, 4, 4])
    np.testing.assert_allclose(props["cell_zero_fraction"], [1 / 3, 2 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(props["effective_library_size"],
                               props["library_size"] * props["size_factor"])
    assert np.exp(np.log(props["size_factor"]).mean()) == pytest.approx(1.0)
    assert props["library_size_zero_fraction"].shape == (4, 2)


def test_explicit_zeros_count_as_zeros_and_input_is_untouched() -> None:
    x = sp.csr_matrix(COUNTS)
    x.data[0] = 0.0  # an explicitly stored zero
    before = x.data.copy()
    props = m.gene_properties(x)
    assert props["gene_zero_fraction"][0] == pytest.approx(0.5)
    np.testing.assert_array_equal(x.data, before)


def test_size_factor_is_tmm_depth_free_and_trims_a_dominant_gene() -> None:
    profile = np.arange(1, 41, dtype=float)
    same_mix = np.vstack([profile * d for d in (1, 2, 5, 10)])
    sf = m.cell_properties(sp.csr_matrix(same_mix))["size_factor"]
    np.testing.assert_allclose(sf, 1.0, atol=1e-9)  # depth alone does not move TMM
    # one cell whose last gene takes as many counts as the 39 others (780): the trimmed mean
    # ignores that gene, and the others' proportions are 820 / 1560 of a normal cell's
    skewed = profile.copy()
    skewed[-1] = profile[:-1].sum()
    cells = np.vstack([np.tile(profile * 50, (20, 1)), skewed * 50])
    sf = m.cell_properties(sp.csr_matrix(cells))["size_factor"]
    assert sf[-1] / sf[0] == pytest.approx(820 / 1560, rel=1e-6)
    assert np.allclose(sf[:20], sf[0])


def test_correlation_properties_counts_and_values() -> None:
    rng = np.random.default_rng(0)
    factor = rng.gamma(2.0, size=200)
    # three genes that are increasing functions of one factor, one independent gene
    dense = np.column_stack([factor, factor**2, np.sqrt(factor), rng.gamma(2.0, size=200)])
    props = m.correlation_properties(sp.csr_matrix(dense), n_genes=3, n_cells=50, seed=1)
    genes = props["gene_gene_correlation"]
    assert genes.shape == (3,)  # upper triangle of 3 × 3
    # the top-3 by variance are factor², factor and the independent gene
    assert np.sort(genes)[-1] == pytest.approx(1.0)
    assert props["cell_cell_correlation"].shape == (50 * 49 // 2,)


def test_property_statistics_zero_for_identical_and_one_for_disjoint() -> None:
    counts, _ = _typed_counts(300)
    props = m.data_properties(counts, _lognorm(counts), n_genes=50, n_cells=100)
    assert list(props) == list(m.PROPERTY_NAMES) and len(props) == 13
    same = m.property_statistics(props, props)
    assert list(same) == list(m.PROPERTY_NAMES)
    assert all(v == 0.0 for v in same.values())
    deeper = m.data_properties(counts * 100, _lognorm(counts * 100), n_genes=50, n_cells=100)
    stats = m.property_statistics(props, deeper)
    assert stats["library_size"] == 1.0  # every library 100× larger: no overlap
    assert stats["size_factor"] < 0.05  # depth-free but for TMM's depth-aware gene weights
    assert stats["cell_zero_fraction"] == 0.0  # same zeros
    assert 0 < stats["library_size_zero_fraction"] <= 1


def test_fasano_franceschini_hand_value_and_dependence() -> None:
    a = np.array([[0.0, 0.0], [1.0, 1.0]])
    b = np.array([[0.0, 1.0], [1.0, 0.0]])
    # origins from a: (0,0) gives quadrant fractions a (½,0,0,½) vs b (0,½,½,0) → ½;
    # (1,1) gives 0. Origins from b give 0. Mean of the two maxima: ¼.
    assert m.fasano_franceschini(a, b) == pytest.approx(0.25)
    assert m.fasano_franceschini(a, a) == 0.0
    rng = np.random.default_rng(0)
    u = rng.normal(size=1000)
    coupled = np.column_stack([u, u])
    uncoupled = np.column_stack([u, rng.permutation(u)])  # same marginals
    assert m.fasano_franceschini(coupled, uncoupled) > 0.2
    fresh = rng.normal(size=1000)
    assert m.fasano_franceschini(coupled, np.column_stack([fresh, fresh])) < 0.08


# ----------------------------------------------------------------------------- gene identities


def test_gene_shuffle_keeps_ks_but_breaks_genewise_correlations() -> None:
    real, _ = _typed_counts(400, seed=1)
    other, _ = _typed_counts(400, seed=2)
    shuffled = other[:, np.random.default_rng(3).permutation(real.shape[1])]
    same = m.genewise_correlations(real, other)
    broken = m.genewise_correlations(real, shuffled)
    for key in ("gene_mean_spearman", "gene_mean_pearson", "gene_variance_spearman",
                "gene_zero_fraction_pearson"):
        assert same[key] > 0.9
        assert broken[key] < 0.3
    assert same["gene_gene_corr_matrix_corr"] > 0.5
    assert abs(broken["gene_gene_corr_matrix_corr"]) < 0.2
    assert m.genewise_correlations(real, real)["gene_gene_corr_matrix_corr"] == pytest.approx(1)
    # the distribution of gene means cannot see the shuffle at all
    ks = m.property_statistics(m.gene_properties(other), m.gene_properties(shuffled))
    assert ks["gene_mean"] == 0.0 and ks["gene_zero_fraction"] == 0.0


def test_genewise_correlations_refuse_different_genes() -> None:
    with pytest.raises(ValueError, match="gene counts differ"):
        m.genewise_correlations(sp.csr_matrix(COUNTS), sp.csr_matrix(COUNTS[:, :2]))


# ------------------------------------------------------------------------- whole distribution


@pytest.mark.parametrize("model", ["gbt", "logreg"])
def test_classifier_auroc_half_for_same_and_one_for_separated(model: str) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(1000, 10)), rng.normal(size=(1000, 10))
    assert abs(m.classifier_auroc(x, y, model=model, seed=1) - 0.5) < 0.05
    assert m.classifier_auroc(x, y + 4.0, model=model) > 0.99
    assert np.isnan(m.classifier_auroc(x[:3], y, model=model))


def test_classifier_auroc_rejects_unknown_model() -> None:
    x = np.random.default_rng(0).normal(size=(50, 2))
    with pytest.raises(ValueError, match="unknown model"):
        m.classifier_auroc(x, x, model="forest")  # type: ignore[arg-type]


def test_mmd_hand_value_and_behaviour() -> None:
    x, y = np.zeros((2, 1)), np.ones((2, 1))
    # Kxx = Kyy = 1, Kxy = exp(-1/2): MMD² = 1 + 1 − 2·exp(−½); median distance is 1
    assert m.mmd_rbf(x, y, bandwidth=1.0) == pytest.approx(2 - 2 * np.exp(-0.5))
    assert m.mmd_rbf(x, y) == pytest.approx(2 - 2 * np.exp(-0.5))
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(800, 5)), rng.normal(size=(800, 5))
    assert abs(m.mmd_rbf(a, a)) < 0.01
    assert abs(m.mmd_rbf(a, b)) < 0.01
    assert m.mmd_rbf(a, b + 2.0) > 0.2
    sigma = m.median_heuristic_bandwidth(a)
    assert sigma == pytest.approx(np.sqrt(2 * 5), rel=0.1)  # E‖a−b‖² = 2·dim
    assert m.mmd_rbf(a, b + 2.0, bandwidth=sigma) > 0.2


def test_ilisi_mixed_and_separated() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(600, 5)), rng.normal(size=(600, 5))
    assert m.ilisi(x, y, k=30) > 0.85  # ≈ (k−1)/(k+1) for a perfect mix
    assert m.ilisi(x, y + 20.0, k=30) < 0.01
    assert np.isnan(m.ilisi(x[:10], y, k=30))


def test_prdc_identical_and_single_mode() -> None:
    rng = np.random.default_rng(0)
    real = rng.normal(size=(1000, 2))
    same = m.prdc(real, rng.normal(size=(1000, 2)), k=5)
    assert same["precision"] > 0.9 and same["recall"] > 0.9
    assert 0.8 < same["density"] < 1.2 and same["coverage"] > 0.9
    two_modes = np.vstack([rng.normal(size=(500, 2)), rng.normal(size=(500, 2)) + 10])
    one_mode = rng.normal(size=(1000, 2))
    half = m.prdc(two_modes, one_mode, k=5)
    assert half["precision"] > 0.9  # what it makes is realistic…
    assert half["coverage"] < 0.6 and half["recall"] < 0.6  # …but it misses a mode
    exact = m.prdc(real, real, k=5)
    assert exact["precision"] == exact["recall"] == exact["coverage"] == 1.0


# -------------------------------------------------------------------------------------- biology


def test_composition_distance_hand_values() -> None:
    # real a ½ b ½; synth a ⅙ b ½ c ⅓ → ½(⅓ + 0 + ⅓) = ⅓
    assert m.composition_distance(list("aabb"), list("abbbcc")) == pytest.approx(1 / 3)
    assert m.composition_distance(list("aabb"), list("abab")) == 0.0
    assert m.composition_distance(list("aa"), list("bb")) == 1.0
    assert m.composition_distance(pd.Categorical(["1", "2"]), np.array([1, 2])) == 0.0


def test_label_classifier_round_trip() -> None:
    pcs, labels = _clusters(400)
    model = m.train_label_classifier(pcs, labels, seed=0)
    predicted = m.predict_labels(model, pcs)
    assert predicted.shape == (400,) and (predicted == labels).mean() > 0.95


def test_tstr_ratio_one_for_same_data_low_for_shuffled_labels() -> None:
    real, real_labels = _clusters(600, spread=3.0, seed=1)
    synth, synth_labels = _clusters(600, spread=3.0, seed=2)
    good = m.tstr_f1(real, real_labels, synth, synth_labels)
    assert good["f1_train_real_test_real"] > 0.9
    assert good["tstr_relative_f1"] == pytest.approx(1.0, abs=0.05)
    shuffled = np.random.default_rng(0).permutation(synth_labels)
    bad = m.tstr_f1(real, real_labels, synth, shuffled)
    assert bad["tstr_relative_f1"] < 0.5
    assert bad["f1_train_real_test_real"] == good["f1_train_real_test_real"]


def test_marker_recovery_identical_vs_shuffled_genes() -> None:
    counts, labels = _typed_counts(400, seed=4)
    other, other_labels = _typed_counts(400, seed=5)
    genes = np.array([f"g{i}" for i in range(counts.shape[1])])
    real = _lognorm(counts)
    same = m.marker_recovery(real, labels, real, labels, genes=genes, top_n=20)
    assert list(same["cell_type"]) == ["type0", "type1", "type2", "type3"]
    assert (same["overlap"] == 1.0).all()
    np.testing.assert_allclose(same["slope"], 1.0)
    np.testing.assert_allclose(same["pearson"], 1.0)
    assert (same["missed_markers"] == "").all()
    assert same.loc[0, "real_markers"].split(", ")[0] in {f"g{i}" for i in range(20)}
    fresh = m.marker_recovery(real, labels, _lognorm(other), other_labels, genes=genes,
                              top_n=20)
    assert (fresh["overlap"] > 0.8).all() and (fresh["pearson"] > 0.8).all()
    perm = np.random.default_rng(0).permutation(len(genes))
    shuffled = m.marker_recovery(real, labels, _lognorm(other[:, perm]), other_labels,
                                 genes=genes, top_n=20)
    assert (shuffled["overlap"] < 0.3).all()
    assert (shuffled["slope"].abs() < 0.3).all()


def test_marker_recovery_skips_small_or_missing_types() -> None:
    x = sp.csr_matrix(np.log1p(COUNTS))
    table = m.marker_recovery(x, list("aabb"), x, list("aabb"), genes=["x", "y", "z"],
                              min_cells=3)
    assert table.empty and "overlap" in table.columns
    with pytest.raises(ValueError, match="gene counts differ"):
        m.marker_recovery(x, list("aabb"), x, list("aabb"), genes=["x", "y"])


def test_marker_table_hand_values() -> None:
    x = sp.csr_matrix(np.array([[2.0, 0, 1], [4.0, 0, 0], [0, 3.0, 1], [0, 1.0, 0]]))
    table = m.marker_table(x, ["a", "a", "b", "b"], ["g0", "g1", "g2"], top_n=1)
    assert len(table) == 2 * 1 * 2
    top_a = table[(table.marker_of == "a") & (table.cell_type == "a")].iloc[0]
    assert top_a.gene == "g0" and top_a.marker_rank == 1
    assert top_a.lfc == pytest.approx(3.0) and top_a.mean_expression == pytest.approx(3.0)
    assert top_a.fraction_expressing == 1.0
    a_in_b = table[(table.marker_of == "a") & (table.cell_type == "b")].iloc[0]
    assert a_in_b.gene == "g0" and a_in_b.fraction_expressing == 0.0
    assert a_in_b.lfc == pytest.approx(-3.0)
    assert table[table.marker_of == "b"].gene.unique().tolist() == ["g1"]
    assert m.marker_table(x, list("aaaa"), ["g0", "g1", "g2"]).empty


# -------------------------------------------------------------------------------- memorisation


def test_dcr_fresh_samples_and_copies() -> None:
    rng = np.random.default_rng(0)
    train, holdout = rng.normal(size=(3000, 8)), rng.normal(size=(500, 8))
    fresh = m.distance_to_closest_ratio(rng.normal(size=(500, 8)), train, holdout, seed=1)
    # train is 6× larger: without equal-size subsampling the ratio would be well below 1
    assert fresh["median_ratio"] == pytest.approx(1.0, abs=0.15)
    assert fresh["fraction_closer_to_train"] == pytest.approx(0.5, abs=0.07)
    assert fresh["d_train"].shape == fresh["d_holdout"].shape == (500,)
    copied = m.distance_to_closest_ratio(train[:400], train[:400], holdout, seed=1)
    assert copied["median_ratio"] == 0.0 and copied["fraction_closer_to_train"] == 1.0


# ----------------------------------------------------------------------------------- verdicts


@pytest.mark.parametrize(
    ("value", "floor", "direction", "expected"),
    [
        (0.10, 0.05, "lower", "good"),  # 0.05 worse, within scale 0.05
        (0.01, 0.05, "lower", "good"),  # better than the floor
        (0.15, 0.05, "lower", "fair"),  # 0.10 worse: within 3 × scale
        (0.30, 0.05, "lower", "poor"),
        (0.90, 0.95, "higher", "good"),
        (0.82, 0.95, "higher", "fair"),
        (0.70, 0.95, "higher", "poor"),
    ],
)
def test_traffic_light(value: float, floor: float, direction: str, expected: str) -> None:
    assert m.traffic_light(value, floor, direction=direction, scale=0.05) == expected  # type: ignore[arg-type]


def test_traffic_light_refuses_missing_numbers() -> None:
    with pytest.raises(ValueError):
        m.traffic_light(float("nan"), 0.1, direction="lower", scale=0.05)
    with pytest.raises(ValueError):
        m.traffic_light(0.1, 0.1, direction="sideways", scale=0.05)  # type: ignore[arg-type]


def test_tstr_with_one_synthetic_label_scores_the_constant_answer() -> None:
    """Synthetic cells that all carry one label score what answering that label for every
    real cell scores (macro F1 over the real labels), not a missing value."""
    real, real_labels = _clusters(600, spread=3.0, seed=1)
    synth, _ = _clusters(600, spread=3.0, seed=2)
    one = np.full(len(synth), real_labels[0])
    scores = m.tstr_f1(real, real_labels, synth, one)
    share = np.mean(np.asarray(real_labels) == real_labels[0])
    classes = len(np.unique(real_labels))
    assert scores["f1_train_synth_test_real"] == pytest.approx(
        2 * share / (1 + share) / classes)
    assert 0 < scores["tstr_relative_f1"] < 0.3
