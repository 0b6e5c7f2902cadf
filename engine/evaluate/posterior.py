"""What the posterior of a Bayesian negative-binomial run says, and how well the model fits.

Used by the Posterior page (through the ``posterior_checks`` task), the CLI and the tests.
Works on any fitted model with the interface of
:class:`engine.generators.bayes_nb.BayesNBGenerator` (``posterior``, ``draw_counts``,
``cell_latents``, ...).

- **Effects**: per gene and non-reference level, the posterior of the condition effect β1
  (natural-log scale of the NB mean): mean, sd, the 90% credible interval (5% and 95%
  quantiles of the draws), P(β1 > 0) and the probability of direction
  pd = max(P(β1 > 0), P(β1 < 0)) (0.5: no idea of the sign; 1: every draw has the same sign).
- **Posterior-predictive checks** on the run's training cells (whose latents the model
  stores): each replicated dataset takes one posterior draw of the gene parameters, a draw of
  every cell's latents (log s, U) and NB counts; per gene its mean, variance and zero fraction
  over the cells is compared with the 5%–95% range of the same statistic over the replicates.
- **Held-out RMSE** on log1p(counts per 10⁴) of cells the model never saw: the genes are cut
  in two halves (even and odd positions); a cell's latents are estimated from one half and
  the other half is predicted (then the halves swap), so no gene's own count informs its
  prediction. Predictions are posterior-predictive expectations of the log-normalised value
  (averaged over NB draws, each normalised by its own total), compared with the model without
  latent factors (U = 0, library from the cell) and with the training cells' mean per
  condition level.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from engine.errors import UserFacingError

LOW, HIGH = 0.05, 0.95  # the 90% credible / predictive interval
INTERVAL = round(HIGH - LOW, 6)
TARGET_SUM = 1e4
VOLCANO_EPS = 1e-3
STATISTICS = {"mean": "mean count", "variance": "variance of counts",
              "zero_fraction": "share of zero counts"}
MARGIN = {"l": 10, "r": 10, "t": 30, "b": 10}
BLOCK = 5000  # cells per block when normalising many cells


# -------------------------------------------------------------------------------- effects
def effects_table(model: Any) -> pd.DataFrame:
    """Return the posterior of the condition effects: one row per gene and non-reference
    level (levels in model order, genes in model order).

    Columns: ``gene``, ``level``, ``mean``, ``sd``, ``q05`` and ``q95`` (the 90% credible
    interval), ``p_positive`` and ``p_negative`` (shares of draws above / below 0), ``pd``
    (probability of direction, max of the two), ``wrong_sign_log10`` (−log10 of the
    probability that the effect has the other sign: from the normal posterior's mean and sd,
    so it keeps growing where the draws' shares stop at 1 / draws), ``direction`` ("up" /
    "down" by the sign of
    the mean), ``ci_excludes_zero``, ``phi_mean`` (NB size φ), ``dispersion_mean`` (1/φ) and
    ``beta0_mean`` (log expression of the reference level relative to an average gene).
    """
    post = model.posterior
    if post is None:
        raise UserFacingError("The Bayesian NB model has not been fitted.")
    genes = [str(g) for g in model.gene_names]
    phi_mean = post.phi.mean(axis=0)
    dispersion = (1.0 / post.phi).mean(axis=0)
    beta0 = post.beta0.mean(axis=0)
    frames = []
    for j, level in enumerate(model.levels[1:]):
        draws = post.beta1[:, j, :]
        mean = draws.mean(axis=0)
        p_pos = (draws > 0).mean(axis=0)
        p_neg = (draws < 0).mean(axis=0)
        low, high = np.quantile(draws, [LOW, HIGH], axis=0)
        frames.append(pd.DataFrame({
            "gene": genes, "level": str(level), "mean": mean, "sd": draws.std(axis=0, ddof=1),
            "q05": low, "q95": high, "p_positive": p_pos, "p_negative": p_neg,
            "pd": np.maximum(p_pos, p_neg), "direction": np.where(mean >= 0, "up", "down"),
            "wrong_sign_log10": _wrong_sign_log10(mean, draws.std(axis=0, ddof=1)),
            "ci_excludes_zero": (low > 0) | (high < 0), "phi_mean": phi_mean,
            "dispersion_mean": dispersion, "beta0_mean": beta0}))
    return pd.concat(frames, ignore_index=True)


def _wrong_sign_log10(mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """−log10 Φ(−|mean| / sd): mean-field ADVI's posterior of β1 is normal, so this is its
    probability of the wrong sign, exact in the tails the draws cannot resolve."""
    from scipy.stats import norm

    return -norm.logsf(np.abs(mean) / np.maximum(sd, 1e-12)) / np.log(10.0)


def top_genes(effects: pd.DataFrame, level: str | None = None, n: int = 20) -> list[str]:
    """Return the ``n`` genes with the largest |posterior mean effect| at ``level`` (default:
    the first non-reference level), largest first."""
    rows = _level_rows(effects, level)
    order = rows["mean"].abs().sort_values(ascending=False, kind="stable").index
    return rows.loc[order, "gene"].head(n).tolist()


def ranked_effects(effects: pd.DataFrame, level: str | None = None) -> pd.DataFrame:
    """Return the rows of ``level`` (default: the first non-reference level), the most certain
    first: by pd, then by |posterior mean| (both descending)."""
    rows = _level_rows(effects, level)
    order = np.lexsort((-rows["mean"].abs().to_numpy(), -rows["pd"].to_numpy()))
    return rows.iloc[order]


def _level_rows(effects: pd.DataFrame, level: str | None) -> pd.DataFrame:
    level = str(effects["level"].iloc[0]) if level is None and len(effects) else level
    return effects[effects["level"] == level]


def fit_summary(model: Any) -> dict[str, Any]:
    """Return what the Posterior page says about a fit: ``steps``, ``converged``,
    ``seconds``, ``method``, ``cells``, ``genes``, ``final_elbo`` (from ``fit_info``),
    ``latent_factors`` (K), ``gene_length_term`` (bool), ``gamma_mean`` / ``gamma_sd`` (the
    shared gene-length coefficient, None without the term), ``condition``, ``reference``,
    ``levels`` and ``posterior_draws``."""
    post = model.posterior
    info = dict(model.fit_info or {})
    with_length = model.log_length is not None
    return {
        "steps": info.get("steps"), "converged": bool(info.get("converged", False)),
        "seconds": info.get("seconds"), "method": info.get("method", ""),
        "cells": info.get("cells", int(post.log_s_mean.size)),
        "genes": info.get("genes", len(model.gene_names)),
        "final_elbo": info.get("final_elbo"),
        "latent_factors": int(post.V.shape[1]), "gene_length_term": with_length,
        "gamma_mean": float(post.gamma.mean()) if with_length else None,
        "gamma_sd": float(post.gamma.std(ddof=1)) if with_length else None,
        "condition": model.condition, "reference": model.levels[0],
        "levels": list(model.levels), "posterior_draws": int(post.n_draws),
    }


# -------------------------------------------------------------------------- effect figures
def elbo_figure(history: dict[str, list[float]] | pd.DataFrame) -> Any:
    """The ELBO trace: the mean ELBO of each window of optimiser steps."""
    import plotly.express as px

    frame = pd.DataFrame(history) if not isinstance(history, pd.DataFrame) else history
    if frame.empty:
        frame = pd.DataFrame({"step": [], "elbo": []})
    figure = px.line(frame, x="step", y="elbo", markers=len(frame) < 50)
    figure.update_layout(height=280, margin=MARGIN, xaxis_title="optimiser step",
                         yaxis_title="ELBO (window mean)")
    return figure


def forest_figure(effects: pd.DataFrame, genes: list[str] | None = None, *,
                  level: str | None = None, top: int = 20) -> Any:
    """Forest plot of β1 at ``level``: the posterior mean and the 90% credible interval of
    each of ``genes`` (default: the ``top`` genes by |mean|), sorted by the mean."""
    import plotly.graph_objects as go

    rows = _level_rows(effects, level)
    genes = list(genes) if genes else top_genes(effects, level, top)
    rows = rows.set_index("gene").reindex([g for g in genes if g in set(rows["gene"])])
    rows = rows.sort_values("mean", kind="stable")
    excludes = rows["ci_excludes_zero"].to_numpy(dtype=bool)
    figure = go.Figure(go.Scatter(
        x=rows["mean"], y=rows.index, mode="markers",
        marker={"color": np.where(excludes, "#d62728", "#1f77b4"), "size": 8},
        error_x={"type": "data", "symmetric": False, "array": rows["q95"] - rows["mean"],
                 "arrayminus": rows["mean"] - rows["q05"], "thickness": 1.5},
        customdata=np.column_stack([rows["q05"], rows["q95"], rows["pd"]]),
        hovertemplate="%{y}: %{x:.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}]"
                      "<br>pd %{customdata[2]:.3f}<extra></extra>"))
    figure.add_vline(x=0, line_dash="dot", line_color="grey")
    level_name = rows["level"].iloc[0] if len(rows) else (level or "")
    figure.update_layout(height=max(260, 22 * len(rows) + 80), margin=MARGIN,
                         xaxis_title=f"β1 ({level_name} vs reference, log scale)",
                         yaxis_title=None, showlegend=False)
    return figure


def volcano_figure(effects: pd.DataFrame, *, level: str | None = None, label_top: int = 10,
                   eps: float = VOLCANO_EPS) -> Any:
    """Volcano-style plot: x the posterior mean of β1 at ``level``, y −log10 of the posterior
    probability of the wrong sign (log axis); the ``label_top`` most certain genes are
    labelled. ``eps`` is kept for callers; the normal tail needs no floor."""
    import plotly.graph_objects as go

    rows = _level_rows(effects, level).copy()
    rows["y"] = rows["wrong_sign_log10"]
    ranked = rows.sort_values("y", ascending=False, kind="stable")
    labelled = set(ranked["gene"].head(label_top))
    figure = go.Figure()
    for excludes, name, colour in ((False, "90% interval covers 0", "#9aa0a6"),
                                   (True, "90% interval excludes 0", "#d62728")):
        part = rows[rows["ci_excludes_zero"] == excludes]
        figure.add_trace(go.Scatter(
            x=part["mean"], y=part["y"], mode="markers", name=name,
            marker={"color": colour, "size": 6, "opacity": 0.75}, text=part["gene"],
            customdata=part["pd"],
            hovertemplate="%{text}: β1 %{x:.3f}, pd %{customdata:.3f}<extra></extra>"))
    top = rows[rows["gene"].isin(labelled)]
    figure.add_trace(go.Scatter(x=top["mean"], y=top["y"], mode="text", text=top["gene"],
                                textposition="top center", showlegend=False,
                                hoverinfo="skip"))
    figure.update_layout(height=420, margin=MARGIN, xaxis_title="posterior mean of β1",
                         yaxis_title="−log10 P(wrong sign)", yaxis_type="log",
                         legend={"orientation": "h", "y": -0.18})
    return figure


def dispersion_figure(effects: pd.DataFrame, observed_mean: pd.Series | None = None) -> Any:
    """Dispersion 1/φ (posterior mean) against mean expression per gene, log-log: the
    observed mean count of the checked cells when ``observed_mean`` (gene → mean) is given,
    else the relative expression exp(β0)."""
    import plotly.graph_objects as go

    genes = effects.drop_duplicates("gene").set_index("gene")
    if observed_mean is not None:
        x = observed_mean.reindex(genes.index).to_numpy(dtype=float)
        title = "observed mean count per cell"
    else:
        x = np.exp(genes["beta0_mean"].to_numpy(dtype=float))
        title = "relative expression exp(β0) (reference level)"
    keep = np.isfinite(x) & (x > 0)
    figure = go.Figure(go.Scatter(
        x=x[keep], y=genes["dispersion_mean"].to_numpy()[keep], mode="markers",
        text=genes.index[keep], marker={"size": 5, "opacity": 0.7},
        hovertemplate="%{text}: mean %{x:.3g}, 1/φ %{y:.3g}<extra></extra>"))
    figure.update_layout(height=380, margin=MARGIN, xaxis_type="log", yaxis_type="log",
                         xaxis_title=title, yaxis_title="dispersion 1/φ (posterior mean)")
    return figure


# ------------------------------------------------------------------- predictive checks
def _column_stats(X: sp.csr_matrix) -> dict[str, np.ndarray]:
    """Per gene (column) over the cells: mean, variance (ddof 1) and share of zeros."""
    n = X.shape[0]
    mean = np.asarray(X.mean(axis=0)).ravel()
    square = np.asarray(X.multiply(X).mean(axis=0)).ravel()
    variance = (square - mean**2) * n / max(n - 1, 1)
    nonzero = np.bincount(X.indices[X.data != 0], minlength=X.shape[1]) if X.nnz else np.zeros(
        X.shape[1])
    return {"mean": mean, "variance": np.maximum(variance, 0.0),
            "zero_fraction": 1.0 - nonzero / max(n, 1)}


def _subsample(n: int, max_cells: int, seed: int) -> np.ndarray:
    if n <= max_cells:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_cells, replace=False))


def _known_levels(model: Any, cells: ad.AnnData) -> np.ndarray:
    """Boolean mask of the cells whose condition is one of the model's levels."""
    if model.condition not in cells.obs:
        raise UserFacingError(f"The cells have no column '{model.condition}', the model's "
                              "condition.")
    return cells.obs[model.condition].astype(str).isin(model.levels).to_numpy()


