"""Membership-inference audit: attacks, metrics, feasibility and the whole audit, with numbers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from engine.errors import DataError
from engine.privacy.audit import (
    MIN_AUDIT_UNITS,
    NOT_PRIVACY_SENTENCE,
    TABLE_COLUMNS,
    attack_metrics,
    audit_feasibility,
    clopper_pearson,
    dcr_distances,
    dcr_scores,
    domias_scores,
    gaussian_kde_logpdf,
    roc_counts,
    run_audit,
    split_audit_donors,
    tpr_at_fpr,
)
from tests.conftest import KANG

N_UNITS = 200  # cells per role in the Gaussian tests
DIMS = 10


def gaussian_roles(seed: int = 1) -> dict[str, np.ndarray]:
    """Members, non-members and reference: three independent samples of one 10-D Gaussian."""
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=(N_UNITS, DIMS)).astype(np.float32)
            for name in ("members", "nonmembers", "reference")}


def perfect_epsilon(n_members: int, n_nonmembers: int) -> float:
    """ε lower bound of a perfect attack by hand: log(CP lower of n/n / CP upper of 0/n)."""
    tpr_low = stats.beta.ppf(0.025, n_members, 1)  # = 0.025 ** (1 / n)
    fpr_high = stats.beta.ppf(0.975, 1, n_nonmembers)  # = 1 - 0.025 ** (1 / n)
    return math.log(tpr_low / fpr_high)


# -- metrics on hand-made scores ---------------------------------------------------------------
# Members and non-members below, sorted together from the top:
#   20 m, 19 m, 14 n, 13 m+n (tie), 12.5 m, 12 n, 11 n, ...
# ROC points (TP, FP): (0,0) (1,0) (2,0) (2,1) (3,2) (4,2) (4,3) ...
# TPR at 10 % FPR with 15 non-members is at FP = 1.5: between (2,1) and (3,2) on the tie's
# diagonal, so TPR = (2 + 0.5) / 10 = 0.25. AUROC (Mann–Whitney, ties count ½):
# (15 + 15 + 13.5 + 13 + 6 × 6) / (10 × 15) = 92.5 / 150.
HAND_MEMBERS = np.array([20, 19, 13, 12.5, 5, 4, 3, 2, 1, 0], dtype=float)
HAND_NONMEMBERS = np.array([14, 13, 12, 11, 10, 9, 8, 7, 6, -1, -2, -3, -4, -5, -6], dtype=float)


def test_roc_counts_merge_ties():
    tp, fp = roc_counts(HAND_MEMBERS, HAND_NONMEMBERS)
    assert list(zip(tp[:7], fp[:7], strict=True)) == [
        (0, 0), (1, 0), (2, 0), (2, 1), (3, 2), (4, 2), (4, 3)]
    assert (tp[-1], fp[-1]) == (10, 15)


def test_tpr_at_fpr_matches_hand_computation():
    result = attack_metrics(HAND_MEMBERS, HAND_NONMEMBERS)
    assert result["tpr_at_10pct_fpr"] == pytest.approx(0.25)
    assert result["auroc"] == pytest.approx(92.5 / 150)
    assert math.isnan(result["tpr_at_1pct_fpr"])  # 15 non-members cannot reach 1 % FPR
    assert any("100 non-member units" in note for note in result["notes"])
    # exactly on a point: the top of its vertical run
    assert tpr_at_fpr(np.array([0, 0, 0.5, 1]), np.array([0, 0.4, 0.6, 1]), 0.0) == 0.4
    assert tpr_at_fpr(np.array([0, 0.2, 0.2, 1]), np.array([0, 0.1, 0.5, 1]), 0.2) == 0.5


def test_clopper_pearson_matches_scipy():
    low, high = clopper_pearson(7, 20)
    assert low == pytest.approx(stats.beta.ppf(0.025, 7, 14), rel=1e-12)
    assert high == pytest.approx(stats.beta.ppf(0.975, 8, 13), rel=1e-12)
    low99, high99 = clopper_pearson(7, 20, confidence=0.99)
    assert low99 < low and high99 > high
    low, high = clopper_pearson(np.array([0, 20]), 20)
    assert low[0] == 0.0 and high[1] == 1.0
    assert high[0] == pytest.approx(1 - 0.025 ** (1 / 20))
    assert low[1] == pytest.approx(0.025 ** (1 / 20))


def test_epsilon_of_a_perfect_attack_is_hand_computed():
    members = np.arange(20) + 100.0
    nonmembers = np.arange(20, dtype=float)
    result = attack_metrics(members, nonmembers)
    expected = perfect_epsilon(20, 20)  # log(0.8316 / 0.1684) = 1.597
    assert expected == pytest.approx(1.597, abs=1e-3)
    assert result["epsilon_lower_bound"] == pytest.approx(expected)
    assert result["epsilon_ci_low"] == result["epsilon_lower_bound"]
    assert math.isinf(result["epsilon_ci_high"])  # no false positive: no upper limit
    assert result["epsilon_point"] == pytest.approx(math.log(41))  # (20.5/21) / (0.5/21)
    assert result["auroc"] == 1.0 and result["tpr_at_10pct_fpr"] == 1.0
    # δ > 0 lowers the bound: log((TPR_low − δ) / FPR_high)
    with_delta = attack_metrics(members, nonmembers, delta=0.05)
    tpr_low = 0.025 ** (1 / 20)
    assert with_delta["epsilon_lower_bound"] == pytest.approx(
        math.log((tpr_low - 0.05) / (1 - tpr_low)))


# -- feasibility and donor split -------------------------------------------------------------
def test_feasibility_sentence_for_two_held_out_donors():
    nonmembers, reference = split_audit_donors(["d1", "d2"], seed=0)
    sentence = audit_feasibility(4, len(nonmembers), len(reference), unit="donor")
    assert sentence is not None
    assert sentence.startswith("A donor-level membership audit needs at least 10 training donors")
    assert "12 held-out donors" in sentence
    assert "2 held-out donors (1 non-member, 1 reference)" in sentence
    assert sentence.count(".") == 1  # one sentence


def test_feasibility_thresholds():
    assert audit_feasibility(10, 10, 2, unit="donor") is None
    assert audit_feasibility(9, 10, 2, unit="donor") is not None
    assert audit_feasibility(10, 9, 2, unit="donor") is not None
    assert "describes its own donors" in audit_feasibility(10, 10, 1, unit="donor")
    assert audit_feasibility(10, 10, None, unit="donor") is None  # reference donors unknown
    assert "3 training and 2 non-member held-out donors" in audit_feasibility(
        3, 2, None, unit="donor")
    assert audit_feasibility(10, 10, 100, unit="cell") is None
    assert "99" in audit_feasibility(10, 10, 99, unit="cell")
    with pytest.raises(ValueError):
        audit_feasibility(10, 10, 10, unit="sample")


def test_feasibility_threshold_is_where_a_perfect_attack_first_shows_leakage():
    # 5 vs 5: even a perfect attack's ε lower bound is 0; 10 vs 10: 0.81
    assert perfect_epsilon(5, 5) < 0
    assert perfect_epsilon(MIN_AUDIT_UNITS, MIN_AUDIT_UNITS) == pytest.approx(0.81, abs=0.01)
    perfect = attack_metrics(np.arange(10) + 100.0, np.arange(10.0))
    assert perfect["epsilon_lower_bound"] == pytest.approx(0.81, abs=0.01)


def test_split_audit_donors_disjoint_and_seeded():
    donors = [f"donor{i}" for i in range(20)]
    nonmembers, reference = split_audit_donors(donors, seed=3)
    assert not set(nonmembers) & set(reference)
    assert set(nonmembers) | set(reference) == set(donors)
    assert len(reference) == 10
    assert split_audit_donors(list(reversed(donors)), seed=3) == (nonmembers, reference)
    assert any(split_audit_donors(donors, seed=s) != (nonmembers, reference) for s in range(5))
    assert len(split_audit_donors(donors, seed=0, reference_fraction=0.25)[1]) == 5
    assert len(split_audit_donors(["a", "b", "c"], seed=0)[1]) == 2  # 1.5 rounds up
    assert split_audit_donors(["a", "a"], seed=0) == (["a"], [])
    with pytest.raises(ValueError):
        split_audit_donors(donors, seed=0, reference_fraction=1.0)


# -- attacks -----------------------------------------------------------------------------------
def test_dcr_cell_and_donor_level_by_hand():
    synth = np.array([[0.0, 0.0], [10.0, 0.0]])
    members = np.array([[1.0, 0.0], [0.0, 2.0], [9.0, 0.0]])
    nonmembers = np.array([[7.0, 0.0]])
    assert dcr_distances(members, synth) == pytest.approx([1.0, 2.0, 1.0])
    by_donor_m, by_donor_n = dcr_scores(members, nonmembers, synth,
                                        member_units=["a", "a", "b"], nonmember_units=["c"])
    assert by_donor_m.to_dict() == pytest.approx({"a": -1.5, "b": -1.0})
    assert by_donor_n.to_dict() == pytest.approx({"c": -3.0})
    by_cell_m, _ = dcr_scores(members, nonmembers, synth)
    assert list(by_cell_m) == pytest.approx([-1.0, -2.0, -1.0])


@pytest.mark.parametrize("rule", ["scott", "silverman"])
def test_kde_matches_scipy(rule):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(300, 3)) @ np.array([[2.0, 0, 0], [0.5, 1, 0], [0, 0, 0.3]])
    points = rng.normal(size=(40, 3))
    expected = stats.gaussian_kde(data.T, bw_method=rule).logpdf(points.T)
    # equal up to the 1e-6 ridge, which shifts far tails by a relative 2e-5
    assert gaussian_kde_logpdf(data, points, bandwidth=rule) == pytest.approx(expected, rel=1e-4)


def test_domias_detects_an_overfit_generator():
    roles = gaussian_roles()
    rng = np.random.default_rng(2)
    synth = roles["members"] + rng.normal(scale=0.05, size=roles["members"].shape)
    score_m, score_n = domias_scores(roles["members"], roles["nonmembers"], synth,
                                     roles["reference"])
    assert attack_metrics(score_m, score_n)["auroc"] > 0.8


# -- the whole audit ---------------------------------------------------------------------------
def test_copied_members_are_caught():
    roles = gaussian_roles()
    rng = np.random.default_rng(3)
    synth = roles["members"] + rng.normal(scale=0.01, size=roles["members"].shape)
    result = run_audit(synth=synth, **roles, member_units=None, nonmember_units=None,
                       unit="cell", seed=0)
    assert result.feasibility is None and result.unit == "cell"
    table = result.table.set_index("attack")
    assert list(result.table.columns) == TABLE_COLUMNS
    assert table.loc["dcr", "auroc"] == 1.0
    # perfect separation of 200 vs 200: ε ≥ log(0.98172 / 0.01828) = 3.98
    assert table.loc["dcr", "epsilon_lower_bound"] == pytest.approx(perfect_epsilon(200, 200))
    assert table.loc["dcr", "epsilon_lower_bound"] > 3.9
    assert table.loc["domias", "auroc"] > 0.9 and table.loc["classifier", "auroc"] > 0.9
    assert (table["epsilon_lower_bound"] > 0).all()
    # the floor (reference cells as a generator that never saw members) sits at chance
    assert (abs(table["auroc_floor"] - 0.5) < 0.12).all()
    assert "with 95 % confidence the generator's ε is at least 3.98" in result.notes[0]
    assert result.notes[-1] == NOT_PRIVACY_SENTENCE
    for name in ("dcr", "domias", "classifier"):
        roc = result.roc[name]
        assert list(roc.columns) == ["fpr", "tpr"]
        assert (roc.iloc[0].tolist(), roc.iloc[-1].tolist()) == ([0, 0], [1, 1])


def test_a_generator_that_never_saw_the_members_is_at_chance():
    # 200 vs 200 units: under no leakage AUROC has sd sqrt(401 / (12·200·200)) = 0.029, so
    # 0.12 is four standard deviations.
    roles = gaussian_roles()
    synth = np.random.default_rng(4).normal(size=(N_UNITS, DIMS))
    result = run_audit(synth=synth, **roles, member_units=None, nonmember_units=None,
                       unit="cell", seed=0)
    table = result.table.set_index("attack")
    assert table["auroc_null_halfwidth"].iloc[0] == pytest.approx(
        1.96 * math.sqrt(401 / (12 * 200 * 200)), rel=1e-4)
    assert (abs(table["auroc"] - 0.5) < 0.12).all()
    assert (table["epsilon_lower_bound"] == 0).all()  # the CI includes 0
    assert (table["epsilon_ci_low"] <= 0).all() and (table["epsilon_ci_high"] >= 0).all()
    assert result.notes[0].startswith("No attack shows membership leakage")


def donor_roles(n_member_donors: int, n_nonmember_donors: int, n_reference_donors: int,
                *, cells: int = 20, seed: int = 5) -> dict:
    """Real roles with donor ids; each donor's cells share a small donor offset."""
    rng = np.random.default_rng(seed)

    def role(prefix: str, n_donors: int) -> tuple[np.ndarray, np.ndarray]:
        offsets = rng.normal(scale=0.3, size=(n_donors, DIMS))
        x = np.vstack([o + rng.normal(size=(cells, DIMS)) for o in offsets])
        return x.astype(np.float32), np.repeat([f"{prefix}{i}" for i in range(n_donors)], cells)

    members, m_units = role("train", n_member_donors)
    nonmembers, n_units = role("held", n_nonmember_donors)
    reference, r_units = role("ref", n_reference_donors)
    return {"members": members, "nonmembers": nonmembers, "reference": reference,
            "member_units": m_units, "nonmember_units": n_units, "reference_units": r_units}


