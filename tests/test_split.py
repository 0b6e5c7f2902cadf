"""Tests of engine.data.split: donor-disjoint and cell-level train/test splits."""

from __future__ import annotations

import itertools
import json
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import KANG

from engine.data.split import (
    SplitResult,
    apply_split,
    generate_split_indices,
    split_cells,
)
from engine.errors import DataError

STRATA = ["cell_type", "condition"]


@pytest.fixture(scope="module")
def kang() -> ad.AnnData:
    """The Kang IFN-b PBMC data: 2000 cells, 8 donors, ctrl/stim, 8 cell types."""
    return ad.read_h5ad(KANG)


def _tv(obs: pd.DataFrame, is_test: np.ndarray, column: str) -> float:
    """Total-variation distance of ``column`` between test and train cells, computed directly."""
    p = obs.loc[is_test, column].value_counts(normalize=True)
    q = obs.loc[~is_test, column].value_counts(normalize=True)
    return float(0.5 * p.sub(q, fill_value=0).abs().sum())


def _synthetic_obs(n_donors: int, cells_per_donor: int = 20, seed: int = 0) -> pd.DataFrame:
    """Metadata of a fake cohort with donors of varying cell-type mixes."""
    rng = np.random.default_rng(seed)
    rows = []
    for d in range(n_donors):
        mix = rng.dirichlet(np.ones(4))
        types = rng.choice(["T", "B", "NK", "Mono"], size=cells_per_donor, p=mix)
        for i, t in enumerate(types):
            rows.append((f"d{d:03d}_c{i}", f"d{d:03d}", t, "stim" if i % 2 else "ctrl"))
    frame = pd.DataFrame(rows, columns=["cell", "donor", "cell_type", "condition"])
    return frame.set_index("cell")


# ---------------------------------------------------------------------- donor-disjoint, Kang
@pytest.mark.shared_data
def test_kang_donor_split_is_disjoint_complete_and_sized(kang: ad.AnnData) -> None:
    obs = kang.obs
    result = split_cells(obs, donor_col="donor", stratify=STRATA, test_fraction=0.25, seed=0)
    assert result.unit == "donor"
    assert result.donor_col == "donor"
    # every cell assigned, in obs order, categorical train/test
    assert result.sides.index.equals(obs.index)
    assert result.sides.notna().all()
    assert list(result.sides.cat.categories) == ["train", "test"]
    assert result.n_train + result.n_test == kang.n_obs
    # no donor on both sides
    donors = obs["donor"].astype(str)
    test_donors = set(donors[result.sides == "test"])
    train_donors = set(donors[result.sides == "train"])
    assert not test_donors & train_donors
    assert test_donors == set(result.test_donors)
    assert train_donors == set(result.train_donors)
    # round half up of 0.25 * 8 = 2 test donors
    assert len(result.test_donors) == 2 and len(result.train_donors) == 6
    assert result.label == "donor-disjoint split: 6 train donors / 2 test donors"
    # the test cell share stays near the request although donors range from 78 to 424 cells
    assert abs(result.n_test / kang.n_obs - 0.25) < 0.05


@pytest.mark.shared_data
def test_kang_balance_beats_random_donor_choice(kang: ad.AnnData) -> None:
    obs = kang.obs
    donors = sorted(obs["donor"].astype(str).unique())
    donor_of_cell = obs["donor"].astype(str).to_numpy()
    # mean TV over every possible choice of 2 test donors (what a random donor pick gives)
    random_tv = []
    for chosen in itertools.combinations(donors, 2):
        is_test = np.isin(donor_of_cell, chosen)
        random_tv.append(np.mean([_tv(obs, is_test, c) for c in STRATA]))
    mean_random = float(np.mean(random_tv))
    assert 0.09 < mean_random < 0.11  # 0.101 for Kang

    for seed in range(5):
        result = split_cells(obs, donor_col="donor", stratify=STRATA, test_fraction=0.25, seed=seed)
        balance = result.balance(obs)
        assert set(balance) == set(STRATA)
        is_test = (result.sides == "test").to_numpy()
        for column in STRATA:  # balance() agrees with a direct computation
            assert balance[column] == pytest.approx(_tv(obs, is_test, column))
        chosen_tv = float(np.mean(list(balance.values())))
        assert chosen_tv <= mean_random
        assert chosen_tv < 0.07  # the two near-best Kang choices score 0.065 and 0.063