def predictive_checks(model: Any, cells: ad.AnnData, *, n_draws: int = 50,
                      max_cells: int = 2000, seed: int = 0) -> tuple[pd.DataFrame,
                                                                     dict[str, Any]]:
    """Posterior-predictive checks of the mean, variance and zero fraction of every gene.

    ``cells`` are the run's training cells (their stored latents are used; cells the model
    never saw get MAP latents from their counts). At most ``max_cells`` cells (a seeded
    subset) are checked against ``n_draws`` replicated datasets.

    Returns (checks, summary): ``checks`` has one row per gene and statistic with
    ``observed``, ``low`` / ``median`` / ``high`` (5%, 50%, 95% of the replicates), ``inside``
    (low ≤ observed ≤ high) and ``ppp`` (the posterior-predictive p-value: share of replicates
    above the observed value, ties counted half);
    ``summary`` has ``coverage`` (share of genes inside, per statistic), ``n_cells``,
    ``n_genes``, ``n_draws``, ``interval`` and ``latents`` ("stored" / "estimated" counts).
    """
    if n_draws < 2:
        raise UserFacingError("Posterior-predictive checks need at least 2 replicated datasets.")
    post = model.posterior
    cells = cells[_known_levels(model, cells)]
    rows = _subsample(cells.n_obs, max_cells, seed)
    if rows.size == 0:
        raise UserFacingError("None of the cells is in one of the model's conditions; there is "
                              "nothing to check.")
    subset = cells[rows]
    subset = subset.to_memory() if subset.isbacked else subset
    counts = model.cell_counts(subset)
    codes = model.codes_of(subset.obs[model.condition])
    names = subset.obs_names.astype(str).to_numpy()
    position = pd.Index(model.cell_names.astype(str)).get_indexer(names)
    known = position >= 0
    k = post.V.shape[1]
    log_s_mean, log_s_sd = np.zeros(rows.size), np.zeros(rows.size)
    U_mean, U_sd = np.zeros((rows.size, k)), np.zeros((rows.size, k))
    log_s_mean[known], log_s_sd[known] = (post.log_s_mean[position[known]],
                                          post.log_s_sd[position[known]])
    U_mean[known], U_sd[known] = post.U_mean[position[known]], post.U_sd[position[known]]
    if not known.all():
        unknown = np.flatnonzero(~known)
        log_s_mean[unknown], U_mean[unknown] = model.cell_latents(counts[unknown],
                                                                  codes[unknown])
    rng = np.random.default_rng(seed)
    chosen = rng.choice(post.n_draws, size=n_draws, replace=n_draws > post.n_draws)
    replicated: dict[str, list[np.ndarray]] = {name: [] for name in STATISTICS}
    for draw in chosen:
        X = model.draw_counts(codes, log_s_mean, log_s_sd, U_mean, U_sd, rng, draw=int(draw))
        for name, values in _column_stats(X).items():
            replicated[name].append(values)
    observed = _column_stats(counts)
    genes = [str(g) for g in model.gene_names]
    frames = []
    for name in STATISTICS:
        stack = np.vstack(replicated[name])
        low, median, high = np.quantile(stack, [LOW, 0.5, HIGH], axis=0)
        frames.append(pd.DataFrame({
            "gene": genes, "statistic": name, "observed": observed[name], "low": low,
            "median": median, "high": high,
            "inside": (observed[name] >= low) & (observed[name] <= high),
            "ppp": ((stack > observed[name][None, :]).mean(axis=0)
                    + 0.5 * (stack == observed[name][None, :]).mean(axis=0))}))
    checks = pd.concat(frames, ignore_index=True)
    summary = {"coverage": {name: float(checks.loc[checks["statistic"] == name,
                                                   "inside"].mean())
                            for name in STATISTICS},
               "n_cells": int(rows.size), "n_genes": len(genes), "n_draws": int(n_draws),
               "interval": INTERVAL,
               "latents": {"stored": int(known.sum()), "estimated": int((~known).sum())}}
    return checks, summary


