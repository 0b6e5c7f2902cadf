"""Empirical privacy audit: membership-inference attacks that work for any generator.

The question an audit answers: *given the synthetic cells, can an attacker tell the real units
(donors, or cells) that the generator was trained on from real units it never saw?* If it can,
the synthetic data leak who was in the training set. An attack only ever gives a **lower bound**
on leakage: a weak attack proves nothing, so a low score is never a privacy guarantee (DESIGN
section 4), and it must be read next to the utility metrics of the same run: a generator that
outputs noise leaks nothing and is useless (:data:`NOT_PRIVACY_SENTENCE`).

Roles (all as coordinates in one shared feature space, e.g. PCA, dense float)
------------------------------------------------------------------------------
* **synthetic** cells, the generator's output;
* **members**: real cells of the training donors (the generator saw them);
* **non-members**: real cells of held-out donors the generator never saw;
* **reference**: real cells of *other* held-out donors, the attacker's auxiliary sample of the
  population (:func:`split_audit_donors` splits the held-out donors into the last two).

The **unit** of the audit is the donor where donor ids are given (a donor's score is the mean of
its cells' scores), otherwise the cell.

Attacks (each returns one membership score per real unit; higher = more likely a member)
----------------------------------------------------------------------------------------
1. ``dcr``: minus the Euclidean distance to the closest synthetic cell (distance to closest
   record). Catches copied or near-copied cells.
2. ``domias``: the density-ratio attack of van Breugel et al. (2023, "Membership inference
   attacks against synthetic data through overfitting detection", AISTATS): log density of the
   synthetic cells minus log density of the reference cells at each real cell. Densities are
   Gaussian kernel density estimates with a full-covariance kernel scaled by Scott's rule
   (``n ** (-1 / (d + 4))``, as :class:`scipy.stats.gaussian_kde`), on the first
   ``max_dims = 20`` columns (PCA columns are ordered by variance; KDE is unreliable beyond
   ~20 dimensions). It looks for synthetic cells crowding around training cells more than the
   population does, rather than for near-copies.
3. ``classifier``: extremely randomised trees (scikit-learn's ``ExtraTreesClassifier``, 100
   fully grown trees, balanced class weights) trained to tell synthetic from reference cells; a
   real cell's score is its predicted probability of being synthetic. Fully grown trees keep
   the local detail that reveals near-copies; extra-trees found noisy copies more often than a
   random forest in our checks (AUROC 0.89 vs 0.77 on copies with noise of 0.3 sd, 5,000
   cells) in about a third of the time.

Metrics (:func:`attack_metrics`)
--------------------------------
* AUROC of members against non-members, and ``auroc_null_halfwidth``: the half-width of the
  95 % range of AUROC under no leakage, ``1.96 * sqrt((m + n + 1) / (12 m n))`` (normal
  approximation of the Mann–Whitney statistic). AUROCs inside ``0.5 ± halfwidth`` are chance.
* TPR at 1 % and 10 % FPR, read off the ROC curve with linear interpolation between its points
  (the rate a randomised threshold achieves). An FPR of ``a`` is reported only when one
  non-member is at most ``a`` of them, i.e. with at least ``1 / a`` non-member units (10 for
  10 %, 100 for 1 %); otherwise NaN and a note.
* The empirical epsilon lower bound (Jagielski et al. 2020, "Auditing differentially private
  machine learning: how private is private SGD?"; Nasr et al. 2021, "Adversary instantiation:
  lower bounds for differentially private machine learning"). For an (epsilon, delta)-DP
  generator, any threshold attack satisfies ``TPR <= exp(eps) FPR + delta`` and
  ``1 - FPR <= exp(eps) (1 - TPR) + delta``, so for every threshold
  ``eps >= max(log((TPR - delta) / FPR), log((1 - FPR - delta) / (1 - TPR)))``.
  With 95 % two-sided Clopper–Pearson intervals on TPR and FPR (:func:`clopper_pearson`):

  - ``epsilon_lower_bound`` / ``epsilon_ci_low`` (the same number): the conservative bound,
    computed with the *lower* TPR and *upper* FPR limits, maximised over thresholds and
    clipped at 0. This is the number to quote: "with 95 % confidence, epsilon >= this". Each
    end uses two one-sided 2.5 % limits, so it holds with >= 95 % confidence at a fixed
    threshold; the threshold is chosen on the same scores (as in the papers above), which in
    simulations without leakage (normal scores, 1,000–2,000 runs) made the bound positive in
    0.4 %, 2.8 %, 4.6 % and 6.0 % of runs with 10, 50, 200 and 1,000 units per side.
  - ``epsilon_ci_high``: the same formula with the upper TPR and lower FPR limits at the chosen
    threshold; often infinite (no non-member above the threshold cannot rule out any epsilon).
  - ``epsilon_point``: the plug-in estimate at the chosen threshold, with rates smoothed as
    ``(k + 1/2) / (n + 1)`` (Jeffreys) so it stays finite. It is noisy with few units and
    biased upwards by the choice of threshold (about 1.1 with no leakage at all): do not quote
    it without the interval.

  ``delta`` defaults to 0. Units are assumed independent; cells of one donor are not, so
  cell-level intervals are too narrow when donors differ (the notes say so).

The no-leakage floor
--------------------
Members and non-members are different donors, so an attack can score above chance without any
leakage: the training donors may simply resemble the population sample more than the held-out
ones do (with few donors, this is a coin toss). As the utility metrics do (DESIGN section 5),
every attack is therefore also run against a generator that never saw a training cell: the
reference cells are split in two (donor-disjoint when ``reference_units`` name two or more
donors, else random halves); one half plays the synthetic cells, the other the reference. The
columns ``auroc_floor`` and ``epsilon_lower_bound_floor`` hold its results; only what exceeds
the floor can be blamed on the generator. The floor is itself one noisy draw, and its
"synthetic" sample is smaller than the real one.

Feasibility thresholds (:func:`audit_feasibility`)
--------------------------------------------------
* At least ``MIN_AUDIT_UNITS = 10`` member units and 10 non-member units. Reasons: below 10
  non-members even a 10 % FPR cannot be reached (one false positive is more than 10 %); and a
  perfect attack on 10 vs 10 units gives an epsilon lower bound of 0.81, while on 5 vs 5 it
  gives 0 (Clopper–Pearson limits of 0/5 and 5/5 are 0.52 and 0.48), so fewer units cannot
  show any leakage at all. At 10 vs 10 the chance range of AUROC is still 0.5 ± 0.26, so every
  result carries its range (``auroc_null_halfwidth``).
* At least ``MIN_REFERENCE_DONORS = 2`` reference donors (a single donor's cells are that
  donor's idiosyncrasies, not the population), or ``MIN_REFERENCE_CELLS = 100`` reference cells
  for a cell-level audit (the kernel density and classifier need a sample of the population).

So a donor-level audit needs at least 10 training donors and 12 held-out donors (10 non-member,
2 reference); with the default even split of :func:`split_audit_donors`, 20 held-out donors.
Most single-cell studies have fewer.

When the donor-level audit is not feasible, :func:`run_audit` (with ``cell_fallback=True``, the
default) says why in ``feasibility`` and fills the table with a **cell-level** audit of the same
cells instead (``unit`` column ``"cell"``), with notes on what that can and cannot show. When no
audit is feasible, the table is empty and ``feasibility`` says why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from scipy.linalg import solve_triangular
from scipy.special import logsumexp

from engine.errors import DataError

NOT_PRIVACY_SENTENCE = (
    "A low attack score is not privacy when the synthetic cells are also unrealistic: read it "
    "together with the utility metrics of the same run."
)

UNITS = ("donor", "cell")
ATTACKS = ("dcr", "domias", "classifier")
ATTACK_LABELS = {
    "dcr": "distance to closest synthetic cell",
    "domias": "density ratio (DOMIAS)",
    "classifier": "synthetic-vs-reference classifier",
}
MIN_AUDIT_UNITS = 10
MIN_REFERENCE_DONORS = 2
MIN_REFERENCE_CELLS = 100
MIN_SYNTH_CELLS = 10
DEFAULT_MAX_DIMS = 20
CONFIDENCE = 0.95
FPR_TARGETS = {"tpr_at_1pct_fpr": 0.01, "tpr_at_10pct_fpr": 0.10}
TABLE_COLUMNS = [
    "attack", "auroc", "tpr_at_1pct_fpr", "tpr_at_10pct_fpr", "epsilon_lower_bound",
    "epsilon_ci_low", "epsilon_ci_high", "epsilon_point", "auroc_null_halfwidth",
    "auroc_floor", "epsilon_lower_bound_floor", "n_members", "n_nonmembers", "unit",
]
_KDE_CHUNK = 2_000_000  # pairwise distances held at once in the KDE


# -- donors and feasibility ----------------------------------------------------------------
def split_audit_donors(
    test_donors: Sequence[str], *, seed: int, reference_fraction: float = 0.5
) -> tuple[list[str], list[str]]:
    """Split held-out donors into (non-member donors, reference donors), disjoint and seeded.

    Donors are de-duplicated, sorted as text and shuffled with ``numpy.random.default_rng(seed)``;
    the first ``floor(reference_fraction * n + 0.5)`` become the reference (clipped so each side
    keeps at least one donor when there are two or more). With one donor, the reference is empty
    (the audit will say it is not feasible). Returns two sorted lists of donor ids as text.
    """
    if not 0.0 < reference_fraction < 1.0:
        raise ValueError("reference_fraction must be strictly between 0 and 1")
    donors = sorted({str(d) for d in test_donors})
    if len(donors) < 2:
        return donors, []
    order = list(np.random.default_rng(seed).permutation(len(donors)))
    n_ref = min(max(math.floor(reference_fraction * len(donors) + 0.5), 1), len(donors) - 1)
    reference = sorted(donors[i] for i in order[:n_ref])
    nonmembers = sorted(donors[i] for i in order[n_ref:])
    return nonmembers, reference


def audit_feasibility(
    n_members: int, n_nonmembers: int, n_reference: int | None, *, unit: str
) -> str | None:
    """Return None when a membership audit at this ``unit`` is meaningful, else one sentence
    saying why not and what would be needed.

    Counts are in units: donors for ``unit="donor"`` (members = training donors, non-members
    and reference = held-out donors), cells for ``unit="cell"``. ``n_reference=None`` means
    unknown and is not checked. The thresholds and their reasons are in this module's docstring.
    """
    _check_unit(unit)
    need_ref = MIN_REFERENCE_DONORS if unit == "donor" else MIN_REFERENCE_CELLS
    too_few = n_members < MIN_AUDIT_UNITS or n_nonmembers < MIN_AUDIT_UNITS
    if not too_few and (n_reference is None or n_reference >= need_ref):
        return None
    if too_few:
        why = ("too few to estimate an attack's true-positive rate at 10 % false positives or "
               "to show any leakage")
    else:
        why = ("and so small a reference describes its own donors rather than the population"
               if unit == "donor" else "too few for a density estimate of the population")
    if unit == "donor":
        if n_reference is None:
            have = f"{n_members} training and {n_nonmembers} non-member held-out donors"
        else:
            have = (f"{n_members} training and {n_nonmembers + n_reference} held-out donors "
                    f"({n_nonmembers} non-member, {n_reference} reference)")
        return (
            f"A donor-level membership audit needs at least {MIN_AUDIT_UNITS} training donors "
            f"and {MIN_AUDIT_UNITS + need_ref} held-out donors ({MIN_AUDIT_UNITS} as "
            f"non-members, {need_ref} as the attacker's reference), but this split has {have}, "
            f"{why}."
        )
    have = (f"{n_members} and {n_nonmembers}" if n_reference is None
            else f"{n_members}, {n_nonmembers} and {n_reference}")
    return (
        f"A cell-level membership audit needs at least {MIN_AUDIT_UNITS} training cells, "
        f"{MIN_AUDIT_UNITS} held-out non-member cells and {need_ref} reference cells, but "
        f"there are {have}, {why}."
    )


# -- attacks -------------------------------------------------------------------------------
def aggregate_by_unit(cell_scores: np.ndarray, units: Sequence[Any] | None = None) -> pd.Series:
    """Return per-unit scores: the mean of each unit's cell scores, indexed by unit id (as text,
    sorted); with ``units=None`` each cell is a unit and the index is its row position."""
    scores = np.asarray(cell_scores, dtype=np.float64).ravel()
    if units is None:
        out = pd.Series(scores, name="score")
    else:
        labels = np.asarray(units).astype(str)
        if labels.shape[0] != scores.shape[0]:
            raise ValueError(f"{labels.shape[0]} unit ids for {scores.shape[0]} cells")
        out = pd.Series(scores).groupby(labels, sort=True).mean().rename("score")
    out.index.name = "unit"
    return out


def dcr_distances(cells: np.ndarray, synth: np.ndarray) -> np.ndarray:
    """Return, for each row of ``cells``, the Euclidean distance to its closest synthetic cell
    (float64, one value per cell): the cell-level DCR."""
    from sklearn.neighbors import NearestNeighbors

    cells = _matrix(cells, "real cells")
    synth = _matrix(synth, "synthetic cells")
    _same_width(cells, synth)
    index = NearestNeighbors(n_neighbors=1).fit(synth)
    distances, _ = index.kneighbors(cells)
    return distances[:, 0]


def dcr_scores(
    members: np.ndarray,
    nonmembers: np.ndarray,
    synth: np.ndarray,
    *,
    member_units: Sequence[Any] | None = None,
    nonmember_units: Sequence[Any] | None = None,
) -> tuple[pd.Series, pd.Series]:
    """Return (member scores, non-member scores) of the distance-to-closest-record attack: per
    unit, minus the mean over its cells of the distance to the closest synthetic cell."""
    return (
        aggregate_by_unit(-dcr_distances(members, synth), member_units),
        aggregate_by_unit(-dcr_distances(nonmembers, synth), nonmember_units),
    )


def gaussian_kde_logpdf(
    data: np.ndarray, points: np.ndarray, *, bandwidth: str | float = "scott"
) -> np.ndarray:
    """Return the log density (float64, one per row of ``points``) of a Gaussian KDE of ``data``.

    The kernel covariance is the data covariance times ``factor ** 2``, with ``factor`` from
    Scott's rule ``n ** (-1 / (d + 4))``, Silverman's ``(n (d + 2) / 4) ** (-1 / (d + 4))`` or
    a number, as in :class:`scipy.stats.gaussian_kde`; a ridge of 1e-6 of the mean variance keeps
    degenerate data (e.g. a constant column) usable. Evaluated in chunks, in log space.
    """
    data = _matrix(data, "KDE data")
    points = _matrix(points, "KDE points")
    _same_width(data, points)
    n, d = data.shape
    if bandwidth == "scott":
        factor = n ** (-1.0 / (d + 4))
    elif bandwidth == "silverman":
        factor = (n * (d + 2) / 4.0) ** (-1.0 / (d + 4))
    elif isinstance(bandwidth, int | float) and bandwidth > 0:
        factor = float(bandwidth)
    else:
        raise ValueError("bandwidth must be 'scott', 'silverman' or a positive number")
    cov = np.cov(data, rowvar=False).reshape(d, d) if n > 1 else np.zeros((d, d))
    scale = float(np.trace(cov)) / d
    ridge = 1e-6 * scale if scale > 0 else 1e-12
    chol = np.linalg.cholesky((cov + ridge * np.eye(d)) * factor**2)
    z_data = solve_triangular(chol, data.T, lower=True).T
    z_points = solve_triangular(chol, points.T, lower=True).T
    log_norm = -math.log(n) - 0.5 * d * math.log(2 * math.pi) - float(np.log(np.diag(chol)).sum())
    sq_data = (z_data**2).sum(axis=1)
    out = np.empty(points.shape[0])
    step = max(1, _KDE_CHUNK // n)
    for start in range(0, points.shape[0], step):
        block = z_points[start : start + step]
        d2 = (block**2).sum(axis=1)[:, None] + sq_data[None, :] - 2.0 * block @ z_data.T
        np.maximum(d2, 0.0, out=d2)
        out[start : start + step] = logsumexp(-0.5 * d2, axis=1) + log_norm
    return out


def domias_scores(
    members: np.ndarray,
    nonmembers: np.ndarray,
    synth: np.ndarray,
    reference: np.ndarray,
    *,
    member_units: Sequence[Any] | None = None,
    nonmember_units: Sequence[Any] | None = None,
    max_dims: int = DEFAULT_MAX_DIMS,
    bandwidth: str | float = "scott",
) -> tuple[pd.Series, pd.Series]:
    """Return (member scores, non-member scores) of the DOMIAS density-ratio attack: per unit,
    the mean over its cells of log p_synthetic(x) − log p_reference(x), both Gaussian KDEs on
    the first ``max_dims`` columns (see :func:`gaussian_kde_logpdf`)."""
    members, nonmembers, synth, reference = (
        _matrix(members, "member cells"), _matrix(nonmembers, "non-member cells"),
        _matrix(synth, "synthetic cells"), _matrix(reference, "reference cells"))
    for other in (nonmembers, synth, reference):
        _same_width(members, other)
    k = min(max_dims, members.shape[1])

    def log_ratio(cells: np.ndarray) -> np.ndarray:
        return (gaussian_kde_logpdf(synth[:, :k], cells[:, :k], bandwidth=bandwidth)
                - gaussian_kde_logpdf(reference[:, :k], cells[:, :k], bandwidth=bandwidth))

    return (aggregate_by_unit(log_ratio(members), member_units),
            aggregate_by_unit(log_ratio(nonmembers), nonmember_units))


def classifier_scores(
    members: np.ndarray,
    nonmembers: np.ndarray,
    synth: np.ndarray,
    reference: np.ndarray,
    *,
    member_units: Sequence[Any] | None = None,
    nonmember_units: Sequence[Any] | None = None,
    seed: int = 0,
    n_estimators: int = 100,
) -> tuple[pd.Series, pd.Series]:
    """Return (member scores, non-member scores) of the classifier attack: extremely randomised
    trees (fully grown, balanced class weights, seeded) learn synthetic (1) against reference
    (0) cells; a unit's score is the mean predicted probability of "synthetic" of its cells."""
    from sklearn.ensemble import ExtraTreesClassifier

    members, nonmembers, synth, reference = (
        _matrix(members, "member cells"), _matrix(nonmembers, "non-member cells"),
        _matrix(synth, "synthetic cells"), _matrix(reference, "reference cells"))
    for other in (nonmembers, synth, reference):
        _same_width(members, other)
    model = ExtraTreesClassifier(n_estimators=n_estimators, class_weight="balanced",
                                 random_state=seed, n_jobs=1)
    labels = np.r_[np.ones(synth.shape[0]), np.zeros(reference.shape[0])]
    model.fit(np.vstack([synth, reference]), labels)
    column = list(model.classes_).index(1.0)
    return (aggregate_by_unit(model.predict_proba(members)[:, column], member_units),
            aggregate_by_unit(model.predict_proba(nonmembers)[:, column], nonmember_units))


