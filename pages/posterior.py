"""Posterior: what a Bayesian negative-binomial run learnt (condition effects with credible
intervals, dispersion, the ELBO trace) and how well it fits (posterior-predictive checks on
the training cells, predictive error on held-out cells)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from engine.errors import UserFacingError
from engine.evaluate import posterior as PO
from engine.generators.registry import list_generators
from engine.tasks import load_model
from pages._ui import current, job_panel, jobs, page_setup, plotly, workspace

METHODS = {"advi": "mean-field ADVI", "fullrank_advi": "full-rank ADVI"}

page_setup("Posterior")
st.caption("A Bayesian negative-binomial model gives every gene a posterior: how sure it is "
           "of each condition effect, how overdispersed the gene's counts are, and whether "
           "data drawn from the fitted model look like the real cells.")

ws = workspace()
capable = {g.name: g.label for g in list_generators() if g.capabilities.posterior}
runs = {r.key: r for r in ws.list_runs() if r.status == "done" and r.generator in capable}
if not runs:
    st.info("No Bayesian model in the workspace yet: train a **Bayesian negative binomial** "
            "model on the Train page.")
    st.page_link("pages/train.py", label="Train a model", icon=":material/model_training:")
    st.stop()


def run_label(key: str) -> str:
    """E.g. "Bayesian negative binomial (PyMC, ADVI) · 1a2b3c4d · kang.h5ad (500 genes)"."""
    run = runs[key]
    dataset = ws.get_dataset(run.dataset_id) if run.dataset_id else None
    return (f"{capable[run.generator]} · {key[:8]} · {dataset.name if dataset else 'no dataset'}"
            f" ({run.n_genes:,} genes)")


keys = list(runs)
run_key = st.selectbox(
    "Model", keys, index=keys.index(current("run_key")) if current("run_key") in keys else 0,
    format_func=run_label, key="po_run")


@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def cached_model(key: str, root: str) -> Any:
    """The fitted model of a run, loaded once per process (read-only)."""
    return load_model(ws, key)


@st.cache_data(max_entries=8, show_spinner="Summarising the posterior…")
def cached_effects(key: str, root: str) -> pd.DataFrame:
    return PO.effects_table(cached_model(key, root))


@st.cache_resource(max_entries=8, show_spinner="Reading the checks…")
def load_checks(path: str, mtime_ns: int) -> PO.PosteriorChecks:
    return PO.PosteriorChecks.load(Path(path))


def stored_checks() -> dict[str, dict[str, Any]]:
    """{result id: summary} of the chosen run's stored checks, newest first."""
    return ws.stored_results(run_key, "posterior")


def checks_label(summary: dict[str, Any]) -> str:
    """E.g. "50 replicates · 2,000 cells · seed 0"."""
    request = summary.get("request", {})
    checks = summary.get("checks", {})
    return (f"{checks.get('n_draws', request.get('n_draws', '?'))} replicates · "
            f"{checks.get('n_cells', 0):,} cells · seed {request.get('seed', 0)}")


try:
    model = cached_model(run_key, str(ws.root))
    effects = cached_effects(run_key, str(ws.root))
except (UserFacingError, OSError, ValueError) as exc:
    st.error(f"The model of this run cannot be read: {exc}")
    st.stop()
info = PO.fit_summary(model)
summaries = stored_checks()
stored_key = f"po_stored.{run_key}"
if st.session_state.get(stored_key) not in summaries:
    made = st.session_state.get("po_result") or (None, None)
    st.session_state[stored_key] = (made[1] if made[0] == run_key and made[1] in summaries
                                    else next(iter(summaries), None))
checks_id = st.session_state.get(stored_key)
checks = None
if checks_id:
    folder = ws.evaluation_dir(run_key, checks_id, kind="posterior")
    try:
        checks = load_checks(str(folder), (folder / "summary.json").stat().st_mtime_ns)
    except (OSError, ValueError):
        st.warning("Those checks are no longer readable in the workspace; run them again.")

