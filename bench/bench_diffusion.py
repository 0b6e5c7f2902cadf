"""The conditional diffusion generator: realism, label accuracy, inverse design and speed.

On the splits of ``bench_dp_nmf_realism.py`` (Kang by donor, pbmc3k by cell; half held out),
conditioned on cell type:

- **realism** with the Compare suite (classifier AUROC, iLISI, train-on-synthetic F1, MMD,
  gene-mean Pearson, each with its real-vs-real floor), for each diffused representation
  asked for (``--spaces pca,genes``: the choice the module documents);
- **label accuracy**: a logistic regression on the real training cells' principal components
  (log-normalised model genes) assigns each conditionally generated cell a type; the share
  that gets the type it was generated for (aim ≥ 0.9), beside the same classifier on the
  held-out real cells (its own ceiling);
- **inverse design** (pbmc3k): targets on 3–4 marker genes from a starting cell type; the
  share of designed cells meeting every gene's target (aim ≥ 90 %), their classifier-assigned
  type and the nearest-real-cell distance ratio, beside the unguided starting cells;
- **speed**: training steps per second, sampled cells per second, and time to a first usable
  model (label accuracy ≥ 0.9) on a 10,000-cell mock dataset (2,000 genes, 8 cell types).

Prints one JSON object.

    python bench/bench_diffusion.py [--datasets kang_by_donor,pbmc3k_by_cells]
        [--spaces pca,genes] [--skip design,speed] [--set name=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from bench_dp_nmf_realism import LABEL_KEY, SEED, evaluate_sample, prepare_split  # noqa: E402

DESIGNS = (
    # toward FCGR3A+ (non-classical) monocytes from classical ones: a real neighbouring type
    {"start": "CD14+ Mono", "up": ["FCGR3A", "MS4A7"], "down": ["S100A8", "LYZ"]},
    # cytotoxic, effector-like cells from naive CD4 T cells
    {"start": "Naive CD4 T", "up": ["GZMK", "CCL5", "NKG7"], "down": ["SELL"]},
)


def label_accuracy(model: Any, train: Any, test: Any, n_per_type: int = 200) -> dict[str, Any]:
    """Generate ``n_per_type`` cells per training cell type; share the real-trained classifier
    assigns to the requested type (and the classifier's accuracy on held-out real cells)."""
    import pandas as pd
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    from engine.evaluate.counterfactual import log_normalised

    genes = [str(g) for g in model.gene_names]
    real = log_normalised(train, genes)
    pca = PCA(n_components=50, random_state=SEED).fit(real)
    labels = train.obs[LABEL_KEY].astype(str).to_numpy()
    classifier = LogisticRegression(max_iter=3000).fit(pca.transform(real), labels)
    held_out = test[test.obs[LABEL_KEY].astype(str).isin(set(labels)).to_numpy()]
    ceiling = float(np.mean(classifier.predict(pca.transform(log_normalised(held_out, genes)))
                           == held_out.obs[LABEL_KEY].astype(str).to_numpy()))
    types = sorted(set(labels))
    contexts = pd.DataFrame({LABEL_KEY: np.repeat(types, n_per_type)})
    started = time.perf_counter()
    cells = model.sample(len(contexts), contexts=contexts, seed=SEED + 1)
    seconds = time.perf_counter() - started
    from_expression = classifier.predict(pca.transform(cells.layers["expression"]))
    from_counts = classifier.predict(pca.transform(log_normalised(cells, genes)))
    wanted = contexts[LABEL_KEY].to_numpy()
    per_type = {t: round(float(np.mean(from_counts[wanted == t] == t)), 3) for t in types}
    return {"label_accuracy_counts": round(float(np.mean(from_counts == wanted)), 4),
            "label_accuracy_expression": round(float(np.mean(from_expression == wanted)), 4),
            "classifier_accuracy_real_held_out": round(ceiling, 4),
            "per_type_counts": per_type, "n_cells": len(contexts),
            "sample_cells_per_s": round(len(contexts) / seconds, 1)}


def run_designs(model: Any, train: Any, scales: list[float]) -> list[dict[str, Any]]:
    """Each target of :data:`DESIGNS` at each guidance scale (genes the model lacks are
    dropped, and said)."""
    from engine.evaluate.counterfactual import log_normalised
    from engine.evaluate.design import analyse_design
    from engine.generators.diffusion import DesignTarget

    modelled = set(map(str, model.gene_names))
    real_expression = log_normalised(train, [str(g) for g in model.gene_names])
    out = []
    for spec, scale in ((spec, scale) for spec in DESIGNS for scale in scales):
        up = [g for g in spec["up"] if g in modelled]
        down = [g for g in spec["down"] if g in modelled]
        dropped = sorted(set(spec["up"] + spec["down"]) - set(up + down))
        if spec["start"] not in model.categories.get(LABEL_KEY, []) or not up + down:
            out.append({**spec, "error": "start type or genes not in the model"})
            continue
        started = time.perf_counter()
        designed, start = model.design(DesignTarget.from_lists(up, down, 1.0), n=500,
                                       start={LABEL_KEY: spec["start"]}, seed=SEED,
                                       scale=scale)
        seconds = round(time.perf_counter() - started, 1)
        result = analyse_design(designed, start, real=train, real_expression=real_expression,
                                label_key=LABEL_KEY, start_label=spec["start"], seed=SEED)
        keys = ("share_meeting_all", "share_start_meeting_all", "top_assigned_type",
                "share_top_assigned_type", "share_assigned_start_type", "nn_distance_ratio",
                "nn_distance_ratio_start")
        out.append({"start": spec["start"], "up": up, "down": down, "dropped": dropped,
                    "scale": scale,
                    "seconds": seconds, **{k: result.summary.get(k) for k in keys},
                    "cell_types": result.cell_types.round(3).to_dict(orient="records"),
                    "genes": result.genes.round(3).to_dict(orient="records")})
    return out


def speed(overrides: dict[str, Any]) -> dict[str, Any]:
    """Training and sampling throughput, and time to a first usable model, on 10k mock
    cells: the model is trained in rounds of 500 steps until label accuracy ≥ 0.9."""
    import anndata as ad

    from engine.generators.base import config_from_dict
    from engine.generators.diffusion import DiffusionConfig, DiffusionGenerator
    from engine.generators.mock import generate_mock_dataset

    adata, _ = generate_mock_dataset("paired", n_cells=12_000, n_genes=2000, n_peaks=50,
                                     n_proteins=5, n_donors=20, seed=5)
    adata = ad.AnnData(adata.X, obs=adata.obs[["cell_type"]].copy(), var=adata.var[[]])
    train, test = adata[:10_000].copy(), adata[10_000:].copy()
    rounds = []
    total_fit = 0.0
    for steps in (500, 1000, 2000, 4000):
        model = DiffusionGenerator(config_from_dict(DiffusionConfig, {
            "fields": LABEL_KEY, "seed": SEED, **overrides, "train_steps": steps}))
        started = time.perf_counter()
        model.fit(train)
        fit_s = time.perf_counter() - started
        total_fit += fit_s
        accuracy = label_accuracy(model, train, test, n_per_type=100)
        rounds.append({"train_steps": steps, "fit_s": round(fit_s, 1),
                       "steps_per_s": round(steps / max(model.history[-1]["seconds"], 1e-9),
                                            1),
                       "label_accuracy_counts": accuracy["label_accuracy_counts"],
                       "sample_cells_per_s": accuracy["sample_cells_per_s"]})
        if accuracy["label_accuracy_counts"] >= 0.9:
            break
    usable = next((r for r in rounds if r["label_accuracy_counts"] >= 0.9), None)
    return {"cells": train.n_obs, "genes": train.n_vars, "rounds": rounds,
            "time_to_first_usable_model_s": usable["fit_s"] if usable else None,
            "device": model.device_used}


def main() -> None:
    import anndata as ad

    from engine.cli import _config_from_args
    from engine.generators.base import config_from_dict
    from engine.generators.diffusion import DiffusionConfig, DiffusionGenerator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="kang_by_donor,pbmc3k_by_cells")
    parser.add_argument("--spaces", default="pca")
    parser.add_argument("--design-scales", default="0.5,1.0",
                        help="gradient-guidance scales of the designs")
    parser.add_argument("--skip", default="", help="comma-separated: realism,labels,design,speed")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()
    overrides = _config_from_args(argparse.Namespace(config=None, set=args.set))
    skip = set(filter(None, args.skip.split(",")))
    results: dict[str, Any] = {"overrides": overrides, "datasets": {}}
    for name in filter(None, args.datasets.split(",")):
        with tempfile.TemporaryDirectory() as folder:
            split = prepare_split(name, Path(folder))
            train = ad.read_h5ad(Path(folder) / "train.h5ad")
            test = ad.read_h5ad(Path(folder) / "test.h5ad")
        entry: dict[str, Any] = {"split": split}
        for space in args.spaces.split(","):
            model = DiffusionGenerator(config_from_dict(DiffusionConfig, {
                "fields": LABEL_KEY, "seed": SEED, **overrides, "space": space}))
            started = time.perf_counter()
            model.fit(train)
            fit_s = round(time.perf_counter() - started, 1)
            row: dict[str, Any] = {"fit_s": fit_s,
                                   "final_loss": round(model.history[-1]["loss"], 4),
                                   "steps_per_s": round(model.config.train_steps
                                                        / model.history[-1]["seconds"], 1)}
            if "realism" not in skip:
                started = time.perf_counter()
                synthetic = model.sample(seed=SEED)
                row["sample_s"] = round(time.perf_counter() - started, 1)
                row.update(evaluate_sample(name, train, test, synthetic))
            if "labels" not in skip:
                row.update(label_accuracy(model, train, test))
            if "design" not in skip and name.startswith("pbmc3k"):
                row["designs"] = run_designs(
                    model, train, [float(v) for v in args.design_scales.split(",")])
            entry[space] = row
        results["datasets"][name] = entry
    if "speed" not in skip:
        results["speed_10k"] = speed(overrides)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
