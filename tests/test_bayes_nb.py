"""The Bayesian negative-binomial model: its likelihood by hand, minibatch scaling, recovery of
simulated parameters, the ISGs on Kang, synthesis, counterfactuals, storage and bad input."""

from __future__ import annotations

import math
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from engine.errors import DataError, UserFacingError
from engine.generators.base import Generator
from engine.generators.bayes_nb import (
    BayesNBConfig,
    BayesNBGenerator,
    build_model,
    level_average_matrix,
    nb_log_likelihood,
    simulate,
)

KANG = Path(__file__).resolve().parents[2] / "shared" / "data" / "kang_ifnb_pbmc" / \
    "kang_ifnb_pbmc_2k.h5ad"
INTERFERON_GENES = ["ISG15", "IFI6", "IFIT1", "IFIT3", "MX1", "IFI44L", "ISG20", "OAS1",
                    "RSAD2", "IFITM3", "LY6E", "HERC5"]


def _model_on(y: np.ndarray, rows: np.ndarray, codes_batch: np.ndarray, codes_all: np.ndarray,
              k: int, config: BayesNBConfig | None = None) -> object:
    import pytensor

    config = config or BayesNBConfig()
    n_levels = int(codes_all.max()) + 1
    batch = {"y": pytensor.shared(y.astype(np.int64), name="y"),
             "rows": pytensor.shared(rows, name="rows"),
             "codes": pytensor.shared(codes_batch.astype(np.int64), name="codes")}
    share = np.bincount(codes_all, minlength=n_levels) / codes_all.size
    model = build_model(n_cells=codes_all.size, n_genes=y.shape[1], n_levels=n_levels, k=k,
                        config=config, size_prior=(0.5, 0.7), log_length=None,
                        level_share=share, level_members=level_average_matrix(codes_all,
                                                                              n_levels),
                        batch=batch)
    model.synthcell_batch = batch  # the shared variables a training loop sets per batch
    return model


def test_likelihood_matches_a_hand_computed_value() -> None:
    y = np.array([[0, 3], [5, 1], [2, 0]])
    codes = np.array([0, 1, 1])
    model = _model_on(y, np.arange(3), codes, codes, k=1)
    point = {"log_s": np.array([0.2, -0.1, 0.4]), "beta0_centred": np.array([0.5, -0.3]),
             "beta1": np.array([[1.0, -0.5]]), "phi_log__": np.log([2.0, 0.7]),
             "U": np.array([[0.3], [-0.2], [0.6]]), "V": np.array([[0.8, -0.4]])}
    observed = model.compile_logp(vars=[model["y"]], jacobian=False)(point)
    expected = 0.0
    share = 2 / 3
    level_mean = {0: 0.3, 1: (-0.2 + 0.6) / 2}
    for i in range(3):
        for g in range(2):
            eta = (point["log_s"][i] + point["beta0_centred"][g]
                   + (float(codes[i] == 1) - share) * point["beta1"][0, g]
                   + (point["U"][i, 0] - level_mean[codes[i]]) * point["V"][0, g])
            mu, phi, count = math.exp(eta), math.exp(point["phi_log__"][g]), y[i, g]
            expected += (math.lgamma(count + phi) - math.lgamma(phi) - math.lgamma(count + 1)
                         + phi * math.log(phi / (phi + mu)) + count * math.log(mu / (phi + mu)))
    assert observed == pytest.approx(expected, rel=1e-10)
    prior = model.compile_logp(vars=[model["beta1"]], jacobian=False)(point)
    assert prior == pytest.approx(-0.5 * (1.0**2 + 0.5**2) - math.log(2 * math.pi), rel=1e-10)


