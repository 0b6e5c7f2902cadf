"""The conditional diffusion generator: schedule, training, conditioning, guidance, denoising,
design, DP-SGD and save/load, on small simulated data (seconds each)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from engine.errors import UserFacingError
from engine.generators.diffusion import (
    DesignTarget,
    DiffusionConfig,
    DiffusionGenerator,
    NoiseSchedule,
    denoiser,
)
from engine.generators.registry import get_generator

TYPES = ("A", "B", "C")
N_GENES = 40


def toy_cells(n_per_type: int = 120, seed: int = 0) -> ad.AnnData:
    """Three cell types, each with its own 8 marker genes (20× the background rate), two
    conditions, and library sizes that vary 4-fold."""
    rng = np.random.default_rng(seed)
    rows, labels, conditions = [], [], []
    for k, name in enumerate(TYPES):
        rate = np.full(N_GENES, 0.5)
        rate[8 * k: 8 * k + 8] = 10.0
        scale = rng.uniform(0.5, 2.0, size=(n_per_type, 1))
        rows.append(rng.poisson(rate * scale))
        labels += [name] * n_per_type
        conditions += list(rng.choice(["ctrl", "stim"], size=n_per_type))
    obs = pd.DataFrame({"cell_type": labels, "condition": conditions,
                        "donor": [f"d{i % 12}" for i in range(len(labels))]})
    obs.index = obs.index.astype(str)
    return ad.AnnData(sp.csr_matrix(np.vstack(rows).astype(np.float32)), obs=obs,
                      var=pd.DataFrame(index=[f"g{i}" for i in range(N_GENES)]))


def small_config(**overrides) -> DiffusionConfig:
    values = {"fields": "cell_type", "n_genes": N_GENES, "n_components": 10, "hidden": 64,
              "depth": 2, "timesteps": 200, "train_steps": 1200, "batch_size": 128,
              "learning_rate": 3e-3, "sampling_steps": 25, "seed": 0}
    return DiffusionConfig(**{**values, **overrides})


def log_expression(adata: ad.AnnData) -> np.ndarray:
    counts = sp.csr_matrix(adata.X).toarray()
    library = np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    return np.log1p(counts / library * 1e4)


def nearest_type(expression: np.ndarray, real: ad.AnnData) -> np.ndarray:
    """Each cell's nearest real cell-type centroid (log-normalised)."""
    real_expression = log_expression(real)
    centroids = np.stack([real_expression[real.obs["cell_type"].to_numpy() == t].mean(axis=0)
                          for t in TYPES])
    distance = ((expression[:, None, :] - centroids[None]) ** 2).sum(axis=2)
    return np.asarray(TYPES)[distance.argmin(axis=1)]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The loops written here (not the generator's fit, which does this itself) on one torch
    thread: two threads on a busy two-core machine made them 10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy() -> ad.AnnData:
    return toy_cells()


@pytest.fixture(scope="module")
def fitted(toy: ad.AnnData) -> DiffusionGenerator:
    model = DiffusionGenerator(small_config())
    model.fit(toy)
    return model


def test_registered_with_its_capabilities() -> None:
    cls = get_generator("diffusion")
    assert cls is DiffusionGenerator
    assert cls.capabilities.conditional and cls.capabilities.inverse_design
    assert cls.capabilities.dp_mechanisms == ("dp-sgd",)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_forward_noising_matches_the_closed_form(kind: str) -> None:
    schedule = NoiseSchedule(kind, 100)
    assert np.all(np.diff(schedule.alpha_bar) < 0)
    assert schedule.alpha_bar[-1] < 0.01
    rng = np.random.default_rng(0)
    x0 = np.full((40_000, 1), 2.0)
    x = x0.copy()
    t = 60
    for step in range(t + 1):  # one step at a time: x_s = √α_s x_{s-1} + √β_s ε
        x = np.sqrt(schedule.alphas[step]) * x + np.sqrt(schedule.betas[step]) * \
            rng.standard_normal(x.shape)
    closed = schedule.q_sample(x0, np.full(x0.shape[0], t), rng.standard_normal(x0.shape))
    expected_mean = np.sqrt(schedule.alpha_bar[t]) * 2.0
    expected_sd = np.sqrt(1 - schedule.alpha_bar[t])
    for sample in (x, closed):
        assert sample.mean() == pytest.approx(expected_mean, abs=0.02)
        assert sample.std() == pytest.approx(expected_sd, rel=0.02)


def test_the_network_overfits_a_tiny_dataset() -> None:
    import torch

    torch.manual_seed(0)
    model = DiffusionGenerator(small_config(timesteps=50))
    network = denoiser(3, [2], width=64, depth=2)
    states = torch.tensor([[1.0, -1.0, 0.5], [-1.0, 1.0, -0.5]])
    codes = torch.tensor([[0], [1]])
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    model.config.condition_dropout = 0.0
    losses = []
    for _ in range(1500):
        loss = model.cell_losses(network, states.repeat(64, 1), codes.repeat(64, 1),
                                 generator).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[:5]) > 0.5
    assert np.mean(losses[-50:]) < 0.05


def test_conditional_samples_land_in_the_requested_type(fitted: DiffusionGenerator,
                                                       toy: ad.AnnData) -> None:
    for cell_type in TYPES:
        cells = fitted.sample(200, contexts=pd.DataFrame({"cell_type": [cell_type]}), seed=1)
        assert (cells.obs["cell_type"] == cell_type).all()
        share = np.mean(nearest_type(log_expression(cells), toy) == cell_type)
        assert share >= 0.9, (cell_type, share)


