"""The Bayesian negative-binomial model (``engine/generators/bayes_nb.py``): parameter
recovery, interferon response on Kang, and speed / memory at scale.

Three parts (``--part recovery|kang|scale|all``; each part's JSON is printed and saved to
``--out-dir``/<part>.json; ``all`` prints one object keyed by part):

- **recovery**: counts simulated from the model itself (``simulate``: 3,000 cells × 300 genes,
  K = 3, seed 1) are fitted (tolerance 0, ``--steps`` 4,000 steps unless told otherwise); per
  parameter (β0, β1, φ, w = U V on ``--w-cells`` cells, log s) the coverage of the 90 %
  central credible intervals and the Pearson correlation of the posterior means with the
  truth, and the coverage over all of them. The truth is first re-expressed in the model's
  parametrisation: β0 and log s centred (they share a constant), U centred within condition
  levels (β1_l += (Ū_l − Ū_0) V, β0 += Ū_0 V, w = (U − Ū_level) V) — "as drawn"; then the
  shift of a level's β1 that equals that level's mean log-size difference d_l is added
  (β1_l + d_l; log s centred within levels) — "identified". Baseline in the same run: the
  same fit with ``averaging=0`` (the last ADVI iterate instead of the Polyak average).
- **kang**: Kang IFN-β PBMCs (2,000 cells), ``condition`` ctrl/stim, 2,000 genes, defaults
  otherwise: ranks of 12 interferon-stimulated genes in posterior-mean β1 (1 = most up), how
  many are in the top 20 / 50, and the agreement with a pseudobulk log2 fold change computed
  in the same run (per donor × condition: summed counts, CPM, log2(CPM + 1); mean over donors
  in both conditions of stim − ctrl): Spearman / Pearson of β1 / ln 2 with it, top-50 overlap,
  and the ISG ranks under the pseudobulk (the baseline). Fit time.
- **scale**: ``--scale-cells`` (100,000) × ``--scale-genes`` (2,000) cells simulated from the
  model (K = 10) in blocks, written as an AnnData Zarr store in ``--tmp``, fitted with
  ``fit_source(ZarrChunkSource(path, chunk_size=20000))`` in a fresh process: wall time to
  convergence, compile time (from the progress messages), peak RSS (VmHWM of the child),
  steps, steps/s, cells/s, matrix entries/s, and an extrapolation to 186,224 × 39,241 (the
  original project: 3 h 45 min on an A40, 38 GB RAM). Baseline in the same run: the research
  code's configuration — a 1,000 × 500 subset, full batch (no minibatch, no total_size), one
  global dispersion, no latent factors, ``pm.fit(method="advi")`` — timed, with its ELBO's
  scale against the full data's. ``--scale-cells`` may be given several sizes (``20000,100000``)
  to measure how time and memory grow with cells; the extrapolation uses the largest two.

Run (2 shared cores: nice it and leave it in the background)::

    PYTHONPATH=. nice -n 5 .venv/bin/python bench/bench_bayes_nb.py [--part all]
        [--cells 3000 --genes 300 --factors 3 --steps 4000]
        [--kang-steps 6000] [--scale-cells 100000 --scale-genes 2000 --baseline-steps 2000]
        [--out-dir DIR (default: <temp>/bench_bayes_nb)] [--tmp /tmp]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "engine" / "generators" / "bayes_nb.py"
KANG = REPO.parent / "shared" / "data" / "kang_ifnb_pbmc" / "kang_ifnb_pbmc_2k.h5ad"
ISGS = ("ISG15", "IFI6", "IFIT1", "IFIT3", "MX1", "IFI44L", "ISG20", "OAS1", "RSAD2", "IFITM3",
        "LY6E", "HERC5")
FULL_CELLS, FULL_GENES = 186_224, 39_241  # the original project's dataset
ORIGINAL = {"hours": 3.75, "ram_gb": 38.0, "hardware": "NVIDIA A40"}
AIM = {"seconds_at_100k_x_2k": 900.0, "peak_rss_gb_at_100k_x_2k": 6.0}
PARTS = ("recovery", "kang", "scale")


def _r(x: float, digits: int = 4) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else round(float(x), digits)


def _module_hash() -> str:
    return hashlib.sha256(MODULE.read_bytes()).hexdigest()[:12]


def _vm_hwm_gb(pid: int | str = "self") -> float:
    """Peak resident set size (VmHWM) of a process in GB, 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return 0.0