def test_minibatch_likelihood_is_scaled_to_the_whole_data() -> None:
    rng = np.random.default_rng(0)
    y = rng.poisson(3.0, (8, 5))
    codes = np.array([0, 1] * 4)
    point = {"log_s": rng.normal(0, 0.3, 8), "beta0_centred": rng.normal(0, 1, 5),
             "beta1": rng.normal(0, 1, (1, 5)), "phi_log__": rng.normal(0, 0.5, 5)}
    full = _model_on(y, np.arange(8), codes, codes, k=0)
    whole = full.compile_logp(vars=[full["y"]], jacobian=False)(point)
    estimates = []
    for rows in np.arange(8).reshape(4, 2):
        part = _model_on(y[rows], rows, codes[rows], codes, k=0)
        estimates.append(part.compile_logp(vars=[part["y"]], jacobian=False)(point))
    # Each batch of 2 of 8 cells is scaled by 4, so the batches' mean is the full likelihood.
    assert np.mean(estimates) == pytest.approx(whole, rel=1e-10)
    assert not np.allclose(estimates, whole)


def _elbo_estimates(y: np.ndarray, codes: np.ndarray, point: dict[str, np.ndarray],
                    batches: list[np.ndarray], repeats: int = 5) -> list[float]:
    """−loss of PyMC's ADVI step (unscaled, as the generator runs it) for each batch of cells,
    with the approximation pinned at ``point`` (sd 1e-4, no learning)."""
    import pymc as pm

    model = _model_on(y[batches[0]], batches[0], codes[batches[0]], codes, k=0)
    with model:
        advi = pm.ADVI(start=point, start_sigma={n: np.full(np.size(v), 1e-4)
                                                  for n, v in point.items()}, random_seed=0)
        advi.approx.scale_cost_to_minibatch = False
        # PyMC estimates the entropy by Monte Carlo too (−log q at the draws): its noise does
        # not shrink with q's sd, so average many draws.
        step = advi.objective.step_function(obj_n_mc=200,
                                            obj_optimizer=pm.adam(learning_rate=1e-12),
                                            score=True)
    batch = model.synthcell_batch
    estimates = []
    for rows in batches:
        batch["y"].set_value(y[rows].astype(np.int64))
        batch["rows"].set_value(rows)
        batch["codes"].set_value(codes[rows].astype(np.int64))
        estimates.append(float(np.mean([-step() for _ in range(repeats)])))
    return estimates


def test_minibatch_elbo_estimates_the_full_data_elbo() -> None:
    rng = np.random.default_rng(1)
    y = rng.poisson(4.0, (12, 6))
    codes = np.array([0, 1] * 6)
    point = {"log_s": rng.normal(0.5, 0.2, 12), "beta0_centred": rng.normal(0.5, 0.5, 6),
             "beta1": rng.normal(0, 0.5, (1, 6)), "phi_log__": rng.normal(1.0, 0.3, 6)}
    full = _elbo_estimates(y, codes, point, [np.arange(12)])[0]
    parts = _elbo_estimates(y, codes, point, list(np.arange(12).reshape(4, 3)))
    assert np.mean(parts) == pytest.approx(full, abs=1.0)  # of about -460
    assert np.std(parts) > 1.0  # the batches do differ
    # Pinned at the point, the ELBO is log p(y, θ) + the entropy of q (sd 1e-4 everywhere).
    model = _model_on(y, np.arange(12), codes, codes, k=0)
    entropy = sum(np.size(v) for v in point.values()) * (math.log(1e-4)
                                                        + 0.5 * math.log(2 * math.pi * math.e))
    assert full == pytest.approx(model.compile_logp()(point) + entropy, abs=1.0)


def _coverage(draws: np.ndarray, truth: np.ndarray) -> float:
    low, high = np.quantile(draws, [0.05, 0.95], axis=0)
    return float(((truth >= low) & (truth <= high)).mean())


@pytest.fixture(scope="module")
def simulated() -> tuple[ad.AnnData, dict[str, np.ndarray], BayesNBGenerator]:
    # tolerance 0: training stops on the ELBO noise test alone.
    cells, truth = simulate(800, 60, latent_factors=2, seed=3)
    model = BayesNBGenerator(BayesNBConfig(condition="condition", n_genes=60, latent_factors=2,
                                           batch_size=200, max_steps=2500, tolerance=0.0,
                                           seed=0))
    model.fit(cells)
    return cells, truth, model


