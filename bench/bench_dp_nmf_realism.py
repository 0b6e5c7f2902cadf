"""How real DP-NMF's cells are (without DP), next to the seed's generator and two peer tools.

Prints one JSON object. On two real datasets, Kang IFN-β PBMC (split by donor) and pbmc3k
(split by cells), each with the split of ``bench/bench_evaluate.py`` (``split_cells``, half held
out, seed 0, cells without a cell type dropped), every method is trained on the same training
cells and draws as many cells as there are training cells:

* ``dp_nmf_zinb``, ``dp_nmf_poisson``: ``engine.generators.dp_nmf`` with ``dp="none"``;
* ``seed_baseline``: the seed's NMF + k-means + Poisson generator (``bench/seed_baseline.py``);
* ``scvi``, ``negbincopula``: scvi-tools' SCVI and scdesigner's NegBinCopula, run by
  ``bench/peers/run_peer.py`` in their own environment, ``bench/.venv-peers``
  (``make bench-peers-env``).

Each synthetic sample is compared with the held-out cells by ``engine.evaluate.suite.evaluate``
(seed 0). Per method: the seconds to fit and sample (imports and file I/O excluded) and, as
(value, floor), classifier_auroc_gbt (lower is better, 0.5 ideal), ilisi (higher), tstr_relative_f1
(higher), mmd (lower) and gene_mean_pearson (higher). Per dataset: the noise floor (real vs real,
from the DP-NMF ZINB evaluation; each method's floor differs slightly because the feature space
is fitted on a pool that includes its synthetic cells). The ``aim`` entry checks that DP-NMF
without DP is at least as real as both peers on classifier AUROC and iLISI.

Every method runs in its own process (memory); a failure is recorded as an error entry.

    make bench-peers-env   # once: the peers' environment (about 2-3 minutes)
    .venv/bin/python bench/bench_dp_nmf_realism.py [--datasets kang pbmc3k] \\
        [--methods dp_nmf_zinb ...] > bench/results/realism.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
SHARED = REPO.parent / "shared" / "data"
PEERS_PYTHON = BENCH / ".venv-peers" / "bin" / "python"
RUN_PEER = BENCH / "peers" / "run_peer.py"

DATASETS: dict[str, dict[str, Any]] = {
    "kang_by_donor": {"path": SHARED / "kang_ifnb_pbmc" / "kang_ifnb_pbmc_2k.h5ad",
                      "donor": "donor"},
    "pbmc3k_by_cells": {"path": SHARED / "pbmc3k" / "pbmc3k_raw.h5ad", "donor": None},
}
OWN_METHODS = ("dp_nmf_zinb", "dp_nmf_poisson", "seed_baseline")
PEER_METHODS = ("scvi", "negbincopula")
METHODS = OWN_METHODS + PEER_METHODS
METRICS = ("classifier_auroc_gbt", "ilisi", "tstr_relative_f1", "mmd", "gene_mean_pearson")
FLOOR_SOURCE = "dp_nmf_zinb"
LABEL_KEY = "cell_type"
SEED = 0
SUBPROCESS_TIMEOUT_S = 900


# ----------------------------------------------------------------- worker side (one process each)
def prepare_split(name: str, out_dir: Path) -> dict[str, Any]:
    """Split one dataset as bench_evaluate.py does; write train/test .h5ad files to out_dir."""
    import anndata as ad

    from engine.data.split import apply_split, split_cells

    spec = DATASETS[name]
    adata = ad.read_h5ad(spec["path"])
    adata = adata[adata.obs[LABEL_KEY].notna()].copy()
    split = split_cells(adata.obs, donor_col=spec["donor"], stratify=[LABEL_KEY],
                        test_fraction=0.5, seed=SEED)
    train, test = apply_split(adata, split)
    train.write_h5ad(out_dir / "train.h5ad")
    test.write_h5ad(out_dir / "test.h5ad")
    return {"n_train": int(train.n_obs), "n_test": int(test.n_obs), "n_genes": int(train.n_vars),
            "split": split.label}


def generate_own(method: str, train: Any) -> Any:
    """Fit one of the project's generators (or the seed baseline) and draw len(train) cells."""
    if method == "seed_baseline":
        sys.path.insert(0, str(BENCH))
        from seed_baseline import seed_baseline

        return seed_baseline(train, n_cells=train.n_obs, seed=SEED)
    from engine.generators.dp_nmf import DPNMFConfig, DPNMFGenerator

    sampling = method.removeprefix("dp_nmf_")
    model = DPNMFGenerator(DPNMFConfig(sampling_method=sampling, dp="none",
                                       cell_type_key=LABEL_KEY, seed=SEED))
    model.fit(train)
    return model.sample(seed=SEED)