def test_donor_level_audit_when_feasible(tmp_path):
    roles = donor_roles(12, 12, 4)
    rng = np.random.default_rng(6)
    synth = roles["members"] + rng.normal(scale=0.01, size=roles["members"].shape)
    result = run_audit(synth=synth, **roles, unit="donor", seed=0, max_cells=100)
    assert result.feasibility is None and result.unit == "donor"
    table = result.table.set_index("attack")
    assert (table["n_members"] == 12).all() and (table["n_nonmembers"] == 12).all()
    assert (table["unit"] == "donor").all()
    assert table.loc["dcr", "auroc"] == 1.0
    assert table.loc["dcr", "epsilon_lower_bound"] == pytest.approx(perfect_epsilon(12, 12))
    assert table["tpr_at_1pct_fpr"].isna().all()  # 12 non-member donors cannot reach 1 %
    assert table["tpr_at_10pct_fpr"].notna().all()
    scores = result.scores["dcr"]
    assert set(scores.loc[scores["member"], "unit"]) == {f"train{i}" for i in range(12)}
    payload = result.to_json()
    json.dumps(payload, allow_nan=False)
    assert payload["audit_dcr_auroc"] == 1.0 and payload["feasibility"] is None
    assert payload["audit_dcr_tpr_at_1pct_fpr"] is None
    assert payload["audit_dcr_n_members"] == 12
    result.table.to_parquet(tmp_path / "audit.parquet")