def coverage_table(checks: pd.DataFrame) -> pd.DataFrame:
    """Per statistic: ``statistic`` (its label), ``genes_inside``, ``genes`` and
    ``share_inside`` (of the 90% posterior-predictive interval)."""
    grouped = checks.groupby("statistic", sort=False)["inside"]
    table = pd.DataFrame({"genes_inside": grouped.sum().astype(int),
                          "genes": grouped.size().astype(int)})
    table["share_inside"] = table["genes_inside"] / table["genes"]
    table = table.reindex([s for s in STATISTICS if s in table.index])
    table.index = [STATISTICS[s] for s in table.index]
    return table.rename_axis("statistic").reset_index()


def observed_means(checks: pd.DataFrame) -> pd.Series:
    """The observed mean count per gene (gene → mean) of the cells a check used."""
    rows = checks[checks["statistic"] == "mean"]
    return pd.Series(rows["observed"].to_numpy(), index=rows["gene"].to_numpy())


def ppc_interval_figure(checks: pd.DataFrame, genes: list[str]) -> Any:
    """For ``genes``: per statistic (one panel each) the 90% posterior-predictive interval
    (bar), its median (tick) and the observed value (dot; red when outside)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = [s for s in STATISTICS if s in set(checks["statistic"])]
    figure = make_subplots(rows=1, cols=len(names), shared_yaxes=True,
                           subplot_titles=[STATISTICS[s] for s in names],
                           horizontal_spacing=0.04)
    for col, name in enumerate(names, start=1):
        rows = checks[checks["statistic"] == name].set_index("gene")
        rows = rows.reindex([g for g in genes if g in rows.index])
        figure.add_trace(go.Scatter(
            x=rows["median"], y=rows.index, mode="markers", name="predictive 90% interval",
            marker={"symbol": "line-ns-open", "size": 10, "color": "#1f77b4"},
            error_x={"type": "data", "symmetric": False, "array": rows["high"] - rows["median"],
                     "arrayminus": rows["median"] - rows["low"], "thickness": 6, "width": 0},
            showlegend=col == 1, legendgroup="interval",
            hovertemplate="%{y}: predictive median %{x:.3g}<extra></extra>"), row=1, col=col)
        inside = rows["inside"].to_numpy(dtype=bool)
        figure.add_trace(go.Scatter(
            x=rows["observed"], y=rows.index, mode="markers", name="observed",
            marker={"size": 8, "color": np.where(inside, "black", "#d62728")},
            showlegend=col == 1, legendgroup="observed",
            hovertemplate="%{y}: observed %{x:.3g}<extra></extra>"), row=1, col=col)
    figure.update_layout(height=max(280, 24 * len(genes) + 100), margin=MARGIN,
                         legend={"orientation": "h", "y": -0.12})
    return figure


def ppc_scatter_figure(checks: pd.DataFrame) -> Any:
    """All genes, one panel per statistic: observed value (x) against the posterior-predictive
    median (y), red when the observed value lies outside the 90% interval; the diagonal is
    where they agree (mean and variance on log axes)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = [s for s in STATISTICS if s in set(checks["statistic"])]
    figure = make_subplots(rows=1, cols=len(names), subplot_titles=[STATISTICS[s]
                                                                     for s in names],
                           horizontal_spacing=0.07)
    for col, name in enumerate(names, start=1):
        rows = checks[checks["statistic"] == name]
        for inside, label, colour in ((True, "inside the 90% interval", "#1f77b4"),
                                      (False, "outside", "#d62728")):
            part = rows[rows["inside"] == inside]
            figure.add_trace(go.Scatter(
                x=part["observed"], y=part["median"], mode="markers", name=label,
                text=part["gene"], marker={"size": 5, "color": colour, "opacity": 0.7},
                showlegend=col == 1, legendgroup=label,
                hovertemplate="%{text}: observed %{x:.3g}, predictive %{y:.3g}<extra></extra>"),
                row=1, col=col)
        values = rows[["observed", "median"]].to_numpy(dtype=float)
        positive = values[values > 0]
        log_axes = name != "zero_fraction" and positive.size > 0
        lo = positive.min() if log_axes else 0.0
        hi = values.max() if values.size else 1.0
        figure.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", showlegend=False,
                                    line={"dash": "dot", "color": "grey"}, hoverinfo="skip"),
                         row=1, col=col)
        if log_axes:
            figure.update_xaxes(type="log", row=1, col=col)
            figure.update_yaxes(type="log", row=1, col=col)
        figure.update_xaxes(title_text="observed", row=1, col=col)
    figure.update_yaxes(title_text="predictive median", row=1, col=1)
    figure.update_layout(height=380, margin=MARGIN, legend={"orientation": "h", "y": -0.25})
    return figure


