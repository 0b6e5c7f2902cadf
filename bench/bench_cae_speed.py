"""Speed and peak memory of the cycle autoencoder (CAE), as its issue asks: training throughput
on this machine's CPU for 10k cells × 2k genes and three context fields, and chunked loading
of a 1M-cell dataset without holding it in memory.

Prints one JSON object. Every measurement is a fresh child process, so its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own; the parent (which imports neither
torch nor anndata, so children inherit no large RSS from it) also polls each child's RSS with
/proc every 0.2 s (``max_rss_gb_polled``) and kills it past ``--mem-limit-gb`` or
``--timeout`` (recorded as an error entry with the last stage reached, never a crash).

    PYTHONPATH=. .venv/bin/python bench/bench_cae_speed.py [--cells 10000] [--genes 2000]
        [--epochs 3] [--ensembles 1,4] [--big-cells 1000000] [--formats h5ad,npz]
        [--disk-train-cells 0] [--skip-big] [--skip-throughput] [--timeout 2400]
        [--mem-limit-gb 10] [--tmp /tmp] [--out /tmp/cae_speed.json]

(the script puts the repository on ``sys.path`` itself, so PYTHONPATH may be left out).

1. **Throughput** (``throughput``): ``--cells`` mock cells (``generate_mock_dataset("paired")``,
   ``--genes`` genes) with the fields ``condition``, ``cell_type``, ``donor`` (2, 4 and 6
   values), every gene modelled (``n_genes=0``), ``--epochs`` epochs, default batch size 128,
   for each ensemble size in ``--ensembles`` (1 and the default 4), fitted on the AnnData in
   memory; once more with one member on the backed ``.h5ad`` (how the Train task opens a
   split for a generator that streams from disk: then 10k cells are two chunks of 8192).
   Reported: training seconds (the training loop's own clock, ``history[-1]["seconds"]``:
   every member's epochs and the per-epoch head norms; setup, the optimisers, the
   target-mean pass and the reference cells are timed apart), cells/s per member = training
   cells × epochs × members / training seconds, the same without the first member-epoch
   (warm-up), seconds per epoch (all members) and per member-epoch, and peak RSS.
   Baseline in the same run (``baseline_autoencoder``): a plain torch autoencoder of the same
   width (genes → ``latent_dim`` 16 → genes, linear, MSE, Adam, lr 2e-3, batch 128, one torch
   thread as the CAE's training uses on two cores) on the same log-normalised cells, once on a
   dense tensor held in memory (the floor cost of one forward/backward of that size) and once
   building each batch from CSR counts as the CAE does (``log_normalise`` of the batch's rows).
2. **Chunked loading** (``big``): ``--big-cells`` mock cells × ``--genes`` genes written to a
   temporary folder in blocks of 100k cells (each block appended to an ``.h5ad``'s CSR ``X``
   on disk, so the writer holds one block), then copied to a ``write_npz_chunks`` folder
   (8192 cells per chunk) read from the backed file. Then, each in its own process:

   a. ``stream_<format>``: one epoch of the CAE's loader (``open_chunk_source`` +
      ``TwoLevelLoader(batch_size=128, shuffle=True)``: chunk reads of 8192 cells prefetched
      by a thread, inner minibatches), only iterating the batches; ``stream_h5ad_prepared``
      also runs the CAE's own per-batch preparation (``CAEGenerator._batches``: library
      sizes, log-normalisation to dense float32, codes, loss weights, tensor);
   b. ``train_from_disk``: ``CAEGenerator.fit`` on the backed ``.h5ad`` (``ensemble_size=1``,
      one epoch, the other settings as in 1.), the stages timed from its progress messages
      and training progress sampled every 200 batches. ``--disk-train-cells N`` trains on a
      backed file of the first N cells instead (written beside the big one) to bound the work.

   Baselines in the same run: the bytes of the counts as CSR in memory (data + indices +
   indptr, from the file) and as dense float32, and ``read_whole``: the seconds and peak RSS
   of ``anndata.read_h5ad`` loading the whole file into memory. The files are deleted at the
   end (the temporary folder under ``--tmp``; the free disk is checked first).

The CAE has a CUDA path (``device="auto"`` picks CUDA when present); this machine has no GPU,
so every number is the CPU's (``environment.cuda_available`` says so).

Measured with the defaults (2-core shared Xeon, load average 1.0-1.7, one torch thread;
10 min 51 s in all):

    10k × 2k, 3 fields, 3 epochs        cells/s per member   s per epoch   peak RSS
    CAE, 1 member (in memory)           3,181                3.1           0.82 GB
    CAE, 4 members (in memory)          3,089                12.9          0.84 GB
    CAE, 1 member (backed .h5ad)        3,052                3.3           0.75 GB
    plain AE 2000-16-2000 (dense)       71,455               0.14          0.61 GB

    1M × 2k (CSR int32 2.42 GB; dense float32 8.0 GB)     seconds   cells/s    peak RSS
    loader only, backed .h5ad (123 chunks of 8192)        3.1       327,528    0.46 GB
    loader + the CAE's batch preparation, .h5ad           8.7       115,650    0.75 GB
    loader only, npz chunk folder                         8.1       123,109    0.29 GB
    CAE fit from the backed .h5ad, 1 member, 1 epoch      349       3,016      0.99 GB
    anndata.read_h5ad of the whole file (baseline)        7.6       -          2.74 GB

A CAE step (128 cells) took about 40 ms, the plain autoencoder's 1.8 ms: per member the CAE
is about 23 times the floor cost, and its cost does not change with the ensemble (four
members: four times the time). Reading and preparing the cells is under 3 % of training.
"""

