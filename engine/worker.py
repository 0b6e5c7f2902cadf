"""Runs one job in its own process: ``python -m engine.worker <job folder> <job id>``.

Owns ``job.json`` while it runs: writes progress (throttled), metric series, and at the
end the result, or the error with its traceback. Stops itself, marking the job
``interrupted``, when the app that started it goes away.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import DataError, JobCancelled, UserFacingError
from engine.jobs import CANCEL_FLAG, JobRecord, load_record, save_record
from engine.store import Workspace

WRITE_EVERY_S = 0.25
# Held for every write of job.json, so the parent watcher's final "interrupted" record can
# never be overwritten by a progress write racing it.
_RECORD_LOCK = threading.Lock()


def _save(job_dir: Path, record: JobRecord) -> None:
    with _RECORD_LOCK:
        save_record(job_dir, record)


@dataclass
class JobContext:
    """What a task gets besides its parameters: the workspace and a progress reporter."""

    workspace: Workspace
    job_dir: Path | None = None
    record: JobRecord | None = None
    _last_write: float = field(default=0.0, repr=False)

    def progress(
        self, fraction: float, message: str = "", *, metrics: dict[str, float] | None = None
    ) -> None:
        """Report progress in [0, 1] with a message and optional metric values to append.

        Raises :class:`JobCancelled` when the user asked to cancel the job.
        """
        if self.job_dir is not None and (self.job_dir / CANCEL_FLAG).exists():
            raise JobCancelled()
        if self.record is None:
            return
        self.record.progress = float(min(max(fraction, 0.0), 1.0))
        if message:
            self.record.message = message
        for name, value in (metrics or {}).items():
            self.record.metrics.setdefault(name, []).append(float(value))
        now = time.monotonic()
        if metrics or now - self._last_write >= WRITE_EVERY_S or fraction >= 1.0:
            _save(self.job_dir, self.record)
            self._last_write = now

    def log(self, text: str) -> None:
        """Append a line to the job's log (stdout goes to ``log.txt``)."""
        print(text, flush=True)


def _watch_parent(job_dir: Path, parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            _RECORD_LOCK.acquire()  # never released: the process ends below
            record = load_record(job_dir)
            if record is not None and record.status == "running":
                record.status = "interrupted"
                record.message = "interrupted: the app stopped while this job was running"
                record.finished = time.time()
                save_record(job_dir, record)
            os._exit(3)


def run_job(job_dir: Path) -> int:
    """Run the job stored in ``job_dir``; return the process exit code."""
    from engine.tasks import resolve_task

    record = load_record(job_dir)
    if record is None:
        return 2
    record.status = "running"
    record.pid = os.getpid()
    record.started = record.started or time.time()
    record.message = "running"
    _save(job_dir, record)
    context = JobContext(workspace=Workspace(), job_dir=job_dir, record=record)
    code = 0
    try:
        result: dict[str, Any] = resolve_task(record.kind)(record.params, context) or {}
        record.status = "done"
        record.progress = 1.0
        record.result = result
        record.message = result.get("message", "done")
    except JobCancelled:
        record.status = "cancelled"
        record.message = "cancelled"
    except UserFacingError as exc:
        record.status = "failed"
        record.error = str(exc)
        record.error_fix = exc.fix if isinstance(exc, DataError) else None
        record.message = "failed"
        record.traceback = traceback.format_exc()
        code = 1
    except BaseException as exc:  # every failure is reported to the UI
        record.status = "failed"
        record.error = f"The job failed unexpectedly: {type(exc).__name__}: {exc}"
        record.message = "failed"
        record.traceback = traceback.format_exc()
        code = 1
    record.finished = time.time()
    _save(job_dir, record)
    return code


def main(argv: list[str]) -> int:
    job_dir = Path(argv[1])
    threading.Thread(
        target=_watch_parent, args=(job_dir, os.getppid()), daemon=True
    ).start()
    return run_job(job_dir)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
