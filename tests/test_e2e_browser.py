"""End to end in a real browser: Debian's chromium, driven by Playwright, against
``streamlit run app.py``. Opens a sample, maps roles, splits, trains the mock generator,
evaluates it on the Compare page, and saves the README screenshot."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.privacy.audit import NOT_PRIVACY_SENTENCE
from engine.store import Workspace

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run",
]
SCREENSHOT = REPO / "docs" / "screenshot.png"  # the README's picture (the Mock data page)

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _serve(workspace: Path, *extra_args: str) -> Iterator[str]:
    """Run ``streamlit run app.py`` on a free port with its own workspace; yield its URL."""
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: `make test` installs it (apt-get install "
                    "chromium).")
    port = _free_port()
    env = dict(os.environ, SYNTHCELL_WORKSPACE=str(workspace))
    env.pop("SYNTHCELL_DATA_DIR", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
         "--server.headless", "true", "--browser.gatherUsageStats", "false", *extra_args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read().strip() == b"ok":
                    break
        except OSError:
            time.sleep(0.2)
    else:
        server.kill()
        pytest.fail(f"streamlit did not start: {server.stdout.read().decode()[-2000:]}")
    try:
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    workspace = tmp_path_factory.mktemp("e2e") / "workspace"
    with _serve(workspace) as url:
        yield url, workspace


@contextlib.contextmanager
def _browser_page() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 1000})
        finally:
            browser.close()


def _wait_idle(page, timeout_ms: int = 60_000) -> None:
    """Wait until the app is not running a script (Streamlit's status widget is gone)."""
    page.wait_for_selector('[data-testid="stStatusWidget"]', state="detached",
                           timeout=timeout_ms)


def test_open_split_train_in_browser(app_url: tuple[str, Path]) -> None:
    from playwright.sync_api import expect

    url, workspace_root = app_url
    with _browser_page() as page:
        page.goto(url)
        expect(page.get_by_role("heading", name="Data", exact=True)).to_be_visible(
            timeout=60_000)

        # Open the first sample (a mock dataset made by the project).
        page.get_by_role("button", name="Open sample").click()
        expect(page.get_by_text("Opened sample_data/mock_")).to_be_visible(timeout=120_000)
        expect(page.get_by_text("Raw counts")).to_be_visible()
        _wait_idle(page)

        # Roles are pre-filled from the column names; save them.
        page.get_by_role("button", name="Save roles").click()
        expect(page.get_by_text("Roles saved with the dataset.")).to_be_visible(timeout=30_000)
        dataset = Workspace(workspace_root).list_datasets()[0]
        assert dataset.roles["donor"] == "donor"
        assert dataset.roles["cell_type"] == "cell_type"

        # Split by donor.
        page.get_by_role("link", name="Split").click()
        expect(page.get_by_role("heading", name="Split", exact=True)).to_be_visible(
            timeout=30_000)
        page.get_by_role("button", name="Make split").click()
        expect(page.get_by_text("donor-disjoint split").first).to_be_visible(timeout=120_000)
        expect(page.get_by_text("Test donors: donor")).to_be_visible(timeout=30_000)
        _wait_idle(page)

        # Train the mock generator and watch the job reach the end.
        page.get_by_role("link", name="Train").click()
        expect(page.get_by_role("heading", name="Train", exact=True)).to_be_visible(
            timeout=30_000)
        page.get_by_role("button", name="Launch run").click()
        expect(page.get_by_text("synthetic cells in")).to_be_visible(timeout=120_000)
        expect(page.get_by_text("Selected run")).to_be_visible(timeout=30_000)
        _wait_idle(page)

        runs = Workspace(workspace_root).list_runs()
        assert len(runs) == 1 and runs[0].generator == "mock"
        assert runs[0].n_cells > 0
        job = next(p for p in (workspace_root / "jobs").iterdir()
                   if '"kind": "train"' in (p / "job.json").read_text())
        assert '"progress": 1.0' in (job / "job.json").read_text()
        # The run, selected in the table, is named under it.
        expect(page.get_by_role("code").filter(has_text=runs[0].key)).to_be_visible()

        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT.with_name("train.png")), full_page=False)

        # Evaluate the run against the held-out donors: the metrics beside their noise floor,
        # the membership audit beside them, and the report to download.
        page.get_by_role("link", name="Compare", exact=True).click()
        expect(page.get_by_role("heading", name="Compare", exact=True)).to_be_visible(
            timeout=30_000)
        page.get_by_role("button", name="Evaluate 1 run").click()
        expect(page.get_by_text("Evaluated: real-vs-synthetic AUROC")).to_be_visible(
            timeout=300_000)
        expect(page.get_by_role("heading", name="All metrics")).to_be_visible(timeout=60_000)
        expect(page.get_by_role("heading", name="Privacy audit (membership inference)")
               ).to_be_visible()
        expect(page.get_by_text(NOT_PRIVACY_SENTENCE)).to_be_visible()
        expect(page.get_by_role("button", name="Download report (HTML)")).to_be_visible()
        # utility, audit (key columns; every column in an expander), all metrics
        expect(page.get_by_test_id("stDataFrame")).to_have_count(4)
        _wait_idle(page)
        workspace = Workspace(workspace_root)
        folder = workspace.evaluation_dir(runs[0].key, workspace.list_splits()[0].id)
        assert (folder / "report.html").exists() and (folder / "metrics.parquet").exists()
        page.set_viewport_size({"width": 1400, "height": 2100})
        page.get_by_role("heading", name="Key metrics").scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        page.screenshot(path=str(SCREENSHOT.with_name("compare.png")))
        page.set_viewport_size({"width": 1400, "height": 1000})

        # Privacy: choosing DP for every stage shows the accountant's total at once.
        page.get_by_role("link", name="Privacy", exact=True).click()
        expect(page.get_by_role("heading", name="Privacy", exact=True)).to_be_visible(
            timeout=30_000)
        page.get_by_role("combobox", name="Differential privacy").click()
        page.get_by_role("option", name="all", exact=True).click()
        expect(page.get_by_test_id("stMetricLabel").filter(has_text="Total ε")).to_be_visible(
            timeout=60_000)
        expect(page.get_by_role("heading", name="What the accountant says")).to_be_visible()
        _wait_idle(page)
        page.set_viewport_size({"width": 1400, "height": 1500})
        page.wait_for_timeout(500)
        page.screenshot(path=str(SCREENSHOT.with_name("privacy.png")))
        page.set_viewport_size({"width": 1400, "height": 1000})

        # Counterfactual: train the cycle autoencoder, then "these cells, but stimulated".
        page.get_by_role("link", name="Train", exact=True).click()
        expect(page.get_by_role("heading", name="Train", exact=True)).to_be_visible(
            timeout=30_000)
        page.get_by_role("combobox", name="Generator").click()
        page.get_by_role("option", name="Cycle autoencoder (counterfactual)").click()
        page.get_by_role("button", name="Launch run").click()
        deadline = time.monotonic() + 300
        while not [r for r in Workspace(workspace_root).list_runs() if r.generator == "cae"]:
            if time.monotonic() > deadline:
                page.screenshot(path="/tmp/e2e_cae_fail.png", full_page=True)
                jobs = [(p / "job.json").read_text()[:1500]
                        for p in (workspace_root / "jobs").iterdir()]
                raise AssertionError(f"the cycle autoencoder run did not finish: {jobs}")
            page.wait_for_timeout(1000)
        _wait_idle(page)
        page.get_by_role("link", name="Counterfactual", exact=True).click()
        expect(page.get_by_role("heading", name="Counterfactual", exact=True)).to_be_visible(
            timeout=30_000)
        page.get_by_role("combobox", name="condition", exact=True).click()
        page.get_by_role("option", name="control", exact=True).click()
        page.keyboard.press("Escape")
        _wait_idle(page)
        page.get_by_role("combobox", name="condition →").click()
        page.get_by_role("option", name="stimulated", exact=True).click()
        _wait_idle(page)
        page.get_by_role("button", name="Generate counterfactual").click()
        expect(page.get_by_role("heading", name="3 · What changed")).to_be_visible(
            timeout=300_000)
        expect(page.get_by_role("button", name="Download counterfactual cells (.h5ad)")
               ).to_be_visible(timeout=60_000)
        _wait_idle(page)
        cf_runs = [r for r in Workspace(workspace_root).list_runs() if r.generator == "cae"]
        assert len(cf_runs) == 1
        assert list((workspace_root / "runs" / cf_runs[0].key / "counterfactuals").iterdir())
        page.set_viewport_size({"width": 1400, "height": 2400})
        page.get_by_role("heading", name="3 · What changed").scroll_into_view_if_needed()
        page.wait_for_timeout(1000)
        page.screenshot(path=str(SCREENSHOT.with_name("counterfactual.png")))
        page.set_viewport_size({"width": 1400, "height": 1000})

        # Generate a mock scenario as a job and preview it as a UMAP.
        page.get_by_role("link", name="Mock data").click()
        expect(page.get_by_role("heading", name="Mock data", exact=True)).to_be_visible(
            timeout=30_000)
        page.get_by_role("combobox", name="Scenario").click()
        page.get_by_role("option", name="bridge").click()
        cells = page.get_by_label("Cells", exact=True)
        cells.fill("800")
        cells.press("Enter")
        page.get_by_role("button", name="Generate").click()
        expect(page.get_by_text("UMAP of the complete RNA profiles, by cluster")).to_be_visible(
            timeout=180_000)
        expect(page.get_by_text("Opened mock bridge")).to_be_visible()
        expect(page.locator("text.legendtext", has_text="RNA+ATAC")).to_be_visible()  # bridge cells
        _wait_idle(page)
        # Streamlit scrolls inside its own container: a tall viewport shows the whole page.
        page.set_viewport_size({"width": 1400, "height": 2100})
        umap_title = page.get_by_text("UMAP of the complete RNA profiles, by cluster")
        umap_title.scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        page.screenshot(path=str(SCREENSHOT))

        # A deep link (a reload, a bookmark) opens the same page with the same sidebar.
        page.goto(f"{url}/compare")
        expect(page.get_by_role("heading", name="Compare", exact=True)).to_be_visible(
            timeout=60_000)
        expect(page.get_by_text("Current selection")).to_be_visible()
        expect(page.get_by_role("link", name="Mock data", exact=True)).to_be_visible()
        expect(page.get_by_role("link", name="ui", exact=True)).to_have_count(0)