from __future__ import annotations

import argparse
import json
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

FIELDS = ("condition", "cell_type", "donor")
BLOCK = 100_000
CHUNK = 8192
BATCH = 128

_COMMON = """
import json, os, resource, sys, threading, time
def peak_gb():
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)
def rss_gb():
    with open("/proc/self/statm") as f:
        return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9, 3)
def event(**kw):
    print(json.dumps({"event": kw}), file=sys.stderr, flush=True)
FIELDS = ["condition", "cell_type", "donor"]
"""

# Writes a mock .h5ad of n_cells × n_genes block by block: each block's counts are appended to
# the CSR X on disk, only the three context columns of obs are kept in memory.
MAKE = _COMMON + """
import anndata as ad, h5py, numpy as np, pandas as pd
from engine.generators.mock import generate_mock_dataset
n_cells, n_genes, out, seed, block = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                      int(sys.argv[4]), int(sys.argv[5]))
t0 = time.perf_counter()
frames, nnz, var, dtype = [], 0, None, None
with h5py.File(out, "w") as f:
    for i in range(-(-n_cells // block)):
        size = min(block, n_cells - i * block)
        data, _ = generate_mock_dataset("paired", n_cells=size, n_genes=n_genes, n_peaks=100,
                                        n_proteins=5, seed=seed * 1000 + i)
        X = data.X.tocsr()
        if i == 0:
            ad.io.write_elem(f, "X", X)
            on_disk = ad.io.sparse_dataset(f["X"])
            var, dtype = data.var[[]], str(X.dtype)
        else:
            on_disk.append(X)
        nnz += int(X.nnz)
        frames.append(data.obs[FIELDS].astype(str))
        del data, X
        event(stage=f"block {i + 1}", seconds=round(time.perf_counter() - t0, 1),
              peak_rss_gb=peak_gb())
    obs = pd.concat(frames, ignore_index=True)
    del frames
    for c in FIELDS:
        obs[c] = obs[c].astype("category")
    obs.index = [f"cell{i}" for i in range(len(obs))]
    ad.io.write_elem(f, "obs", obs)
    ad.io.write_elem(f, "var", var)
    for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
        ad.io.write_elem(f, key, {})
    f.attrs["encoding-type"] = "anndata"
    f.attrs["encoding-version"] = "0.1.0"
    shape = tuple(int(s) for s in f["X"].attrs["shape"])
    bytes_csr = sum(int(f["X"][k].size) * f["X"][k].dtype.itemsize
                    for k in ("data", "indices", "indptr"))
    dtypes = {k: str(f["X"][k].dtype) for k in ("data", "indices", "indptr")}
print(json.dumps({
    "cells": shape[0], "genes": shape[1], "seconds": round(time.perf_counter() - t0, 1),
    "nnz": nnz, "nnz_per_cell": round(nnz / shape[0], 1), "dtypes": dtypes,
    "file_gb": round(os.path.getsize(out) / 1e9, 3),
    "csr_in_memory_gb": round(bytes_csr / 1e9, 3),
    "dense_float32_in_memory_gb": round(shape[0] * shape[1] * 4 / 1e9, 3),
    "values_per_field": {c: int(obs[c].nunique()) for c in FIELDS},
    "peak_rss_gb": peak_gb()}))
"""