# -- the fit ----------------------------------------------------------------------------------
st.subheader("The fit")
cols = st.columns(4)
cols[0].metric("Optimiser steps", f"{info['steps']:,}" if info["steps"] is not None else "—")
cols[1].metric("Converged", "yes" if info["converged"] else "no")
cols[2].metric("Fit time", f"{info['seconds']:.1f} s" if info["seconds"] is not None else "—")
cols[3].metric("Inference", METHODS.get(info["method"], info["method"] or "—"))
others = ", ".join(f"**{lv}**" for lv in info["levels"][1:])
st.markdown(f"{info['cells']:,} training cells × {info['genes']:,} genes; condition "
            f"**{info['condition']}** with reference level **{info['reference']}**: the "
            f"effects of {others} are measured against it. {info['posterior_draws']} posterior "
            "draws of the gene parameters are kept.")
k = info["latent_factors"]
if k:
    st.markdown(f"**K = {k} latent factors.** The per-cell, per-gene term w is low rank, "
                "w = U·V (U: cells × K, V: K × genes): it carries the cell-to-cell structure "
                "(cell types, states) that the condition does not.")
else:
    st.markdown("**No latent factors (K = 0):** besides its library size and condition, a "
                "cell has no term of its own.")
if info["gene_length_term"]:
    st.markdown(f"**Gene-length term:** present; the shared coefficient γ = "
                f"{info['gamma_mean']:.3f} (posterior sd {info['gamma_sd']:.3f}).")
else:
    st.markdown("**Gene-length term:** left out: no gene-length table was supplied.")
if not info["converged"]:
    st.caption("The ELBO had not settled when training stopped at its step limit; more "
               "steps may still move the estimates.")
st.caption("ELBO (evidence lower bound, higher is better) averaged over each window of "
           "optimiser steps; minibatches make single steps noisy.")
plotly(PO.elbo_figure(model.history), key="po_elbo")

# -- condition effects --------------------------------------------------------------------------
st.subheader("Condition effects")
levels = info["levels"][1:]
level = (st.selectbox("Effect of", levels, key="po_level",
                      help=f"Each level is compared with {info['reference']}.")
         if len(levels) > 1 else levels[0])
st.caption(f"β1: the change of log mean expression in **{level}** vs **{info['reference']}** "
           "(natural log; 0.69 doubles). Dots: posterior means; bars: 90% credible intervals; "
           "red: intervals that exclude 0.")
gene_names = [str(g) for g in model.gene_names]
genes = st.multiselect("Genes in the forest plot", gene_names,
                       default=PO.top_genes(effects, level, 20), key=f"po_genes.{run_key}.{level}",
                       help="By default the 20 genes with the largest |effect|.")
if genes:
    plotly(PO.forest_figure(effects, genes, level=level), key="po_forest")
else:
    st.caption("Pick genes to draw the forest plot.")
st.caption("Every gene: the posterior mean effect against the posterior probability that "
           "the effect has the other sign (−log10, log axis; 0.3 means a coin toss, 2 one in a "
           "hundred). Red: the 90% interval excludes 0. The most certain genes are labelled.")
plotly(PO.volcano_figure(effects, level=level), key="po_volcano")
observed = PO.observed_means(checks.checks) if checks is not None else None
st.caption("Dispersion 1/φ (the NB variance is μ + μ²/φ, so 0 is Poisson) against mean "
           + ("count per cell of the checked cells." if observed is not None else
              "expression exp(β0); run the predictive checks to use observed mean counts."))
plotly(PO.dispersion_figure(effects, observed), key="po_dispersion")
st.caption("The effects, the most certain first (by pd, then by size); the download holds "
           "every gene and level.")
shown = PO.ranked_effects(effects, level)
st.dataframe(shown.drop(columns=["level"]).head(200).style.format(
    {"mean": "{:+.3f}", "sd": "{:.3f}", "q05": "{:+.3f}", "q95": "{:+.3f}",
     "p_positive": "{:.3f}", "p_negative": "{:.3f}", "pd": "{:.3f}", "phi_mean": "{:.3g}",
     "dispersion_mean": "{:.3g}", "beta0_mean": "{:+.3f}"}), hide_index=True, width="stretch")
