"""The comparison suite: 20k + 20k cells × 2k genes, 1M + 1M through subsampling, and the
floor and the mock generator's scores on Kang (by donor) and pbmc3k (by cells).

Prints one JSON object. Each size runs in a fresh process so its peak memory is its own.
The baseline in the same run is the standard embedding pipeline (scanpy's normalise, log1p,
HVG, PCA, then umap-learn) on all the pooled cells: the picture alone, without metrics.

    python bench/bench_evaluate.py [--skip-million]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

MAKE = """
import sys
import anndata as ad, numpy as np, scipy.sparse as sp
from engine.generators.mock import generate_mock_dataset
n_cells, out, seed = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
blocks, obs = [], []
for i in range(-(-n_cells // 100_000)):
    size = min(100_000, n_cells - i * 100_000)
    block, _ = generate_mock_dataset("paired", n_cells=size, n_genes=2000, n_peaks=100,
                                     n_proteins=5, seed=seed * 1000 + i)
    blocks.append(block.X); obs.append(block.obs[["donor", "cell_type", "condition"]])
import pandas as pd
adata = ad.AnnData(sp.vstack(blocks, format="csr"), obs=pd.concat(obs, ignore_index=True),
                   var=block.var[[]])
adata.obs_names = [f"c{seed}_{i}" for i in range(adata.n_obs)]
adata.write_h5ad(out)
"""

RUN = """
import json, resource, sys, time
import anndata as ad
from engine.evaluate.suite import evaluate
real_path, synth_path, backed = sys.argv[1], sys.argv[2], sys.argv[3] == "backed"
t0 = time.perf_counter()
real = ad.read_h5ad(real_path, backed="r" if backed else None)
synthetic = ad.read_h5ad(synth_path, backed="r" if backed else None)
roles = {"donor": "donor", "cell_type": "cell_type", "condition": "condition"}
result = evaluate(real, synthetic, roles=roles, seed=0)
elapsed = time.perf_counter() - t0
auroc, floor = result.metric("classifier_auroc_gbt")
print(json.dumps({"seconds": round(elapsed, 2),
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                  "classifier_auroc_gbt": auroc, "floor": floor,
                  "cells_used": result.provenance}))
"""

BASELINE = """
import json, resource, sys, time
import anndata as ad, scanpy as sc
t0 = time.perf_counter()
adata = ad.concat([ad.read_h5ad(sys.argv[1]), ad.read_h5ad(sys.argv[2])])
sc.pp.normalize_total(adata, target_sum=1e4); sc.pp.log1p(adata)
sc.pp.highly_variable_genes(adata, n_top_genes=2000, flavor="seurat")
sc.pp.pca(adata, n_comps=30)
import umap  # scanpy 1.11's neighbours step fails with scipy 1.17 on this many cells
umap.UMAP(random_state=0).fit_transform(adata.obsm["X_pca"])
print(json.dumps({"seconds": round(time.perf_counter() - t0, 2),
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))
"""

KANG_SANITY = """
import json, time
import anndata as ad
from engine.data.split import apply_split, split_cells
from engine.evaluate.suite import evaluate
from engine.generators.mock_generator import MockGenerator, MockGeneratorConfig
out = {}
for name, path, donor in (("kang_by_donor", sys_argv[1], "donor"),
                          ("pbmc3k_by_cells", sys_argv[2], None)):
    adata = ad.read_h5ad(path)
    if "cell_type" in adata.obs:
        adata = adata[adata.obs["cell_type"].notna()].copy()
    split = split_cells(adata.obs, donor_col=donor, stratify=["cell_type"], test_fraction=0.5,
                        seed=0)
    train, test = apply_split(adata, split)
    roles = {"donor": donor, "cell_type": "cell_type", "condition":
             "condition" if "condition" in adata.obs else None}
    model = MockGenerator(MockGeneratorConfig(n_genes=2000))
    model.fit(train)
    mock = model.sample(seed=0)
    t0 = time.perf_counter()
    result = evaluate(test, mock, train=train, roles=roles, seed=0)
    keys = ["classifier_auroc_gbt", "mmd", "ilisi", "gene_mean_pearson", "ks_gene_zero_fraction",
            "composition_distance", "median_dcr_ratio"]
    rows = {k: dict(zip(("mock", "floor"), result.metric(k))) for k in keys
            if (result.metrics["metric"] == k).any()}
    out[name] = {"seconds": round(time.perf_counter() - t0, 2), "metrics": rows,
                 "floor_unit": result.provenance["floor_unit"]}
print(json.dumps(out))
""".replace("sys_argv", "__import__('sys').argv")


def run(code: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True,
                          text=True)
    if done.returncode != 0:
        return {"error": done.stderr[-1500:]}
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-million", action="store_true")
    args = parser.parse_args()
    result: dict = {"benchmark": "evaluate"}
    with tempfile.TemporaryDirectory() as tmp:
        real, synth = Path(tmp) / "real20k.h5ad", Path(tmp) / "synth20k.h5ad"
        run(MAKE, "20000", str(real), "1")
        run(MAKE, "20000", str(synth), "2")
        result["20k_plus_20k"] = {"suite": run(RUN, str(real), str(synth), "memory"),
                                  "baseline_scanpy_umap_only": run(BASELINE, str(real),
                                                                   str(synth)),
                                  "aim": {"seconds": 90, "peak_rss_gb": 4}}
        if not args.skip_million:
            big_real, big_synth = Path(tmp) / "real1m.h5ad", Path(tmp) / "synth1m.h5ad"
            run(MAKE, "1000000", str(big_real), "3")
            run(MAKE, "1000000", str(big_synth), "4")
            result["1M_plus_1M_backed"] = {"suite": run(RUN, str(big_real), str(big_synth),
                                                        "backed"),
                                           "aim": {"seconds": 300}}
    if (SHARED / "kang_ifnb_pbmc").exists():
        result["shared_data_sanity"] = run(
            KANG_SANITY, str(SHARED / "kang_ifnb_pbmc" / "kang_ifnb_pbmc_2k.h5ad"),
            str(SHARED / "pbmc3k" / "pbmc3k_raw.h5ad"))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