def evaluate_sample(name: str, train: Any, test: Any, synthetic: Any) -> dict[str, Any]:
    """Metrics of one synthetic sample against the held-out cells, each as value and floor."""
    import math

    from engine.evaluate.suite import evaluate

    donor = DATASETS[name]["donor"]
    roles = {"donor": donor, "cell_type": LABEL_KEY,
             "condition": "condition" if "condition" in test.obs else None}
    t0 = time.perf_counter()
    result = evaluate(test, synthetic, train=train, roles=roles, seed=SEED)
    present = set(result.metrics["metric"])

    def clean(x: float) -> float | None:
        return round(x, 5) if math.isfinite(x) else None

    metrics = {}
    for metric in METRICS:
        if metric in present:
            value, floor = result.metric(metric)
            metrics[metric] = {"value": clean(value), "floor": clean(floor)}
    return {"metrics": metrics, "seconds_evaluate": round(time.perf_counter() - t0, 2),
            "floor_unit": result.provenance.get("floor_unit"),
            "n_compared": result.provenance.get("n_synthetic")}


def worker(args: argparse.Namespace) -> None:
    """One method on one dataset (own methods: fit, sample, evaluate; peers: evaluate only)."""
    import anndata as ad

    sys.path.insert(0, str(REPO))
    split_dir = Path(args.split_dir)
    if args.worker == "split":
        print(json.dumps(prepare_split(args.dataset, split_dir)))
        return
    train = ad.read_h5ad(split_dir / "train.h5ad")
    test = ad.read_h5ad(split_dir / "test.h5ad")
    out: dict[str, Any] = {}
    if args.synthetic:
        synthetic = ad.read_h5ad(args.synthetic)
    else:
        t0 = time.perf_counter()
        synthetic = generate_own(args.worker, train)
        out["seconds"] = round(time.perf_counter() - t0, 2)
    out["n_synthetic"] = int(synthetic.n_obs)
    out.update(evaluate_sample(args.dataset, train, test, synthetic))
    print(json.dumps(out))


# ----------------------------------------------------------------- driver side
def run_json(command: list[str]) -> dict[str, Any]:
    """Run a command and parse the JSON object on the last line of its stdout."""
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                              timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {SUBPROCESS_TIMEOUT_S} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr or done.stdout)[-1500:]}
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": "no JSON in the output: " + done.stdout[-500:]}


def worker_command(role: str, dataset: str, split_dir: Path,
                   synthetic: Path | None = None) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", role,
               "--dataset", dataset, "--split-dir", str(split_dir)]
    return command + (["--synthetic", str(synthetic)] if synthetic else [])


