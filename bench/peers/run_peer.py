"""Fit one peer generator on training cells and write synthetic cells (runs in the peers venv).

Peers, for bench/bench_dp_nmf_realism.py:

* ``scvi``: scvi-tools' SCVI (a VAE with a ZINB likelihood, default architecture) on the raw
  counts, unsupervised: the cell type is **not** a covariate. ``SCVI_MAX_EPOCHS`` epochs on all
  training cells (no validation split), the KL warm-up over those epochs. Synthetic cells are
  posterior predictive samples (``posterior_predictive_sample``: z ~ q(z | x), then counts ~
  p(x | z)) of training cells drawn with replacement, each keeping its source cell's label.
  A sample conditioned on its source cell's encoding already carries that cell's type, so a
  label covariate would add nothing here (it matters only when sampling from the prior per
  type).
* ``negbincopula``: scdesigner's ``NegBinCopula``: per gene a negative binomial whose mean and
  dispersion depend on the cell type (``~ cell_type``), and a Gaussian copula per cell type
  (``copula_formula="~ cell_type"``) over the ``COPULA_TOP_K`` most expressed genes with a
  Ledoit-Wolf covariance (the plain sample covariance is singular for the small types); the
  other genes are independent given the type. ``COPULA_MAX_EPOCHS`` epochs at most (scdesigner
  stops earlier on its 10 % validation split). Synthetic cells get labels drawn with
  replacement from the training labels (cell-type proportions kept).
* Both: genes with no count in the training cells are left out of the fit and written as zeros
  (their fitted mean would be ~0 anyway; leaving them out halves the work on pbmc3k).

Writes an .h5ad with integer counts (CSR, int32) in X, the training var_names, obs[cell_type],
and a JSON line on stdout with the settings used and the seconds taken.

    bench/.venv-peers/bin/python bench/peers/run_peer.py --method scvi|negbincopula \\
        --train TRAIN.h5ad --out OUT.h5ad --n-cells N --seed S [--label-key cell_type]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib.metadata import version
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

# SCVI: epochs chosen so that ~1-3k cells train in a few minutes on 2 busy CPU cores (about
# 5-10 s an epoch here for 9-15k genes); batches of 64 (scvi's default is 128) give twice the
# optimiser steps in the same time.
SCVI_MAX_EPOCHS = 20
SCVI_BATCH_SIZE = 64
# NegBinCopula: genes modelled jointly by the copula (a dense top_k x top_k correlation each
# cell type), optimiser epochs with scdesigner's own early stopping.
COPULA_TOP_K = 1000
COPULA_MAX_EPOCHS = 20
COPULA_BATCH_SIZE = 256


def source_cells(train: ad.AnnData, n_cells: int, seed: int) -> np.ndarray:
    """Rows of training cells drawn with replacement: the source (and label) of each cell."""
    return np.random.default_rng(seed).choice(train.n_obs, size=n_cells, replace=True)


def detected_genes(counts: sp.csr_matrix) -> np.ndarray:
    """Columns with at least one count in the training cells."""
    return np.flatnonzero(np.asarray(counts.getnnz(axis=0)) > 0)


def run_scvi(train: ad.AnnData, n_cells: int, seed: int,
             label_key: str) -> tuple[sp.csr_matrix, np.ndarray, dict[str, Any]]:
    import scvi
    import torch

    scvi.settings.seed = seed
    torch.set_num_threads(2)
    counts_all = sp.csr_matrix(train.X, dtype=np.float32)
    detected = detected_genes(counts_all)
    adata = ad.AnnData(counts_all[:, detected], obs=pd.DataFrame(index=train.obs_names.copy()),
                       var=pd.DataFrame(index=train.var_names[detected].copy()))
    scvi.model.SCVI.setup_anndata(adata)
    model = scvi.model.SCVI(adata)
    # The KL warm-up spans the whole (short) run, as scvi's default 400-epoch warm-up spans its
    # default 400-epoch run; with the default the KL weight would stay near 0.
    model.train(max_epochs=SCVI_MAX_EPOCHS, batch_size=SCVI_BATCH_SIZE, train_size=1.0,
                accelerator="cpu", devices=1, enable_progress_bar=False,
                plan_kwargs={"n_epochs_kl_warmup": SCVI_MAX_EPOCHS})
    history = model.history["elbo_train"]["elbo_train"]

    rows = source_cells(train, n_cells, seed)
    sources = adata[rows].copy()
    sources.obs_names = [f"scvi_{i}" for i in range(n_cells)]
    drawn = model.posterior_predictive_sample(sources, n_samples=1)
    counts = _place_columns(sp.csr_matrix(drawn.to_scipy_sparse()), detected, train.n_vars)
    labels = train.obs[label_key].astype(str).to_numpy()[rows]
    settings = {"epochs": len(history), "batch_size": SCVI_BATCH_SIZE,
                "train_size": 1.0, "n_epochs_kl_warmup": SCVI_MAX_EPOCHS,
                "elbo_train_first_last": [round(float(history.iloc[0]), 1),
                                          round(float(history.iloc[-1]), 1)],
                "gene_likelihood": model.module.gene_likelihood,
                "n_latent": model.module.n_latent, "label_covariate": False,
                "genes_fitted": len(detected), "genes": int(train.n_vars),
                "sampling": "posterior_predictive_sample of training cells drawn with "
                            "replacement"}
    return counts, labels, settings


def run_negbincopula(train: ad.AnnData, n_cells: int, seed: int,
                     label_key: str) -> tuple[sp.csr_matrix, np.ndarray, dict[str, Any]]:
    import torch
    from scdesigner.simulators import NegBinCopula

    np.random.seed(seed)  # scdesigner draws from numpy's global generator
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    counts_all = sp.csr_matrix(train.X, dtype=np.float32)
    detected = detected_genes(counts_all)
    labels_train = train.obs[label_key].astype(str)
    levels = sorted(labels_train.unique())
    fit_data = ad.AnnData(counts_all[:, detected],
                          obs=pd.DataFrame({"cell_type": pd.Categorical(labels_train,
                                                                        categories=levels)},
                                           index=train.obs_names.copy()),
                          var=pd.DataFrame(index=train.var_names[detected].copy()))
    top_k = min(COPULA_TOP_K, len(detected))
    model = NegBinCopula(mean_formula="~ cell_type", dispersion_formula="~ cell_type",
                         copula_formula="~ cell_type", estimator="ledoit_wolf", top_k=top_k)
    model.fit(fit_data, batch_size=COPULA_BATCH_SIZE, max_epochs=COPULA_MAX_EPOCHS,
              verbose=False)

    rows = source_cells(train, n_cells, seed)
    labels = labels_train.to_numpy()[rows]
    obs = pd.DataFrame({"cell_type": pd.Categorical(labels, categories=levels)},
                       index=[f"nbc_{i}" for i in range(n_cells)])
    drawn = model.sample(obs=obs, batch_size=COPULA_BATCH_SIZE)
    # Defensive: a NaN or infinite quantile from nbinom.ppf is not a count; write 0.
    x = np.nan_to_num(np.asarray(drawn.X), nan=0.0, posinf=0.0).round().clip(0)
    full = _place_columns(sp.csr_matrix(x.astype(np.int32)), detected, train.n_vars)
    settings = {"mean_formula": "~ cell_type", "dispersion_formula": "~ cell_type",
                "copula_formula": "~ cell_type", "estimator": "ledoit_wolf", "top_k": top_k,
                "max_epochs": COPULA_MAX_EPOCHS, "batch_size": COPULA_BATCH_SIZE,
                "epochs": _copula_epochs(model.marginal), "genes_fitted": len(detected),
                "genes": int(train.n_vars)}
    return full, labels, settings


def _copula_epochs(marginal: Any) -> int | None:
    """Epochs the marginal optimiser actually ran (scdesigner stops early on validation)."""
    stopped = getattr(marginal, "stopped_epoch", None)
    if stopped:
        return int(stopped)
    history = getattr(marginal, "fit_history", None)
    return len(history) if history else None


def _place_columns(block: sp.spmatrix, columns: np.ndarray, n_columns: int) -> sp.csr_matrix:
    """Put ``block``'s columns at ``columns`` of an all-zero matrix with ``n_columns`` columns."""
    block = sp.csc_matrix(block)
    indptr = np.zeros(n_columns + 1, dtype=np.int64)
    indptr[columns + 1] = np.diff(block.indptr)
    indptr = np.cumsum(indptr)
    placed = sp.csc_matrix((block.data, block.indices, indptr), shape=(block.shape[0], n_columns))
    return sp.csr_matrix(placed, dtype=np.int32)


METHODS = {"scvi": run_scvi, "negbincopula": run_negbincopula}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, choices=sorted(METHODS))
    parser.add_argument("--train", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--n-cells", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label-key", default="cell_type")
    args = parser.parse_args()

    train = ad.read_h5ad(args.train)
    train = train[train.obs[args.label_key].notna()].copy()
    t0 = time.perf_counter()
    counts, labels, settings = METHODS[args.method](train, args.n_cells, args.seed,
                                                    args.label_key)
    seconds = time.perf_counter() - t0
    counts.eliminate_zeros()
    out = ad.AnnData(counts, obs=pd.DataFrame({"cell_type": pd.Categorical(labels)},
                                              index=[f"{args.method}_{i}"
                                                     for i in range(args.n_cells)]),
                     var=pd.DataFrame(index=train.var_names.copy()))
    out.write_h5ad(args.out)
    package = "scvi-tools" if args.method == "scvi" else "scdesigner"
    print(json.dumps({"method": args.method, "seconds": round(seconds, 2),
                      "versions": {package: version(package), "torch": version("torch")},
                      "settings": settings}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
