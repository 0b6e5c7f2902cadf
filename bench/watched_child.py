"""Run a benchmark step in a fresh interpreter while watching its memory and time.

Shared by the speed benchmarks: each step runs as ``python -c CODE ARGS`` with the
repository on ``PYTHONPATH``; its resident set size is read from ``/proc`` every ``poll``
seconds, and it is killed past ``timeout`` seconds or ``mem_limit_gb``. The step reports
stages as ``{"event": ...}`` lines on stderr and its result as the last stdout line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def rss_gb(pid: int) -> float:
    """Current resident set size of process ``pid`` in GB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


@dataclass
class ChildRun:
    """What a watched step left: its output, exit status, wall time, the largest RSS seen
    and, when it was killed, why."""

    stdout: str
    stderr: str
    returncode: int | None
    seconds: float
    max_rss_gb: float
    killed_because: str | None

    def events(self) -> list[dict[str, Any]]:
        """The stages the step reported on stderr, in order."""
        return [json.loads(line)["event"] for line in self.stderr.splitlines()
                if line.startswith('{"event"')]

    def result(self) -> dict[str, Any] | None:
        """The step's last stdout line as JSON, or None when it failed or was killed."""
        lines = self.stdout.strip().splitlines()
        if self.killed_because is None and self.returncode == 0 and lines:
            return json.loads(lines[-1])
        return None

    def error(self, rss_digits: int = 3) -> dict[str, Any]:
        """An error entry: why it ended (kill reason or exit status with stderr's tail), the
        seconds before it did, the largest RSS seen and every stage it reported."""
        noise = [line for line in self.stderr.splitlines()
                 if not line.startswith('{"event"')]
        return {"error": self.killed_because
                or f"exit status {self.returncode}: " + "\n".join(noise)[-1500:],
                "seconds_before_end": round(self.seconds, 1),
                "max_rss_gb_polled": round(self.max_rss_gb, rss_digits),
                "stages_reached": self.events()}


def run_watched(code: str, *args: str, timeout: float, mem_limit_gb: float,
                env: dict[str, str] | None = None, niceness: int = 0,
                poll: float = 0.25) -> ChildRun:
    """Run ``code`` with ``args`` in a fresh interpreter (cwd the repository, its
    ``PYTHONPATH`` the repository, ``env`` added), at ``niceness`` at least, and return what
    it left; kills it past ``timeout`` seconds or ``mem_limit_gb`` of RSS. Writes nothing."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore",
                **(env or {})}
    # nice execs python in place: the child's pid stays the interpreter's
    nice = ["nice", "-n", str(niceness - os.nice(0))] if os.nice(0) < niceness else []
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        child = subprocess.Popen([*nice, sys.executable, "-c", code, *args], cwd=REPO,
                                 env=full_env, stdout=out, stderr=err, text=True)
        max_rss, why = 0.0, None
        while child.poll() is None:
            max_rss = max(max_rss, rss_gb(child.pid))
            elapsed = time.perf_counter() - start
            if elapsed > timeout:
                why = f"timeout after {elapsed:.0f} s (limit {timeout:.0f} s)"
            elif max_rss > mem_limit_gb:
                why = f"killed at RSS {max_rss:.1f} GB (limit {mem_limit_gb:.1f} GB)"
            if why:
                child.kill()
                child.wait()
                break
            time.sleep(poll)
        elapsed = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        return ChildRun(out.read(), err.read(), child.returncode, elapsed, max_rss, why)
