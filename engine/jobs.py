"""Background jobs: a queue, worker processes, progress, cancel, errors, records on disk.

Each job runs a task from :mod:`engine.tasks` in its own Python process
(``python -m engine.worker <job folder>``), so CPU-heavy work never holds the UI's GIL.
The worker writes ``jobs/<id>/job.json`` (status, progress, message, metric series,
result or error with traceback) while it runs; the manager writes it only before the
worker starts and after it has exited. Records outlive the app: a new manager reads them,
and jobs that were running when the app stopped are marked ``interrupted``.

A scheduler thread starts queued jobs when a slot is free: ``SYNTHCELL_CPU_JOBS`` CPU
jobs at once, and one GPU job at a time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from engine.settings import REPO_ROOT, cpu_job_slots
from engine.store import Workspace, atomic_write_json, read_json

ACTIVE = ("queued", "running")
FINISHED = ("done", "failed", "cancelled", "interrupted")
CANCEL_FLAG = "cancel.flag"
CANCEL_GRACE_S = 5.0


@dataclass
class JobRecord:
    """Everything known about one job; stored as ``job.json``."""

    id: str
    kind: str
    params: dict[str, Any]
    title: str
    device: str = "cpu"
    status: str = "queued"
    progress: float = 0.0
    message: str = "waiting for a free slot"
    metrics: dict[str, list[float]] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    error_fix: str | None = None
    traceback: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    pid: int | None = None

    @property
    def duration_s(self) -> float | None:
        """Seconds from start to finish (or to now while running)."""
        if self.started is None:
            return None
        return (self.finished or time.time()) - self.started

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE


def load_record(job_dir: Path) -> JobRecord | None:
    """Read a job record from its folder, or None when it is missing or unreadable."""
    payload = read_json(job_dir / "job.json")
    if not payload:
        return None
    known = {k: v for k, v in payload.items() if k in JobRecord.__dataclass_fields__}
    return JobRecord(**known)


def save_record(job_dir: Path, record: JobRecord) -> None:
    """Write a job record atomically."""
    atomic_write_json(job_dir / "job.json", asdict(record))


def _pid_alive(pid: int | None, job_id: str) -> bool:
    """Return True when ``pid`` is a live worker process of ``job_id``."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return job_id in " ".join(proc.cmdline())
    except (psutil.Error, OSError):
        return False