# ----------------------------------------------------------------------- held-out RMSE
def _log_normalise(X: sp.spmatrix | np.ndarray) -> np.ndarray:
    """log1p(counts per 10⁴) of a (cells × genes) count matrix, dense (each row normalised by
    its own total; an all-zero row stays zero)."""
    dense = X.toarray() if sp.issparse(X) else np.asarray(X)
    dense = dense.astype(np.float64)
    library = dense.sum(axis=1, keepdims=True)
    return np.log1p(dense * (TARGET_SUM / np.maximum(library, 1.0)))


def level_means(model: Any, cells: ad.AnnData) -> np.ndarray:
    """The mean log1p(counts per 10⁴) over the model's genes (normalised over those genes)
    of ``cells`` per condition level: levels × genes (NaN for a level without cells)."""
    known = _known_levels(model, cells)
    n_levels, n_genes = len(model.levels), len(model.gene_names)
    sums = np.zeros((n_levels, n_genes))
    totals = np.zeros(n_levels)
    rows = np.flatnonzero(known)
    for start in range(0, rows.size, BLOCK):
        part = cells[rows[start:start + BLOCK]]
        part = part.to_memory() if part.isbacked else part
        X = model.cell_counts(part)
        library = np.asarray(X.sum(axis=1)).ravel()
        scaled = sp.csr_matrix(sp.diags(TARGET_SUM / np.maximum(library, 1.0)) @ X)
        scaled.data = np.log1p(scaled.data)
        codes = model.codes_of(part.obs[model.condition])
        indicator = sp.csr_matrix((np.ones(codes.size), (codes, np.arange(codes.size))),
                                  shape=(n_levels, codes.size))
        sums += np.asarray((indicator @ scaled).todense())
        totals += np.bincount(codes, minlength=n_levels)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / totals[:, None]