def run_peer(method: str, dataset: str, split_dir: Path, n_cells: int) -> dict[str, Any]:
    """Fit a peer in its own environment, then evaluate its cells in this one."""
    if not PEERS_PYTHON.exists():
        return {"error": "run make bench-peers-env"}
    out_path = split_dir / f"{method}.h5ad"
    peer = run_json([str(PEERS_PYTHON), str(RUN_PEER), "--method", method,
                     "--train", str(split_dir / "train.h5ad"), "--out", str(out_path),
                     "--n-cells", str(n_cells), "--seed", str(SEED), "--label-key", LABEL_KEY])
    if "error" in peer:
        return peer
    evaluated = run_json(worker_command(method, dataset, split_dir, out_path))
    out_path.unlink(missing_ok=True)
    if "error" in evaluated:
        return {"error": "evaluation: " + evaluated["error"], **peer}
    return {"seconds": peer["seconds"], **evaluated, "versions": peer.get("versions"),
            "settings": peer.get("settings")}


def aim(results: dict[str, Any]) -> dict[str, Any]:
    """DP-NMF (no DP) at least as real as both peers on classifier AUROC and iLISI."""
    checks: dict[str, Any] = {}
    for dataset, entry in results.items():
        methods = entry.get("methods", {})
        peers = [methods.get(p, {}) for p in PEER_METHODS]
        if any("error" in p or "classifier_auroc_gbt" not in p.get("metrics", {}) for p in peers):
            checks[dataset] = {"met": None, "why": "a peer has no result"}
            continue
        best_peer_auroc = min(p["metrics"]["classifier_auroc_gbt"]["value"] for p in peers)
        best_peer_ilisi = max(p["metrics"]["ilisi"]["value"] for p in peers)
        for variant in ("dp_nmf_zinb", "dp_nmf_poisson"):
            ours = methods.get(variant, {}).get("metrics", {})
            if "classifier_auroc_gbt" not in ours:
                checks[f"{dataset}/{variant}"] = {"met": None, "why": "no result"}
                continue
            auroc, ilisi = ours["classifier_auroc_gbt"]["value"], ours["ilisi"]["value"]
            checks[f"{dataset}/{variant}"] = {
                "auroc_ok": auroc <= best_peer_auroc, "ilisi_ok": ilisi >= best_peer_ilisi,
                "met": auroc <= best_peer_auroc and ilisi >= best_peer_ilisi,
                "auroc": auroc, "best_peer_auroc": best_peer_auroc,
                "ilisi": ilisi, "best_peer_ilisi": best_peer_ilisi}
    return {"rule": "DP-NMF without DP: classifier_auroc_gbt <= both peers' (lower is better, "
                    "0.5 ideal) and ilisi >= both peers' (higher is better)",
            "checks": checks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS),
                        default=list(DATASETS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--split-dir", help=argparse.SUPPRESS)
    parser.add_argument("--synthetic", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    t_start = time.perf_counter()
    results: dict[str, Any] = {}
    for dataset in args.datasets:
        if not DATASETS[dataset]["path"].exists():
            results[dataset] = {"error": f"missing {DATASETS[dataset]['path']}"}
            continue
        with tempfile.TemporaryDirectory(prefix="realism_") as tmp:
            split_dir = Path(tmp)
            split = run_json(worker_command("split", dataset, split_dir))
            if "error" in split:
                results[dataset] = {"error": "split: " + split["error"]}
                continue
            methods: dict[str, Any] = {}
            for method in args.methods:
                if method in PEER_METHODS:
                    methods[method] = run_peer(method, dataset, split_dir, split["n_train"])
                else:
                    methods[method] = run_json(worker_command(method, dataset, split_dir))
            evaluated = [m for m in (FLOOR_SOURCE, *methods) if "metrics" in methods.get(m, {})]
            source = methods[evaluated[0]] if evaluated else {}
            results[dataset] = {**split,
                                "floor": {k: v["floor"]
                                          for k, v in source.get("metrics", {}).items()},
                                "floor_from": evaluated[0] if evaluated else None,
                                "floor_unit": source.get("floor_unit"), "methods": methods}
    print(json.dumps({"benchmark": "dp_nmf_realism", "seed": SEED,
                      "seconds_total": round(time.perf_counter() - t_start, 1),
                      "datasets": results, "aim": aim(results)}, indent=2))


if __name__ == "__main__":
    main()