class JobManager:
    """Submits, schedules, watches and cancels jobs of one workspace."""

    def __init__(
        self,
        workspace: Workspace,
        *,
        cpu_slots: int | None = None,
        start_scheduler: bool = True,
        poll_s: float = 0.2,
    ) -> None:
        self.workspace = workspace
        self.cpu_slots = cpu_slots if cpu_slots is not None else cpu_job_slots()
        self.poll_s = poll_s
        self._lock = threading.RLock()
        self._procs: dict[str, subprocess.Popen] = {}
        self._stop = threading.Event()
        self._recover()
        self._thread: threading.Thread | None = None
        if start_scheduler:
            self._thread = threading.Thread(target=self._loop, name="job-scheduler", daemon=True)
            self._thread.start()

    # -- public ------------------------------------------------------------------------
    def submit(
        self, kind: str, params: dict[str, Any], *, title: str, device: str | None = None
    ) -> str:
        """Queue a job running task ``kind`` with ``params``; return its id.

        ``device`` is ``"cpu"`` or ``"gpu"``; by default the task decides
        (:func:`engine.tasks.job_device`). Writes ``jobs/<id>/job.json`` with status ``queued``.
        """
        from engine.tasks import job_device, resolve_task

        resolve_task(kind)
        device = device or job_device(kind, params)
        job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        record = JobRecord(id=job_id, kind=kind, params=params, title=title, device=device)
        job_dir = self.workspace.jobs_dir / job_id
        job_dir.mkdir(parents=True)
        save_record(job_dir, record)
        if self._thread is None:
            self.schedule()
        return job_id

    def get(self, job_id: str) -> JobRecord | None:
        """Return the current record of a job."""
        return load_record(self.workspace.jobs_dir / job_id)

    def list(self, *, limit: int | None = None) -> list[JobRecord]:
        """Return job records, newest first."""
        records = [load_record(p) for p in self.workspace.jobs_dir.iterdir() if p.is_dir()]
        ordered = sorted((r for r in records if r), key=lambda r: r.created, reverse=True)
        return ordered[:limit] if limit else ordered

    def cancel(self, job_id: str) -> None:
        """Ask a job to stop: a queued job is cancelled at once; a running one is told to
        stop at its next progress report and killed if it has not stopped in a few seconds."""
        job_dir = self.workspace.jobs_dir / job_id
        with self._lock:
            record = load_record(job_dir)
            if record is None or not record.is_active:
                return
            (job_dir / CANCEL_FLAG).touch()
            if record.status == "queued" and job_id not in self._procs:
                record.status = "cancelled"
                record.message = "cancelled before it started"
                record.finished = time.time()
                save_record(job_dir, record)

    def wait(self, job_id: str, *, timeout: float | None = None) -> JobRecord:
        """Block until the job has finished (or ``timeout`` s passed); return its record."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._thread is None:
                self.schedule()
            record = self.get(job_id)
            if record is None or record.status in FINISHED:
                return record
            if deadline is not None and time.monotonic() > deadline:
                return record
            time.sleep(self.poll_s)

    def shutdown(self, *, kill_running: bool = False) -> None:
        """Stop the scheduler; optionally kill running workers (as an app crash would)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if kill_running:
            with self._lock:
                for proc in self._procs.values():
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                for proc in self._procs.values():
                    proc.wait(timeout=10)

    # -- scheduling --------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            # The scheduler must survive one unreadable or bad record.
            with contextlib.suppress(Exception):
                self.schedule()
            self._stop.wait(self.poll_s)

    def schedule(self) -> None:
        """Reap finished workers, enforce cancels, and start queued jobs in free slots."""
        with self._lock:
            self._reap()
            records = self.list()
            for record in records:
                if (record.status == "running" and record.id not in self._procs
                        and not _pid_alive(record.pid, record.id)):
                    self._mark_interrupted(record)
            running = [r for r in records if r.status == "running"]
            busy_cpu = sum(1 for r in running if r.device != "gpu")
            busy_gpu = sum(1 for r in running if r.device == "gpu")
            for record in sorted((r for r in records if r.status == "queued"),
                                 key=lambda r: r.created):
                if record.device == "gpu":
                    if busy_gpu >= 1:
                        continue
                    busy_gpu += 1
                else:
                    if busy_cpu >= self.cpu_slots:
                        continue
                    busy_cpu += 1
                self._start(record)

    def _start(self, record: JobRecord) -> None:
        job_dir = self.workspace.jobs_dir / record.id
        record.status = "running"
        record.started = time.time()
        record.message = "starting"
        save_record(job_dir, record)
        env = dict(os.environ, SYNTHCELL_WORKSPACE=str(self.workspace.root))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        log = (job_dir / "log.txt").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.worker", str(job_dir), record.id],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        # The worker records its own pid in job.json; writing here could race its progress.
        self._procs[record.id] = proc

    def _reap(self) -> None:
        for job_id, proc in list(self._procs.items()):
            job_dir = self.workspace.jobs_dir / job_id
            code = proc.poll()
            if code is None:
                self._enforce_cancel(job_id, proc, job_dir)
                continue
            del self._procs[job_id]
            record = load_record(job_dir)
            if record is not None and record.status == "running":
                # The worker died without writing its end (killed, out of memory, ...).
                cancelled = (job_dir / CANCEL_FLAG).exists()
                record.status = "cancelled" if cancelled else "failed"
                record.message = "cancelled" if cancelled else f"the worker exited with code {code}"
                if not cancelled:
                    record.error = (
                        f"The job stopped unexpectedly (exit code {code}); it may have run "
                        "out of memory. See the job log."
                    )
                record.finished = time.time()
                save_record(job_dir, record)

    def _enforce_cancel(self, job_id: str, proc: subprocess.Popen, job_dir: Path) -> None:
        flag = job_dir / CANCEL_FLAG
        if not flag.exists():
            return
        if time.time() - flag.stat().st_mtime > CANCEL_GRACE_S:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    def _recover(self) -> None:
        """Mark jobs whose worker is gone as interrupted (the app stopped under them)."""
        for record in self.list():
            if record.status == "running" and not _pid_alive(record.pid, record.id):
                self._mark_interrupted(record)

    def _mark_interrupted(self, record: JobRecord) -> None:
        fresh = load_record(self.workspace.jobs_dir / record.id)
        if fresh is None or fresh.status != "running":
            return
        fresh.status = "interrupted"
        fresh.message = "interrupted: the app stopped while this job was running"
        fresh.finished = fresh.finished or time.time()
        save_record(self.workspace.jobs_dir / record.id, fresh)


_MANAGERS: dict[Path, JobManager] = {}
_MANAGERS_LOCK = threading.Lock()


def get_manager(workspace: Workspace | None = None) -> JobManager:
    """Return the process-wide job manager of a workspace (created on first use)."""
    workspace = workspace or Workspace()
    with _MANAGERS_LOCK:
        manager = _MANAGERS.get(workspace.root)
        if manager is None:
            manager = JobManager(workspace)
            _MANAGERS[workspace.root] = manager
        return manager
