"""Speed and peak memory of the DP-NMF generator: fit + sample at 10k / 100k / 1M cells ×
2k genes, without DP and with ``dp="all"`` (cell-level, ε = 4), against a baseline measured
in the same run: the bare cost of the two library calls the seed made (sklearn
``MiniBatchNMF(n_components=20, batch_size=2048)`` then ``KMeans`` on W) on the same data.

Prints one JSON object. The data files are built first, each in its own process (Linux
children inherit their parent's peak RSS, so the parent stays small); then every run
(size × {baseline, none, all}) is a fresh process whose ``ru_maxrss`` is its own. The parent
polls each child's RSS and kills it past ``--mem-limit-gb`` (the machine is shared; an
unchecked 1M run can exhaust it) or past ``--timeout``; either is recorded as an error
entry with the last fit stage reached, never a crash.

Aim (the issue): fit + sample at 100k ≤ 60 s without DP and ≤ 120 s with ``--dp all``;
linear in cells; peak memory ≤ 8 GB at 1M.

    python bench/bench_dp_nmf_speed.py [--max-cells 1000000] [--timeout 5400]
                                       [--mem-limit-gb 16] [--skip-baseline]
                                       [--module path/to/patched/dp_nmf.py]
                                       [--compare-module path/to/previous/dp_nmf.py]
                                       [--sizes 100000,1000000] [--variants none,all]
                                       [--out bench/results/dp_nmf_speed.json]

Each run reports fit and sample seconds, cells per second, the fit's stages (from its
progress messages), the time of the DP noise calibration itself, the sklearn NMF's passes and
minibatch steps, and peak RSS after loading, after fit and at the end. ``--module`` measures
another copy of ``dp_nmf.py`` (a proposed patch); the file is copied when the benchmark starts
so that every run measures the same code.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.watched_child import run_watched  # noqa: E402

MODULE = REPO / "engine" / "generators" / "dp_nmf.py"
SIZES = (10_000, 100_000, 1_000_000)
AIM = {"fit_plus_sample_seconds_at_100k": {"none": 60.0, "all": 120.0},
       "peak_rss_gb_at_1M": 8.0, "scaling": "linear in cells"}

MAKE = """
import json, sys, time
import anndata as ad, numpy as np, pandas as pd, scipy.sparse as sp
from engine.generators.mock import generate_mock_dataset
n_cells, n_genes, out, seed = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
t0 = time.perf_counter()
blocks, obs = [], []
for i in range(-(-n_cells // 100_000)):
    size = min(100_000, n_cells - i * 100_000)
    block, _ = generate_mock_dataset("paired", n_cells=size, n_genes=n_genes, n_peaks=100,
                                     n_proteins=5, seed=seed * 1000 + i)
    blocks.append(block.X); obs.append(block.obs[["donor", "cell_type"]])
    var = block.var[[]]
    del block
adata = ad.AnnData(sp.vstack(blocks, format="csr"), obs=pd.concat(obs, ignore_index=True),
                   var=var)
adata.obs_names = [f"c{seed}_{i}" for i in range(adata.n_obs)]
adata.write_h5ad(out)
print(json.dumps({"seconds": round(time.perf_counter() - t0, 2), "nnz": int(adata.X.nnz),
                  "nnz_per_cell": round(adata.X.nnz / adata.n_obs, 1),
                  "dtype": str(adata.X.dtype), "donors": int(adata.obs["donor"].nunique()),
                  "cell_types": int(adata.obs["cell_type"].nunique())}))
"""

_COMMON = """
import json, resource, sys, time
def peak_gb():
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)
def rss_gb():
    with open("/proc/self/statm") as f:
        return round(int(f.read().split()[1]) * 4096 / 1e9, 3)
def event(**kw):
    print(json.dumps({"event": kw}), file=sys.stderr, flush=True)
"""

RUN = _COMMON + """
import importlib.util
import anndata as ad
module_file, path, dp = sys.argv[1], sys.argv[2], sys.argv[3]
# the copy of dp_nmf.py taken when the benchmark started (the file may change meanwhile)
spec = importlib.util.spec_from_file_location("bench_dp_nmf_module", module_file)
mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mod
spec.loader.exec_module(mod)
t0 = time.perf_counter()
adata = ad.read_h5ad(path)
load_s, after_load = time.perf_counter() - t0, peak_gb()
event(stage="loaded", seconds=round(load_s, 2), peak_rss_gb=after_load)

calibration = []  # timed in place: fit looks the name up in its module at call time
_calibrate = mod.calibrate_noise_multiplier
def timed_calibrate(**kw):
    t = time.perf_counter()
    out = _calibrate(**kw)
    calibration.append(time.perf_counter() - t)
    return out
mod.calibrate_noise_multiplier = timed_calibrate

nmf_runs = []  # passes and minibatch steps of the (non-DP) sklearn NMF
class CountingNMF(mod.MiniBatchNMF):
    def fit_transform(self, X, y=None, W=None, H=None):
        out = super().fit_transform(X, y=y, W=W, H=H)
        nmf_runs.append({"passes": int(self.n_iter_), "minibatch_steps": int(self.n_steps_),
                         "max_iter": int(self.max_iter)})
        return out
mod.MiniBatchNMF = CountingNMF

marks = []
def progress(fraction, message):
    marks.append((time.perf_counter(), message, peak_gb(), rss_gb()))
    event(stage=message, peak_rss_gb=marks[-1][2], rss_gb=marks[-1][3])

model = mod.DPNMFGenerator(mod.DPNMFConfig(dp=dp, donor_key="", epsilon_total=4.0, seed=0))
t1 = time.perf_counter()
model.fit(adata, progress=progress)
t2 = time.perf_counter()
after_fit = peak_gb()
stages = []
for (t, message, peak, rss), nxt in zip(marks, marks[1:] + [(t2, "", after_fit, 0)]):
    if message.startswith("fitted"):
        continue
    stages.append({"stage": message, "seconds": round(nxt[0] - t, 2),
                   "peak_rss_gb_at_start": peak, "rss_gb_at_start": rss})
event(stage="fitted", seconds=round(t2 - t1, 2), peak_rss_gb=after_fit)
n = adata.n_obs
synthetic = model.sample(n, seed=0)
t3 = time.perf_counter()
releases = model.accountant.releases
print(json.dumps({
    "cells": n, "dp": dp, "load_seconds": round(load_s, 2),
    "fit_seconds": round(t2 - t1, 2), "sample_seconds": round(t3 - t2, 2),
    "fit_plus_sample_seconds": round(t3 - t1, 2),
    "fit_cells_per_second": round(n / (t2 - t1)), "sample_cells_per_second": round(n / (t3 - t2)),
    "calibration_seconds": round(sum(calibration), 3) if calibration else None,
    "fit_stages": stages, "nmf": nmf_runs[0] if nmf_runs else None,
    "peak_rss_gb": peak_gb(), "peak_rss_gb_after_load": after_load,
    "peak_rss_gb_after_fit": after_fit,
    "noise_multiplier": releases[0].noise_multiplier if releases else None,
    "privacy_label": model.privacy_label, "clusters": len(model.cluster_labels),
    "synthetic_nnz_per_cell": round(synthetic.X.nnz / max(synthetic.n_obs, 1), 1)}))
"""

BASELINE = _COMMON + """
import anndata as ad, numpy as np, scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.decomposition import MiniBatchNMF
adata = ad.read_h5ad(sys.argv[1])
after_load = peak_gb()
t0 = time.perf_counter()
x = sp.csr_matrix(adata.X, dtype=np.float64)  # log1p of library-normalised counts
lib = np.asarray(x.sum(axis=1)).ravel()
x = sp.csr_matrix(sp.diags(float(np.median(lib)) / np.maximum(lib, 1.0)) @ x)
x.data = np.log1p(x.data)
t1 = time.perf_counter()
event(stage="prepared", seconds=round(t1 - t0, 2), peak_rss_gb=peak_gb())
nmf = MiniBatchNMF(n_components=20, batch_size=2048, random_state=0)
w = nmf.fit_transform(x)
t2 = time.perf_counter()
event(stage="nmf", seconds=round(t2 - t1, 2), peak_rss_gb=peak_gb())
n_types = adata.obs["cell_type"].nunique()
KMeans(n_clusters=n_types, n_init=4, random_state=0).fit_predict(w)
t3 = time.perf_counter()
print(json.dumps({
    "cells": adata.n_obs,
    "method": "MiniBatchNMF(n_components=20, batch_size=2048, random_state=0).fit_transform"
              " on log1p(median-library-normalised counts), then KMeans(n_clusters=#cell"
              " types, n_init=4) on W; no sampling",
    "prep_seconds": round(t1 - t0, 2), "nmf_seconds": round(t2 - t1, 2),
    "kmeans_seconds": round(t3 - t2, 2), "seconds": round(t3 - t1, 2),
    "cells_per_second": round(adata.n_obs / (t3 - t1)),
    "nmf": {"passes": int(nmf.n_iter_), "minibatch_steps": int(nmf.n_steps_),
            "max_iter": int(nmf.max_iter)},
    "peak_rss_gb": peak_gb(), "peak_rss_gb_after_load": after_load}))
"""


def run(code: str, *args: str, timeout: float, mem_limit_gb: float) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter; return its last stdout line as JSON, or an
    error entry (exit status, timeout or memory kill) with the stages it reported."""
    child = run_watched(code, *args, timeout=timeout, mem_limit_gb=mem_limit_gb)
    result = child.result()
    return child.error(rss_digits=2) if result is None else result


def _label(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n / 1000:g}k"


def _per_100k(seconds: float | None, cells: int) -> float | None:
    return None if seconds is None else round(seconds / cells * 100_000, 2)


def _scaling(rows: dict[int, dict[str, Any]], key: str) -> dict[str, Any]:
    """Seconds per 100k cells at each size, and the log-log slope between sizes (1 =
    linear)."""
    ok = {n: r[key] for n, r in sorted(rows.items()) if isinstance(r.get(key), (int, float))}
    per = {_label(n): _per_100k(s, n) for n, s in ok.items()}
    sizes = list(ok)
    slopes = {}
    for a, b in itertools.pairwise(sizes):
        if ok[a] > 0 and ok[b] > 0:
            slopes[f"{_label(a)}->{_label(b)}"] = round(
                math.log(ok[b] / ok[a]) / math.log(b / a), 2)
    return {"seconds_per_100k_cells": per, "loglog_slope": slopes}


def _environment(module: Path) -> dict[str, Any]:
    import numpy
    import scipy
    import sklearn

    def git(*cmd: str) -> str:
        done = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip()

    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "numpy": numpy.__version__, "scipy": scipy.__version__,
            "sklearn": sklearn.__version__, "git_commit": git("rev-parse", "--short", "HEAD"),
            "module": str(module), "module_blob": git("hash-object", str(module)),
            "module_modified_vs_head": bool(git("status", "--porcelain", str(module)))
            if module.resolve() == MODULE else None,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-cells", type=int, default=1_000_000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--timeout", type=float, default=5400.0,
                        help="seconds per run (each size × variant)")
    parser.add_argument("--mem-limit-gb", type=float, default=16.0,
                        help="kill a run whose RSS passes this (recorded as an error)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--module", type=Path, default=MODULE,
                        help="the dp_nmf.py to measure (e.g. a patched copy); copied at start")
    parser.add_argument("--compare-module", type=Path, default=None,
                        help="a second dp_nmf.py (e.g. the code before a change) measured on "
                        "the same data files in the same run: entries none_compare, "
                        "all_compare")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated cell counts instead of 10k/100k/1M up to "
                        "--max-cells")
    parser.add_argument("--variants", default="none,all",
                        help="which of none,all to run (the baseline is separate)")
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.sizes.split(",")] if args.sizes else (
        [n for n in SIZES if n <= args.max_cells] or [args.max_cells])
    limits = {"timeout": args.timeout, "mem_limit_gb": args.mem_limit_gb}
    started = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "dp_nmf_speed", "genes": args.genes, "aim": AIM,
                              "environment": _environment(args.module), "sizes": {}}
    dp_variants = [v for v in ("none", "all") if v in args.variants.split(",")]
    variants = (["baseline"] if not args.skip_baseline else []) + dp_variants
    if args.compare_module:
        variants += [f"{v}_compare" for v in dp_variants]
        result["environment"]["compare_module"] = str(args.compare_module)
    with tempfile.TemporaryDirectory(prefix="bench_dp_nmf_") as tmp:
        module = Path(tmp) / "dp_nmf_measured.py"
        shutil.copyfile(args.module, module)
        compare = Path(tmp) / "dp_nmf_compared.py"
        if args.compare_module:
            shutil.copyfile(args.compare_module, compare)
        for n in sizes:
            path = Path(tmp) / f"cells{n}.h5ad"
            entry: dict[str, Any] = {"data": run(MAKE, str(n), str(args.genes), str(path),
                                                 str(args.seed), **limits)}
            if "error" not in entry["data"]:
                for variant in variants:
                    code = BASELINE if variant == "baseline" else RUN
                    measured = compare if variant.endswith("_compare") else module
                    argv = (str(path),) if variant == "baseline" else (
                        str(measured), str(path), variant.removesuffix("_compare"))
                    entry[variant] = run(code, *argv, **limits)
                    print(f"[bench_dp_nmf_speed] {n} cells, {variant}: "
                          f"{json.dumps(entry[variant])[:300]}", file=sys.stderr, flush=True)
            path.unlink(missing_ok=True)
            result["sizes"][str(n)] = entry
    rows = {int(n): e for n, e in result["sizes"].items()}
    result["linearity"] = {
        f"dp_{v}": {"fit": _scaling({n: e.get(v, {}) for n, e in rows.items()}, "fit_seconds"),
                    "sample": _scaling({n: e.get(v, {}) for n, e in rows.items()},
                                       "sample_seconds"),
                    "fit_plus_sample": _scaling({n: e.get(v, {}) for n, e in rows.items()},
                                                "fit_plus_sample_seconds")}
        for v in dp_variants}
    if not args.skip_baseline:
        result["linearity"]["baseline"] = _scaling(
            {n: e.get("baseline", {}) for n, e in rows.items()}, "seconds")
    verdict: dict[str, Any] = {}
    at100k = rows.get(100_000, {})
    for v in ("none", "all"):
        secs = at100k.get(v, {}).get("fit_plus_sample_seconds")
        aim = AIM["fit_plus_sample_seconds_at_100k"][v]
        verdict[f"100k_dp_{v}_within_{aim:.0f}s"] = None if secs is None else secs <= aim
        base = at100k.get("baseline", {}).get("seconds")
        fit = at100k.get(v, {}).get("fit_seconds")
        if base and fit:
            verdict[f"100k_dp_{v}_fit_over_baseline"] = round(fit / base, 2)
    at1m = rows.get(1_000_000, {})
    for v in ("none", "all"):
        run_1m = at1m.get(v, {})
        peak = run_1m.get("peak_rss_gb", run_1m.get("max_rss_gb_polled"))  # killed: polled max
        verdict[f"1M_dp_{v}_within_8GB"] = None if peak is None else peak <= 8.0
    result["verdict"] = verdict
    result["environment"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