class Marks:
    """A progress callback that keeps (seconds since creation, message, ELBO) triples."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.items: list[tuple[float, str, float | None]] = []

    def __call__(self, fraction: float, message: str, metrics: dict[str, float] | None = None
                 ) -> None:
        elbo = (metrics or {}).get("ELBO")
        self.items.append((time.perf_counter() - self.start, message, elbo))
        print(f"  {self.items[-1][0]:8.1f} s  peak {_vm_hwm_gb():6.3f} GB  {message}",
              file=sys.stderr, flush=True)

    def when(self, prefix: str) -> float | None:
        return next((t for t, m, _ in self.items if m.startswith(prefix)), None)

    def timing(self, window: int) -> dict[str, Any]:
        """Prepare / compile / optimise split: compile ≈ time to the first ELBO window minus
        ``window`` steps at the steady step rate of the later windows."""
        windows = [t for t, _, e in self.items if e is not None]
        compile_at = self.when("compiling")
        drawing = self.when("drawing")
        if compile_at is None or not windows:
            return {}
        steady = ((windows[-1] - windows[0]) / (window * (len(windows) - 1))
                  if len(windows) > 1 else None)
        first = windows[0] - compile_at
        compile_s = first - window * steady if steady else None
        return {"prepare_seconds": _r(compile_at, 2),
                "compile_seconds_est": _r(compile_s, 2),
                "first_window_seconds": _r(first, 2),
                "steady_seconds_per_step": _r(steady, 5),
                "optimise_seconds_after_compile": _r((windows[-1] - compile_at)
                                                     - (compile_s or 0.0), 2),
                "posterior_seconds": _r(self.items[-1][0] - drawing, 2) if drawing else None}


# ------------------------------------------------------------------------------- recovery
def _interval_stats(draws: np.ndarray, true: np.ndarray) -> dict[str, Any]:
    """Coverage of the 90 % central interval, Pearson r of the posterior mean, z-score sd."""
    lo, hi = np.quantile(draws, [0.05, 0.95], axis=0)
    inside = (true >= lo) & (true <= hi)
    mean, sd = draws.mean(0), draws.std(0)
    z = (mean - true) / np.maximum(sd, 1e-12)
    return {"coverage90": _r(inside.mean()), "pearson": _r(np.corrcoef(mean.ravel(),
                                                                       true.ravel())[0, 1]),
            "z_sd": _r(z.std(), 3), "z_mean": _r(z.mean(), 3),
            "median_ci_width": _r(np.median(hi - lo)), "n": int(true.size),
            "_inside": int(inside.sum())}


def recovery_scores(model: Any, cells: Any, truth: dict[str, np.ndarray], w_cells: int,
                    seed: int = 0) -> dict[str, Any]:
    """Coverage and correlation per parameter, "as drawn" and "identified" (see top)."""
    from engine.generators.bayes_nb import level_average_matrix

    post = model.posterior
    codes = model.cell_codes
    n_levels = len(model.levels)
    genes = np.array([int(g[4:]) for g in model.gene_names])
    Ubar = level_average_matrix(codes, n_levels) @ truth["U"]
    beta1 = truth["beta1"] + (Ubar[1:] - Ubar[0]) @ truth["V"]
    beta0 = truth["beta0"] + Ubar[0] @ truth["V"]
    beta0, beta1 = beta0[genes], beta1[:, genes]
    log_s = truth["log_s"]
    d = np.array([log_s[codes == lv].mean() - log_s[codes == 0].mean()
                  for lv in range(1, n_levels)])
    rng = np.random.default_rng(seed)
    n_draws = post.n_draws
    sub = np.sort(rng.choice(codes.size, size=min(w_cells, codes.size), replace=False))
    w_true = ((truth["U"][sub] - Ubar[codes[sub]]) @ truth["V"])[:, genes]
    U_draws = (post.U_mean[sub][None] + post.U_sd[sub][None]
               * rng.standard_normal((n_draws, sub.size, post.U_mean.shape[1])))
    w_draws = np.einsum("dck,dkg->dcg", U_draws, post.V)
    ls_draws = (post.log_s_mean[None] + post.log_s_sd[None]
                * rng.standard_normal((n_draws, codes.size)))

    def within(values: np.ndarray) -> np.ndarray:  # centre over cells within levels
        out = values.copy()
        for lv in range(n_levels):
            out[..., codes == lv] -= values[..., codes == lv].mean(-1, keepdims=True)
        return out

    b0_draws = post.beta0 - post.beta0.mean(1, keepdims=True)
    common = {"beta0": _interval_stats(b0_draws, beta0 - beta0.mean()),
              "phi": _interval_stats(post.phi, truth["phi"][genes]),
              "w": _interval_stats(w_draws, w_true)}
    as_drawn = {**{k: dict(v) for k, v in common.items()},
                "beta1": _interval_stats(post.beta1, beta1),
                "log_s": _interval_stats(ls_draws - ls_draws.mean(1, keepdims=True),
                                         log_s - log_s.mean())}
    identified = {**{k: dict(v) for k, v in common.items()},
                  "beta1": _interval_stats(post.beta1, beta1 + d[:, None]),
                  "log_s": _interval_stats(within(ls_draws), within(log_s))}
    out: dict[str, Any] = {"level_log_size_shift_d": [_r(x) for x in d],
                           "w_cells": int(sub.size)}
    for name, table in (("as_drawn", as_drawn), ("identified", identified)):
        inside = sum(v.pop("_inside") for v in table.values())
        total = sum(v["n"] for v in table.values())
        out[name] = {"parameters": {k: table[k] for k in ("beta0", "beta1", "phi", "w",
                                                          "log_s")},
                     "overall_coverage90_pooled": _r(inside / total),
                     "overall_coverage90_mean_of_parameters": _r(np.mean(
                         [v["coverage90"] for v in table.values()])),
                     "below_0.85": {k: v["coverage90"] for k, v in table.items()
                                    if v["coverage90"] < 0.85}}
    return out


def part_recovery(args: argparse.Namespace) -> dict[str, Any]:
    from engine.generators.bayes_nb import BayesNBConfig, BayesNBGenerator, simulate

    cells, truth = simulate(args.cells, args.genes, latent_factors=args.factors, seed=args.seed)
    runs = {}
    # averaging=0.0 fails in _ParameterAverage.update (zip strict over no kept values); a
    # decay of 1e-9 keeps the last iterate to within 1e-9 of it.
    for label, averaging in (("polyak_0.99", 0.99), ("baseline_last_iterate", 1e-9)):
        config = BayesNBConfig(condition="condition", n_genes=args.genes,
                               latent_factors=args.factors, max_steps=args.steps,
                               tolerance=args.tolerance, averaging=averaging, seed=0)
        model = BayesNBGenerator(config)
        marks = Marks()
        started = time.perf_counter()
        model.fit(cells, progress=marks)
        seconds = time.perf_counter() - started
        runs[label] = {"averaging": averaging, "fit_seconds": _r(seconds, 2),
                       "fit_info": model.fit_info, "timing": marks.timing(config.window),
                       **recovery_scores(model, cells, truth, args.w_cells)}
        print(f"[recovery] {label}: {json.dumps(runs[label]['identified'])}", file=sys.stderr,
              flush=True)
    return {"part": "recovery", "data": {"cells": args.cells, "genes": args.genes,
                                         "latent_factors": args.factors, "seed": args.seed},
            "fit": {"tolerance": args.tolerance, "max_steps": args.steps,
                    "other_settings": "BayesNBConfig defaults (batch 512, lr 0.02, "
                    "200 posterior draws)"},
            "interval": "central 90 %", "runs": runs, "module_sha256": _module_hash()}


# ----------------------------------------------------------------------------------- kang
def pseudobulk_lfc(adata: Any, condition: str = "condition", donor: str = "donor",
                   ctrl: str = "ctrl", stim: str = "stim") -> tuple[np.ndarray, list[str]]:
    """Return per-gene mean over donors (in both conditions) of log2(CPM+1) stim − ctrl."""
    import scipy.sparse as sp

    X = sp.csr_matrix(adata.X, dtype=np.float64)
    conditions = adata.obs[condition].astype(str).to_numpy()
    donors = adata.obs[donor].astype(str).to_numpy()
    both = sorted(set(donors[conditions == ctrl]) & set(donors[conditions == stim]))
    diffs = []
    for d in both:
        profile = {}
        for level in (ctrl, stim):
            summed = np.asarray(X[(donors == d) & (conditions == level)].sum(axis=0)).ravel()
            profile[level] = np.log2(summed / max(summed.sum(), 1.0) * 1e6 + 1.0)
        diffs.append(profile[stim] - profile[ctrl])
    return np.mean(diffs, axis=0), both


def part_kang(args: argparse.Namespace) -> dict[str, Any]:
    import anndata as ad
    import pandas as pd
    from scipy.stats import pearsonr, spearmanr

    from engine.generators.bayes_nb import BayesNBConfig, BayesNBGenerator

    adata = ad.read_h5ad(KANG)
    lfc_all, donors = pseudobulk_lfc(adata)
    overrides = {"max_steps": args.kang_steps} if args.kang_steps else {}
    config = BayesNBConfig(condition="condition", n_genes=args.kang_genes, **overrides)
    model = BayesNBGenerator(config)
    marks = Marks()
    started = time.perf_counter()
    model.fit(adata, progress=marks)
    seconds = time.perf_counter() - started
    genes = list(model.gene_names)
    stim = model.levels.index("stim") - 1
    beta1 = model.posterior.beta1[:, stim, :]
    log2_effect = beta1.mean(0) / math.log(2.0)
    lo, hi = np.quantile(beta1, [0.05, 0.95], axis=0)
    lfc = pd.Series(lfc_all, index=adata.var_names.astype(str)).reindex(genes).to_numpy()
    order_model = np.argsort(-log2_effect, kind="stable")
    order_pb = np.argsort(-lfc, kind="stable")
    rank_model = {genes[g]: i + 1 for i, g in enumerate(order_model)}
    rank_pb = {genes[g]: i + 1 for i, g in enumerate(order_pb)}
    present = [g for g in ISGS if g in rank_model]
    ranks = {g: rank_model[g] for g in present}
    position = {g: i for i, g in enumerate(genes)}
    top50_model, top50_pb = set(order_model[:50]), set(order_pb[:50])
    return {
        "part": "kang", "data": str(KANG.name), "cells": int(adata.n_obs),
        "levels": model.levels, "modelled_genes": len(genes),
        "config": {"condition": "condition", "n_genes": args.kang_genes, **overrides,
                   "other_settings": "BayesNBConfig defaults"},
        "fit_seconds": _r(seconds, 2), "fit_info": model.fit_info,
        "timing": marks.timing(config.window),
        "isgs_modelled": present, "isgs_missing": [g for g in ISGS if g not in rank_model],
        "isg_rank_beta1": ranks,
        "isg_log2_effect": {g: _r(log2_effect[position[g]], 3) for g in present},
        "isg_in_top20": sum(r <= 20 for r in ranks.values()),
        "isg_in_top50": sum(r <= 50 for r in ranks.values()),
        "baseline_pseudobulk": {
            "donors_in_both_conditions": donors,
            "isg_rank": {g: rank_pb[g] for g in present},
            "isg_log2fc": {g: _r(lfc[position[g]], 3) for g in present},
            "isg_in_top20": sum(rank_pb[g] <= 20 for g in present),
            "isg_in_top50": sum(rank_pb[g] <= 50 for g in present)},
        "agreement_with_pseudobulk": {
            "spearman": _r(spearmanr(log2_effect, lfc).statistic),
            "pearson": _r(pearsonr(log2_effect, lfc).statistic),
            "top50_up_overlap": len(top50_model & top50_pb)},
        "genes_with_90ci_excluding_0": {"up": int((lo > 0).sum()), "down": int((hi < 0).sum())},
        "module_sha256": _module_hash()}


# ---------------------------------------------------------------------------------- scale
def make_store(path: Path, n_cells: int, n_genes: int, k: int, seed: int, block: int = 10_000
               ) -> dict[str, Any]:
    """Simulate ``simulate``'s model in blocks of cells (shared gene parameters) and write an
    AnnData Zarr store; the dense arrays never exceed one block."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    beta0 = rng.normal(0.0, 1.0, n_genes)
    beta1 = rng.normal(0.0, 0.5, (1, n_genes))
    phi = np.exp(rng.normal(np.log(5.0), 0.5, n_genes))
    V = rng.normal(0.0, 0.3, (k, n_genes))
    effect = np.vstack([np.zeros((1, n_genes)), beta1])
    parts, codes_all, log_s_all, U_all = [], [], [], []
    for start in range(0, n_cells, block):
        n = min(block, n_cells - start)
        codes = rng.integers(0, 2, n)
        log_s = rng.normal(np.log(1500.0 / n_genes), 0.3, n)
        U = rng.normal(0.0, 1.0, (n, k))
        mu = np.exp(log_s[:, None] + beta0[None, :] + effect[codes] + U @ V)
        parts.append(sp.csr_matrix(rng.poisson(rng.gamma(phi, mu / phi)).astype(np.float32)))
        codes_all.append(codes)
        log_s_all.append(log_s)
        U_all.append(U)
    np.savez(str(path) + ".truth.npz", beta0=beta0, beta1=beta1, phi=phi, V=V,
             log_s=np.concatenate(log_s_all), U=np.concatenate(U_all))
    X = sp.vstack(parts, format="csr")
    levels = np.array(["c0", "c1"])
    obs = pd.DataFrame({"condition": pd.Categorical(levels[np.concatenate(codes_all)],
                                                    categories=list(levels))},
                       index=[f"cell{i}" for i in range(n_cells)])
    adata = ad.AnnData(X, obs=obs, var=pd.DataFrame(index=[f"gene{g}" for g in range(n_genes)]))
    adata.write_zarr(str(path), chunks=(block, n_genes))
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {"seconds": _r(time.perf_counter() - started, 2), "nnz": int(X.nnz),
            "density": _r(X.nnz / (n_cells * n_genes)),
            "mean_library": _r(float(X.sum()) / n_cells, 1), "store_gb": _r(size / 1e9, 3)}


