"""App start-up and page responsiveness under a CPU-heavy job.

Prints one JSON object:
- ``start``: seconds from ``streamlit run app.py`` to the server's health check, and to the
  Data page's heading being visible in headless chromium; baseline: a one-line Streamlit
  app started and opened the same way in the same run.
- ``data_page_rerun``: seconds per rerun of the Data page (AppTest, median of N) with no job,
  while a CPU-bound job runs as a worker process (how the studio runs jobs), and, as the
  baseline, while the same work runs in a thread of the app's own process (GIL contention).

    python bench/bench_app.py [--reruns 15]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def burn_cpu(params: dict[str, Any], context: Any) -> dict[str, Any]:
    """A job that keeps one core busy in pure Python for ``seconds``."""
    end = time.monotonic() + float(params.get("seconds", 10))
    total = 0
    while time.monotonic() < end:
        for i in range(100_000):
            total += i * i
        if context is not None:
            context.progress(0.5, "busy")
    return {"total": total % 7}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def time_start(script: Path, heading: str, env: dict[str, str]) -> dict[str, float]:
    """Start ``streamlit run script``; return seconds to health and to ``heading`` visible."""
    from playwright.sync_api import expect, sync_playwright

    port = _free_port()
    started = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(script), "--server.port", str(port),
         "--server.headless", "true"], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1):
                    break
            except OSError:
                time.sleep(0.05)
        healthy = time.perf_counter() - started
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(url)
            expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible(
                timeout=60_000)
            visible = time.perf_counter() - started
            browser.close()
        return {"to_health_s": round(healthy, 3), "to_first_page_s": round(visible, 3)}
    finally:
        server.terminate()
        server.wait(timeout=10)


def time_reruns(workspace: Path, n: int) -> list[float]:
    """Return the seconds of ``n`` reruns of the Data page with its current dataset."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60)  # opens on Data
    at.run()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - t0)
    assert not at.exception, at.exception
    return times


def summarise(times: list[float]) -> dict[str, float]:
    return {"median_s": round(statistics.median(times), 4), "max_s": round(max(times), 4)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reruns", type=int, default=15)
    args = parser.parse_args()
    from engine.cli import ConsoleContext
    from engine.jobs import JobManager
    from engine.store import Workspace
    from engine.tasks import import_dataset

    with tempfile.TemporaryDirectory() as tmp:
        workspace = Path(tmp) / "workspace"
        os.environ["SYNTHCELL_WORKSPACE"] = str(workspace)
        env = dict(os.environ)
        hello = Path(tmp) / "hello.py"
        hello.write_text("import streamlit as st\nst.title('Data')\n")
        result: dict[str, Any] = {"benchmark": "app"}
        result["start"] = {"studio": time_start(REPO / "app.py", "Data", env),
                           "baseline_hello_app": time_start(hello, "Data", env)}

        ws = Workspace(workspace)
        sample = sorted((REPO / "sample_data").glob("*.h5ad"))[0]
        import_dataset({"path": str(sample)}, ConsoleContext(ws, quiet=True))
        idle = time_reruns(workspace, args.reruns)

        manager = JobManager(ws, poll_s=0.1)
        job = manager.submit("bench.bench_app:burn_cpu", {"seconds": 600}, title="burn")
        while manager.get(job).progress == 0:
            time.sleep(0.1)
        under_process = time_reruns(workspace, args.reruns)
        manager.cancel(job)
        manager.wait(job, timeout=30)
        manager.shutdown()

        stop = threading.Event()

        def burn_in_thread() -> None:
            while not stop.is_set():
                burn_cpu({"seconds": 0.2}, None)

        thread = threading.Thread(target=burn_in_thread, daemon=True)
        thread.start()
        under_thread = time_reruns(workspace, args.reruns)
        stop.set()
        thread.join()
        result["data_page_rerun"] = {
            "idle": summarise(idle),
            "cpu_job_in_worker_process": summarise(under_process),
            "baseline_cpu_work_in_app_thread": summarise(under_thread),
            "aim_s": 0.5,
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
