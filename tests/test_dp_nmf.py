"""Tests of the DP-NMF generator on pbmc_small and a Kang subsample."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from engine.generators.dp_nmf import (
    DPNMFConfig,
    DPNMFGenerator,
    _cluster_sums,
    _donor_profiles,
    _proportions_from_log_means,
    _self_consistent_proportions,
    _shrunk_profiles,
    _unit_cluster_weights,
    _zinb_moments,
    plan_privacy,
)
from tests.conftest import KANG, PBMC_SMALL

pytestmark = [pytest.mark.shared_data,
              pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")]


@pytest.fixture(scope="module")
def kang() -> ad.AnnData:
    """300 random Kang cells, the 800 most expressed genes."""
    adata = ad.read_h5ad(KANG)
    rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, 300, replace=False))
    adata = adata[rows].copy()
    means = np.asarray(adata.X.mean(axis=0)).ravel()
    return adata[:, np.sort(np.argsort(-means)[:800])].copy()


@pytest.fixture(scope="module")
def pbmc_small() -> ad.AnnData:
    """The 80-cell Seurat example; its Seurat clusters serve as cell types."""
    return ad.read_h5ad(PBMC_SMALL)


def _fit(train: ad.AnnData, **options: object) -> DPNMFGenerator:
    config = DPNMFConfig(**{"n_components": 6, "nmf_max_iter": 50, "nmf_dp_steps": 10,
                            **options})
    model = DPNMFGenerator(config)
    model.fit(train)
    return model


def test_pbmc_small_counts_names_labels_and_reproducible(pbmc_small: ad.AnnData,
                                                        tmp_path: Path) -> None:
    model = _fit(pbmc_small, cell_type_key="RNA_snn_res.0.8")
    first, second = model.sample(seed=3), model.sample(seed=3)
    assert sp.isspmatrix_csr(first.X) and first.X.dtype == np.int32
    assert first.n_obs == pbmc_small.n_obs
    assert (first.X != second.X).nnz == 0
    assert (model.sample(seed=4).X != first.X).nnz > 0
    assert first.X.data.min() >= 0
    assert list(first.var_names) == list(pbmc_small.var_names)
    assert set(first.obs["cell_type"]) <= set(pbmc_small.obs["RNA_snn_res.0.8"].astype(str))
    assert first.uns["privacy"] == {"label": "not private"}
    model.save(tmp_path / "m")
    again = DPNMFGenerator.load(tmp_path / "m")
    assert (again.sample(seed=3).X != first.X).nnz == 0


def test_kang_labels_and_reproducible_fit(kang: ad.AnnData, tmp_path: Path) -> None:
    a, b = _fit(kang, sample_fraction=0.8), _fit(kang, sample_fraction=0.8)
    sa = a.sample(50, seed=1)
    assert (sa.X != b.sample(50, seed=1).X).nnz == 0
    assert sa.n_obs == 50
    assert len(_fit(kang).cluster_labels) == kang.obs["cell_type"].nunique()
    assert set(sa.obs["cell_type"]) <= set(kang.obs["cell_type"].astype(str))
    sa.write_h5ad(tmp_path / "s.h5ad")


def test_zinb_has_more_zeros_than_poisson(kang: ad.AnnData) -> None:
    zinb = _fit(kang).sample(300, seed=0)
    poisson = _fit(kang, sampling_method="poisson").sample(300, seed=0)
    zero = lambda x: 1.0 - x.nnz / np.prod(x.shape)  # noqa: E731
    assert zero(zinb.X) > zero(poisson.X)
    means_z = np.asarray(zinb.X.mean(axis=0)).ravel()
    means_p = np.asarray(poisson.X.mean(axis=0)).ravel()
    assert np.corrcoef(np.log1p(means_z), np.log1p(means_p))[0, 1] > 0.9


def test_within_cluster_variation_and_proportions(kang: ad.AnnData) -> None:
    model = _fit(kang)
    synth = model.sample(3000, seed=0)
    lib = np.asarray(synth.X.sum(axis=1)).ravel()
    biggest = np.argmax(model.params["weights"])
    in_cluster = synth.obs["cluster"].astype(int).to_numpy() == biggest
    assert lib[in_cluster].std() / lib[in_cluster].mean() > 0.2
    observed = np.bincount(synth.obs["cluster"].astype(int), minlength=len(model.cluster_labels))
    expected = model.params["weights"] / model.params["weights"].sum()
    assert np.abs(observed / 3000 - expected).max() < 0.04
    uniform = DPNMFGenerator(model.config)
    uniform.config.proportion_aware = False
    uniform.h, uniform.params, uniform.gene_names = model.h, model.params, model.gene_names
    uniform.cluster_labels, uniform.n_train_cells = model.cluster_labels, model.n_train_cells
    counts = np.bincount(uniform.sample(3000, seed=0).obs["cluster"].astype(int))
    assert np.abs(counts / 3000 - 1 / len(counts)).max() < 0.04


def _top_gene_correlations(counts: np.ndarray, genes: np.ndarray) -> np.ndarray:
    """Upper-triangle gene-gene correlations of log1p(counts per 1,000)."""
    profiles = np.log1p(counts / np.maximum(counts.sum(axis=1, keepdims=True), 1) * 1000)
    corr = np.nan_to_num(np.corrcoef(profiles[:, genes].T))
    return corr[np.triu_indices(len(genes), 1)]


@pytest.mark.parametrize("method", ["poisson", "zinb"])
def test_within_cluster_programmes_keep_gene_correlations(kang: ad.AnnData,
                                                          method: str) -> None:
    """Synthetic cells of a cluster co-vary like its real cells: r = 0.44 / 0.45 (Poisson /
    ZINB) between the real and synthetic gene-gene correlations, mean |corr| 0.07 / 0.06
    against the real 0.16; before the joint (w, scale) programme draws r was 0.09 / 0.11
    and mean |corr| 0.03."""
    model = _fit(kang, sampling_method=method)
    synth = model.sample(3000, seed=0)
    biggest = np.argmax(model.params["weights"])
    real = kang.X[model.train_clusters == biggest].toarray().astype(float)
    fake = synth.X[synth.obs["cluster"].astype(int).to_numpy() == biggest].toarray()
    top = np.argsort(-real.mean(axis=0))[:100]
    real_corr = _top_gene_correlations(real, top)
    fake_corr = _top_gene_correlations(fake.astype(float), top)
    assert np.corrcoef(real_corr, fake_corr)[0, 1] > 0.3
    assert np.abs(fake_corr).mean() > 0.3 * np.abs(real_corr).mean()
    assert np.corrcoef(real.mean(axis=0), fake.mean(axis=0))[0, 1] > 0.99


def test_zinb_moments_leave_the_programme_variance_out_of_the_dispersion() -> None:
    """Counts ZINB(μ ρ, r, π) with ρ log-normal (mean 1, variance σ²): the moments and zero
    fraction, told σ², give back r and π; not told, the dispersion absorbs ρ."""
    rng = np.random.default_rng(0)
    mu, r, pi, s2 = np.array([3.0, 10.0, 0.8]), np.array([2.0, 0.8, 4.0]), \
        np.array([0.1, 0.0, 0.3]), np.array([0.3, 0.5, 0.2])
    n = 400_000
    log_sd = np.sqrt(np.log1p(s2))
    rho = np.exp(rng.normal(-log_sd**2 / 2, log_sd, size=(n, 3)))
    x = rng.poisson(rng.gamma(r, mu * rho / r)) * (rng.random((n, 3)) >= pi)
    m, v, z = x.mean(axis=0), x.var(axis=0), (x == 0).mean(axis=0)
    mu_hat, r_hat, pi_hat = _zinb_moments(m, v, z, programme_var=s2)
    assert np.allclose(r_hat, r, rtol=0.1)
    assert np.allclose(pi_hat, pi, atol=0.03)
    assert np.allclose(mu_hat, mu, rtol=0.05)
    _, r_blind, _ = _zinb_moments(m, v, z)
    assert np.all(r_blind < 0.8 * r)


def test_dp_sampling_keeps_clusters_changes_statistics(kang: ad.AnnData) -> None:
    plain = _fit(kang)
    private = _fit(kang, dp="sampling")
    assert np.array_equal(plain.train_clusters, private.train_clusters)
    assert np.array_equal(plain.h, private.h)
    assert not np.allclose(plain.params["mean"], private.params["mean"])
    spend = private.privacy_spend()
    assert spend["epsilon"] <= 4.0 + 1e-9 and spend["epsilon"] >= 0.99 * 4.0
    assert private.sample(20, seed=0).uns["privacy"]["epsilon"] == pytest.approx(
        spend["epsilon"])
    assert "partial" in private.privacy_label


def test_dp_kmeans_changes_clusters_not_nmf(kang: ad.AnnData) -> None:
    plain = _fit(kang)
    private = _fit(kang, dp="kmeans", epsilon_total=2.0)
    assert np.array_equal(plain.h, private.h)
    assert not np.array_equal(plain.train_clusters, private.train_clusters)
    eps = private.privacy_spend()["epsilon"]
    assert 0.99 * 2.0 <= eps <= 2.0 + 1e-9


def test_dp_all_with_donors(kang: ad.AnnData) -> None:
    model = _fit(kang, dp="all", donor_key="donor", max_cells_per_unit=20,
                 clusters_from="kmeans")
    synth = model.sample(100, seed=0)
    spend = model.privacy_spend()
    assert 0.99 * 4.0 <= spend["epsilon"] <= 4.0 + 1e-9
    names = {r["name"] for r in spend["releases"]}
    assert {"basis profiles", "kmeans sums", "profile sums"} <= names
    assert model.privacy_label.startswith("DP (ε=4, δ=") and "unit=donor" in model.privacy_label
    assert synth.X.data.min() >= 0 and "privacy" in synth.uns


def test_donor_level_profiles_cell_types_and_plan_equal_spend(kang: ad.AnnData) -> None:
    model = _fit(kang, dp="all", donor_key="donor", max_cells_per_unit=20,
                 cell_type_key="cell_type", epsilon_total=8.0)
    assert model.clusters_by_type  # auto: cell types at donor level too
    synth = model.sample(200, seed=0)
    assert synth.X.nnz > 0 and synth.X.data.min() >= 0
    spend = model.privacy_spend()
    names = [r["name"] for r in spend["releases"]]
    assert "cluster donor weights" in names and "profile scale" not in names
    units = kang.obs["donor"].nunique()
    plan = plan_privacy(model.config, n_units=units, n_labels=kang.obs["cell_type"].nunique())
    assert sorted(names) == sorted(r["name"] for r in plan.releases)
    assert spend["epsilon"] == pytest.approx(plan.epsilon, rel=1e-9)
    released = {r["name"]: r["noise_multiplier"] for r in spend["releases"]}
    assert released == {r["name"]: r["noise_multiplier"] for r in plan.releases}


def test_unit_cluster_weights_move_the_stacked_sums_by_at_most_one() -> None:
    rng = np.random.default_rng(0)
    units = rng.integers(0, 12, 400).astype(str)
    clusters = rng.integers(0, 5, 400)
    rows = rng.random((400, 30))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)  # unit-norm profiles
    weights = _unit_cluster_weights(units, clusters)
    full = _cluster_sums(rows * weights[:, None], clusters, 5)
    for unit in np.unique(units):  # remove one donor: the others' weights are unchanged
        rest = units != unit
        without = _cluster_sums(rows[rest] * _unit_cluster_weights(units[rest],
                                                                   clusters[rest])[:, None],
                                clusters[rest], 5)
        assert np.linalg.norm(full - without) <= 1.0 + 1e-9
        mine = _cluster_sums(weights[~rest][:, None], clusters[~rest], 5)[:, 0]
        share = np.bincount(clusters[~rest], minlength=5) / (~rest).sum()
        assert np.allclose(mine, np.sqrt(share))  # Σ of its weights per cluster: sqrt(f)


def test_self_consistent_proportions_need_no_scale() -> None:
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.full(300, 0.3), size=2)
    lib = np.array([1500.0, 4000.0])
    profiles = []
    for c in range(2):
        logs = np.log1p(1e4 * rng.poisson(p[c] * lib[c], size=(3000, 300)) / lib[c])
        profiles.append((logs / np.linalg.norm(logs, axis=1, keepdims=True)).mean(axis=0))
    back = _self_consistent_proportions(np.array(profiles), lib, 1e4, 80.0)
    assert np.allclose(back.sum(axis=1), 1.0, rtol=1e-3)
    top = p > 0.01
    assert np.allclose(back[top], p[top], rtol=0.25)


def test_donor_profiles_shrink_noise_and_keep_a_clear_deviation() -> None:
    rng = np.random.default_rng(2)
    top = np.arange(40)
    truth = np.full((3, 40), 0.1)
    truth[0, :20] = 0.2  # cluster 0 departs on 20 genes; 1 and 2 are alike
    noise = np.array([0.01, 0.01, 0.01])
    means = truth + rng.normal(0.0, 0.01, truth.shape)
    shares = np.array([0.3, 0.3, 0.4])
    pooled = np.concatenate([shares @ truth, np.full(60, 0.001)])  # 60 faint genes
    out = _donor_profiles(means, noise, shares, pooled, 1e-4, top)
    assert out.shape == (3, 100) and np.all(out >= 0)
    assert out[0, :20].mean() > 0.18 and abs(out[1, :20].mean() - out[2, :20].mean()) < 0.02
    assert np.allclose(out[:, 40:], 0.001)  # outside the released genes: the pooled profile
    flat = _donor_profiles(rng.normal(0.1, 0.05, (3, 40)), np.full(3, 0.05), shares,
                           pooled, 1e-4, top)  # noise only: shrunk to the pooled mean
    assert np.ptp(flat[:, :40], axis=0).max() < 0.05


def test_plan_before_training_is_what_the_fit_spends(kang: ad.AnnData) -> None:
    config = DPNMFConfig(n_components=6, nmf_max_iter=50, dp="all", epsilon_total=2.0,
                         cell_type_key="cell_type")
    plan = plan_privacy(config, n_units=kang.n_obs, n_labels=kang.obs["cell_type"].nunique())
    model = DPNMFGenerator(config)
    model.fit(kang)
    spend = model.privacy_spend()
    assert spend["epsilon"] == pytest.approx(plan.epsilon, rel=1e-9)
    assert spend["delta"] == plan.delta == pytest.approx(1 / (10 * kang.n_obs))
    assert sorted(r["name"] for r in spend["releases"]) == sorted(r["name"]
                                                                   for r in plan.releases)
    assert len(set(plan.multipliers.values())) == 1  # total mode: one shared multiplier


def test_per_stage_budgets_hold_each_and_compose_below_their_sum() -> None:
    config = DPNMFConfig(dp="all", budget_mode="per_stage", epsilon_nmf=1.0,
                         epsilon_kmeans=0.5, epsilon_sampling=2.0, clusters_from="kmeans")
    plan = plan_privacy(config, n_units=2000, n_labels=8)
    for stage, budget in (("nmf", 1.0), ("kmeans", 0.5), ("sampling", 2.0)):
        assert plan.stage_epsilon[stage] <= budget  # each at δ ≥ its share δ / 3
    assert max(plan.stage_epsilon.values()) < plan.epsilon <= 3.5
    assert plan.multipliers["kmeans"] > plan.multipliers["sampling"]  # less ε, more noise
    one = plan_privacy(DPNMFConfig(dp="kmeans", budget_mode="per_stage",
                                   epsilon_kmeans=0.5), n_units=2000)
    assert one.epsilon == pytest.approx(0.5, rel=1e-3)


def test_dp_sgd_basis_is_still_available(kang: ad.AnnData) -> None:
    model = _fit(kang, dp="nmf", nmf_dp_method="sgd", epsilon_total=3.0)
    names = {r["name"] for r in model.privacy_spend()["releases"]}
    assert names == {"nmf gradient"}
    assert np.allclose(np.linalg.norm(model.h, axis=1), 1.0)
    assert model.privacy_label.startswith("not private: only the nmf stage is noised")


def test_clusters_from_cell_types_cost_no_budget(kang: ad.AnnData) -> None:
    model = _fit(kang, dp="all", clusters_from="cell_type", cell_type_key="cell_type")
    names = {r["name"] for r in model.privacy_spend()["releases"]}
    assert not names & {"kmeans counts", "kmeans sums", "label counts"}
    types = sorted(kang.obs["cell_type"].astype(str).unique())
    assert model.cluster_labels == types
    assert np.array_equal(np.asarray(types)[model.train_clusters],
                          kang.obs["cell_type"].astype(str).to_numpy())
    assert not any(name.startswith("basis") for name in names)  # no basis is fitted
    plan = plan_privacy(model.config, n_units=kang.n_obs, n_labels=len(types))
    assert plan.stages == ("sampling",)
    assert model.privacy_spend()["epsilon"] == pytest.approx(plan.epsilon, rel=1e-9)


def test_auto_clusters_are_cell_types_under_dp_all_only(kang: ad.AnnData) -> None:
    types = sorted(kang.obs["cell_type"].astype(str).unique())
    labels = kang.obs["cell_type"].astype(str).to_numpy()
    private = _fit(kang, dp="all")  # the default clusters_from is "auto"
    assert private.config.clusters_from == "auto" and private.clusters_by_type
    assert np.array_equal(np.asarray(types)[private.train_clusters], labels)
    names = {r["name"] for r in private.privacy_spend()["releases"]}
    assert not names & {"kmeans counts", "kmeans sums", "label counts", "basis profiles"}
    plan = plan_privacy(private.config, n_units=kang.n_obs, n_labels=len(types))
    assert plan.stages == ("sampling",)
    assert private.privacy_spend()["epsilon"] == pytest.approx(plan.epsilon, rel=1e-9)
    # without DP, with a partial DP stage, or without a cell-type column: k-means
    plain = _fit(kang)
    assert not plain.clusters_by_type
    assert not np.array_equal(np.asarray(types)[plain.train_clusters], labels)
    assert not _fit(kang, dp="kmeans", epsilon_total=2.0).clusters_by_type
    unlabelled = _fit(kang, dp="all", cell_type_key="")
    assert not unlabelled.clusters_by_type
    names = {r["name"] for r in unlabelled.privacy_spend()["releases"]}
    assert {"basis profiles", "kmeans counts", "kmeans sums"} <= names
    plan = plan_privacy(unlabelled.config, n_units=kang.n_obs, n_labels=0)
    assert plan.stages == ("nmf", "kmeans", "sampling")
    assert unlabelled.privacy_spend()["epsilon"] == pytest.approx(plan.epsilon, rel=1e-9)


def test_dp_log_library_release_uses_the_centred_bound(kang: ad.AnnData) -> None:
    model = _fit(kang, dp="sampling", log_library_min=5.0, log_library_max=12.0)
    assert "profile pooled sums" in {r["name"] for r in model.privacy_spend()["releases"]}
    lib = np.exp(model.params["log_lib_mean"])
    assert np.all((lib >= np.exp(5.0)) & (lib <= np.exp(12.0)))
    assert np.allclose(model.params["log_lib_sd"], model.params["log_lib_sd"][0])  # pooled


def test_dp_gene_shapes_stay_poisson_where_noise_hides_them(kang: ad.AnnData) -> None:
    """Noisy square sums and detections give a gene a dispersion or zero inflation only
    where they stand clear of the noise; the others are Poisson, never random extremes."""
    tight = _fit(kang, dp="sampling", epsilon_total=1.0, delta=1e-5)
    loose = _fit(kang, dp="sampling", epsilon_total=100.0, delta=1e-5)
    r, pi = tight.params["r"][0], tight.params["pi"][0]
    assert np.mean(r >= 1e4 * (1 - 1e-9)) > 0.9 and np.mean(pi == 0) > 0.9
    assert np.all(r >= 1e-3) and np.all(pi <= 0.95)
    assert np.any(loose.params["r"][0] < 1e4 * (1 - 1e-9))  # the top genes, at a large ε


def test_shrunk_profiles_keep_clear_signal_and_pool_noise() -> None:
    rng = np.random.default_rng(0)
    sizes = np.array([400.0, 300.0, 5.0])
    truth = np.full((3, 200), 0.05)
    truth[0, :10], truth[1, 10:20] = 0.3, 0.3  # markers of the two large clusters
    sums = truth * sizes[:, None] + rng.normal(0.0, 1.0, truth.shape)
    pooled = (truth * sizes[:, None]).sum(axis=0) + rng.normal(0.0, 1.0, 200)
    est = _shrunk_profiles(sums, sizes, 1.0, pooled)
    assert np.all(est >= 0)
    assert est[0, :10].mean() > 0.25 and est[1, 10:20].mean() > 0.25
    assert np.abs(est[2, 20:] - est[:, 20:].mean(axis=0)).max() < 0.05  # tiny cluster pooled


def test_proportions_from_log_means_invert_poisson_log_means() -> None:
    rng = np.random.default_rng(0)
    p = np.array([[1e-4, 1e-3, 1e-2, 0.05]])
    lib = np.array([2000.0])
    counts = rng.poisson(p * lib[0], size=(20000, 4))
    log_means = np.log1p(1e4 * counts / lib[0]).mean(axis=0, keepdims=True)
    back = _proportions_from_log_means(log_means, lib, 1e4)
    assert np.allclose(back, p, rtol=0.1)


def _nb_donor_data(inv_r: dict[str, float], *, donors: int = 80, per_donor: int = 20,
                   genes: int = 150, seed: int = 0) -> ad.AnnData:
    """Cells of two types, each type's counts NB with its own 1 / r (0: Poisson), spread
    over donors; each type has its own gene profile."""
    rng = np.random.default_rng(seed)
    types = list(inv_r)
    profiles = rng.dirichlet(np.full(genes, 0.3), size=len(types))
    n = donors * per_donor
    labels = rng.integers(0, len(types), n)
    library = np.exp(rng.normal(np.log(2000), 0.2, n))
    mu = library[:, None] * profiles[labels]
    rows = []
    for i in range(n):
        dispersion = inv_r[types[labels[i]]]
        rate = rng.gamma(1 / dispersion, mu[i] * dispersion) if dispersion else mu[i]
        rows.append(rng.poisson(rate))
    obs = {"donor": np.repeat([f"d{d}" for d in range(donors)], per_donor),
           "cell_type": np.asarray(types)[labels]}
    return ad.AnnData(sp.csr_matrix(np.asarray(rows, dtype=np.float32)),
                      obs=pd.DataFrame(obs, index=[f"c{i}" for i in range(n)]),
                      var=pd.DataFrame(index=[f"g{g}" for g in range(genes)]))


def test_donor_level_zinb_recovers_each_clusters_over_dispersion() -> None:
    train = _nb_donor_data({"overdispersed": 0.5, "poisson": 0.0})
    model = _fit(train, dp="all", donor_key="donor", max_cells_per_unit=20,
                 cell_type_key="cell_type", epsilon_total=20.0, seed=0)
    inv_r = dict(zip(model.cluster_labels, 1.0 / model.params["r"].min(axis=1), strict=True))
    assert inv_r["overdispersed"] == pytest.approx(0.5, abs=0.12)
    assert inv_r["poisson"] < 0.1
    synth = model.sample(seed=0)
    def lognorm(x: np.ndarray) -> np.ndarray:
        return np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)

    kind = synth.obs["cell_type"].to_numpy() == "overdispersed"
    real_kind = train.obs["cell_type"].to_numpy() == "overdispersed"
    synth_var = lognorm(synth.X[kind].toarray()).var(axis=0).mean()
    real_var = lognorm(train.X[real_kind].toarray()).var(axis=0).mean()
    assert synth_var == pytest.approx(real_var, rel=0.25)  # not the Poisson spread
    names = {r["name"] for r in model.privacy_spend()["releases"]}
    assert "cluster dispersion sums" in names
    poisson = _fit(train, dp="all", donor_key="donor", max_cells_per_unit=20,
                   cell_type_key="cell_type", epsilon_total=20.0, sampling_method="poisson")
    assert "cluster dispersion sums" not in {r["name"]
                                             for r in poisson.privacy_spend()["releases"]}