def child_fit(path: str, k: int, max_steps: int, chunk_size: int) -> dict[str, Any]:
    """Fit on a Zarr store (run in a fresh process); timings and peak memory."""
    import resource

    from engine.data.chunks import ZarrChunkSource
    from engine.generators.bayes_nb import BayesNBConfig, BayesNBGenerator

    base_gb = _vm_hwm_gb()
    source = ZarrChunkSource(path, chunk_size=chunk_size)
    overrides = {"max_steps": max_steps} if max_steps else {}
    config = BayesNBConfig(condition="condition", n_genes=source.n_vars, latent_factors=k,
                           chunk_size=chunk_size, **overrides)
    model = BayesNBGenerator(config)
    marks = Marks()
    started = time.perf_counter()
    model.fit_source(source, progress=marks)
    seconds = time.perf_counter() - started
    info = model.fit_info
    timing = marks.timing(config.window)
    steps, n_cells = info["steps"], source.n_obs
    n_genes = len(model.gene_names)
    per_step = timing.get("steady_seconds_per_step") or seconds / max(steps, 1)
    elbo = info.get("final_elbo")
    peak_gb, maxrss_gb = _vm_hwm_gb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    # cross-check of the ELBO's scale: the NB log-likelihood at the posterior means on the
    # first 2,000 cells, per matrix entry, beside the reported ELBO per entry (PyMC 5.28's
    # default scale_cost_to_minibatch divides the loss by cells² / (batch · genes), not by
    # cells / batch: its get_scaling gets the (batch, genes) shape wrapped in a 1-tuple).
    from engine.generators.bayes_nb import nb_log_likelihood

    post = model.posterior
    first = source.read_chunk(0, genes=None)
    rows = first.rows[:2000]
    position = {g: i for i, g in enumerate(source.var_names.astype(str))}
    columns = np.array([position[g] for g in model.gene_names])
    y = first.X[: rows.size][:, columns].toarray()
    mu = model.mean_expression(model.cell_codes[rows], post.log_s_mean[rows], post.U_mean[rows])
    loglik = float(nb_log_likelihood(y, mu, post.phi.mean(0)).mean())
    truth_file = Path(path + ".truth.npz")
    recovery = None
    if truth_file.is_file():  # coverage and correlation against the simulation's truth
        with np.load(truth_file) as saved:
            truth = {name: saved[name] for name in saved.files}
        scores = recovery_scores(model, None, truth, w_cells=300)
        recovery = {name: {"overall_coverage90_pooled": table["overall_coverage90_pooled"],
                           "parameters": {p: {"coverage90": v["coverage90"],
                                              "pearson": v["pearson"]}
                                          for p, v in table["parameters"].items()}}
                    for name, table in scores.items() if isinstance(table, dict)
                    and "parameters" in table}
    return {"cells": n_cells, "genes": n_genes, "latent_factors": k,
            "batch_size": config.batch_size, "chunk_size": chunk_size,
            "max_steps": config.max_steps, "tolerance": config.tolerance,
            "fit_seconds": _r(seconds, 2), "fit_info": info, "timing": timing,
            "epochs": _r(steps * config.batch_size / n_cells, 2),
            "steps_per_second": _r(1.0 / per_step, 3),
            "cells_per_second": _r(config.batch_size / per_step, 1),
            "entries_per_second": _r(config.batch_size * n_genes / per_step, 0),
            "reported_elbo_per_entry": _r(elbo / (n_cells * n_genes), 5) if elbo else None,
            "nb_loglik_per_entry_at_posterior_mean_2000_cells": _r(loglik, 5),
            "elbo_trace_tail": [_r(e, 0) for e in model.history["elbo"][-5:]],
            "rss_gb_before_fit": _r(base_gb, 3),
            "peak_rss_gb": _r(peak_gb, 3), "ru_maxrss_gb": _r(maxrss_gb, 3),
            "recovery_vs_truth": recovery}