def test_too_few_donors_falls_back_to_cells():
    roles = donor_roles(4, 2, 5)  # 5 reference donors = 100 cells, enough for cells
    synth = np.random.default_rng(7).normal(size=(80, DIMS))
    result = run_audit(synth=synth, **roles, unit="donor", seed=0)
    assert "donor-level membership audit needs" in result.feasibility
    assert result.unit == "cell" and result.requested_unit == "donor"
    assert (result.table["unit"] == "cell").all() and len(result.table) == 3
    assert (result.table["n_members"] == 80).all() and (result.table["n_nonmembers"] == 40).all()
    assert any(note.startswith("Shown instead: a cell-level audit") for note in result.notes)
    payload = result.to_json()
    assert payload["audit_unit"] == "cell" and payload["feasibility"] == result.feasibility
    json.dumps(payload, allow_nan=False)

    strict = run_audit(synth=synth, **roles, unit="donor", seed=0, cell_fallback=False)
    assert strict.table.empty and strict.roc == {} and strict.feasibility == result.feasibility
    assert not any(key.startswith("audit_dcr") for key in strict.to_json())


def test_same_seed_same_audit():
    roles = donor_roles(4, 2, 2)
    synth = np.random.default_rng(8).normal(size=(80, DIMS))
    first = run_audit(synth=synth, **roles, unit="donor", seed=1, max_cells=50)
    second = run_audit(synth=synth, **roles, unit="donor", seed=1, max_cells=50)
    assert first.table.equals(second.table)


