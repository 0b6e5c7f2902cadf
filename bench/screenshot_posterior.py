"""The README's picture of the Posterior page (docs/posterior.png): copy a workspace that holds
a fitted Bayesian negative-binomial run (and, ideally, its stored posterior-predictive checks)
to a scratch folder, make that run the current one, open the Posterior page of
``streamlit run app.py`` in Debian's chromium (Playwright) and screenshot the page from its
title down to the volcano plot: the fit, the ELBO trace, the forest plot and the volcano.
Prints the picture's path and the fit's key numbers as JSON. The source workspace is only read.

How docs/posterior.png was made (Kang 2k, donor split, 1,000 genes, generator bayes-nb, run
300e540d754b43c0 in /tmp/ws_bnb):

    SYNTHCELL_WORKSPACE=/tmp/ws_bnb .venv/bin/python -m engine posterior --run 300e540d754b43c0
    PYTHONPATH=. .venv/bin/python bench/screenshot_posterior.py --workspace /tmp/ws_bnb

    PYTHONPATH=. .venv/bin/python bench/screenshot_posterior.py --workspace DIR
        [--run KEY]             # default: the workspace's current run if Bayesian, else the
                                # newest finished Bayesian run
        [--out docs/posterior.png]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from screenshot_design import CHROMIUM, CHROMIUM_ARGS, serve  # noqa: E402  (one server start)

WIDTH = 1400


def prepare(source: Path, root: Path, run_key: str | None) -> dict[str, Any]:
    """Copy the workspace ``source`` to ``root`` and make the chosen Bayesian run current
    there; return the run key and its fit summary."""
    from engine.evaluate import posterior as PO
    from engine.generators.registry import list_generators
    from engine.store import Workspace
    from engine.tasks import load_model

    shutil.copytree(source, root, symlinks=True)
    ws = Workspace(root)
    capable = {g.name for g in list_generators() if g.capabilities.posterior}
    runs = {r.key: r for r in ws.list_runs() if r.status == "done" and r.generator in capable}
    if not runs:
        raise SystemExit(f"no finished Bayesian run in {source}")
    if run_key is None:
        state_key = ws.state().get("run_key")
        run_key = state_key if state_key in runs else next(iter(runs))
    if run_key not in runs:
        raise SystemExit(f"run {run_key} is not a finished Bayesian run in {source}")
    run = runs[run_key]
    ws.set_state(dataset_id=run.dataset_id, split_id=run.split_id, run_key=run_key)
    checks = sorted((ws.evaluation_dir(run_key, None, kind="posterior").parent)
                    .glob("*/summary.json"))
    info = PO.fit_summary(load_model(ws, run_key))
    return {"run_key": run_key, "generator": run.generator, "n_checks": len(checks),
            "fit": {k: info[k] for k in ("cells", "genes", "steps", "converged", "seconds",
                                         "method", "condition", "reference", "levels",
                                         "latent_factors", "posterior_draws")}}


def screenshot(url: str, out: Path, run_key: str) -> dict[str, Any]:
    """Open the Posterior page, wait until it has drawn the fit and its plots, and save the
    page from its title down to the volcano plot as ``out``."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": WIDTH, "height": 1000},
                                    device_scale_factor=1)
            page.goto(f"{url}/posterior")
            title = page.get_by_role("heading", name="Posterior", exact=True)
            expect(title).to_be_visible(timeout=120_000)
            expect(page.get_by_role("heading", name="The fit")).to_be_visible(timeout=180_000)
            expect(page.get_by_text(run_key[:8]).first).to_be_visible(timeout=60_000)
            expect(page.get_by_role("heading", name="Does the model fit?")).to_be_visible(
                timeout=180_000)
            # ELBO, forest, volcano, dispersion (and, with stored checks, two more)
            charts = page.get_by_test_id("stPlotlyChart")
            expect(charts.nth(3)).to_be_visible(timeout=120_000)
            page.wait_for_selector('[data-testid="stStatusWidget"]', state="detached",
                                   timeout=120_000)
            if page.get_by_test_id("stException").count():
                raise SystemExit("the Posterior page shows an exception")
            volcano = charts.nth(2)
            # Streamlit scrolls inside its own container: a viewport as tall as the part
            # wanted shows it whole; the title goes to the top.
            top = title.bounding_box()["y"]
            box = volcano.bounding_box()
            height = int(min(max(box["y"] + box["height"] - top + 140, 1000), 4000))
            page.set_viewport_size({"width": WIDTH, "height": height})
            page.wait_for_timeout(500)
            page.evaluate("window.scrollTo(0, 0)")
            title.evaluate("e => e.scrollIntoView({block: 'start'})")
            page.wait_for_timeout(2000)  # plotly re-lays out to the new size
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
            return {"width": WIDTH, "height": height}
        finally:
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, required=True,
                        help="a workspace with a fitted Bayesian run (copied, not changed)")
    parser.add_argument("--run", default=None, help="run key (default: the current run)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "posterior.png")
    args = parser.parse_args()
    if not (args.workspace / "runs").is_dir():
        raise SystemExit(f"{args.workspace} is not a workspace")
    if not Path(CHROMIUM).exists():
        raise SystemExit("Debian's chromium is missing (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="synthcell_posterior_") as scratch:
        root = Path(scratch) / "workspace"
        made = prepare(args.workspace.resolve(), root, args.run)
        with serve(root) as url:
            size = screenshot(url, args.out.resolve(), made["run_key"])
    print(json.dumps({"screenshot": str(args.out.resolve()), **size,
                      "bytes": args.out.resolve().stat().st_size, **made}, indent=1))


if __name__ == "__main__":
    main()