def test_samples_are_counts_with_realistic_libraries(fitted: DiffusionGenerator,
                                                     toy: ad.AnnData) -> None:
    cells = fitted.sample(seed=2)
    assert cells.n_obs == toy.n_obs
    values = cells.X.data
    assert np.all(values == np.round(values)) and values.min() >= 0
    assert list(cells.var_names) == list(toy.var_names)
    real_library = np.asarray(toy.X.sum(axis=1)).ravel()
    synthetic_library = np.asarray(cells.X.sum(axis=1)).ravel()
    assert np.median(synthetic_library) == pytest.approx(np.median(real_library), rel=0.25)
    # drawn contexts follow the training proportions (equal thirds here)
    shares = cells.obs["cell_type"].value_counts(normalize=True)
    assert shares.min() > 0.2


def test_guidance_moves_a_gene_in_the_requested_direction(fitted: DiffusionGenerator) -> None:
    # g20 is a marker of type C: ask type A cells for it, and for less of their own g0.
    target = DesignTarget.from_lists(["g20"], ["g0"], strength=1.0)
    designed, start = fitted.design(target, n=150, start={"cell_type": "A"}, seed=3)
    names = list(designed.var_names)
    g20, g0 = names.index("g20"), names.index("g0")
    before, after = start.layers["expression"], designed.layers["expression"]
    sd = before.std(axis=0)
    assert after[:, g20].mean() - before[:, g20].mean() > 1.0 * sd[g20]
    assert after[:, g0].mean() < before[:, g0].mean() - 0.5 * sd[g0]
    # the same noise without guidance gives the starting cells: a paired comparison
    assert designed.uns["design"]["target"]["genes"] == ["g20", "g0"]
    # a target the model cannot reach without leaving type A moves the cells toward type C
    # along the learned components, but no gene leaves the range real cells span
    assert after.max() < 11.0
    # without guidance (scale 0) the designed cells are the starting cells
    same, start_again = fitted.design(target, n=20, start={"cell_type": "A"}, seed=3, scale=0.0)
    np.testing.assert_allclose(same.layers["expression"], start_again.layers["expression"])


def test_design_rejects_genes_the_model_lacks(fitted: DiffusionGenerator) -> None:
    with pytest.raises(UserFacingError, match="does not include NOPE"):
        fitted.design(DesignTarget.from_lists(["NOPE"], []), n=10)
    with pytest.raises(UserFacingError, match="both up and down"):
        DesignTarget.from_lists(["g1"], ["g1"])


def test_denoising_pulls_noisy_cells_toward_their_type(fitted: DiffusionGenerator,
                                                      toy: ad.AnnData) -> None:
    rng = np.random.default_rng(4)
    cells = toy[::3].copy()
    truth = log_expression(cells)
    # thin the counts to a quarter: a much noisier view of the same cells
    cells.X = sp.csr_matrix(rng.binomial(cells.X.toarray().astype(int), 0.25).astype(
        np.float32))
    cells = cells[np.asarray(cells.X.sum(axis=1)).ravel() > 0].copy()
    out = fitted.denoise(cells, strength=0.3, seed=0)
    assert out.uns["denoise"]["step"] == 60
    centroids = {t: log_expression(toy[toy.obs["cell_type"] == t]).mean(axis=0) for t in TYPES}
    own = np.stack([centroids[t] for t in out.obs["cell_type"]])
    before = np.abs(out.layers["observed"] - own).mean()
    after = np.abs(out.layers["denoised"] - own).mean()
    assert after < 0.7 * before
    assert np.mean(nearest_type(out.layers["denoised"], toy) == out.obs["cell_type"]) >= 0.9
    del truth


def test_save_and_load_give_the_same_samples(fitted: DiffusionGenerator, tmp_path) -> None:
    fitted.save(tmp_path / "model")
    loaded = DiffusionGenerator.load(tmp_path / "model")
    a = fitted.sample(50, seed=5)
    b = loaded.sample(50, seed=5)
    assert (a.X != b.X).nnz == 0
    assert loaded.categories == fitted.categories
    np.testing.assert_allclose(a.layers["expression"], b.layers["expression"], atol=1e-5)


def test_unknown_context_values_get_a_sentence(fitted: DiffusionGenerator) -> None:
    with pytest.raises(UserFacingError, match="never saw cell_type = Z"):
        fitted.sample(5, contexts=pd.DataFrame({"cell_type": ["Z"]}))


def test_dp_sgd_is_accounted_and_keeps_nothing_unreleased(toy: ad.AnnData) -> None:
    model = DiffusionGenerator(small_config(dp="dp-sgd", epsilon=4.0, dp_epochs=3.0,
                                            donor_key="donor", max_cells_per_unit=10,
                                            n_genes=20))
    model.fit(toy)
    spend = model.privacy_spend()
    assert spend["epsilon"] == pytest.approx(4.0, rel=0.02)
    assert spend["delta"] == pytest.approx(1 / (10 * 12))
    assert [r["name"] for r in spend["releases"]] == ["gene choice", "dp-sgd"]
    assert spend["unit"] == "donor (donor)"
    assert model.context_counts is None  # contexts are drawn uniformly, not from the data
    assert model.rep.space == "genes" and len(model.gene_names) == 20
    # data-independent scaling: the state's centre and scale are the DP constants
    assert np.all(model.rep.z_mean == 1.0) and np.all(model.rep.z_scale == 2.0)
    cells = model.sample(30, seed=0)
    assert cells.n_obs == 30 and "DP-SGD" in model.privacy_label
