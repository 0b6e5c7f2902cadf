"""The README's picture of the Design page (docs/design.png): in a temporary workspace, import
Kang, split it by donor, train the conditional diffusion model (2,000 steps), design
CD14+ monocytes with interferon genes up and CCL2 down, then open the Design page of
``streamlit run app.py`` in Debian's chromium (Playwright) and screenshot the stored design's
report. Prints the picture's path and the design's key numbers as JSON.

    PYTHONPATH=. .venv/bin/python bench/screenshot_design.py [--out docs/design.png]
        [--workspace DIR]  # keep the workspace (default: a temporary one, removed)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
KANG = REPO.parent / "shared" / "data" / "kang_ifnb_pbmc" / "kang_ifnb_pbmc_2k.h5ad"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run",
]
WIDTH = 1400
UP, DOWN = ["ISG15", "IFI6"], ["CCL2"]
FALLBACK_UP = ["IFIT3", "MX1", "ISG20", "IFIT1", "LY6E", "IFITM3"]
FALLBACK_DOWN = ["CD74", "HLA-DRA", "S100A8", "LYZ"]
START = {"cell_type": "CD14+ Monocytes"}


def _pick(wanted: list[str], fallback: list[str], genes: set[str], n: int,
          taken: set[str]) -> list[str]:
    """``wanted`` genes the model has, topped up from ``fallback`` (then any) to ``n``."""
    chosen = [g for g in wanted if g in genes and g not in taken]
    for gene in [*fallback, *sorted(genes)]:
        if len(chosen) >= n:
            break
        if gene in genes and gene not in taken and gene not in chosen:
            chosen.append(gene)
    return chosen


def prepare(root: Path) -> dict[str, Any]:
    """Import, split, train and design in the workspace ``root``; return what was made."""
    from engine.cli import ConsoleContext
    from engine.store import Workspace
    from engine.tasks import design, import_dataset, load_model, split_dataset, train_generator

    ws = Workspace(root)
    ctx = ConsoleContext(ws, quiet=True)
    clock = time.monotonic()
    dataset_id = import_dataset({"path": str(KANG)}, ctx)["dataset_id"]
    record = ws.get_dataset(dataset_id)
    split_id = split_dataset({"dataset_id": dataset_id, "donor_col": record.roles.get("donor"),
                              "stratify": ["cell_type"], "test_fraction": 0.25, "seed": 0},
                             ctx)["split_id"]
    train_start = time.monotonic()
    run_key = train_generator({"generator": "diffusion", "dataset_id": dataset_id,
                               "split_id": split_id, "seed": 0,
                               "config": {"train_steps": 2000}}, ctx)["run_key"]
    train_s = time.monotonic() - train_start
    genes = {str(g) for g in load_model(ws, run_key).gene_names}
    up = _pick(UP, FALLBACK_UP, genes, 2, set())
    down = _pick(DOWN, FALLBACK_DOWN, genes, 1, set(up))
    design_start = time.monotonic()
    made = design({"run_key": run_key, "up": up, "down": down, "start": START,
                   "n_cells": 300}, ctx)
    design_s = time.monotonic() - design_start
    ws.set_state(dataset_id=dataset_id, split_id=split_id, run_key=run_key)
    summary = json.loads((ws.evaluation_dir(run_key, made["design_id"], kind="designs")
                          / "summary.json").read_text())
    return {"run_key": run_key, "design_id": made["design_id"], "up": up, "down": down,
            "summary": summary, "train_s": round(train_s, 1), "design_s": round(design_s, 1),
            "prepare_s": round(time.monotonic() - clock, 1)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(workspace: Path) -> Iterator[str]:
    """``streamlit run app.py`` on a free port over ``workspace``; yield its URL."""
    port = _free_port()
    env = dict(os.environ, SYNTHCELL_WORKSPACE=str(workspace))
    env.pop("SYNTHCELL_DATA_DIR", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
         "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.read().strip() == b"ok":
                        break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    server.kill()
                    raise SystemExit("streamlit did not start: "
                                     + server.stdout.read().decode()[-2000:]) from None
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


def screenshot(url: str, out: Path) -> dict[str, Any]:
    """Open the Design page, wait for the stored design's report (the metric and the UMAP)
    and save the report, from its heading to the download button, as ``out``."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": WIDTH, "height": 1000})
            page.goto(f"{url}/design")
            expect(page.get_by_role("heading", name="Design", exact=True)).to_be_visible(
                timeout=120_000)
            expect(page.get_by_test_id("stMetricLabel").filter(
                has_text="Cells meeting every target")).to_be_visible(timeout=180_000)
            expect(page.get_by_text("UMAP of real cells with the starting and designed")
                   ).to_be_visible(timeout=60_000)
            # training loss, cell types, violins, UMAP
            expect(page.get_by_test_id("stPlotlyChart")).to_have_count(4, timeout=60_000)
            page.wait_for_selector('[data-testid="stStatusWidget"]', state="detached",
                                   timeout=120_000)
            heading = page.get_by_role("heading", name="3 · The designed cells")
            download = page.get_by_role("button", name="Download designed cells (.h5ad)")
            expect(download).to_be_visible(timeout=30_000)
            # Streamlit scrolls inside its own container: a viewport as tall as the report
            # shows it whole; the heading goes to the top.
            top = heading.bounding_box()["y"]
            bottom = download.bounding_box()["y"] + download.bounding_box()["height"]
            height = int(min(max(bottom - top + 120, 1000), 4000))
            page.set_viewport_size({"width": WIDTH, "height": height})
            page.wait_for_timeout(500)
            heading.evaluate("e => e.scrollIntoView({block: 'start'})")
            page.wait_for_timeout(1500)  # plotly re-lays out to the new size
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
            return {"width": WIDTH, "height": height}
        finally:
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "design.png")
    parser.add_argument("--workspace", type=Path, default=None,
                        help="keep the workspace here (default: a temporary one)")
    args = parser.parse_args()
    if not KANG.exists():
        raise SystemExit(f"Kang is missing at {KANG}")
    if not Path(CHROMIUM).exists():
        raise SystemExit("Debian's chromium is missing (apt-get install chromium)")
    with contextlib.ExitStack() as stack:
        if args.workspace is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix="synthcell_design_"))) / "workspace"
        else:
            root = args.workspace.resolve()
        made = prepare(root)
        with serve(root) as url:
            size = screenshot(url, args.out.resolve())
    summary = made["summary"]
    print(json.dumps({
        "screenshot": str(args.out.resolve()), **size,
        "run_key": made["run_key"], "design_id": made["design_id"],
        "up": made["up"], "down": made["down"], "start": START,
        "n_cells": summary["n_cells"],
        "share_meeting_all": round(summary["share_meeting_all"], 4),
        "share_start_meeting_all": round(summary["share_start_meeting_all"], 4),
        "nn_distance_ratio": round(summary.get("nn_distance_ratio", float("nan")), 3),
        "nn_distance_ratio_start": round(summary.get("nn_distance_ratio_start",
                                                     float("nan")), 3),
        "top_assigned_type": summary.get("top_assigned_type"),
        "share_assigned_start_type": summary.get("share_assigned_start_type"),
        "train_s": made["train_s"], "design_s": made["design_s"],
    }, indent=1))


if __name__ == "__main__":
    main()