@pytest.mark.shared_data
def test_kang_split_is_reproducible_and_seed_dependent(kang: ad.AnnData) -> None:
    obs = kang.obs
    kwargs = {"donor_col": "donor", "stratify": STRATA, "test_fraction": 0.25}
    first = split_cells(obs, seed=3, **kwargs)
    again = split_cells(obs, seed=3, **kwargs)
    assert first.test_donors == again.test_donors
    assert first.sides.equals(again.sides)
    assert first.params() == again.params()
    # two candidates lie within the default tolerance of the best: seeds pick among them
    picks = {tuple(split_cells(obs, seed=s, **kwargs).test_donors) for s in range(12)}
    assert len(picks) == 2
    # with no tolerance the single best wins whatever the seed
    best = {tuple(split_cells(obs, seed=s, tolerance=0.0, **kwargs).test_donors) for s in range(4)}
    assert best == {("101", "1256")}


@pytest.mark.shared_data
def test_kang_apply_split_and_round_trip(kang: ad.AnnData, tmp_path) -> None:
    result = split_cells(kang.obs, donor_col="donor", stratify=STRATA, test_fraction=0.25, seed=0)
    train, test = apply_split(kang, result)
    assert train.n_obs + test.n_obs == kang.n_obs
    assert train.n_vars == test.n_vars == kang.n_vars
    assert not train.is_view and not test.is_view
    assert (train.obs["split"] == "train").all() and (test.obs["split"] == "test").all()
    assert set(train.obs["donor"].astype(str)) == set(result.train_donors)
    assert set(test.obs["donor"].astype(str)) == set(result.test_donors)
    assert test.uns["split"]["label"] == result.label
    assert test.uns["split"]["seed"] == 0
    assert "split" not in kang.obs  # the input is untouched
    test.write_h5ad(tmp_path / "test.h5ad")  # uns['split'] is storable

    frame = result.to_frame()
    assert list(frame.columns) == ["cell_id", "side", "donor"]
    path = tmp_path / "split.csv"
    frame.to_csv(path, index=False)
    params = json.loads(json.dumps(result.params()))
    back = SplitResult.from_frame(pd.read_csv(path, dtype=str), params=params)
    assert back.sides.equals(result.sides.set_axis(result.sides.index.astype(str)))
    assert back.test_donors == result.test_donors
    assert back.train_donors == result.train_donors
    assert back.label == result.label
    assert back.params() == result.params()


# ---------------------------------------------------------------------- cell-level
@pytest.mark.shared_data
def test_kang_cell_level_split_is_stratified(kang: ad.AnnData) -> None:
    obs = kang.obs
    result = split_cells(obs, donor_col=None, stratify=STRATA, test_fraction=0.25, seed=0)
    assert result.unit == "cell" and result.donor_col is None
    assert result.label.startswith("cell-level split (no donor column)")
    assert result.test_donors == [] and "donor" not in result.to_frame()
    assert result.n_test == 500  # sklearn: ceil(0.25 * 2000)
    balance = result.balance(obs)
    assert max(balance.values()) < 0.02
    # a cell-level split puts cells of most donors on both sides
    per_donor = pd.crosstab(obs["donor"], result.sides)
    assert (per_donor > 0).all(axis=1).sum() >= 7


def test_cell_level_with_singleton_combinations() -> None:
    obs = pd.DataFrame(
        {
            "cell_type": ["T"] * 50 + ["B"] * 47 + ["rare1", "rare2", "rare3"],
            "condition": ["ctrl", "stim"] * 50,
        },
        index=[f"c{i}" for i in range(100)],
    )
    result = split_cells(obs, donor_col=None, stratify=STRATA, test_fraction=0.2, seed=1)
    assert result.n_test == 20 and result.n_train == 80
    assert "not stratified" not in result.label
    comp = result.composition(obs, "cell_type")
    assert comp.loc["T", "test"] == pytest.approx(0.5, abs=0.06)
    # more groups than test cells: falls back to an unstratified split and says so
    many = pd.DataFrame(
        {"g": [f"g{i // 2}" for i in range(40)]}, index=[f"x{i}" for i in range(40)]
    )
    result = split_cells(many, donor_col=None, stratify=["g"], test_fraction=0.1, seed=0)
    assert result.n_test == 4 and "not stratified" in result.label