# Copies a backed .h5ad to a write_npz_chunks folder (read chunk by chunk).
TO_NPZ = _COMMON + """
import anndata as ad
from engine.data.chunks import write_npz_chunks
path, folder, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.perf_counter()
backed = ad.read_h5ad(path, backed="r")
write_npz_chunks(backed, folder, chunk_size=chunk)
backed.file.close()
size = sum(p.stat().st_size for p in __import__("pathlib").Path(folder).iterdir())
print(json.dumps({"seconds": round(time.perf_counter() - t0, 1), "folder_gb": round(size / 1e9, 3),
                  "chunk_size": chunk, "peak_rss_gb": peak_gb()}))
"""

# Writes the first n cells of a backed .h5ad to a new .h5ad (block by block).
HEAD = _COMMON + """
import anndata as ad, h5py
path, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.perf_counter()
backed = ad.read_h5ad(path, backed="r")
with h5py.File(out, "w") as f:
    for start in range(0, n, 100_000):
        X = backed.X[start:min(n, start + 100_000)]
        if start == 0:
            ad.io.write_elem(f, "X", X)
            on_disk = ad.io.sparse_dataset(f["X"])
        else:
            on_disk.append(X)
    ad.io.write_elem(f, "obs", backed.obs.iloc[:n].copy())
    ad.io.write_elem(f, "var", backed.var.copy())
    for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
        ad.io.write_elem(f, key, {})
    f.attrs["encoding-type"] = "anndata"
    f.attrs["encoding-version"] = "0.1.0"
backed.file.close()
print(json.dumps({"cells": n, "seconds": round(time.perf_counter() - t0, 1),
                  "peak_rss_gb": peak_gb()}))
"""

