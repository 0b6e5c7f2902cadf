"""Loading and summarising data: pbmc3k (10x folder and .h5ad) and a 1M-cell mock .h5ad.

Prints one JSON object. Each measurement runs in a fresh process so peak memory (ru_maxrss)
is its own; the baseline in the same run is scanpy's reader plus
``scanpy.pp.calculate_qc_metrics`` on the same files.

    python bench/bench_data.py [--cells 1000000] [--genes 2000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
PBMC3K_10X = SHARED / "pbmc3k" / "filtered_gene_bc_matrices" / "hg19"
PBMC3K_H5AD = SHARED / "pbmc3k" / "pbmc3k_raw.h5ad"

OURS = """
import json, resource, sys, time
t0 = time.perf_counter()
from engine.data.readers import read_dataset
from engine.data.summary import summarize
from engine.data.validate import validate_dataset
t_import = time.perf_counter()
adata = read_dataset(sys.argv[1])
t_read = time.perf_counter()
check = validate_dataset(adata)
summary = summarize(adata)
t_done = time.perf_counter()
print(json.dumps({"read_s": t_read - t_import, "check_and_summary_s": t_done - t_read,
                  "total_s": t_done - t_import, "import_s": t_import - t0,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                  "shape": [summary.n_cells, summary.n_genes], "is_counts": check.is_counts}))
"""

BASELINE = """
import json, resource, sys, time
from pathlib import Path
import scanpy as sc
t0 = time.perf_counter()
path = Path(sys.argv[1])
adata = sc.read_10x_mtx(path) if path.is_dir() else sc.read_h5ad(path)
t_read = time.perf_counter()
sc.pp.calculate_qc_metrics(adata, inplace=True, percent_top=None)
t_done = time.perf_counter()
print(json.dumps({"read_s": t_read - t0, "check_and_summary_s": t_done - t_read,
                  "total_s": t_done - t0,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))
"""


def run(code: str, path: Path) -> dict:
    """Run ``code`` on ``path`` in a fresh Python process; return its JSON output."""
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_big_h5ad(path: Path, n_cells: int, n_genes: int) -> dict:
    """Write an ``n_cells`` × ``n_genes`` mock .h5ad, stacking 100k-cell mock blocks."""
    import anndata as ad
    import scipy.sparse as sp

    from engine.generators.mock import generate_mock_dataset

    started = time.perf_counter()
    block_cells = min(n_cells, 100_000)
    blocks = []
    for i in range(-(-n_cells // block_cells)):
        size = min(block_cells, n_cells - i * block_cells)
        block, _ = generate_mock_dataset("paired", n_cells=size, n_genes=n_genes, n_peaks=100,
                                         n_proteins=5, seed=i)
        blocks.append(block.X)
    matrix = sp.vstack(blocks, format="csr")
    adata = ad.AnnData(matrix)
    adata.obs_names = [f"cell{i}" for i in range(adata.n_obs)]
    adata.write_h5ad(path)
    return {"seconds": time.perf_counter() - started, "nnz": int(matrix.nnz),
            "file_gb": path.stat().st_size / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--make", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        print(json.dumps(make_big_h5ad(Path(args.make), args.cells, args.genes)))
        return
    result: dict = {"benchmark": "load_and_summarise"}
    if PBMC3K_10X.exists():
        result["pbmc3k_10x"] = {"ours": run(OURS, PBMC3K_10X),
                                "baseline_scanpy": run(BASELINE, PBMC3K_10X)}
        result["pbmc3k_h5ad"] = {"ours": run(OURS, PBMC3K_H5AD),
                                 "baseline_scanpy": run(BASELINE, PBMC3K_H5AD)}
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "mock_big.h5ad"
        # Made in a child process: on Linux a child inherits its parent's peak RSS, so the
        # parent must never hold the big matrix before it starts the measured processes.
        made = json.loads(subprocess.run(
            [sys.executable, __file__, "--make", str(big), "--cells", str(args.cells),
             "--genes", str(args.genes)], cwd=REPO, check=True, capture_output=True, text=True,
        ).stdout)
        result[f"mock_{args.cells}x{args.genes}"] = {
            "made": made,
            "ours": run(OURS, big),
            "baseline_scanpy": run(BASELINE, big),
            "aim": {"total_s": 20, "peak_rss_gb": 6},
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