def test_bad_input_is_refused():
    roles = gaussian_roles()
    synth = np.random.default_rng(9).normal(size=(N_UNITS, DIMS))
    broken = synth.copy()
    broken[3, 2] = np.nan
    with pytest.raises(DataError, match="missing or infinite"):
        run_audit(synth=broken, **roles, member_units=None, nonmember_units=None, unit="cell",
                  seed=0)
    with pytest.raises(DataError, match="at least 10 synthetic cells"):
        run_audit(synth=synth[5:10], **roles, member_units=None, nonmember_units=None,
                  unit="cell", seed=0)
    with pytest.raises(ValueError):
        run_audit(synth=synth[:, :5], **roles, member_units=None, nonmember_units=None,
                  unit="cell", seed=0)
    with pytest.raises(ValueError):
        run_audit(synth=synth, **roles, member_units=None, nonmember_units=None,
                  unit="donor", seed=0)


@pytest.mark.shared_data
def test_kang_audit_reports_donor_infeasibility_and_a_cell_level_result():
    import anndata as ad
    import scanpy as sc

    adata = ad.read_h5ad(KANG)
    rng = np.random.default_rng(0)
    adata = adata[np.sort(rng.choice(adata.n_obs, size=1000, replace=False))].copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=30, random_state=0)
    pcs = adata.obsm["X_pca"].astype(np.float32)
    donors = adata.obs["donor"].astype(str).to_numpy()
    all_donors = sorted(set(donors))
    assert len(all_donors) == 8
    train = set(rng.permutation(all_donors)[:4])
    nonmember_donors, reference_donors = split_audit_donors(
        [d for d in all_donors if d not in train], seed=0)
    assert len(nonmember_donors) == len(reference_donors) == 2
    is_m, is_n, is_r = (np.isin(donors, list(group))
                        for group in (train, nonmember_donors, reference_donors))
    # an overfit generator: the training cells with a little noise
    synth = pcs[is_m] + rng.normal(scale=0.1, size=pcs[is_m].shape).astype(np.float32)
    result = run_audit(synth=synth, members=pcs[is_m], nonmembers=pcs[is_n],
                       reference=pcs[is_r], member_units=donors[is_m],
                       nonmember_units=donors[is_n], reference_units=donors[is_r],
                       unit="donor", seed=0)
    assert result.feasibility is not None
    assert "4 training and 4 held-out donors (2 non-member, 2 reference)" in result.feasibility
    assert result.unit == "cell" and len(result.table) == 3
    table = result.table.set_index("attack")
    assert (table["n_members"] == is_m.sum()).all()
    assert table.loc["dcr", "auroc"] > 0.95
    assert table.loc["dcr", "epsilon_lower_bound"] > table.loc["dcr", "epsilon_lower_bound_floor"]
    assert table.loc["domias", "auroc"] > table.loc["domias", "auroc_floor"]
    assert "if cells of one donor were independent (they are not)" in result.notes[0]
    json.dumps(result.to_json(), allow_nan=False)
