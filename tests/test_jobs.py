"""The job manager: progress, metric series, cancel, failure, queue, restart."""

from __future__ import annotations

import itertools
import os
import signal
import time
from pathlib import Path

import pytest

from engine.jobs import JobManager, load_record, save_record
from engine.store import Workspace

COUNT = "tests.job_tasks:count"


@pytest.fixture
def manager(workspace: Path):
    jm = JobManager(Workspace(workspace), cpu_slots=1, poll_s=0.05)
    yield jm
    jm.shutdown(kill_running=True)


def test_job_reports_progress_metrics_and_result(manager: JobManager) -> None:
    job_id = manager.submit(COUNT, {"steps": 4, "delay": 0.05}, title="count")
    record = manager.wait(job_id, timeout=60)
    assert record.status == "done"
    assert record.progress == 1.0
    assert record.result == {"steps": 4, "message": "counted to 4"}
    assert record.message == "counted to 4"
    assert record.metrics["loss"] == pytest.approx([1.0, 0.5, 1 / 3, 0.25])
    assert record.pid and record.started and record.finished >= record.started


def test_failure_is_captured_with_traceback(manager: JobManager) -> None:
    job_id = manager.submit(COUNT, {"steps": 5, "fail_at": 1}, title="fails")
    record = manager.wait(job_id, timeout=60)
    assert record.status == "failed"
    assert "RuntimeError: boom at step 1" in record.error
    assert "Traceback" in record.traceback and "job_tasks.py" in record.traceback
    assert len(record.metrics["loss"]) == 2  # progress made before the failure is kept


def test_user_error_message_is_shown_as_is(manager: JobManager, tmp_path: Path) -> None:
    bad = tmp_path / "notes.docx"
    bad.write_text("not a matrix")
    job_id = manager.submit("import_dataset", {"path": str(bad)}, title="import")
    record = manager.wait(job_id, timeout=120)
    assert record.status == "failed"
    assert not record.error.startswith("The job failed unexpectedly")
    assert "format" in record.error.lower()
    assert list(manager.workspace.root.joinpath("datasets").iterdir()) == []


def test_cancel_running_and_queued_jobs(manager: JobManager) -> None:
    running = manager.submit(COUNT, {"steps": 400, "delay": 0.05}, title="long")
    queued = manager.submit(COUNT, {"steps": 2}, title="waits")
    deadline = time.monotonic() + 60
    while manager.get(running).progress == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert manager.get(queued).status == "queued"  # one CPU slot: the second job waits
    manager.cancel(queued)
    assert manager.get(queued).status == "cancelled"
    manager.cancel(running)
    record = manager.wait(running, timeout=30)
    assert record.status == "cancelled"
    assert 0 < record.progress < 1


def test_queue_runs_jobs_in_order_within_slots(workspace: Path) -> None:
    manager = JobManager(Workspace(workspace), cpu_slots=1, poll_s=0.05)
    try:
        ids = [manager.submit(COUNT, {"steps": 2, "delay": 0.1}, title=f"j{i}") for i in range(3)]
        records = [manager.wait(i, timeout=120) for i in ids]
        assert [r.status for r in records] == ["done"] * 3
        for earlier, later in itertools.pairwise(records):
            assert later.started >= earlier.finished - 0.05  # never overlapping
    finally:
        manager.shutdown(kill_running=True)


def test_records_survive_restart_and_running_jobs_become_interrupted(workspace: Path) -> None:
    first = JobManager(Workspace(workspace), cpu_slots=1, poll_s=0.05)
    done = first.submit(COUNT, {"steps": 1}, title="finished before the restart")
    assert first.wait(done, timeout=60).status == "done"
    long = first.submit(COUNT, {"steps": 1000, "delay": 0.05}, title="running at the restart")
    deadline = time.monotonic() + 60
    while (first.get(long).pid is None or first.get(long).progress == 0) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    first.shutdown(kill_running=True)  # the app dies and takes its worker with it

    second = JobManager(Workspace(workspace), cpu_slots=1, poll_s=0.05)
    try:
        assert second.get(done).status == "done"
        assert second.get(done).result["steps"] == 1
        assert second.get(long).status == "interrupted"
        assert {r.id for r in second.list()} == {done, long}
    finally:
        second.shutdown()


def test_worker_stops_itself_when_the_app_goes_away(workspace: Path) -> None:
    """A worker whose parent died marks its job interrupted and exits."""
    import subprocess
    import sys

    script = (
        "import time\n"
        "from engine.jobs import JobManager\n"
        "from engine.store import Workspace\n"
        f"m = JobManager(Workspace({str(workspace)!r}), poll_s=0.05)\n"
        f"j = m.submit({COUNT!r}, {{'steps': 1000, 'delay': 0.05}}, title='orphan')\n"
        "print(j, flush=True)\n"
        "time.sleep(60)\n"
    )
    app = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                           cwd=Path(__file__).resolve().parents[1])
    job_id = app.stdout.readline().strip()
    job_dir = workspace / "jobs" / job_id
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        record = load_record(job_dir)
        if record and record.progress > 0:
            break
        time.sleep(0.05)
    assert load_record(job_dir).progress > 0, "the worker never reported progress"
    os.kill(app.pid, signal.SIGKILL)
    app.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and load_record(job_dir).status == "running":
        time.sleep(0.1)
    assert load_record(job_dir).status == "interrupted"


def test_stale_running_record_without_process_is_interrupted(workspace: Path) -> None:
    ws = Workspace(workspace)
    manager = JobManager(ws, start_scheduler=False)
    job_id = manager.submit(COUNT, {"steps": 1}, title="x")
    job_dir = ws.jobs_dir / job_id
    record = load_record(job_dir)
    record.status, record.pid = "running", 999_999
    save_record(job_dir, record)
    JobManager(ws, start_scheduler=False)
    assert load_record(job_dir).status == "interrupted"


def test_gpu_jobs_run_one_at_a_time_beside_cpu_jobs(workspace: Path) -> None:
    manager = JobManager(Workspace(workspace), cpu_slots=1, poll_s=0.05)
    try:
        gpu = [manager.submit(COUNT, {"steps": 3, "delay": 0.1}, title=f"g{i}", device="gpu")
               for i in range(2)]
        cpu = manager.submit(COUNT, {"steps": 3, "delay": 0.1}, title="c", device="cpu")
        records = {i: manager.wait(i, timeout=120) for i in [*gpu, cpu]}
        assert all(r.status == "done" for r in records.values())
        first, second = (records[i] for i in gpu)
        assert second.started >= first.finished - 0.05  # the GPU slot is exclusive
        assert records[cpu].started < first.finished  # a CPU job does not wait for it
        assert manager.get(cpu).device == "cpu" and first.device == "gpu"
    finally:
        manager.shutdown(kill_running=True)


def test_mock_training_is_a_cpu_job() -> None:
    from engine.tasks import job_device

    assert job_device("train", {"generator": "mock"}) == "cpu"
    assert job_device("split", {}) == "cpu"