# Fits the CAE and times its stages. argv: path, ensemble size, epochs, backed (0/1),
# seconds between training-progress events (0: none).
FIT = _COMMON + """
import anndata as ad, numpy as np
import torch
from engine.generators.cae import CAEConfig, CAEGenerator
path, size, epochs, backed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
t0 = time.perf_counter()
adata = ad.read_h5ad(path, backed="r" if backed else None)
load_s, after_load = time.perf_counter() - t0, peak_gb()
event(stage="loaded", seconds=round(load_s, 2), peak_rss_gb=after_load, rss_gb=rss_gb())
config = CAEConfig(fields=",".join(FIELDS), n_genes=0, ensemble_size=size, epochs=epochs,
                   condition_key="condition", cell_type_key="cell_type", device="cpu", seed=0)
model = CAEGenerator(config)
timed = {}
def timing(name, method):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            timed[name] = round(timed.get(name, 0.0) + time.perf_counter() - start, 3)
            event(stage=f"{name} done", seconds=timed[name], peak_rss_gb=peak_gb(),
                  rss_gb=rss_gb())
    return wrapper
model._fit_plain = timing("train", model._fit_plain)
model._combination_means = timing("target_means_pass", model._combination_means)
model._reference_cells = timing("reference_cells", model._reference_cells)
# Count the cells trained on: every training step calls losses() once with its batch.
seen = {"batches": 0, "cells": 0, "threads": None}
t_train = [0.0]
inner_losses = model.losses
def losses(x, *args, **kwargs):
    if seen["batches"] == 0:
        t_train[0] = time.perf_counter()
        seen["threads"] = torch.get_num_threads()
    seen["batches"] += 1
    seen["cells"] += int(x.shape[0])
    if seen["batches"] % 200 == 0:
        event(stage="training", batches=seen["batches"], cells=seen["cells"],
              seconds=round(time.perf_counter() - t_train[0], 1), rss_gb=rss_gb(),
              peak_rss_gb=peak_gb())
    return inner_losses(x, *args, **kwargs)
model.losses = losses
model._head_norms = timing("head_norms", model._head_norms)
marks = []
def progress(fraction, message="", metrics=None):
    marks.append((round(time.perf_counter() - t1, 3), message))
t1 = time.perf_counter()
model.fit(adata, progress=progress)
fit_s = time.perf_counter() - t1
seconds = [r["seconds"] for r in model.history]
per_epoch = [round(b - a, 3) for a, b in zip([0.0] + seconds[:-1], seconds)]
n = model.n_train_cells
members = model.n_members
# The training loop's own clock (CAE history: from the first epoch's start to the last
# epoch's record, head norms included); _fit_plain's wall time also holds its setup (Adam).
train_s = model.history[-1]["seconds"]
# One progress message per member-epoch ("epoch e/E, member k/K") with several members, per
# epoch ("epoch e/E: loss") with one: their gaps are the member-epochs' durations.
ends = [t for t, m in marks if (", member " in m if members > 1 else m.startswith("epoch"))]
starts = [round(t_train[0] - t1, 3)] + ends[:-1]
member_epochs = [round(b - a, 3) for a, b in zip(starts, ends)]
later = member_epochs[1:]
print(json.dumps({
    "cells": n, "genes": len(model.gene_names), "fields": {f: len(c) for f, c in
                                                           model.categories.items()},
    "interaction_field": model.module.interaction_field, "ensemble_size": members,
    "epochs": epochs, "batch_size": config.batch_size, "backed": backed,
    "chunk_size_used": config.chunk_size if backed else n,
    "torch_threads_in_training": seen["threads"],
    "training_cells_seen": seen["cells"], "training_batches": seen["batches"],
    "train_seconds": train_s, "fit_plain_call_seconds": timed["train"],
    "cells_per_second_per_member": round(n * epochs * members / train_s, 1),
    "cells_per_second_ensemble": round(n * epochs / train_s, 1),
    "seconds_per_epoch": per_epoch,
    "seconds_per_epoch_mean": round(sum(per_epoch) / len(per_epoch), 3),
    "seconds_per_member_epoch": round(train_s / (epochs * members), 3),
    "member_epoch_seconds": member_epochs,
    "cells_per_second_per_member_after_first_member_epoch":
        round(n * len(later) / sum(later), 1) if later else None,
    "ms_per_batch_step": round(1000 * train_s / max(1, seen["batches"]), 2),
    "head_norm_seconds": timed.get("head_norms"),
    "fit_seconds": round(fit_s, 3), "load_seconds": round(load_s, 3),
    "setup_seconds": round(fit_s - timed["train"] - timed.get("reference_cells", 0.0), 3),
    "target_means_pass_seconds": timed.get("target_means_pass"),
    "reference_cells_seconds": timed.get("reference_cells"),
    "final_loss": round(model.history[-1]["loss"], 4),
    "progress_marks": marks if len(marks) <= 6 else marks[:3] + marks[-3:],
    "peak_rss_gb_after_load": after_load, "peak_rss_gb": peak_gb(),
    "cuda_available": bool(torch.cuda.is_available()), "device_used": model.device_used}))
"""

# The plain autoencoder of the same width (the floor of one forward/backward of that size).
BASELINE = _COMMON + """
import anndata as ad, numpy as np, scipy.sparse as sp
import torch
from engine.generators.cae import CAEConfig, log_normalise
path, epochs = sys.argv[1], int(sys.argv[2])
adata = ad.read_h5ad(path)
cfg = CAEConfig()
counts = sp.csr_matrix(adata.X, dtype=np.float32)
library = np.asarray(counts.sum(axis=1)).ravel()
torch.set_num_threads(1)
n, genes = counts.shape
def run(from_csr):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(genes, cfg.latent_dim),
                                torch.nn.Linear(cfg.latent_dim, genes))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    dense = None if from_csr else torch.from_numpy(log_normalise(counts, library,
                                                                 cfg.target_sum))
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    steps = 0
    for epoch in range(epochs):
        order = rng.permutation(n)
        for s in range(0, n, cfg.batch_size):
            rows = order[s:s + cfg.batch_size]
            if from_csr:
                x = torch.from_numpy(log_normalise(counts[rows], library[rows], cfg.target_sum))
            else:
                x = dense[rows]
            loss = torch.nn.functional.mse_loss(model(x), x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
    seconds = time.perf_counter() - start
    return {"train_seconds": round(seconds, 3),
            "cells_per_second": round(n * epochs / seconds, 1),
            "seconds_per_epoch": round(seconds / epochs, 3),
            "ms_per_batch_step": round(1000 * seconds / steps, 3),
            "final_loss": round(float(loss.detach()), 4)}
dense = run(False)
event(stage="dense done", **dense)
csr = run(True)
print(json.dumps({
    "method": f"torch Sequential(Linear({genes}, {cfg.latent_dim}), Linear({cfg.latent_dim}, "
              f"{genes})), MSE on log1p(counts / library * {cfg.target_sum:g}), Adam lr "
              f"{cfg.learning_rate:g}, batch {cfg.batch_size}, shuffled, 1 torch thread, "
              f"{epochs} epochs",
    "cells": n, "genes": genes, "epochs": epochs,
    "dense_in_memory": dense, "batches_from_csr": csr, "peak_rss_gb": peak_gb()}))
"""

