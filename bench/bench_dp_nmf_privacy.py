"""DP-NMF under differential privacy: utility and the membership audit at total ε ∈ {1, 4, 10},
δ = 1e-5, against the same settings without DP (the baseline, in the same run).

Two settings, as the issue asks:

- **Kang, cell level**: donor-disjoint 50 % split of ``kang_ifnb_pbmc_2k``; the privacy unit
  is the cell (``donor_key=""``).
- **Mock, donor level**: a simulated 200-donor dataset from the mock generator (paired RNA,
  8,000 cells, 1,000 genes), donor-disjoint 50 % split; the unit is the donor, at most 20
  cells each. ``--mock-donors N`` simulates N donors instead (40 cells each, the same
  generator seed), to see how utility grows with the number of privacy units.

Each point reports the accountant's ε, train-on-synthetic relative F1 and the real-vs-
synthetic classifier AUROC (with floors), their ratio to the no-DP point, and the strongest
membership attack's AUROC. Prints one JSON object.

    python bench/bench_dp_nmf_privacy.py [--epsilons 1,4,10] [--dp all] [--settings kang,mock]
        [--seeds 0,1,2] [--clusters-from auto|kmeans|cell_type] [--mock-donors 200]
        [--set NAME=VALUE ...]

With several ``--seeds`` each point is fitted and sampled once per seed (the generator's
``seed`` and the sampling seed; the evaluation seed stays 0): every seed's point is listed
under ``per_seed`` and the headline metrics are their means. The share of the no-DP F1 is
the mean DP F1 over the mean no-DP F1 (the baseline is fitted with the same seeds).
With the default ``--clusters-from auto`` the DP points use cell-type clusters and the
no-DP baseline k-means (the generator's default both ways).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import anndata as ad

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from any folder: the engine is importable
SHARED = REPO.parent / "shared" / "data"
DELTA = 1e-5
ATTACKS = ("dcr", "domias", "classifier")


def _kang() -> tuple[ad.AnnData, ad.AnnData, dict[str, Any], dict[str, Any]]:
    from engine.data.split import apply_split, split_cells

    adata = ad.read_h5ad(SHARED / "kang_ifnb_pbmc" / "kang_ifnb_pbmc_2k.h5ad")
    adata = adata[adata.obs["cell_type"].notna()].copy()
    split = split_cells(adata.obs, donor_col="donor", stratify=["cell_type"],
                        test_fraction=0.5, seed=0)
    train, test = apply_split(adata, split)
    roles = {"donor": "donor", "cell_type": "cell_type", "condition": "condition"}
    return train, test, roles, {"donor_key": ""}


def _mock(n_donors: int = 200) -> tuple[ad.AnnData, ad.AnnData, dict[str, Any], dict[str, Any]]:
    from engine.data.split import apply_split, split_cells
    from engine.generators.mock import generate_mock_dataset

    adata, _ = generate_mock_dataset("paired", n_cells=40 * n_donors, n_genes=1000,
                                     n_peaks=50, n_proteins=5, n_donors=n_donors, seed=3)
    adata = ad.AnnData(adata.X, obs=adata.obs[["donor", "cell_type", "condition"]].copy(),
                       var=adata.var[[]])
    split = split_cells(adata.obs, donor_col="donor", stratify=["cell_type"],
                        test_fraction=0.5, seed=0)
    train, test = apply_split(adata, split)
    roles = {"donor": "donor", "cell_type": "cell_type", "condition": "condition"}
    return train, test, roles, {"donor_key": "donor", "max_cells_per_unit": 20}


def _point(train: ad.AnnData, test: ad.AnnData, roles: dict[str, Any],
           options: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    from engine.evaluate.suite import evaluate
    from engine.generators.dp_nmf import DPNMFConfig, DPNMFGenerator

    started = time.perf_counter()
    model = DPNMFGenerator(DPNMFConfig(cell_type_key="cell_type", seed=seed, **options))
    model.fit(train)
    synthetic = model.sample(seed=seed)
    fit_seconds = time.perf_counter() - started
    result = evaluate(test, synthetic, train=train, roles=roles, seed=0)
    audit = result.to_json().get("audit", {})
    aurocs = [audit.get(f"audit_{a}_auroc") for a in ATTACKS]
    aurocs = [a for a in aurocs if a is not None]
    point = {"seed": seed, "privacy": model.privacy_label,
             "epsilon": model.privacy_spend().get("epsilon"),
             "delta": model.privacy_spend().get("delta"),
             "seconds_fit_sample": round(fit_seconds, 1),
             "audit_auroc_max": max(aurocs) if aurocs else None,
             "audit_unit": audit.get("audit_unit")}
    for name in ("tstr_relative_f1", "classifier_auroc_gbt", "ilisi", "gene_mean_pearson"):
        value, floor = result.metric(name)
        point[name] = {"value": value, "floor": floor}
    return point


def _seeded_point(train: ad.AnnData, test: ad.AnnData, roles: dict[str, Any],
                  options: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """One point per seed; with several seeds, the metrics' means and every seed's point."""
    points = [_point(train, test, roles, options, seed) for seed in seeds]
    if len(points) == 1:
        return points[0]
    out = dict(points[0], seed=seeds)
    for name in ("tstr_relative_f1", "classifier_auroc_gbt", "ilisi", "gene_mean_pearson"):
        values = [p[name]["value"] for p in points]
        out[name] = {"value": float(sum(values) / len(values)),
                     "floor": points[0][name]["floor"], "per_seed": values}
    aurocs = [p["audit_auroc_max"] for p in points if p["audit_auroc_max"] is not None]
    out["audit_auroc_max"] = max(aurocs) if aurocs else None
    out["seconds_fit_sample"] = round(sum(p["seconds_fit_sample"] for p in points), 1)
    out["per_seed"] = points
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epsilons", default="1,4,10")
    parser.add_argument("--dp", default="all")
    parser.add_argument("--settings", default="kang,mock")
    parser.add_argument("--clusters-from", default="auto",
                        choices=("auto", "kmeans", "cell_type"),
                        help="auto (the default): cell types under dp=all, k-means without DP")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                        help="further DPNMFConfig fields, for the DP and the no-DP points")
    parser.add_argument("--seeds", default="0",
                        help="comma-separated fit/sample seeds; metrics are their means")
    parser.add_argument("--mock-donors", type=int, default=200,
                        help="donors of the mock setting (40 cells each; half train)")
    args = parser.parse_args()
    from engine.cli import _config_from_args

    overrides = _config_from_args(argparse.Namespace(config=None, set=args.set))
    epsilons = [float(e) for e in args.epsilons.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    mock_name = f"mock_{args.mock_donors}_donors_donor_level"
    makers = {"kang_cell_level": _kang,
              mock_name: lambda: _mock(args.mock_donors)}
    wanted = {"kang": "kang_cell_level", "mock": mock_name}
    out: dict[str, Any] = {"benchmark": "dp_nmf_privacy", "dp": args.dp, "delta": DELTA,
                           "clusters_from": args.clusters_from, "seeds": seeds,
                           "set": overrides}
    for short in args.settings.split(","):
        name = wanted[short]
        if short == "kang" and not SHARED.exists():
            out[name] = {"error": f"no data at {SHARED}"}
            continue
        train, test, roles, unit_options = makers[name]()
        unit_options = {**unit_options, "clusters_from": args.clusters_from, **overrides}
        baseline = _seeded_point(train, test, roles, {**unit_options, "dp": "none"}, seeds)
        print(json.dumps({name: {"no_dp": baseline}}), flush=True)
        rows: dict[str, Any] = {"no_dp": baseline, "n_train": train.n_obs,
                                "n_units": int(train.obs["donor"].nunique())
                                if unit_options["donor_key"] else train.n_obs}
        for epsilon in epsilons:
            point = _seeded_point(train, test, roles, {**unit_options, "dp": args.dp,
                                                       "epsilon_total": epsilon,
                                                       "delta": DELTA}, seeds)
            for metric in ("tstr_relative_f1",):
                base = baseline[metric]["value"]
                point[f"{metric}_share_of_no_dp"] = (
                    point[metric]["value"] / base if base else None)
                if "per_seed" in point[metric]:  # each seed against the same seed's no-DP
                    point[f"{metric}_share_per_seed"] = [
                        v / b if b else None for v, b in
                        zip(point[metric]["per_seed"], baseline[metric]["per_seed"],
                            strict=True)]
            rows[f"epsilon_{epsilon:g}"] = point
            print(json.dumps({name: {f"epsilon_{epsilon:g}": point}}), flush=True)
        out[name] = rows
    out["aim"] = "at ε = 4 keep ≥ 80 % of the no-DP train-on-synthetic F1"
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
