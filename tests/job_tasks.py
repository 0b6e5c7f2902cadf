"""Tasks used by the job tests; the worker process imports them as ``tests.job_tasks:NAME``."""

from __future__ import annotations

import time
from typing import Any


def count(params: dict[str, Any], context: Any) -> dict[str, Any]:
    """Report ``steps`` progress points with a metric, ``delay`` s apart; fail if asked."""
    steps = int(params.get("steps", 5))
    for step in range(steps):
        time.sleep(float(params.get("delay", 0.05)))
        context.progress((step + 1) / steps, f"step {step + 1} of {steps}",
                         metrics={"loss": 1.0 / (step + 1)})
        if params.get("fail_at") == step:
            raise RuntimeError(f"boom at step {step}")
    return {"steps": steps, "message": f"counted to {steps}"}


def burn_cpu(params: dict[str, Any], context: Any) -> dict[str, Any]:
    """Keep one core busy in pure Python for ``seconds`` (holds this process's GIL)."""
    end = time.monotonic() + float(params.get("seconds", 5))
    total = 0
    while time.monotonic() < end:
        for i in range(200_000):
            total += i * i
        context.progress(1 - (end - time.monotonic()) / float(params.get("seconds", 5)), "busy")
    return {"total": total % 97}