# One epoch of the CAE's two-level loader over a file. argv: path, mode (loader | prepared),
# chunk size, batch size.
STREAM = _COMMON + """
import numpy as np
from engine.data.chunks import TwoLevelLoader, open_chunk_source
path, mode, chunk, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
source = open_chunk_source(path, chunk_size=chunk)
loader = TwoLevelLoader(source, batch_size=batch_size, shuffle=True, seed=0)
open_s, after_open = time.perf_counter() - t0, peak_gb()
event(stage="opened", seconds=round(open_s, 2), peak_rss_gb=after_open, rss_gb=rss_gb())
cells = batches = 0
max_rss = rss_gb()
if mode == "prepared":
    import pandas as pd
    from engine.generators.cae import CAEConfig, CAEGenerator, _context_weights
    model = CAEGenerator(CAEConfig(fields=",".join(FIELDS), n_genes=0))
    obs = source.obs(FIELDS)
    model.categories = {f: sorted(map(str, pd.unique(obs[f].astype(str)))) for f in FIELDS}
    codes_all = {f: pd.Categorical(obs[f].astype(str), categories=c).codes.astype(np.int64)
                 for f, c in model.categories.items()}
    model._cell_weights = _context_weights(codes_all)
    del obs
    genes = np.arange(source.n_vars)
    import torch
    batches_iter = model._batches(loader, codes_all, genes, torch.device("cpu"))
    size = lambda b: int(b[0].shape[0])
else:
    batches_iter = iter(loader)
    size = len
t1 = time.perf_counter()
for batch in batches_iter:
    cells += size(batch)
    batches += 1
    if batches % 500 == 0:
        max_rss = max(max_rss, rss_gb())
    if batches % 2000 == 0:
        event(stage="streaming", cells=cells, seconds=round(time.perf_counter() - t1, 1),
              rss_gb=rss_gb())
seconds = time.perf_counter() - t1
print(json.dumps({
    "source": repr(source), "mode": mode, "cells": cells, "batches": batches,
    "chunks": source.n_chunks, "chunk_size": source.chunk_size, "batch_size": batch_size,
    "prefetch": loader.prefetch, "seconds": round(seconds, 2),
    "cells_per_second": round(cells / seconds), "open_seconds": round(open_s, 2),
    "peak_rss_gb_after_open": after_open, "rss_gb_max_sampled_in_loop": max_rss,
    "peak_rss_gb": peak_gb()}))
"""

# The in-memory baseline: anndata reads the whole file.
READ_WHOLE = _COMMON + """
import anndata as ad, scipy.sparse as sp
path = sys.argv[1]
before = peak_gb()
t0 = time.perf_counter()
adata = ad.read_h5ad(path)
seconds = time.perf_counter() - t0
X = adata.X
nbytes = X.data.nbytes + X.indices.nbytes + X.indptr.nbytes if sp.issparse(X) else X.nbytes
print(json.dumps({"seconds": round(seconds, 2), "x_type": type(X).__name__,
                  "x_dtype": str(X.dtype), "x_bytes_gb": round(nbytes / 1e9, 3),
                  "rss_gb_after": rss_gb(), "peak_rss_gb_before": before,
                  "peak_rss_gb": peak_gb()}))
"""