def test_simulated_parameters_are_recovered(simulated) -> None:
    cells, truth, model = simulated
    post = model.posterior
    genes = np.array([int(name[4:]) for name in model.gene_names])
    codes = cells.obs["condition"].cat.codes.to_numpy()
    level_mean_u = level_average_matrix(codes, 2) @ truth["U"]
    # The truth in the model's parametrisation: factors centred within levels, and a shift of
    # one level's size factors is indistinguishable from a shift of all its effects.
    size_shift = truth["log_s"][codes == 1].mean() - truth["log_s"][codes == 0].mean()
    beta1 = (truth["beta1"] + (level_mean_u[1:] - level_mean_u[0]) @ truth["V"])[:, genes]
    assert _coverage(post.beta1, beta1 + size_shift) >= 0.8
    assert np.corrcoef(post.beta1.mean(0).ravel(), beta1.ravel())[0, 1] > 0.97
    assert _coverage(post.phi, truth["phi"][genes]) >= 0.7
    assert np.corrcoef(post.phi.mean(0), truth["phi"][genes])[0, 1] > 0.8
    w = ((truth["U"] - level_mean_u[codes]) @ truth["V"])[:, genes]
    predicted_w = post.U_mean @ post.V.mean(0)
    assert np.corrcoef(predicted_w.ravel(), w.ravel())[0, 1] > 0.9
    elbo = np.asarray(model.history["elbo"])
    assert elbo[-1] > elbo[0]
    # The live ELBO is the full-data one (PyMC's loss alone is divided by the batch scaling):
    # it sits just below the log-likelihood of all cells at the posterior mean.
    counts = cells.X.toarray()[:, genes]
    mean = model.mean_expression(model.cell_codes, post.log_s_mean, post.U_mean)
    loglik = nb_log_likelihood(counts, mean, post.phi.mean(0)[None, :]).sum()
    assert loglik * 1.15 < elbo[-1] < loglik
    assert model.fit_info["converged"] and model.fit_info["steps"] < 2500


def test_samples_are_posterior_predictive_counts_in_any_condition(simulated) -> None:
    cells, _, model = simulated
    out = model.sample(300, seed=1)
    X = out.X.toarray()
    assert X.shape == (300, 60) and (X >= 0).all() and np.array_equal(X, np.rint(X))
    assert list(out.var_names) == model.gene_names
    assert set(out.obs["condition"]) <= {"c0", "c1"}
    assert np.array_equal(model.sample(300, seed=1).X.toarray(), X)
    # The condition can be set for every cell; the strongest effect shows in the counts.
    strongest = int(np.argmax(model.posterior.beta1.mean(0)[0]))
    as_c0 = model.sample(400, contexts=pd.DataFrame({"condition": ["c0"]}), seed=2)
    as_c1 = model.sample(400, contexts=pd.DataFrame({"condition": ["c1"]}), seed=2)
    assert (as_c1.obs["condition"] == "c1").all()
    ratio = as_c1.X[:, strongest].mean() / max(as_c0.X[:, strongest].mean(), 1e-9)
    assert ratio == pytest.approx(np.exp(model.posterior.beta1.mean(0)[0, strongest]), rel=0.35)
    # The library sizes of posterior-predictive cells follow the real ones.
    real = np.asarray(cells.X.sum(axis=1)).ravel()
    assert np.median(X.sum(axis=1)) == pytest.approx(np.median(real), rel=0.15)


def test_counterfactual_moves_cells_by_the_condition_effect(simulated) -> None:
    cells, _, model = simulated
    control = cells[cells.obs["condition"] == "c0"][:100]
    result = model.counterfactual_expression(control, {"condition": "c1"})
    assert (result["target_contexts"]["condition"] == "c1").all()
    head = result["heads_target"]["condition"] - result["heads_source"]["condition"]
    assert np.allclose(head, model.posterior.beta1.mean(0)[0][None, :])
    out = model.counterfactual(control, {"condition": "c1"}, seed=0)
    assert out.n_obs == 100 and (out.obs["source_condition"] == "c0").all()
    with pytest.raises(UserFacingError, match="not a level of condition"):
        model.counterfactual_expression(control, {"condition": "c9"})