def _expected_log_normalised(model: Any, codes: np.ndarray, log_s: np.ndarray,
                             U: np.ndarray, n_draws: int, rng: np.random.Generator
                             ) -> np.ndarray:
    """E[log1p(counts per 10⁴)] of the model's genes under the posterior predictive, for
    cells with fixed latents: the mean over ``n_draws`` NB draws (a posterior draw of the
    gene parameters per cell), each normalised by its own total."""
    total = np.zeros((codes.size, len(model.gene_names)))
    zeros_s, zeros_u = np.zeros(codes.size), np.zeros_like(U)
    for _ in range(n_draws):
        total += _log_normalise(model.draw_counts(codes, log_s, zeros_s, U, zeros_u, rng))
    return total / n_draws


def heldout_rmse(model: Any, heldout: ad.AnnData, train: ad.AnnData, *, max_cells: int = 2000,
                 n_draws: int = 50, seed: int = 0) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Held-out predictive RMSE on log1p(counts per 10⁴) over the model's genes.

    For at most ``max_cells`` of ``heldout`` (cells the model never saw; a seeded subset of
    those with counts in the model's genes and a known condition), genes at even positions
    predict those at odd positions and vice versa: the cell's latents (log s, U) are MAP
    estimates from one half (:meth:`cell_latents` with ``genes``), and the other half is
    predicted as the posterior-predictive mean of its log-normalised value (the average over
    ``n_draws`` NB draws; fewer draws add Monte-Carlo noise, which only raises the model's
    RMSE). Compared with the model without latent factors (U = 0; log s from the cell's
    counts in the first half) and a baseline: the mean log-normalised expression of the
    ``train`` cells in the cell's condition level.

    Returns (table, summary): ``table`` has one row per ``method`` with its ``rmse``;
    ``summary`` has ``rmse`` ({method: value}), ``n_cells``, ``n_genes``, ``n_draws`` and
    ``skipped`` (held-out cells left out: no counts in the model's genes or an unknown
    condition).
    """
    known = _known_levels(model, heldout)
    cells = heldout[known]
    cells = cells.to_memory() if cells.isbacked else cells
    counts = model.cell_counts(cells)
    measured = np.asarray(counts.sum(axis=1)).ravel() > 0
    usable = np.flatnonzero(measured)
    rows = usable[_subsample(usable.size, max_cells, seed)]
    if rows.size == 0:
        raise UserFacingError("None of the held-out cells has counts in the model's genes and "
                              "a condition the model knows; there is nothing to predict.")
    counts = counts[rows]
    codes = model.codes_of(cells.obs[model.condition].to_numpy()[rows])
    observed = _log_normalise(counts)
    n_genes = observed.shape[1]
    halves = (np.arange(0, n_genes, 2), np.arange(1, n_genes, 2))
    rng = np.random.default_rng(seed)
    k = model.posterior.V.shape[1]
    full = np.zeros_like(observed)
    plain = np.zeros_like(observed)
    base = model.mean_expression(codes, np.zeros(rows.size), np.zeros((rows.size, k)))
    dense = counts.toarray()
    for known_half, hidden in (halves, halves[::-1]):
        if hidden.size == 0:
            continue
        log_s, U = model.cell_latents(counts, codes, genes=known_half)
        full[:, hidden] = _expected_log_normalised(model, codes, log_s, U, n_draws,
                                                   rng)[:, hidden]
        library = np.maximum(dense[:, known_half].sum(axis=1), 0.5)
        log_s0 = np.log(library / base[:, known_half].sum(axis=1))
        plain[:, hidden] = _expected_log_normalised(
            model, codes, log_s0, np.zeros((rows.size, k)), n_draws, rng)[:, hidden]
    baseline = level_means(model, train)[codes]
    if np.isnan(baseline).any():
        missing = [model.levels[c] for c in np.unique(codes)
                   if np.isnan(baseline[codes == c]).any()]
        raise UserFacingError(f"The training cells have no cells in {', '.join(missing)}; the "
                              "baseline needs every condition level.")

    def rmse(predicted: np.ndarray) -> float:
        return float(np.sqrt(np.mean((predicted - observed) ** 2)))

    values = {"model": rmse(full), "model_without_factors": rmse(plain),
              "baseline": rmse(baseline)}
    labels = {"model": f"Bayesian NB (latent factors, K = {k})",
              "model_without_factors": "Bayesian NB without latent factors (U = 0)",
              "baseline": "Training mean per condition level"}
    table = pd.DataFrame({"method": list(values), "label": [labels[m] for m in values],
                          "rmse": list(values.values())})
    summary = {"rmse": values, "n_cells": int(rows.size), "n_genes": int(n_genes),
               "n_draws": int(n_draws), "skipped": int(heldout.n_obs - usable.size),
               "scale": "log1p(counts per 10^4) over the model's genes"}
    return table, summary


# ------------------------------------------------------------------------------ the result
@dataclass
class PosteriorChecks:
    """The stored result of the ``posterior_checks`` task: per gene and statistic checks,
    held-out RMSE per method (empty without held-out cells) and a JSON summary."""

    checks: pd.DataFrame
    summary: dict[str, Any]
    rmse: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(
        {"method": [], "label": [], "rmse": []}))

    def save(self, folder: Path) -> None:
        """Write ``checks.parquet``, ``rmse.csv`` and ``summary.json`` into ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        self.checks.to_parquet(folder / "checks.parquet", index=False)
        self.rmse.to_csv(folder / "rmse.csv", index=False)
        (folder / "summary.json").write_text(json.dumps(self.summary, indent=1))

    @classmethod
    def load(cls, folder: Path) -> PosteriorChecks:
        """Read a result written by :meth:`save`."""
        return cls(checks=pd.read_parquet(folder / "checks.parquet"),
                   summary=json.loads((folder / "summary.json").read_text()),
                   rmse=pd.read_csv(folder / "rmse.csv"))


def run_checks(model: Any, train: ad.AnnData, heldout: ad.AnnData | None, *, n_draws: int = 50,
               max_cells: int = 2000, seed: int = 0) -> PosteriorChecks:
    """Predictive checks on ``train`` (the run's training cells) and, when ``heldout`` has
    cells, the held-out RMSE (its predictions average ``n_draws`` draws too); return them as
    one :class:`PosteriorChecks` (its summary has ``checks`` and ``heldout``, None without
    held-out cells)."""
    checks, check_summary = predictive_checks(model, train, n_draws=n_draws,
                                              max_cells=max_cells, seed=seed)
    summary: dict[str, Any] = {"checks": check_summary, "heldout": None}
    result = PosteriorChecks(checks=checks, summary=summary)
    if heldout is not None and heldout.n_obs:
        result.rmse, summary["heldout"] = heldout_rmse(model, heldout, train,
                                                       max_cells=max_cells, n_draws=n_draws,
                                                       seed=seed)
    return result