def test_bad_uploads_get_one_sentence_and_leave_nothing(tmp_path: Path) -> None:
    """A corrupt file and a file over the upload limit (1 MB here) in a real browser."""
    from playwright.sync_api import expect

    workspace = tmp_path / "workspace"
    corrupt = tmp_path / "truncated.h5ad"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 2000)
    big = tmp_path / "big.csv"
    big.write_bytes(b"cell,g1\n" + b"c,1\n" * 400_000)  # 1.6 MB
    with _serve(workspace, "--server.maxUploadSize", "1") as url, _browser_page() as page:
        page.goto(url)
        page.get_by_role("tab", name="Upload").click()
        expect(page.get_by_text("Up to 1 MB; larger files: open them by path")).to_be_visible(
            timeout=60_000)
        page.locator('input[type="file"]').set_input_files(str(corrupt))
        page.get_by_role("button", name="Open upload").click()
        alert = page.get_by_test_id("stAlertContentError")
        expect(alert).to_contain_text("corrupt or truncated", timeout=120_000)
        # The traceback is folded away in an expander, not shown.
        expect(page.get_by_text("Details for a bug report")).to_be_visible()
        expect(page.get_by_text("Traceback (most recent call last)")).not_to_be_visible()

        page.locator('input[type="file"]').set_input_files(str(big))
        expect(page.get_by_text("File must be 1.0MB or smaller.")).to_be_visible(timeout=30_000)
    assert list((workspace / "datasets").iterdir()) == []
    assert list((workspace / ".tmp").iterdir()) == []
    assert list((workspace / "uploads").iterdir()) == []