def test_saved_posterior_round_trips_as_netcdf_and_zarr(simulated, tmp_path: Path) -> None:
    import arviz as az
    import xarray as xr

    _, _, model = simulated
    model.save(tmp_path / "model")
    loaded = Generator.load.__func__(BayesNBGenerator, tmp_path / "model")
    assert np.array_equal(loaded.posterior.beta1, model.posterior.beta1)
    assert np.array_equal(loaded.posterior.U_mean, model.posterior.U_mean)
    assert np.array_equal(loaded.sample(50, seed=4).X.toarray(),
                          model.sample(50, seed=4).X.toarray())
    netcdf = az.from_netcdf(str(tmp_path / "model" / "posterior.nc"))
    assert netcdf.posterior["beta1"].shape == (1, 200, 1, 60)
    assert list(netcdf.posterior["beta1"].coords["level"].values) == ["c1"]
    tree = xr.open_datatree(str(tmp_path / "model" / "posterior.zarr"), engine="zarr")
    assert np.allclose(tree["posterior"]["phi"].values, netcdf.posterior["phi"].values)
    assert tree["sample_stats"]["elbo"].size == len(model.history["elbo"])


@pytest.mark.skipif(not KANG.exists(), reason="needs ../shared/data")
def test_interferon_genes_are_the_largest_effects_on_kang() -> None:
    cells = ad.read_h5ad(KANG)
    model = BayesNBGenerator(BayesNBConfig(condition="condition", n_genes=400,
                                           latent_factors=5, batch_size=256, max_steps=800,
                                           seed=0))
    model.fit(cells)
    assert model.levels == ["ctrl", "stim"]
    effect = pd.Series(model.posterior.beta1.mean(0)[0], index=model.gene_names)
    top = effect.sort_values(ascending=False).index[:25]
    present = [g for g in INTERFERON_GENES if g in effect.index]
    assert len(present) >= 8
    assert len(set(present) & set(top)) >= 0.75 * len(present)
    # Pseudobulk log fold change (sum per donor and condition, CPM) agrees in ranking.
    frame = pd.DataFrame(cells[:, model.gene_names].X.toarray(), columns=model.gene_names)
    frame[["donor", "condition"]] = cells.obs[["donor", "condition"]].astype(str).to_numpy()
    bulk = frame.groupby(["donor", "condition"]).sum()
    cpm = np.log2(bulk.div(bulk.sum(axis=1), axis=0) * 1e6 + 1)
    lfc = (cpm.xs("stim", level="condition") - cpm.xs("ctrl", level="condition")).mean()
    assert effect.corr(lfc, method="spearman") > 0.6


def test_bad_input_gets_a_sentence() -> None:
    cells, _ = simulate(60, 8, latent_factors=0, seed=0)
    with pytest.raises(DataError, match="has no column 'batch'"):
        BayesNBGenerator(BayesNBConfig(condition="batch", max_steps=10)).fit(cells)
    one_level = cells.copy()
    one_level.obs["condition"] = "c0"
    with pytest.raises(DataError, match="has one level"):
        BayesNBGenerator(BayesNBConfig(condition="condition", max_steps=10)).fit(one_level)
    missing = cells.copy()
    missing.obs["condition"] = missing.obs["condition"].astype(object)
    missing.obs.iloc[3, 0] = np.nan
    with pytest.raises(DataError, match="empty for 1 cells"):
        BayesNBGenerator(BayesNBConfig(condition="condition", max_steps=10)).fit(missing)
    with pytest.raises(UserFacingError, match="needs a condition column"):
        BayesNBGenerator(BayesNBConfig(max_steps=10)).fit(cells)
    with pytest.raises(DataError, match="reference level 'ctrl'"):
        BayesNBGenerator(BayesNBConfig(condition="condition", reference="ctrl",
                                       max_steps=10)).fit(cells)