def run(code: str, *args: str, timeout: float, mem_limit_gb: float,
        label: str = "") -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter at niceness 5 (or the parent's, if higher); return
    its last stdout line as JSON plus ``max_rss_gb_polled`` and ``wall_seconds``, or an error
    entry (exit status, timeout or memory kill) with the stages it reported."""
    child = run_watched(code, *args, timeout=timeout, mem_limit_gb=mem_limit_gb,
                        env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
                        niceness=5, poll=0.2)  # the machine is shared
    result = child.result()
    if result is None:
        result = child.error()
        result["stages_reached"] = result["stages_reached"][-8:]
    else:
        result["max_rss_gb_polled"] = round(child.max_rss_gb, 3)
        result["wall_seconds"] = round(child.seconds, 1)
    if label == "train_from_disk" and "error" not in result:
        result["training_progress"] = [e for e in child.events()
                                       if e.get("stage") == "training"][-5:]
    print(f"[bench_cae_speed] {label}: {json.dumps(result)[:400]}", file=sys.stderr,
          flush=True)
    return result


def _environment() -> dict[str, Any]:
    def git(*cmd: str) -> str:
        done = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip()

    cpu = ""
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle
                        if line.startswith("model name")), "")
    except OSError:
        pass
    module = REPO / "engine" / "generators" / "cae.py"
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "python": platform.python_version(),
            "git_commit": git("rev-parse", "--short", "HEAD"),
            "cae_blob": git("hash-object", str(module)),
            "cae_modified_vs_head": bool(git("status", "--porcelain", str(module))),
            "chunks_modified_vs_head": bool(git("status", "--porcelain",
                                                str(REPO / "engine" / "data" / "chunks.py"))),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers, gathered from the entries."""
    tp = result.get("throughput", {})
    base = tp.get("baseline_autoencoder", {})
    floor = base.get("dense_in_memory", {}).get("cells_per_second")
    out: dict[str, Any] = {}
    for name, entry in tp.items():
        if name.startswith("cae_") and "error" not in entry:
            out[f"{name}_cells_per_second_per_member"] = entry["cells_per_second_per_member"]
            out[f"{name}_cells_per_second_per_member_after_first_member_epoch"] = entry[
                "cells_per_second_per_member_after_first_member_epoch"]
            out[f"{name}_seconds_per_epoch"] = entry["seconds_per_epoch_mean"]
            out[f"{name}_peak_rss_gb"] = entry["peak_rss_gb"]
            out[f"{name}_per_member_slower_than_plain_ae"] = _ratio(
                floor, entry["cells_per_second_per_member"])
    if floor:
        out["baseline_plain_ae_cells_per_second"] = floor
        out["baseline_plain_ae_from_csr_cells_per_second"] = base.get(
            "batches_from_csr", {}).get("cells_per_second")
    big = result.get("big", {})
    for name, entry in big.items():
        if not isinstance(entry, dict) or "error" in entry:
            continue
        if name.startswith("stream_"):
            out[f"{name}_seconds"] = entry["seconds"]
            out[f"{name}_cells_per_second"] = entry["cells_per_second"]
            out[f"{name}_peak_rss_gb"] = entry["peak_rss_gb"]
        if name == "train_from_disk":
            out["train_from_disk_cells"] = entry["cells"]
            out["train_from_disk_fit_seconds"] = entry["fit_seconds"]
            out["train_from_disk_cells_per_second_per_member"] = entry[
                "cells_per_second_per_member"]
            out["train_from_disk_peak_rss_gb"] = entry["peak_rss_gb"]
        if name == "read_whole":
            out["read_whole_peak_rss_gb"] = entry["peak_rss_gb"]
            out["read_whole_seconds"] = entry["seconds"]
    data = big.get("data", {})
    if "csr_in_memory_gb" in data:
        out["big_csr_in_memory_gb"] = data["csr_in_memory_gb"]
        out["big_dense_float32_gb"] = data["dense_float32_in_memory_gb"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=10_000, help="throughput cells")
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3, help="throughput epochs")
    parser.add_argument("--ensembles", default="1,4", help="ensemble sizes to time")
    parser.add_argument("--big-cells", type=int, default=1_000_000)
    parser.add_argument("--formats", default="h5ad,npz", help="formats streamed in 2a")
    parser.add_argument("--disk-train-cells", type=int, default=0,
                        help="train from disk on the first N cells only (0: all)")
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--timeout", type=float, default=2400.0, help="seconds per child")
    parser.add_argument("--mem-limit-gb", type=float, default=10.0,
                        help="kill a child whose RSS passes this (recorded as an error)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    limits = {"timeout": args.timeout, "mem_limit_gb": args.mem_limit_gb}
    started = time.perf_counter()
    free = shutil.disk_usage(args.tmp).free
    result: dict[str, Any] = {
        "benchmark": "cae_speed", "fields": list(FIELDS), "genes": args.genes,
        "environment": {**_environment(), "tmp": str(args.tmp),
                        "tmp_free_gb_at_start": round(free / 1e9, 1)}}
    with tempfile.TemporaryDirectory(prefix="bench_cae_speed_", dir=args.tmp) as tmp:
        folder = Path(tmp)
        if not args.skip_throughput:
            small = folder / f"cells{args.cells}.h5ad"
            tp: dict[str, Any] = {"data": run(MAKE, str(args.cells), str(args.genes),
                                              str(small), str(args.seed), str(BLOCK),
                                              label="throughput data", **limits)}
            if "error" not in tp["data"]:
                tp["baseline_autoencoder"] = run(BASELINE, str(small), str(args.epochs),
                                                 label="baseline autoencoder", **limits)
                for size in (int(s) for s in args.ensembles.split(",")):
                    tp[f"cae_ensemble{size}"] = run(FIT, str(small), str(size),
                                                    str(args.epochs), "0",
                                                    label=f"cae ensemble {size}", **limits)
                tp["cae_ensemble1_backed"] = run(FIT, str(small), "1", str(args.epochs), "1",
                                                 label="cae ensemble 1 backed", **limits)
            result["throughput"] = tp
        if not args.skip_big:
            # the .h5ad, the npz copy and a possible head file: about 3 × the CSR size
            need_gb = args.big_cells * args.genes * 0.17 * 8 * 3 / 1e9
            if free / 1e9 < need_gb + 5:
                result["big"] = {"error": f"{free / 1e9:.0f} GB free under {args.tmp}; "
                                          f"about {need_gb:.0f} GB needed"}
            else:
                result["big"] = _big(folder, args, limits)
    result["environment"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["summary"] = _summary(result)
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return result


def _big(folder: Path, args: argparse.Namespace, limits: dict[str, float]) -> dict[str, Any]:
    """Write the big dataset, stream it, train from it, load it whole; delete it."""
    path = folder / f"cells{args.big_cells}.h5ad"
    big: dict[str, Any] = {"data": run(MAKE, str(args.big_cells), str(args.genes), str(path),
                                       str(args.seed + 1), str(BLOCK), label="big data",
                                       **limits)}
    if "error" in big["data"]:
        return big
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if "h5ad" in formats:
        big["stream_h5ad"] = run(STREAM, str(path), "loader", str(CHUNK), str(BATCH),
                                 label="stream h5ad", **limits)
        big["stream_h5ad_prepared"] = run(STREAM, str(path), "prepared", str(CHUNK),
                                          str(BATCH), label="stream h5ad prepared", **limits)
    if "npz" in formats:
        npz = folder / "chunks"
        big["npz_data"] = run(TO_NPZ, str(path), str(npz), str(CHUNK), label="npz copy",
                              **limits)
        if "error" not in big["npz_data"]:
            big["stream_npz"] = run(STREAM, str(npz), "loader", str(CHUNK), str(BATCH),
                                    label="stream npz", **limits)
        shutil.rmtree(npz, ignore_errors=True)
    train_path = path
    if 0 < args.disk_train_cells < args.big_cells:
        train_path = folder / f"head{args.disk_train_cells}.h5ad"
        big["train_subset"] = run(HEAD, str(path), str(train_path), str(args.disk_train_cells),
                                  label="train subset", **limits)
    big["train_from_disk"] = run(FIT, str(train_path), "1", "1", "1", label="train_from_disk",
                                 **limits)
    big["read_whole"] = run(READ_WHOLE, str(path), label="read whole", **limits)
    for leftover in folder.glob("*.h5ad"):
        leftover.unlink()
    return big


if __name__ == "__main__":
    main()