def child_baseline(path: str, n_cells: int, n_genes: int, steps: int, seed: int
                   ) -> dict[str, Any]:
    """The research code's configuration on a subset of the store: full batch, no
    total_size, one global dispersion, no latent factors, ``pm.fit(method="advi")``."""
    import pymc as pm
    import pytensor.tensor as pt

    from engine.data.chunks import ZarrChunkSource

    source = ZarrChunkSource(path, chunk_size=max(n_cells, 256))
    rng = np.random.default_rng(seed)
    chunk = source.read_chunk(0)
    rows = np.sort(rng.choice(len(chunk), size=min(n_cells, len(chunk)), replace=False))
    X = chunk.X[rows]
    totals = np.asarray(X.sum(axis=0)).ravel()
    genes = np.sort(np.argsort(-totals, kind="stable")[:n_genes])
    y = np.rint(X[:, genes].toarray()).astype(np.int64)
    codes = source.obs(["condition"])["condition"].astype(str).to_numpy()[chunk.rows[rows]]
    stim = (codes != sorted(set(codes))[0]).astype(np.float64)
    library = np.log(np.maximum(y.sum(axis=1), 1.0) / y.shape[1])
    started = time.perf_counter()
    with pm.Model():
        log_s = pm.Normal("log_s", library.mean(), max(library.std(), 0.05), shape=y.shape[0])
        beta0 = pm.Normal("beta0", 0.0, 3.0, shape=y.shape[1])
        beta1 = pm.Normal("beta1", 0.0, 1.0, shape=y.shape[1])
        phi = pm.HalfCauchy("phi", 2.0)
        eta = log_s[:, None] + beta0[None, :] + pt.as_tensor_variable(stim)[:, None] * beta1
        pm.NegativeBinomial("y", mu=pt.exp(eta), alpha=phi, observed=y)
        built = time.perf_counter()
        first: list[float] = []

        def first_step(*_: Any) -> None:  # called after every step; keep the first time
            if not first:
                first.append(time.perf_counter())

        approx = pm.fit(n=steps, method="advi", random_seed=seed, progressbar=False,
                        callbacks=[first_step])
    seconds = time.perf_counter() - started
    per_step = (started + seconds - first[0]) / max(steps - 1, 1)
    hist = np.asarray(approx.hist)
    elbo = float(-hist[-min(100, hist.size):].mean())
    return {"cells": int(y.shape[0]), "genes": int(y.shape[1]), "steps": steps,
            "fit_seconds": _r(seconds, 2), "build_seconds": _r(built - started, 2),
            "compile_and_first_step_seconds": _r(first[0] - built, 2),
            "steady_seconds_per_step": _r(per_step, 5),
            "steps_per_second": _r(1.0 / per_step, 3),
            "entries_per_second": _r(y.size / per_step, 0),
            "projected_seconds_for_pm_fit_default_10000_steps": _r(
                first[0] - started + 10_000 * per_step, 1),
            "final_elbo": _r(elbo, 1), "elbo_per_entry": _r(elbo / y.size, 5),
            "peak_rss_gb": _r(_vm_hwm_gb(), 3)}