# -- metrics -------------------------------------------------------------------------------
def clopper_pearson(
    k: np.ndarray | int, n: int, *, confidence: float = CONFIDENCE
) -> tuple[np.ndarray, np.ndarray]:
    """Return the two-sided Clopper–Pearson interval (lower, upper) for ``k`` successes out of
    ``n`` at ``confidence`` (each limit one-sided at ``(1 - confidence) / 2``), as float arrays
    shaped like ``k``; the lower limit is 0 at ``k = 0`` and the upper 1 at ``k = n``."""
    k = np.asarray(k, dtype=np.float64)
    alpha = (1.0 - confidence) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        lower = np.where(k > 0, stats.beta.ppf(alpha, np.maximum(k, 1e-300), n - k + 1), 0.0)
        upper = np.where(k < n, stats.beta.ppf(1 - alpha, k + 1, np.maximum(n - k, 1e-300)), 1.0)
    return lower, upper


def epsilon_from_rates(tpr: np.ndarray, fpr: np.ndarray, *, delta: float = 0.0) -> np.ndarray:
    """Return the epsilon an (epsilon, delta)-DP mechanism must have for a test with these rates:
    ``max(log((TPR - delta) / FPR), log((1 - FPR - delta) / (1 - TPR)))`` element-wise, with
    −inf where neither ratio is positive and +inf where a denominator is 0 (not clipped)."""
    tpr = np.asarray(tpr, dtype=np.float64)
    fpr = np.asarray(fpr, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        first = np.log(np.divide(tpr - delta, fpr))
        second = np.log(np.divide(1.0 - fpr - delta, 1.0 - tpr))
    first = np.where(np.isnan(first), -np.inf, first)
    second = np.where(np.isnan(second), -np.inf, second)
    return np.maximum(first, second)


def roc_counts(
    scores_members: np.ndarray, scores_nonmembers: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Return (true positives, false positives) at every distinct threshold, from the highest
    score down, starting at (0, 0) and ending at (all members, all non-members); tied scores
    enter together."""
    m = np.asarray(scores_members, dtype=np.float64).ravel()
    n = np.asarray(scores_nonmembers, dtype=np.float64).ravel()
    scores = np.concatenate([m, n])
    is_member = np.r_[np.ones(m.size), np.zeros(n.size)]
    order = np.argsort(-scores, kind="stable")
    scores, is_member = scores[order], is_member[order]
    last_of_tie = np.r_[scores[1:] != scores[:-1], True]
    tp = np.cumsum(is_member)[last_of_tie]
    fp = np.cumsum(1.0 - is_member)[last_of_tie]
    return np.r_[0.0, tp], np.r_[0.0, fp]


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Return the TPR at false-positive rate ``target`` on a ROC curve (points in threshold
    order, FPR and TPR non-decreasing): the highest TPR at FPR == target if such a point
    exists, else linear interpolation between the last point below and the first above."""
    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    below = np.flatnonzero(fpr <= target + 1e-12)
    i = int(below[-1])
    if abs(fpr[i] - target) <= 1e-12 or i == len(fpr) - 1:
        return float(tpr[i])
    j = i + 1
    return float(tpr[i] + (tpr[j] - tpr[i]) * (target - fpr[i]) / (fpr[j] - fpr[i]))


def attack_metrics(
    scores_members: np.ndarray | pd.Series,
    scores_nonmembers: np.ndarray | pd.Series,
    *,
    delta: float = 0.0,
    confidence: float = CONFIDENCE,
) -> dict[str, Any]:
    """Return the metrics of one attack from its member and non-member scores.

    Keys: ``auroc``, ``auroc_null_halfwidth``, ``tpr_at_1pct_fpr``, ``tpr_at_10pct_fpr`` (NaN
    when there are fewer than 100 / 10 non-members), ``epsilon_lower_bound`` (= ``epsilon_ci_low``,
    the conservative bound to quote), ``epsilon_ci_high``, ``epsilon_point``,
    ``epsilon_threshold`` (the score threshold they refer to), ``n_members``, ``n_nonmembers``,
    ``fpr`` and ``tpr`` (ROC arrays for plotting, redundant points dropped) and ``notes`` (list
    of sentences). Definitions are in the module docstring.
    """
    from sklearn.metrics import roc_auc_score

    m = np.asarray(scores_members, dtype=np.float64).ravel()
    n = np.asarray(scores_nonmembers, dtype=np.float64).ravel()
    if m.size == 0 or n.size == 0:
        raise ValueError("attack_metrics needs at least one member and one non-member score")
    if not (np.isfinite(m).all() and np.isfinite(n).all()):
        raise ValueError("attack scores must be finite")
    if not 0.0 <= delta < 1.0:
        raise ValueError("delta must be in [0, 1)")
    n_m, n_n = m.size, n.size
    notes: list[str] = []
    auroc = float(roc_auc_score(np.r_[np.ones(n_m), np.zeros(n_n)], np.r_[m, n]))
    halfwidth = 1.959964 * math.sqrt((n_m + n_n + 1) / (12.0 * n_m * n_n))

    tp, fp = roc_counts(m, n)
    tpr, fpr = tp / n_m, fp / n_n
    out: dict[str, Any] = {"auroc": auroc, "auroc_null_halfwidth": halfwidth}
    for key, target in FPR_TARGETS.items():
        if n_n * target >= 1.0 - 1e-9:
            out[key] = tpr_at_fpr(fpr, tpr, target)
        else:
            out[key] = math.nan
            need = math.ceil(1.0 / target - 1e-9)
            notes.append(f"TPR at {target:.0%} FPR needs at least {need} non-member units "
                         f"(there are {n_n}), so it is not reported.")

    tpr_low, tpr_high = clopper_pearson(tp, n_m, confidence=confidence)
    fpr_low, fpr_high = clopper_pearson(fp, n_n, confidence=confidence)
    conservative = epsilon_from_rates(tpr_low, fpr_high, delta=delta)
    best = int(np.argmax(conservative))
    optimistic = epsilon_from_rates(tpr_high[best], fpr_low[best], delta=delta)
    point = epsilon_from_rates((tp[best] + 0.5) / (n_m + 1), (fp[best] + 0.5) / (n_n + 1),
                               delta=delta)
    lower = max(0.0, float(conservative[best]))
    high = max(0.0, float(optimistic))
    if math.isinf(high):
        notes.append("The upper end of the ε interval is unbounded: with these numbers of "
                     "units, no upper limit can be put on what the attack achieves.")
    scores_sorted = np.sort(np.r_[m, n])[::-1]
    distinct = scores_sorted[np.r_[True, scores_sorted[1:] != scores_sorted[:-1]]]
    threshold = math.inf if best == 0 else float(distinct[best - 1])
    out.update({
        "epsilon_lower_bound": lower,
        "epsilon_ci_low": lower,
        "epsilon_ci_high": high,
        "epsilon_point": max(0.0, float(point)),
        "epsilon_threshold": threshold,
        "n_members": n_m,
        "n_nonmembers": n_n,
        "notes": notes,
    })
    out["fpr"], out["tpr"] = _thin_roc(fpr, tpr)
    return out


# -- the audit -----------------------------------------------------------------------------
@dataclass
class AuditResult:
    """The outcome of :func:`run_audit`.

    ``table`` has one row per attack with :data:`TABLE_COLUMNS` (empty when no audit was
    feasible); ``roc`` maps attack name to a DataFrame with ``fpr`` and ``tpr``; ``feasibility``
    is None when the requested audit was possible, else the sentence saying why not;
    ``unit`` is the unit of the table's rows (``"cell"`` after a fallback), ``requested_unit``
    the one asked for; ``scores`` maps attack name to per-unit scores (``unit``, ``score``,
    ``member``; a cell is named by its row in the capped sample); ``settings`` records the
    seed, caps and sample sizes; ``notes`` are sentences for the user, with
    the last :data:`NOT_PRIVACY_SENTENCE` (a summary comes first when the table has rows).
    """

    table: pd.DataFrame
    roc: dict[str, pd.DataFrame]
    feasibility: str | None
    notes: list[str]
    unit: str
    requested_unit: str
    scores: dict[str, pd.DataFrame] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-safe dict: ``audit_<attack>_<column>`` for every number of the table
        (NaN and infinities become None), plus ``feasibility``, ``notes``, ``audit_unit``,
        ``audit_requested_unit`` and ``audit_settings``."""
        payload: dict[str, Any] = {
            "feasibility": self.feasibility,
            "notes": list(self.notes),
            "audit_unit": self.unit,
            "audit_requested_unit": self.requested_unit,
            "audit_settings": dict(self.settings),
        }
        for row in self.table.to_dict(orient="records"):
            for column in TABLE_COLUMNS:
                if column in ("attack", "unit"):
                    continue
                value = row[column]
                if column.startswith("n_"):
                    payload[f"audit_{row['attack']}_{column}"] = int(value)
                else:
                    value = float(value)
                    payload[f"audit_{row['attack']}_{column}"] = (
                        value if math.isfinite(value) else None)
        return payload


def run_audit(
    *,
    synth: np.ndarray,
    members: np.ndarray,
    nonmembers: np.ndarray,
    reference: np.ndarray,
    member_units: Sequence[Any] | None,
    nonmember_units: Sequence[Any] | None,
    unit: str,
    seed: int,
    max_cells: int = 5000,
    reference_units: Sequence[Any] | None = None,
    delta: float = 0.0,
    max_dims: int = DEFAULT_MAX_DIMS,
    cell_fallback: bool = True,
) -> AuditResult:
    """Run the three membership attacks and return an :class:`AuditResult`.

    Inputs are coordinates in one feature space (rows = cells). With ``unit="donor"``,
    ``member_units`` and ``nonmember_units`` give each real cell's donor; ``reference_units``
    (optional, recommended) lets the reference donors be counted and the floor be split by
    donor (without it, neither is done, and a note says so). With ``unit="cell"``, each cell is
    a unit.
    Each of the four samples is capped at ``max_cells`` cells with a seeded draw; members and
    non-members by donor: every donor keeps min(its cells, c) cells for the largest c that fits.
    When a donor-level audit is not feasible and ``cell_fallback`` is true, the table holds a
    cell-level audit of the same cells; otherwise, or when that too is infeasible, it is empty.
    Raises :class:`~engine.errors.DataError` for non-finite coordinates or too few synthetic
    cells, ValueError for inconsistent arguments.
    """
    _check_unit(unit)
    if max_cells < 1:
        raise ValueError("max_cells must be positive")
    synth = _matrix(synth, "synthetic cells")
    members = _matrix(members, "training (member) cells")
    nonmembers = _matrix(nonmembers, "held-out non-member cells")
    reference = _matrix(reference, "held-out reference cells")
    for other in (synth, nonmembers, reference):
        _same_width(members, other)
    if synth.shape[0] < MIN_SYNTH_CELLS:
        raise DataError(f"The privacy audit needs at least {MIN_SYNTH_CELLS} synthetic cells, "
                        f"but the sample has {synth.shape[0]}.")
    if unit == "donor" and (member_units is None or nonmember_units is None):
        raise ValueError("unit='donor' needs member_units and nonmember_units")
    m_units = _unit_array(member_units, members.shape[0], "member_units")
    n_units = _unit_array(nonmember_units, nonmembers.shape[0], "nonmember_units")
    r_units = _unit_array(reference_units, reference.shape[0], "reference_units")

    rng = np.random.default_rng(seed)
    synth = synth[_capped_rows(None, synth.shape[0], max_cells, rng)]
    r_rows = _capped_rows(None, reference.shape[0], max_cells, rng)
    reference = reference[r_rows]
    r_units = None if r_units is None else r_units[r_rows]
    by_donor = unit == "donor"
    m_rows = _capped_rows(m_units if by_donor else None, members.shape[0], max_cells, rng)
    n_rows = _capped_rows(n_units if by_donor else None, nonmembers.shape[0], max_cells, rng)
    members, nonmembers = members[m_rows], nonmembers[n_rows]
    m_units = None if m_units is None else m_units[m_rows]
    n_units = None if n_units is None else n_units[n_rows]

    settings = {"seed": seed, "max_cells": max_cells, "delta": delta, "max_dims": max_dims,
                "confidence": CONFIDENCE, "n_synthetic_cells": int(synth.shape[0]),
                "n_reference_cells": int(reference.shape[0])}
    notes: list[str] = []
    audit_unit = unit
    if unit == "donor":
        n_ref = None if r_units is None else len(set(r_units))
        if n_ref is None:
            notes.append("The reference cells' donors were not given, so the audit could not "
                         f"check that they come from at least {MIN_REFERENCE_DONORS} donors.")
        feasibility = audit_feasibility(len(set(m_units)), len(set(n_units)), n_ref, unit="donor")
        if feasibility is not None:
            if not cell_fallback:
                return _empty(feasibility, notes, unit, unit, settings)
            audit_unit = "cell"
            cell_feasibility = audit_feasibility(members.shape[0], nonmembers.shape[0],
                                                 reference.shape[0], unit="cell")
            if cell_feasibility is not None:
                return _empty(feasibility, [*notes, cell_feasibility], unit, unit, settings)
            notes.append(
                "Shown instead: a cell-level audit of the same cells, which asks whether a "
                "training cell can be told from a held-out donor's cell; cells of one donor "
                "are not independent, so its confidence statements are too optimistic, and "
                "differences between donors that no generator causes also raise its scores "
                "(the floor columns measure them).")
    else:
        feasibility = audit_feasibility(members.shape[0], nonmembers.shape[0],
                                        reference.shape[0], unit="cell")
        if feasibility is not None:
            return _empty(feasibility, notes, unit, unit, settings)
        if m_units is not None or n_units is not None:
            notes.append("Units are cells although donors are known: cells of one donor are "
                         "not independent, so the confidence statements are too optimistic.")
    unit_kw: dict[str, Any] = (
        {"member_units": m_units, "nonmember_units": n_units} if audit_unit == "donor"
        else {"member_units": None, "nonmember_units": None})

    floor_synth_rows, floor_ref_rows = _reference_halves(r_units, reference.shape[0], rng)
    has_floor = min(floor_synth_rows.size, floor_ref_rows.size) >= MIN_SYNTH_CELLS
    rows, roc, scores = [], {}, {}
    for name in ATTACKS:
        score_m, score_n = _attack(name, members, nonmembers, synth, reference, unit_kw,
                                   seed=seed, max_dims=max_dims)
        if not (np.isfinite(score_m.to_numpy()).all() and np.isfinite(score_n.to_numpy()).all()):
            notes.append(f"The {ATTACK_LABELS[name]} attack gave non-finite scores and is "
                         "left out.")
            continue
        result = attack_metrics(score_m, score_n, delta=delta)
        floor = {"auroc": math.nan, "epsilon_lower_bound": math.nan}
        if has_floor:
            floor_m, floor_n = _attack(name, members, nonmembers,
                                       reference[floor_synth_rows], reference[floor_ref_rows],
                                       unit_kw, seed=seed, max_dims=max_dims)
            if np.isfinite(floor_m.to_numpy()).all() and np.isfinite(floor_n.to_numpy()).all():
                floor = attack_metrics(floor_m, floor_n, delta=delta)
        rows.append({"attack": name, **{c: result[c] for c in TABLE_COLUMNS
                                         if c in result and c != "unit"},
                     "auroc_floor": floor["auroc"],
                     "epsilon_lower_bound_floor": floor["epsilon_lower_bound"],
                     "unit": audit_unit})
        roc[name] = pd.DataFrame({"fpr": result["fpr"], "tpr": result["tpr"]})
        scores[name] = pd.concat([
            pd.DataFrame({"unit": score_m.index.astype(str), "score": score_m.to_numpy(),
                          "member": True}),
            pd.DataFrame({"unit": score_n.index.astype(str), "score": score_n.to_numpy(),
                          "member": False}),
        ], ignore_index=True)
        notes.extend(note for note in result["notes"] if note not in notes)
    if not has_floor:
        notes.append("The reference set is too small to split for the no-leakage floor, so "
                     "the floor columns are empty.")
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    if not table.empty:
        clustered = audit_unit == "cell" and (m_units is not None or n_units is not None)
        notes.insert(0, _summary(table, audit_unit, delta=delta, clustered=clustered))
    notes.append(NOT_PRIVACY_SENTENCE)
    return AuditResult(table=table, roc=roc, feasibility=feasibility, notes=notes,
                       unit=audit_unit, requested_unit=unit, scores=scores, settings=settings)


def _attack(name: str, members: np.ndarray, nonmembers: np.ndarray, synth: np.ndarray,
            reference: np.ndarray, unit_kw: dict[str, Any], *, seed: int,
            max_dims: int) -> tuple[pd.Series, pd.Series]:
    """Run one attack by name; return (member scores, non-member scores)."""
    if name == "dcr":
        return dcr_scores(members, nonmembers, synth, **unit_kw)
    if name == "domias":
        return domias_scores(members, nonmembers, synth, reference, **unit_kw,
                             max_dims=max_dims)
    return classifier_scores(members, nonmembers, synth, reference, **unit_kw, seed=seed)


# -- helpers -------------------------------------------------------------------------------
def _summary(table: pd.DataFrame, unit: str, *, delta: float, clustered: bool) -> str:
    """One sentence on the strongest attack and its floor, or on the absence of evidence."""
    plural = "donors" if unit == "donor" else "cells"
    leaking = table[table["epsilon_lower_bound"] > 0]
    halfwidth = float(table["auroc_null_halfwidth"].iloc[0])
    if leaking.empty:
        best = table.loc[table["auroc"].idxmax()]
        return (f"No attack shows membership leakage at 95 % confidence (every ε lower bound "
                f"is 0); the highest AUROC is {best['auroc']:.2f} "
                f"({ATTACK_LABELS[best['attack']]}), and with {int(best['n_members'])} member "
                f"and {int(best['n_nonmembers'])} non-member {plural}, values within "
                f"0.5 ± {halfwidth:.2f} are what chance gives.")
    best = leaking.loc[leaking["epsilon_lower_bound"].idxmax()]
    claim = ("which would show at 95 % confidence, if cells of one donor were independent "
             "(they are not), that" if clustered else "so with 95 % confidence")
    sentence = (f"The {ATTACK_LABELS[best['attack']]} attack tells training {plural} from "
                f"held-out ones with AUROC {best['auroc']:.2f}, {claim} the generator's ε is "
                f"at least {best['epsilon_lower_bound']:.2f} ({unit} level, δ = {delta:g})")
    if math.isfinite(best["auroc_floor"]):
        sentence += (f"; held-out reference cells passed off as synthetic, which never saw a "
                     f"training cell, score AUROC {best['auroc_floor']:.2f} (ε lower bound "
                     f"{best['epsilon_lower_bound_floor']:.2f}) with the same attack, and only "
                     "what exceeds that floor can be blamed on the generator")
    return sentence + "."


def _empty(feasibility: str, notes: list[str], unit: str, requested: str,
           settings: dict[str, Any]) -> AuditResult:
    return AuditResult(table=pd.DataFrame(columns=TABLE_COLUMNS), roc={},
                       feasibility=feasibility, notes=[*notes, NOT_PRIVACY_SENTENCE],
                       unit=unit, requested_unit=requested, settings=settings)


def _check_unit(unit: str) -> None:
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, not {unit!r}")


def _matrix(values: np.ndarray, name: str) -> np.ndarray:
    """Return ``values`` as a 2-D float64 array; DataError if it holds NaN or infinities."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (cells × features)")
    if not np.isfinite(array).all():
        raise DataError(f"The {name} have missing or infinite coordinates, so the privacy "
                        "audit cannot run; check the generator's output for NaN values.")
    return array


def _same_width(first: np.ndarray, second: np.ndarray) -> None:
    if first.shape[1] != second.shape[1]:
        raise ValueError(f"feature spaces differ: {first.shape[1]} vs {second.shape[1]} columns")


def _unit_array(units: Sequence[Any] | None, n: int, name: str) -> np.ndarray | None:
    if units is None:
        return None
    array = np.asarray(units).astype(str)
    if array.shape != (n,):
        raise ValueError(f"{name} has {array.size} entries for {n} cells")
    return array


def _capped_rows(units: np.ndarray | None, n: int, max_cells: int,
                 rng: np.random.Generator) -> np.ndarray:
    """Return sorted rows of a seeded subsample of at most ``max_cells`` rows; by unit, each unit
    keeps min(size, c) rows for the largest c that fits (at least one row per unit)."""
    if n <= max_cells:
        return np.arange(n)
    if units is None:
        return np.sort(rng.choice(n, size=max_cells, replace=False))
    groups = pd.Series(np.arange(n)).groupby(units, sort=True).indices
    sizes = np.array([len(rows) for rows in groups.values()])
    low, high = 1, int(sizes.max())
    while low < high:  # largest cap c with sum(min(size, c)) <= max_cells
        mid = (low + high + 1) // 2
        if np.minimum(sizes, mid).sum() <= max_cells:
            low = mid
        else:
            high = mid - 1
    picked = [rng.choice(rows, size=min(len(rows), low), replace=False)
              for rows in groups.values()]
    return np.sort(np.concatenate(picked))


def _reference_halves(units: np.ndarray | None, n: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split reference rows in two for the floor: donor-disjoint and balanced in cells (largest
    donor first, each to the smaller side) with two or more donors, else random cell halves."""
    if units is not None and len(set(units)) >= 2:
        sizes = pd.Series(units).value_counts()
        order = list(sizes.index)
        rng.shuffle(order)
        order.sort(key=lambda donor: -sizes[donor])  # largest first, ties in seeded order
        first: list[str] = []
        n_first = n_second = 0
        for donor in order:
            if n_first <= n_second:
                first.append(donor)
                n_first += sizes[donor]
            else:
                n_second += sizes[donor]
        in_first = np.isin(units, first)
        return np.flatnonzero(in_first), np.flatnonzero(~in_first)
    order = rng.permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2 :])


def _thin_roc(fpr: np.ndarray, tpr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop ROC points in the middle of straight vertical or horizontal runs."""
    if fpr.size <= 2:
        return fpr, tpr
    keep = np.ones(fpr.size, dtype=bool)
    same_f = (fpr[1:-1] == fpr[:-2]) & (fpr[1:-1] == fpr[2:])
    same_t = (tpr[1:-1] == tpr[:-2]) & (tpr[1:-1] == tpr[2:])
    keep[1:-1] = ~(same_f | same_t)
    return fpr[keep], tpr[keep]