# ---------------------------------------------------------------------- many donors, edge cases
def test_many_donors_use_sampling_and_stay_fast() -> None:
    obs = _synthetic_obs(200)
    start = time.perf_counter()
    result = split_cells(obs, donor_col="donor", stratify=STRATA, test_fraction=0.2, seed=0)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0
    assert len(result.test_donors) == 40 and len(result.train_donors) == 160
    assert not set(result.test_donors) & set(result.train_donors)
    assert result.n_test == 40 * 20
    # better balanced than random donor choices on average
    rng = np.random.default_rng(123)
    donors = np.array(sorted(obs["donor"].unique()))
    random_tv = [
        _tv(obs, obs["donor"].isin(rng.choice(donors, 40, replace=False)).to_numpy(), "cell_type")
        for _ in range(50)
    ]
    assert result.balance(obs)["cell_type"] < np.mean(random_tv)
    again = split_cells(obs, donor_col="donor", stratify=STRATA, test_fraction=0.2, seed=0)
    assert again.test_donors == result.test_donors
    other = split_cells(obs, donor_col="donor", stratify=STRATA, test_fraction=0.2, seed=1)
    assert other.test_donors != result.test_donors


def test_test_donor_count_rounds_half_up_and_keeps_one_each_side() -> None:
    obs = _synthetic_obs(5, cells_per_donor=10)
    counts = {
        f: len(split_cells(obs, donor_col="donor", test_fraction=f).test_donors)
        for f in (0.01, 0.3, 0.5, 0.99)
    }
    assert counts == {0.01: 1, 0.3: 2, 0.5: 3, 0.99: 4}
    two = _synthetic_obs(2, cells_per_donor=10)
    result = split_cells(two, donor_col="donor", test_fraction=0.2)
    assert result.label == "donor-disjoint split: 1 train donor / 1 test donor"


def test_generate_split_indices_layout() -> None:
    obs = _synthetic_obs(10)
    out = generate_split_indices(
        obs, donor_col="donor", test_fraction=0.2, seed=0, stratify=["cell_type"]
    )
    split = out["splits"]["split_1"]
    assert set(split) == {"train_index", "test_index"}
    assert sorted(split["train_index"] + split["test_index"]) == sorted(obs.index)
    test_donors = {obs.loc[c, "donor"] for c in split["test_index"]}
    train_donors = {obs.loc[c, "donor"] for c in split["train_index"]}
    assert len(test_donors) == 2 and not test_donors & train_donors
    json.dumps(out)  # plain lists of str, so YAML/JSON can store it


def test_errors_are_sentences() -> None:
    obs = _synthetic_obs(3, cells_per_donor=5)
    one = obs.assign(donor="d000")
    with pytest.raises(DataError, match="only 1 donor"):
        split_cells(one, donor_col="donor")
    with pytest.raises(DataError, match="'patient'"):
        split_cells(obs, donor_col="patient")
    with pytest.raises(DataError, match="'tissue'"):
        split_cells(obs, donor_col="donor", stratify=["tissue"])
    with pytest.raises(DataError, match="between 0 and 1"):
        split_cells(obs, donor_col="donor", test_fraction=1.5)
    missing = obs.copy()
    missing.iloc[0, missing.columns.get_loc("donor")] = None
    with pytest.raises(DataError, match="1 cell"):
        split_cells(missing, donor_col="donor")
    duplicated = obs.set_axis(["same"] * len(obs), axis=0)
    with pytest.raises(DataError, match="more than once") as info:
        split_cells(duplicated, donor_col="donor")
    assert info.value.fix == "make_unique"
    result = split_cells(obs, donor_col="donor")
    other = ad.AnnData(obs=pd.DataFrame(index=["a", "b"]))
    with pytest.raises(DataError, match="not in the split"):
        apply_split(other, result)
    bad = result.to_frame()
    bad.loc[0, "donor"] = bad.loc[len(bad) - 1, "donor"]
    bad.loc[0, "side"], bad.loc[len(bad) - 1, "side"] = "train", "test"
    with pytest.raises(DataError, match="both sides"):
        SplitResult.from_frame(bad)