def run_child(mode: str, argv: list[str], timeout: float, mem_limit_gb: float,
              log: Path) -> dict[str, Any]:
    """Run this file as ``--child mode`` in a fresh interpreter (its stderr goes to ``log``);
    kill it past ``timeout`` seconds or ``mem_limit_gb`` RSS; return its last stdout line as
    JSON or an error entry."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", mode, *argv]
    with tempfile.TemporaryFile("w+") as out, open(log, "w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err)
        peak, reason = 0.0, None
        while proc.poll() is None:
            time.sleep(1.0)
            peak = max(peak, _vm_hwm_gb(proc.pid))
            if time.perf_counter() - started > timeout:
                reason = f"timeout after {timeout:.0f} s"
            elif peak > mem_limit_gb:
                reason = f"peak RSS {peak:.1f} GB over the {mem_limit_gb} GB limit"
            if reason:
                proc.kill()
                proc.wait()
        out.seek(0)
        err.seek(0)
        lines = [line for line in out.read().splitlines() if line.startswith("{")]
        if proc.returncode == 0 and lines:
            return json.loads(lines[-1])
        return {"error": reason or f"exit status {proc.returncode}",
                "seconds": _r(time.perf_counter() - started, 1), "peak_rss_gb": _r(peak, 3),
                "stderr_tail": err.read()[-1500:]}


def extrapolate(runs: list[dict[str, Any]], k: int, levels: int = 2) -> dict[str, Any]:
    """Scale the largest run to FULL_CELLS × FULL_GENES (formulas in the result)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": "no scale run finished"}
    big = max(ok, key=lambda r: r["cells"])
    cell_ratio, gene_ratio = FULL_CELLS / big["cells"], FULL_GENES / big["genes"]
    hours = big["fit_seconds"] * cell_ratio * gene_ratio / 3600
    # time: the same number of epochs (steps × batch / cells) to converge, and a step's cost ∝
    # batch × genes, so time ∝ cells × genes. The per-step update of every per-cell
    # parameter (∝ cells × (K+1)) is left out; it is small next to batch × genes.
    result: dict[str, Any] = {
        "target": {"cells": FULL_CELLS, "genes": FULL_GENES}, "from_run_cells": big["cells"],
        "from_run_converged": big["fit_info"].get("converged"),
        "from_run_epochs": big.get("epochs"),
        "time_formula": "T_full = T_fit(N, G) · (N_full / N) · (G_full / G): same epochs to "
                        "converge, a step costing ∝ batch × genes",
        "hours_estimate": _r(hours, 2),
        "hours_estimate_if_steps_capped_at_the_runs_max_steps": _r(
            big["max_steps"] * FULL_GENES / big["genes"]
            / big["steps_per_second"] / 3600, 2),
        "original": ORIGINAL}
    per_cell_bytes = None
    if len(ok) > 1:
        small = sorted(ok, key=lambda r: r["cells"])[-2]
        if small["cells"] != big["cells"]:
            per_cell_bytes = ((big["peak_rss_gb"] - small["peak_rss_gb"]) * 1e9
                              / (big["cells"] - small["cells"]))
    theory_cell = 8.0 * (k + 1) * 14  # mean, rho, 2×Adam moments each, EMA ×2, grads, draws
    if per_cell_bytes is None or per_cell_bytes <= 0:
        per_cell_bytes = theory_cell
        source = "theory: (K+1) parameters × ~14 float64 copies"
    else:
        source = f"measured: peak RSS slope between {small['cells']} and {big['cells']} cells"
    base = big.get("rss_gb_before_fit") or 0.3
    cells_gb = per_cell_bytes * big["cells"] / 1e9
    gene_part = max(big["peak_rss_gb"] - base - cells_gb, 0.0)
    memory = base + per_cell_bytes * FULL_CELLS / 1e9 + gene_part * gene_ratio
    result.update({
        "memory_formula": "M_full = M_import + b_cell · N_full + (M_peak − M_import − "
                          "b_cell · N) · G_full / G: per-cell latents and their optimiser "
                          "state ∝ N·(K+1); everything else (per-gene ∝ G·(K+L+2), one chunk "
                          "of chunk_size × G, one dense batch of batch × G and its "
                          "temporaries, the posterior draws) taken as ∝ G — an upper bound, "
                          "since fixed costs are scaled too",
        "bytes_per_cell": _r(per_cell_bytes, 1), "bytes_per_cell_source": source,
        "gb_import": _r(base, 3), "gb_gene_proportional_at_run": _r(gene_part, 3),
        "ram_gb_estimate": _r(memory, 2),
        "note": "the first chunk is densified as float64 for the factor start "
                f"(chunk_size × G × 8 B = {20_000 * FULL_GENES * 8 / 1e9:.1f} GB at G = "
                f"{FULL_GENES:,}) — part of the G-proportional term"})
    return result