cols = st.columns(2)
cols[0].download_button("Download the effects table (CSV)",
                        effects.to_csv(index=False).encode(),
                        file_name=f"effects_{run_key[:8]}.csv", mime="text/csv",
                        key="po_effects_csv")
netcdf = ws.run_dir(run_key) / "model" / "posterior.nc"
if netcdf.exists():
    cols[1].download_button("Download the posterior (NetCDF, ArviZ)", netcdf.read_bytes,
                            file_name=f"posterior_{run_key[:8]}.nc",
                            mime="application/x-netcdf", key="po_netcdf")

# -- checks ------------------------------------------------------------------------------------
st.subheader("Does the model fit?")
st.caption("Posterior-predictive checks: replicated datasets drawn from the fitted model (one "
           "posterior draw each) for the training cells, compared gene by gene with the real "
           "counts in mean, variance and share of zeros. Held-out error: for cells the model "
           "never saw, half the genes predict the other half, on log1p(counts per 10⁴).")
cols = st.columns(3)
n_draws = cols[0].number_input("Replicated datasets", min_value=2, max_value=1000, value=50,
                               step=10, key="po_draws")
max_cells = cols[1].number_input("Cells at most", min_value=10, max_value=100_000, value=2000,
                                 step=500, key="po_cells")
seed = cols[2].number_input("Seed", min_value=0, value=0, step=1, key="po_seed")
if st.button("Run the checks", type="primary", key="po_go"):
    st.session_state["po_job"] = jobs().submit(
        "posterior_checks", {"run_key": run_key, "n_draws": int(n_draws),
                             "max_cells": int(max_cells), "seed": int(seed)},
        title=f"Posterior checks {run_key[:8]}")


def remember(job: Any) -> None:
    made = (job.result["run_key"], job.result["posterior_id"])
    st.session_state["po_result"] = made
    st.session_state[f"po_stored.{made[0]}"] = made[1]  # show it (before the selectbox)


job_panel("po_job", on_done=remember)

if summaries and checks is not None:
    st.selectbox("Stored checks", list(summaries), key=stored_key,
                 format_func=lambda i: checks_label(summaries[i]),
                 help="Every check of this model stays in the workspace; newest first.")
    summary = checks.summary
    st.markdown(f"**{summary['checks']['n_cells']:,}** training cells, "
                f"**{summary['checks']['n_draws']}** replicated datasets: share of genes whose "
                "observed statistic lies inside its 90% posterior-predictive interval (about "
                "90% when the model fits).")
    st.dataframe(PO.coverage_table(checks.checks).style.format({"share_inside": "{:.1%}"}),
                 hide_index=True, width="stretch", key="po_coverage")
    ppc_genes = st.multiselect("Genes to check", gene_names,
                               default=PO.top_genes(effects, level, 10),
                               key=f"po_ppc_genes.{run_key}.{level}",
                               help="By default the 10 genes with the largest |effect|.")
    if ppc_genes:
        plotly(PO.ppc_interval_figure(checks.checks, ppc_genes), key="po_ppc_genes_fig")
    st.caption("All genes: observed against the median of the replicates; red genes lie "
               "outside their 90% interval.")
    plotly(PO.ppc_scatter_figure(checks.checks), key="po_ppc_scatter")
    heldout = summary.get("heldout")
    if heldout:
        st.markdown(f"**Held-out RMSE** on {heldout['n_cells']:,} cells the model never saw × "
                    f"{heldout['n_genes']:,} genes (log1p of counts per 10⁴; lower is better):")
        st.dataframe(checks.rmse[["label", "rmse"]].rename(columns={"label": "prediction"})
                     .style.format({"rmse": "{:.4f}"}), hide_index=True, width="stretch",
                     key="po_rmse")
        st.caption("Each cell's latents are estimated from the genes at even positions to "
                   "predict those at odd positions, and the other way round, so no gene's own "
                   "count informs its prediction; a prediction is the mean log-normalised "
                   "value over as many draws from the model as there are replicated datasets. "
                   "Without latent factors: U = 0, library from the cell. Baseline: the "
                   "training cells' mean in the cell's condition.")
    else:
        st.caption("No held-out RMSE: the run was trained without a split, so there are no "
                   "held-out cells.")
