"""The cycle autoencoder: grouping of context maps, non-negative base, targets for every field,
recovery of a known additive effect, the ensemble as the mean of its members, save/load, and
the counterfactual task on Kang."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from engine.generators.cae import CAEConfig, CAEGenerator, cae_ensemble, cae_module, draw_targets
from tests.conftest import KANG

EFFECT_GENES = np.arange(10)
EFFECT_LOG = np.log(4.0)  # "stim" multiplies genes 0-9 by 4 in every cell type


def _toy(seed: int = 0, n_cells: int = 600, n_genes: int = 120) -> ad.AnnData:
    """Two cell types × two conditions; stim raises genes 0–9 four-fold (additive in log)."""
    rng = np.random.default_rng(seed)
    cell_type = rng.choice(["T", "B"], size=n_cells)
    condition = rng.choice(["ctrl", "stim"], size=n_cells)
    profiles = {t: rng.gamma(0.6, 1.0, size=n_genes) + 0.05 for t in ("T", "B")}
    profiles["B"][20:40] *= 6.0  # B-cell markers
    log_rate = np.stack([np.log(profiles[t]) for t in cell_type])
    log_rate[np.ix_(condition == "stim", EFFECT_GENES)] += EFFECT_LOG
    rate = np.exp(log_rate)
    rate /= rate.sum(axis=1, keepdims=True)
    library = rng.integers(1500, 3000, size=n_cells)
    counts = rng.poisson(rate * library[:, None])
    obs = pd.DataFrame({"cell_type": cell_type, "condition": condition},
                       index=[f"c{i}" for i in range(n_cells)])
    return ad.AnnData(sp.csr_matrix(counts.astype(np.float32)), obs=obs,
                      var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]))


@pytest.fixture(scope="module")
def toy_model() -> tuple[CAEGenerator, ad.AnnData]:
    data = _toy()
    model = CAEGenerator(CAEConfig(fields="condition,cell_type", n_genes=0, epochs=40,
                                   batch_size=64, latent_dim=16, seed=0, ensemble_size=1))
    model.fit(data)
    return model, data


@pytest.fixture(scope="module")
def pair_model() -> tuple[CAEGenerator, ad.AnnData]:
    """A two-member ensemble (seed 3: members of seeds 3 and 4), few epochs."""
    data = _toy(n_cells=300, n_genes=60)
    model = CAEGenerator(CAEConfig(fields="condition,cell_type", n_genes=0, epochs=4,
                                   batch_size=64, latent_dim=8, seed=3, ensemble_size=2))
    model.fit(data)
    return model, data


def test_each_context_map_sees_only_its_own_cells() -> None:
    torch.manual_seed(0)
    module = cae_module(30, {"condition": ["ctrl", "stim"], "cell_type": ["B", "NK", "T"]},
                        latent=8, hidden=12, scale=0.0159)
    x = torch.rand(50, 30)
    codes = {"condition": torch.randint(0, 2, (50,)), "cell_type": torch.randint(0, 3, (50,))}
    x_hat, hidden, outputs = module(x, codes)
    assert x_hat.shape == (50, 30) and hidden["cell_type"].shape == (50, 8)
    for f, n_values in (("condition", 2), ("cell_type", 3)):
        head = module.head(f)
        assert head.maps.calls == np.bincount(codes[f].numpy(), minlength=n_values).tolist()
        with torch.no_grad():
            for value in range(n_values):
                rows = torch.nonzero(codes[f] == value, as_tuple=True)[0]
                alone = 0.0159 * head.decoder(head.maps.maps[value](head.encoder(x[rows])))
                assert torch.allclose(outputs[f][rows], alone, atol=1e-6)
    # the output is the base head plus the sum of the field heads
    total = outputs["base"] + outputs["condition"] + outputs["cell_type"]
    assert torch.allclose(x_hat, total, atol=1e-6)


def test_targets_change_every_field_for_every_cell() -> None:
    rng = np.random.default_rng(0)
    codes = {"condition": rng.integers(0, 2, 1000), "cell_type": rng.integers(0, 8, 1000),
             "donor": rng.integers(0, 4, 1000), "assay": np.zeros(1000, dtype=np.int64)}
    n_values = {"condition": 2, "cell_type": 8, "donor": 4, "assay": 1}
    targets = draw_targets(codes, n_values, rng)
    for f in ("condition", "cell_type", "donor"):
        assert (targets[f] != codes[f]).all(), f
        assert set(np.unique(targets[f])) == set(range(n_values[f]))
    assert (targets["assay"] == 0).all()  # one value: nothing else to draw


def test_base_weights_stay_non_negative_and_loss_falls(toy_model) -> None:
    model, _ = toy_model
    assert model.n_members == 1
    assert float(model.module.members[0].base_weight.detach().min()) >= 0.0
    losses = [r["loss"] for r in model.history]
    assert losses[-1] < 0.5 * losses[0]
    assert {"norm_base", "norm_condition", "norm_cell_type"} <= set(model.history[-1])


def test_condition_head_recovers_the_known_additive_effect(toy_model) -> None:
    model, data = toy_model
    contributions = model.head_contributions(data, "condition")
    effect = (contributions["stim"] - contributions["ctrl"]).to_numpy()
    on, off = effect[EFFECT_GENES], np.delete(effect, EFFECT_GENES)
    assert on.min() > 0.5, on
    assert np.abs(off).max() < 0.5 * on.mean()
    # counterfactual ctrl -> stim: the effect genes rise as much as in real stim cells
    ctrl = data[data.obs["condition"] == "ctrl"]
    stim = data[data.obs["condition"] == "stim"]
    result = model.counterfactual_expression(ctrl, {"condition": "stim"})
    x_stim, _ = model.cell_matrix(stim)
    real_shift = x_stim[:, EFFECT_GENES].mean(0) - result["source"][:, EFFECT_GENES].mean(0)
    predicted_shift = (result["predicted"][:, EFFECT_GENES].mean(0)
                       - result["source"][:, EFFECT_GENES].mean(0))
    assert np.all(predicted_shift > 0.5 * real_shift), (predicted_shift, real_shift)
    # additive: the condition head gives the effect within each cell type alike
    for cell_type in ("B", "T"):
        within = model.head_contributions(data[data.obs["cell_type"] == cell_type], "condition")
        assert (within["stim"] - within["ctrl"]).to_numpy()[EFFECT_GENES].min() > 0.5


def test_counterfactual_and_sample_outputs(toy_model) -> None:
    model, data = toy_model
    cells = data[:50]
    out = model.counterfactual(cells, {"condition": "stim", "cell_type": "B"}, seed=3)
    assert (out.obs["condition"] == "stim").all() and (out.obs["cell_type"] == "B").all()
    assert out.obs["source_condition"].tolist() == cells.obs["condition"].tolist()
    assert out.X.dtype == np.float32 and np.allclose(out.X.data, np.round(out.X.data))
    synthetic = model.sample(80, seed=1)
    assert synthetic.shape == (80, data.n_vars)
    assert set(synthetic.obs["condition"]) <= {"ctrl", "stim"}
    chosen = model.sample(20, contexts=pd.DataFrame({"condition": ["stim"]}), seed=1)
    assert (chosen.obs["condition"] == "stim").all()
    with pytest.raises(Exception, match="never saw condition = heat"):
        model.counterfactual(cells, {"condition": "heat"})


def test_save_load_round_trip(toy_model, tmp_path) -> None:
    model, data = toy_model
    model.save(tmp_path / "model")
    loaded = CAEGenerator.load(tmp_path / "model")
    assert loaded.categories == model.categories
    before = model.counterfactual_expression(data[:40], {"condition": "stim"})["predicted"]
    after = loaded.counterfactual_expression(data[:40], {"condition": "stim"})["predicted"]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)
    assert loaded.history == model.history
    assert not list((tmp_path / "model").glob("*.pt")) and not list(
        (tmp_path / "model").glob("*.pkl"))


def test_missing_field_and_missing_values_are_explained() -> None:
    data = _toy(n_cells=60)
    with pytest.raises(Exception, match="no column 'stimulus'"):
        CAEGenerator(CAEConfig(fields="stimulus", epochs=1)).fit(data)
    with pytest.raises(Exception, match="at least one metadata field"):
        CAEGenerator(CAEConfig(epochs=1)).fit(data)
    data.obs.loc[data.obs_names[0], "condition"] = np.nan
    with pytest.raises(Exception, match="no value in condition"):
        CAEGenerator(CAEConfig(fields="condition", epochs=1)).fit(data)


def test_fit_from_npz_chunks_on_disk(tmp_path) -> None:
    from engine.data.chunks import write_npz_chunks

    data = _toy(n_cells=300)
    folder = write_npz_chunks(data, tmp_path / "chunks", chunk_size=64)
    # two members: one loader, re-pointed per member, serves chunks read in the background
    model = CAEGenerator(CAEConfig(fields="condition,cell_type", n_genes=50, epochs=2,
                                   batch_size=32, chunk_size=64, ensemble_size=2))
    model.fit(folder)
    assert model.n_train_cells == 300 and len(model.gene_names) == 50
    assert model.reference.n_obs == 300 and model.n_members == 2
    assert [r["epoch"] for r in model.history] == [1, 2]


@pytest.mark.shared_data
def test_counterfactual_task_on_kang(ws) -> None:
    """Train through the train task on Kang and ask for 'CD14+ Monocytes, but stimulated'."""
    from engine.data.split import apply_split, split_cells
    from engine.evaluate.counterfactual import CounterfactualResult
    from engine.tasks import counterfactual, store_dataset, train_generator

    class Quiet:
        workspace = ws

        def progress(self, fraction, message="", *, metrics=None):
            pass

        def log(self, text):
            pass

    kang = ad.read_h5ad(KANG)
    kang = kang[kang.obs["cell_type"].notna()].copy()
    dataset_id = store_dataset(kang, Quiet(), name="kang", source="test",
                               origin="file")["dataset_id"]
    split = split_cells(kang.obs, donor_col="donor", stratify=["cell_type"],
                        test_fraction=0.25, seed=0)
    train, test = apply_split(kang, split)
    record = ws.save_split(dataset_id, split_frame=split.to_frame(), train=train, test=test,
                           unit=split.unit, label=split.label, params=split.params(),
                           train_donors=split.train_donors, test_donors=split.test_donors)
    run = train_generator({"generator": "cae", "dataset_id": dataset_id, "split_id": record.id,
                           "config": {"epochs": 20, "n_genes": 1000, "ensemble_size": 1},
                           "seed": 0}, Quiet())
    model_config = ws.get_run(run["run_key"]).config
    assert model_config["condition_key"] == "condition"
    assert model_config["cell_type_key"] == "cell_type"
    result = counterfactual({"run_key": run["run_key"],
                             "selection": {"cell_type": ["CD14+ Monocytes"],
                                           "condition": ["ctrl"]},
                             "changes": {"condition": "stim"}}, Quiet())
    folder = ws.evaluation_dir(run["run_key"], result["counterfactual_id"],
                               kind="counterfactuals")
    loaded = CounterfactualResult.load(folder)
    n_ctrl = int(((kang.obs["cell_type"] == "CD14+ Monocytes")
                  & (kang.obs["condition"] == "ctrl")).sum())
    assert loaded.cells.n_obs == n_ctrl
    close = loaded.closeness
    assert close["n_real_target_cells"] > 100
    # interferon response: ISG15 goes up; the counterfactual lands nearer the real stimulated
    # monocytes than the unchanged cells do on the top DE genes
    assert loaded.genes.loc["ISG15", "log2_fold_change"] > 1.0
    assert close["counterfactual"]["r2_top_de"] > close["unchanged_baseline"]["r2_top_de"]
    assert close["counterfactual"]["direction_agreement"] > 0.7
    assert set(loaded.embedding["group"]) == {"source", "counterfactual", "real target"}
    again = counterfactual({"run_key": run["run_key"],
                            "selection": {"cell_type": ["CD14+ Monocytes"],
                                          "condition": ["ctrl"]},
                            "changes": {"condition": "stim"}}, Quiet())
    assert again["cached"]


@pytest.mark.parametrize("interaction", [None, "condition"])
def test_dp_sgd_per_cell_gradients_sum_to_the_batch_gradient(interaction: str | None) -> None:
    from opacus import GradSampleModule
    from opacus.grad_sample import register_grad_sampler

    from engine.generators.cae import (
        _context_gain_grad_sample,
        _tied_base_grad_sample,
        log_normalise,
    )

    data = _toy(n_cells=40, n_genes=30)
    model = CAEGenerator(CAEConfig(fields="condition,cell_type", latent_dim=4, map_hidden=8))
    model.categories = {"condition": ["ctrl", "stim"], "cell_type": ["B", "T"]}
    model.module = cae_module(30, model.categories, latent=4, hidden=8, scale=0.0159,
                              interaction_field=interaction)
    if interaction:  # non-zero gains, so the gradients that flow through them count too
        torch.nn.init.normal_(model.module.gain.weight, std=0.5)
    register_grad_sampler(model.module.TiedBase)(_tied_base_grad_sample)
    register_grad_sampler(model.module.ContextGain)(_context_gain_grad_sample)
    model.module.set_masked(True)
    wrapped = GradSampleModule(model.module, batch_first=True, loss_reduction="sum")
    counts = sp.csr_matrix(data.X)
    x = torch.from_numpy(log_normalise(counts, np.asarray(counts.sum(1)).ravel(), 1e4))
    codes = {f: pd.Categorical(data.obs[f], categories=c).codes.astype(np.int64)
             for f, c in model.categories.items()}
    (model._total(model.losses(x, codes, np.random.default_rng(0))) * 40).backward()
    for name, p in model.module.named_parameters():
        assert p.grad_sample is not None, name
        assert p.grad_sample.shape == (40, *p.shape)
        error = (p.grad_sample.sum(0) - p.grad).norm() / p.grad.norm().clamp(min=1e-12)
        assert float(error) < 1e-4, (name, float(error))
    wrapped._close()


def test_dp_sgd_is_accounted_per_cell_and_per_donor() -> None:
    data = _toy(n_cells=200, n_genes=40)
    model = CAEGenerator(CAEConfig(fields="condition,cell_type", epochs=2, batch_size=50,
                                   dp="dp-sgd", epsilon=3.0, n_genes=10, ensemble_size=4))
    messages: list[str] = []
    model.fit(data, progress=lambda fraction, message="", **_: messages.append(message))
    # one member, whatever ensemble_size says: a second would spend the budget again
    assert model.members_to_train() == 1 and model.n_members == 1
    assert any("DP-SGD trains one model, not an ensemble of 4" in m for m in messages)
    assert "one model" in model.privacy_label
    spend = model.privacy_spend()
    assert spend["epsilon"] == pytest.approx(3.0, rel=0.01) and spend["epsilon"] <= 3.0
    assert spend["unit"] == "cell" and spend["delta"] == pytest.approx(1 / 2000)
    release = spend["releases"][0]
    assert release["sampling_rate"] == pytest.approx(50 / 200)
    assert release["count"] == 8  # 2 epochs at q = 1/4
    assert len(model.gene_names) == 40  # under DP every gene: choosing some reads the data
    assert "ε = 3.00" in model.privacy_label and "not private" in model.privacy_label

    data.obs["donor"] = [f"d{i % 10}" for i in range(data.n_obs)]  # 20 cells per donor
    by_donor = CAEGenerator(CAEConfig(fields="condition", epochs=1, batch_size=20,
                                      dp="dp-sgd", epsilon=3.0, donor_key="donor",
                                      max_cells_per_unit=5))
    by_donor.fit(data)
    spend = by_donor.privacy_spend()
    assert spend["unit"] == "donor (donor)" and spend["delta"] == pytest.approx(1 / 100)
    # 10 donors × 5 cells: 20 expected cells per step is 4 donors of 10
    assert spend["releases"][0]["sampling_rate"] == pytest.approx(0.4)


def test_dp_sgd_without_noise_learns_what_plain_training_learns(monkeypatch) -> None:
    """The DP path (per-cell gradients, clipping, the averaged step) trains the same model when
    the noise is negligible: the condition head recovers the known effect."""
    import engine.privacy.accountant as accountant

    monkeypatch.setattr(accountant, "calibrate_noise_multiplier", lambda **_: 1e-6)
    data = _toy()
    model = CAEGenerator(CAEConfig(fields="condition,cell_type", epochs=25, batch_size=64,
                                   dp="dp-sgd", max_grad_norm=1e4, n_genes=0))
    model.fit(data)
    contributions = model.head_contributions(data, "condition")
    effect = (contributions["stim"] - contributions["ctrl"]).to_numpy()
    assert effect[EFFECT_GENES].min() > 0.4
    assert np.abs(np.delete(effect, EFFECT_GENES)).mean() < 0.2 * effect[EFFECT_GENES].mean()


def test_context_contributions_center_each_field(toy_model) -> None:
    from engine.evaluate.counterfactual import context_contributions

    model, _ = toy_model
    table = context_contributions(model, "condition")
    assert list(table.columns) == ["ctrl", "stim"]
    np.testing.assert_allclose(table.sum(axis=1), 0.0, atol=1e-5)  # centred over the values
    assert (table["stim"].to_numpy()[EFFECT_GENES] > 0.2).all()


def test_interaction_field_defaults_to_the_condition() -> None:
    from engine.errors import UserFacingError
    from engine.generators.cae import interaction_field

    fields = ["cell_type", "condition"]
    assert interaction_field(CAEConfig(condition_key="condition"), fields) == "condition"
    assert interaction_field(CAEConfig(), fields) == "cell_type"  # no condition column: first
    assert interaction_field(CAEConfig(interaction_field="none"), fields) is None
    assert interaction_field(CAEConfig(), ["condition"]) is None  # nothing else to scale
    with pytest.raises(UserFacingError, match="donor"):
        interaction_field(CAEConfig(interaction_field="donor"), fields)


def test_target_means_are_the_real_means_of_each_combination(toy_model) -> None:
    from engine.evaluate.counterfactual import log_normalised

    model, data = toy_model
    assert "means" in model.history[-1] and model.module.interaction_field == "condition"
    assert model.module.members[0].interaction_field == "condition"
    x = log_normalised(data, [str(g) for g in model.gene_names])
    codes = model.codes_for(data.obs)
    keys = model._combination_keys(codes)
    assert sorted(model._target_means) == sorted(np.unique(keys).tolist())  # 2 × 2, all seen
    for key, mean in model._target_means.items():
        np.testing.assert_allclose(mean.cpu().numpy(), x[keys == key].mean(0), atol=1e-5)


def test_a_combination_without_cells_has_no_target_mean() -> None:
    data = _toy(n_cells=300, n_genes=40)
    held_out = (data.obs["cell_type"] == "B") & (data.obs["condition"] == "stim")
    model = CAEGenerator(CAEConfig(fields="condition,cell_type", n_genes=0, epochs=1,
                                   ensemble_size=1))
    model.fit(data[~held_out.to_numpy()].copy())
    assert len(model._target_means) == 3
    b_stim = model._combination_keys(model.codes_for(pd.DataFrame(
        {"condition": ["stim"], "cell_type": ["B"]})))[0]
    assert b_stim not in model._target_means


# ---------------------------------------------------------------------------------- ensemble
def test_ensemble_output_and_each_head_are_the_members_mean(pair_model) -> None:
    model, data = pair_model
    assert model.n_members == 2
    x, _ = model.cell_matrix(data)
    codes = model.codes_for(data.obs.assign(condition="stim"))
    x_hat, heads = model.decode(x, codes)
    parts = [model.decode(x, codes, member=k) for k in range(2)]
    assert not np.allclose(parts[0][0], parts[1][0])  # the members differ
    np.testing.assert_allclose(x_hat, (parts[0][0] + parts[1][0]) / 2, atol=1e-5)
    assert set(heads) == {"base", "condition", "cell_type"}
    for head, out in heads.items():
        np.testing.assert_allclose(out, (parts[0][1][head] + parts[1][1][head]) / 2, atol=1e-5)
    # still additive: the ensemble's output is the sum of its (mean) heads
    np.testing.assert_allclose(x_hat, sum(heads.values()), atol=1e-5)
    # a counterfactual's change per head is the members' mean change per head
    ctrl = data[data.obs["condition"] == "ctrl"]
    result = model.counterfactual_expression(ctrl, {"condition": "stim"})
    x_ctrl, _ = model.cell_matrix(ctrl)
    before = [model.decode(x_ctrl, model.codes_for(ctrl.obs), member=k)[1] for k in range(2)]
    after = [model.decode(x_ctrl, model.codes_for(ctrl.obs.assign(condition="stim")),
                          member=k)[1] for k in range(2)]
    for head in heads:
        change = (result["heads_target"][head] - result["heads_source"][head]).mean(0)
        members = [(a[head] - b[head]).mean(0) for a, b in zip(after, before, strict=True)]
        np.testing.assert_allclose(change, np.mean(members, axis=0), atol=1e-5)
    # per-gene context contributions (the Counterfactual page's bars) are the members' mean
    table = model.head_contributions(data, "condition")
    for value in ("ctrl", "stim"):
        own = [model.decode(x, model.codes_for(data.obs.assign(condition=value)),
                            member=k)[1]["condition"].mean(0) for k in range(2)]
        np.testing.assert_allclose(table[value].to_numpy(), np.mean(own, axis=0), atol=1e-5)


def test_each_member_is_the_model_of_its_own_seed(pair_model) -> None:
    """Member k of an ensemble of seed s is the one-member model of seed s + k: its own
    initialisation, target draws and batch order, untouched by the other members."""
    model, data = pair_model
    alone = CAEGenerator(CAEConfig(fields="condition,cell_type", n_genes=0, epochs=4,
                                   batch_size=64, latent_dim=8, seed=4, ensemble_size=1))
    alone.fit(data)
    for mine, theirs in zip(model.module.members[1].state_dict().values(),
                            alone.module.members[0].state_dict().values(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    # the history is per epoch, of the ensemble: the loss terms are the members' mean
    assert [r["epoch"] for r in model.history] == [1, 2, 3, 4]
    assert {"loss", "means", "norm_base", "norm_condition"} <= set(model.history[-1])


def test_ensemble_module_forward_is_the_mean_of_its_members() -> None:
    torch.manual_seed(0)
    categories = {"condition": ["ctrl", "stim"], "cell_type": ["B", "T"]}
    members = [cae_module(20, categories, latent=4, hidden=8, scale=0.0159,
                          interaction_field="condition") for _ in range(3)]
    for member in members:  # non-zero gains, so the interaction term is averaged too
        torch.nn.init.normal_(member.gain.weight, std=0.5)
    ensemble = cae_ensemble(members)
    x = torch.rand(10, 20)
    codes = {"condition": torch.randint(0, 2, (10,)), "cell_type": torch.randint(0, 2, (10,))}
    with torch.no_grad():
        x_hat, hidden, outputs = ensemble(x, codes)
        each = [m(x, codes) for m in members]
        assert torch.allclose(x_hat, sum(e[0] for e in each) / 3, atol=1e-6)
        for head in outputs:
            assert torch.allclose(outputs[head], sum(e[2][head] for e in each) / 3, atol=1e-6)
        assert hidden["condition"].shape == (10, 3 * 4)  # members' states side by side
        logits = ensemble.classify(x)
        assert torch.allclose(logits["cell_type"],
                              sum(m.classify(x)["cell_type"] for m in members) / 3, atol=1e-6)


def test_ensemble_save_load_round_trip(pair_model, tmp_path) -> None:
    model, data = pair_model
    model.save(tmp_path / "model")
    with np.load(tmp_path / "model" / "weights.npz") as weights:
        assert {k.split(".")[1] for k in weights.files} == {"0", "1"}
    loaded = CAEGenerator.load(tmp_path / "model")
    assert loaded.n_members == 2
    before = model.counterfactual_expression(data[:40], {"condition": "stim"})
    after = loaded.counterfactual_expression(data[:40], {"condition": "stim"})
    for key in ("predicted", "decoded", "reconstructed"):
        np.testing.assert_array_equal(after[key], before[key])
    for head in before["heads_target"]:
        np.testing.assert_array_equal(after["heads_target"][head], before["heads_target"][head])
    assert loaded.history == model.history


def test_a_model_saved_before_ensembles_loads_as_one_member(toy_model, tmp_path) -> None:
    """Before ensembles, weights.npz held one module's tensors (``base.weight``, …) and
    neither state.json nor config.json named an ensemble size."""
    import json

    model, data = toy_model
    folder = tmp_path / "old"
    model.save(folder)
    with np.load(folder / "weights.npz") as weights:
        old = {k.removeprefix("members.0."): weights[k] for k in weights.files}
    assert "base.weight" in old
    np.savez(folder / "weights.npz", **old)
    for name, drop in (("state.json", None), ("config.json", "config")):
        payload = json.loads((folder / name).read_text())
        (payload[drop] if drop else payload).pop("ensemble_size")
        (folder / name).write_text(json.dumps(payload))
    loaded = CAEGenerator.load(folder)
    assert loaded.n_members == 1
    before = model.counterfactual_expression(data[:40], {"condition": "stim"})["predicted"]
    after = loaded.counterfactual_expression(data[:40], {"condition": "stim"})["predicted"]
    np.testing.assert_array_equal(after, before)