def part_scale(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(s) for s in str(args.scale_cells).split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench_bnb_", dir=args.tmp))
    result: dict[str, Any] = {"part": "scale", "aim": AIM, "module_sha256": _module_hash(),
                              "runs": [], "cpu": f"{os.cpu_count()} cores (shared)"}
    try:
        for n in sizes:
            path = tmp / f"sim_{n}x{args.scale_genes}.zarr"
            made = run_child("make", [str(path), str(n), str(args.scale_genes),
                                      str(args.scale_factors), str(args.seed)],
                             timeout=args.timeout, mem_limit_gb=args.mem_limit_gb,
                             log=Path(args.out_dir) / f"scale_make_{n}.log")
            print(f"[scale] made {n}: {json.dumps(made)}", file=sys.stderr, flush=True)
            if "error" in made:
                result["runs"].append({"cells": n, "make": made, "error": "make failed"})
                continue
            fit = run_child("fit", [str(path), str(args.scale_factors),
                                    str(args.scale_steps), str(args.chunk_size)],
                            timeout=args.timeout, mem_limit_gb=args.mem_limit_gb,
                            log=Path(args.out_dir) / f"scale_fit_{n}.log")
            fit["data"] = made
            result["runs"].append(fit)
            print(f"[scale] fit {n}: {json.dumps(fit)}", file=sys.stderr, flush=True)
            if n == sizes[-1] and not args.skip_baseline:
                base = run_child("baseline", [str(path), "1000", "500",
                                              str(args.baseline_steps), str(args.seed)],
                                 timeout=args.timeout, mem_limit_gb=args.mem_limit_gb,
                                 log=Path(args.out_dir) / "scale_baseline.log")
                if "error" not in base and "error" not in fit:
                    scale = fit["cells"] * fit["genes"] / (base["cells"] * base["genes"])
                    base["elbo_scale"] = {
                        "entries_full_over_subset": _r(scale, 1),
                        "full_data_final_elbo_reported": fit["fit_info"].get("final_elbo"),
                        "baseline_elbo_times_scale": _r(base["final_elbo"] * scale, 0),
                        "note": "the baseline's ELBO sums the log-likelihood of 1000 × 500 "
                                "entries with no total_size, so as an estimate of the "
                                "full-data ELBO it is off by this factor"}
                result["baseline_research_config"] = base
        ok = [r for r in result["runs"] if "error" not in r]
        for r in ok:
            if r["cells"] == 100_000 and r["genes"] == 2000:
                result["aim_met"] = {"seconds": r["fit_seconds"] <= AIM["seconds_at_100k_x_2k"],
                                     "memory": r["peak_rss_gb"]
                                     <= AIM["peak_rss_gb_at_100k_x_2k"]}
        result["extrapolation"] = extrapolate(result["runs"], args.scale_factors)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


# ----------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=(*PARTS, "all"), default="all")
    parser.add_argument("--out-dir", default=str(Path(tempfile.gettempdir()) / "bench_bayes_nb"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cells", type=int, default=3000, help="recovery: cells")
    parser.add_argument("--genes", type=int, default=300, help="recovery: genes")
    parser.add_argument("--factors", type=int, default=3, help="recovery: latent factors")
    parser.add_argument("--steps", type=int, default=4000, help="recovery: max steps")
    parser.add_argument("--tolerance", type=float, default=0.0, help="recovery: tolerance")
    parser.add_argument("--w-cells", type=int, default=300, help="recovery: cells for w")
    parser.add_argument("--kang-genes", type=int, default=2000)
    parser.add_argument("--kang-steps", type=int, default=0, help="0: the config default")
    parser.add_argument("--scale-cells", default="100000", help="comma-separated sizes")
    parser.add_argument("--scale-genes", type=int, default=2000)
    parser.add_argument("--scale-factors", type=int, default=10)
    parser.add_argument("--scale-steps", type=int, default=0, help="0: the config default")
    parser.add_argument("--chunk-size", type=int, default=20_000)
    parser.add_argument("--baseline-steps", type=int, default=2000)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--mem-limit-gb", type=float, default=16.0)
    parser.add_argument("--tmp", default="/tmp")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("child_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        a = args.child_args
        if args.child == "make":
            out = make_store(Path(a[0]), int(a[1]), int(a[2]), int(a[3]), int(a[4]))
        elif args.child == "fit":
            out = child_fit(a[0], int(a[1]), int(a[2]), int(a[3]))
        else:
            out = child_baseline(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]))
        print(json.dumps(out))
        return
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = PARTS if args.part == "all" else (args.part,)
    functions = {"recovery": part_recovery, "kang": part_kang, "scale": part_scale}
    results = {}
    for part in parts:
        started = time.perf_counter()
        results[part] = functions[part](args)
        results[part]["part_seconds"] = _r(time.perf_counter() - started, 1)
        (out_dir / f"{part}.json").write_text(json.dumps(results[part], indent=2))
        print(f"[{part}] done in {results[part]['part_seconds']} s", file=sys.stderr,
              flush=True)
    print(json.dumps(results if len(parts) > 1 else results[parts[0]], indent=2))


if __name__ == "__main__":
    main()
