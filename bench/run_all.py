"""Run every benchmark in bench/ and print one JSON object keyed by benchmark file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    results = {}
    for script in sorted(HERE.glob("bench_*.py")):
        # A script's own folder, not the working folder, is on its import path: point
        # PYTHONPATH at the repository so every benchmark can import the engine.
        env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
        done = subprocess.run([sys.executable, str(script)], cwd=HERE.parent, env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            results[script.stem] = {"error": done.stderr[-2000:]}
            continue
        # Each benchmark prints one JSON object last; anything before it is log noise.
        text = done.stdout[done.stdout.index("{"):]
        results[script.stem] = json.loads(text)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
