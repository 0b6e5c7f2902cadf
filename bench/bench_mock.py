"""Benchmark of the multimodal mock generator, with a naive baseline measured in the same run.

Usage::

    python bench/bench_mock.py [--cells 100000 --genes 2000 --peaks 20000 --proteins 30]
                               [--scenario mosaic] [--baseline-cells 5000] [--seed 0]

Prints one JSON object on stdout: wall seconds, cells per second, peak RSS of the process
(``resource.getrusage``) right after the run, non-zeros and density per modality, and a
baseline: the naive approach (dense float64 logits -> sigmoid -> dense uniform draw ->
``csr_matrix`` for ATAC; numpy's dense ``negative_binomial`` of the whole block for RNA)
timed on a ``--baseline-cells`` slice and extrapolated linearly to ``--cells``.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.generators.mock import _n_threads, generate_mock_dataset


def _peak_rss_mb() -> float:
    """Return the peak resident set size of this process so far, in MiB (Linux: KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _naive_baseline(
    *, n_cells: int, n_genes: int, n_peaks: int, latent_dim: int, seed: int
) -> dict[str, float]:
    """Time the naive dense approach on ``n_cells`` cells with the same model sizes.

    Returns the seconds spent on ATAC (dense logits, sigmoid, dense Bernoulli, CSR) and on
    RNA (dense log-means, one dense numpy negative-binomial draw, CSR).
    """
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.6, size=(n_cells, latent_dim))
    scale = 1.0 / (1.6 * math.sqrt(latent_dim))

    start = time.perf_counter()
    peak_w = rng.normal(0.0, 1.2 * scale, size=(n_peaks, latent_dim))
    peak_b = rng.normal(-3.6, 0.8, size=n_peaks)
    p = 1.0 / (1.0 + np.exp(-(z @ peak_w.T + peak_b)))
    atac = sp.csr_matrix((rng.random(p.shape) < p).astype(np.uint8))
    atac_seconds = time.perf_counter() - start
    del p, atac

    start = time.perf_counter()
    gene_w = rng.normal(0.0, 1.5 * scale, size=(n_genes, latent_dim))
    eta = z @ gene_w.T + rng.normal(0.0, 2.5, size=n_genes)
    eta -= np.log(np.exp(eta).sum(axis=1, keepdims=True))
    mu = np.exp(eta + np.log(1.25 * n_genes))
    size = 1.0 / 0.3
    rna = sp.csr_matrix(rng.negative_binomial(size, size / (size + mu)).astype(np.int32))
    rna_seconds = time.perf_counter() - start
    del mu, eta, rna
    return {"atac_seconds": atac_seconds, "rna_seconds": rna_seconds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the JSON result and return it as a dict."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--peaks", type=int, default=20_000)
    parser.add_argument("--proteins", type=int, default=30)
    parser.add_argument("--latent-dim", type=int, default=10)
    parser.add_argument("--scenario", default="mosaic")
    parser.add_argument("--baseline-cells", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rss_before = _peak_rss_mb()
    start = time.perf_counter()
    adata, _keys = generate_mock_dataset(
        args.scenario,
        n_cells=args.cells,
        n_genes=args.genes,
        n_peaks=args.peaks,
        n_proteins=args.proteins,
        latent_dim=args.latent_dim,
        seed=args.seed,
    )
    seconds = time.perf_counter() - start
    peak_rss = _peak_rss_mb()

    n = adata.n_obs
    atac_obs, atac_true = adata.obsm["X_atac"], adata.obsm["X_atac_true"]
    nnz = {
        "rna_observed": int(adata.X.nnz),
        "rna_true": int(adata.layers["counts_true"].nnz),
        "atac_observed": int(atac_obs.nnz),
        "atac_true": int(atac_true.nnz),
        "adt_observed": int(np.count_nonzero(adata.obsm["X_adt"])),
        "adt_true": int(np.count_nonzero(adata.obsm["X_adt_true"])),
    }
    density = {
        "rna_true": nnz["rna_true"] / (n * args.genes),
        "atac_true": nnz["atac_true"] / (n * args.peaks),
    }
    stored_mb = (
        sum(
            m.data.nbytes + m.indices.nbytes + m.indptr.nbytes
            for m in (adata.X, adata.layers["counts"], adata.layers["counts_true"])
        )
        + sum(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes for m in (atac_obs, atac_true))
        + adata.obsm["X_adt"].nbytes * 2
    ) / 2**20
    observed = {m: int(adata.obs[f"has_{m}"].sum()) for m in ("rna", "atac", "adt")}
    del adata, atac_obs, atac_true

    slice_cells = min(args.baseline_cells, args.cells)
    naive = _naive_baseline(
        n_cells=slice_cells,
        n_genes=args.genes,
        n_peaks=args.peaks,
        latent_dim=args.latent_dim,
        seed=args.seed,
    )
    factor = args.cells / slice_cells
    naive_total = (naive["atac_seconds"] + naive["rna_seconds"]) * factor
    result: dict[str, Any] = {
        "cells": args.cells,
        "genes": args.genes,
        "peaks": args.peaks,
        "proteins": args.proteins,
        "scenario": args.scenario,
        "threads": _n_threads(),
        "seconds": round(seconds, 2),
        "cells_per_second": round(args.cells / seconds),
        "peak_rss_mb": round(peak_rss, 1),
        "rss_before_mb": round(rss_before, 1),
        "stored_matrices_mb": round(stored_mb, 1),
        "nnz": nnz,
        "density": {k: round(v, 4) for k, v in density.items()},
        "cells_observed_with": observed,
        "baseline": {
            "method": "naive dense: float64 logits -> sigmoid -> dense uniform -> csr_matrix "
            "(ATAC); one dense numpy negative_binomial (RNA); single thread",
            "slice_cells": slice_cells,
            "slice_seconds_atac": round(naive["atac_seconds"], 2),
            "slice_seconds_rna": round(naive["rna_seconds"], 2),
            "extrapolated_seconds": round(naive_total, 1),
            "naive_dense_atac_gib_at_full_size": round(args.cells * args.peaks * 8 * 3 / 2**30, 1),
            "speedup": round(naive_total / seconds, 2),
        },
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