def test_gene_lengths_add_one_shared_coefficient(tmp_path: Path) -> None:
    cells, _ = simulate(200, 12, latent_factors=0, seed=5)
    table = tmp_path / "lengths.tsv"
    table.write_text("gene\tlength\n" + "".join(f"gene{g}\t{1000 + 300 * g}\n"
                                                for g in range(12)))
    model = BayesNBGenerator(BayesNBConfig(condition="condition", n_genes=12,
                                           latent_factors=0, gene_lengths=str(table),
                                           max_steps=200, seed=0))
    model.fit(cells)
    assert model.posterior.gamma.shape == (200,) and model.posterior.gamma.std() > 0
    assert "gamma" in model.inference_data.posterior
    short = tmp_path / "short.csv"
    short.write_text("gene,length\ngene0,100\n")
    with pytest.raises(DataError, match="no length for 11 modelled genes"):
        BayesNBGenerator(BayesNBConfig(condition="condition", n_genes=12, latent_factors=0,
                                       gene_lengths=str(short), max_steps=10)).fit(cells)


def test_fit_streams_chunks_from_a_zarr_store(tmp_path: Path) -> None:
    from engine.data.chunks import ZarrChunkSource

    cells, _ = simulate(300, 10, latent_factors=1, seed=6)
    cells.X = sp.csr_matrix(cells.X)
    cells.write_zarr(tmp_path / "cells.zarr")
    model = BayesNBGenerator(BayesNBConfig(condition="condition", n_genes=10,
                                           latent_factors=1, chunk_size=100, batch_size=50,
                                           max_steps=60, window=20, seed=0))
    messages: list[float] = []
    model.fit_source(ZarrChunkSource(tmp_path / "cells.zarr", chunk_size=100),
                     progress=lambda f, m="", metrics=None: messages.extend(
                         (metrics or {}).values()))
    assert model.posterior.log_s_mean.shape == (300,)
    assert len(messages) == 3 and messages == model.history["elbo"]


def test_full_rank_advi_for_small_problems_only() -> None:
    cells, truth = simulate(80, 5, latent_factors=0, seed=7)
    model = BayesNBGenerator(BayesNBConfig(condition="condition", n_genes=5, latent_factors=0,
                                           method="fullrank_advi", batch_size=40,
                                           max_steps=600, seed=0))
    model.fit(cells)
    assert model.posterior.beta1.shape == (200, 1, 5)
    assert np.corrcoef(model.posterior.beta1.mean(0)[0], truth["beta1"][0])[0, 1] > 0.8
    assert (model.posterior.log_s_sd > 0).all()
    big = BayesNBGenerator(BayesNBConfig(condition="condition", n_genes=5, latent_factors=3,
                                         method="fullrank_advi", max_steps=10))
    with pytest.raises(UserFacingError, match="Full-rank ADVI needs"):
        big.fit(simulate(8000, 5, latent_factors=0, seed=7)[0])


def test_three_levels_give_two_effects_per_gene() -> None:
    cells, truth = simulate(900, 8, latent_factors=0, n_levels=3, seed=8)
    model = BayesNBGenerator(BayesNBConfig(condition="condition", reference="c1", n_genes=8,
                                           latent_factors=0, batch_size=150, max_steps=1500,
                                           seed=0))
    model.fit(cells)
    assert model.levels == ["c1", "c0", "c2"]
    assert model.posterior.beta1.shape == (200, 2, 8)
    # Against reference c1: c0's effect is -β1(c1) and c2's is β1(c2) - β1(c1) in the truth.
    expected = np.vstack([-truth["beta1"][0], truth["beta1"][1] - truth["beta1"][0]])
    estimated = model.posterior.beta1.mean(0)
    assert np.corrcoef(estimated.ravel(), expected.ravel())[0, 1] > 0.95
    out = model.sample(90, contexts=pd.DataFrame({"condition": ["c2"]}), seed=0)
    assert (out.obs["condition"] == "c2").all()
