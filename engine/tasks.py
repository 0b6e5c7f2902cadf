"""The jobs the app and the CLI can start: each is a function ``(params, context) -> result``.

The UI submits them to the :class:`engine.jobs.JobManager` (which runs them in a worker
process); the CLI calls the same functions directly with a console progress reporter.
Results are small JSON-able dicts naming what was written to the workspace.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from engine.errors import DataError, UserFacingError
from engine.store import RunRecord, Workspace, atomic_write_json


class Context(Protocol):
    """What a task receives besides its parameters (see :class:`engine.worker.JobContext`)."""

    workspace: Workspace

    def progress(
        self, fraction: float, message: str = "", *, metrics: dict[str, float] | None = None
    ) -> None: ...

    def log(self, text: str) -> None: ...


# -- datasets --------------------------------------------------------------------------------
def store_dataset(
    adata: Any,
    context: Context,
    *,
    name: str,
    source: str,
    origin: str,
    notes: dict[str, Any] | None = None,
    make_current: bool = True,
) -> dict[str, Any]:
    """Validate, summarise and store ``adata``; return ``{dataset_id, ...}``.

    With ``make_current`` the dataset becomes the workspace's current one (``state.json``).

    Writes the dataset folder plus ``summary.json`` and ``qc.parquet`` (per-cell library
    size, detected genes, mitochondrial fraction) so pages never recompute them.
    """
    from engine.data.roles import guess_roles
    from engine.data.summary import summarize
    from engine.data.validate import validate_dataset

    context.progress(0.5, "checking values")
    check = validate_dataset(adata)
    context.progress(0.6, "summarising")
    summary = summarize(adata)
    roles = guess_roles(adata.obs)
    context.progress(0.75, "writing to the workspace")
    record = context.workspace.add_dataset(
        adata,
        name=name,
        source=source,
        is_counts=check.is_counts,
        counts_message=check.message,
        roles=roles,
        origin=origin,
        notes=notes,
    )
    write_summary(context.workspace, record.id, summary)
    if make_current:
        context.workspace.set_state(dataset_id=record.id, split_id=None)
    context.progress(1.0, f"stored {record.n_cells} cells × {record.n_genes} genes")
    return {
        "dataset_id": record.id,
        "message": f"Opened {name}: {record.n_cells:,} cells × {record.n_genes:,} genes.",
    }


def write_summary(workspace: Workspace, dataset_id: str, summary: Any) -> None:
    """Write ``summary.json`` and ``qc.parquet`` beside a stored dataset."""
    import pandas as pd

    folder = workspace.dataset_dir(dataset_id)
    qc = pd.DataFrame(
        {
            "library_size": np.asarray(summary.library_size, dtype=np.float64),
            "n_detected": np.asarray(summary.n_detected, dtype=np.int64),
        }
    )
    if summary.mito_fraction is not None:
        qc["mito_fraction"] = np.asarray(summary.mito_fraction, dtype=np.float64)
    tmp = folder / ".qc.parquet.tmp"
    qc.to_parquet(tmp)
    tmp.replace(folder / "qc.parquet")
    atomic_write_json(
        folder / "summary.json",
        {
            "n_cells": summary.n_cells,
            "n_genes": summary.n_genes,
            "nnz": summary.nnz,
            "sparsity": summary.sparsity,
            "is_counts": summary.counts.is_counts,
            "counts_message": summary.counts.message,
            "mito_genes": summary.mito_genes,
            "obs_columns": json.loads(summary.obs_columns.to_json(orient="records")),
        },
    )


def import_dataset(params: dict[str, Any], context: Context) -> dict[str, Any]:
    """Read a file or folder, check it, and store it as a dataset.

    params: ``path``; optional ``name``, ``cells_as_columns``, ``make_unique``,
    ``layer`` (use this layer / 'raw' as the counts), ``delete_source`` (for uploads),
    ``origin``.
    """
    import shutil

    from engine.data.readers import read_dataset
    from engine.data.validate import make_names_unique, use_counts_layer

    path = Path(params["path"])
    scratch = context.workspace.scratch_dir()
    keep_source = False
    try:
        context.progress(0.05, f"reading {path.name}")
        adata = read_dataset(
            path, cells_as_columns=bool(params.get("cells_as_columns")), workdir=scratch
        )
        if params.get("make_unique"):
            adata = make_names_unique(adata)
        if params.get("layer"):
            adata = use_counts_layer(adata, params["layer"])
        return store_dataset(
            adata,
            context,
            name=params.get("name") or path.name,
            source=str(params.get("source") or path),
            origin=params.get("origin", "file"),
        )
    except DataError as exc:
        keep_source = exc.fix is not None  # the user may retry with the fix applied
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if params.get("delete_source") and not keep_source:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            if path.parent.parent == context.workspace.uploads_dir:
                shutil.rmtree(path.parent, ignore_errors=True)


def mock_dataset(params: dict[str, Any], context: Context) -> dict[str, Any]:
    """Generate a multimodal mock dataset, embed it for a preview, and store it.

    params: the :class:`engine.generators.mock.MockConfig` fields; optional ``name``.
    Writes ``obsm['X_umap']`` (UMAP of the complete RNA profiles) into the stored data.
    """
    from engine.evaluate.embedding import umap_embedding
    from engine.generators.base import config_from_dict
    from engine.generators.mock import MockConfig, config_to_kwargs, generate_mock_dataset

    config = config_from_dict(MockConfig, params)
    kwargs = config_to_kwargs(config)

    def report(fraction: float, message: str = "") -> None:
        context.progress(0.6 * fraction, message or "generating")

    adata, keys = generate_mock_dataset(**kwargs, progress=report)
    context.progress(0.6, "embedding for the preview (UMAP)")
    truth_layer = keys.get("truth", {}).get("rna", "")
    layer = truth_layer.split("/", 1)[1] if truth_layer.startswith("layers/") else None
    adata.obsm["X_umap"] = umap_embedding(adata, layer=layer, seed=int(kwargs.get("seed", 0)))
    adata.uns["mock_keys"] = json.dumps(keys)
    name = params.get("name") or f"mock {kwargs['problem_type']} (seed {kwargs.get('seed', 0)})"
    return store_dataset(
        adata, context, name=name, source="multimodal mock generator", origin="mock",
        notes={"scenario": kwargs["problem_type"], "keys": keys},
        make_current=False,  # the Mock data page offers that as a choice
    )


# -- splits ------------------------------------------------------------------------------------
def split_dataset(params: dict[str, Any], context: Context) -> dict[str, Any]:
    """Split a stored dataset into train / test by donor (or by cell without a donor role).

    params: ``dataset_id``, ``test_fraction``, ``seed``, optional ``donor_col`` and
    ``stratify`` (columns). Writes the split folder (``split.csv``, ``train.h5ad``,
    ``test.h5ad``).
    """
    from engine.data.split import apply_split, split_cells

    workspace = context.workspace
    dataset_id = params["dataset_id"]
    record = workspace.get_dataset(dataset_id)
    if record is None:
        raise DataError("That dataset is no longer in the workspace; open it again.")
    context.progress(0.1, "reading the dataset")
    adata = workspace.load_dataset(dataset_id)
    context.progress(0.3, "choosing test donors")
    result = split_cells(
        adata.obs,
        donor_col=params.get("donor_col") or None,
        stratify=list(params.get("stratify") or []),
        test_fraction=float(params.get("test_fraction", 0.2)),
        seed=int(params.get("seed", 0)),
    )
    context.progress(0.6, "writing train and test sets")
    train, test = apply_split(adata, result)
    split = workspace.save_split(
        dataset_id,
        split_frame=result.to_frame(),
        train=train,
        test=test,
        unit=result.unit,
        label=result.label,
        params=result.params(),
        train_donors=result.train_donors,
        test_donors=result.test_donors,
    )
    workspace.set_state(dataset_id=dataset_id, split_id=split.id)
    context.progress(1.0, "split saved")
    return {
        "split_id": split.id,
        "message": (
            f"{result.label}: {split.n_train:,} training cells, {split.n_test:,} test cells."
        ),
    }


# -- training ------------------------------------------------------------------------------------
def train_generator(params: dict[str, Any], context: Context) -> dict[str, Any]:
    """Fit a generator on a split's training cells and sample synthetic cells.

    params: ``generator``, ``config`` (dict), ``seed``, optional ``dataset_id``,
    ``split_id``, ``n_cells``. Asking for a run that exists returns it at once. Writes
    ``runs/<key>/`` with ``config.json``, ``model/``, ``synthetic.h5ad`` (provenance in
    ``uns['synthcell']``), ``privacy.json``, ``metrics.json``, ``log.txt``, ``meta.json``.
    """
    from engine.generators.base import config_from_dict, fill_role_fields
    from engine.generators.registry import get_generator

    workspace = context.workspace
    try:
        generator_cls = get_generator(params["generator"])
    except ValueError as exc:
        raise UserFacingError(str(exc)) from exc
    split_of_run = workspace.get_split(params["split_id"]) if params.get("split_id") else None
    # The CLI may name only the split: its dataset gives the roles (and the run's dataset).
    role_dataset = params.get("dataset_id") or (split_of_run.dataset_id if split_of_run
                                                else None)
    role_source = workspace.get_dataset(role_dataset) if role_dataset else None
    values = fill_role_fields(generator_cls.config_class, params.get("config") or {},
                              role_source.roles if role_source else {})
    if "seed" not in values:  # a config's own seed (fit draws) follows the run's seed
        values["seed"] = int(params.get("seed", 0))
    try:
        config = config_from_dict(generator_cls.config_class, values)
    except ValueError as exc:
        raise UserFacingError(str(exc)) from exc
    config_dict = dataclasses.asdict(config)
    seed = int(params.get("seed", 0))
    dataset_id = params.get("dataset_id")
    split_id = params.get("split_id")
    split = workspace.get_split(split_id) if split_id else None
    if split_id and split is None:
        raise UserFacingError(
            f"There is no split {split_id} in the workspace; make one on the Split page first."
        )
    dataset_id = dataset_id or (split.dataset_id if split else None)
    dataset = workspace.get_dataset(split.dataset_id) if split else None
    if dataset is not None and not dataset.is_counts and (
        generator_cls.capabilities.needs_training_data
    ):
        raise UserFacingError(
            f"{generator_cls.label} models raw counts, but {dataset.name} does not hold them: "
            f"{dataset.counts_message}"
        )
    key = workspace.run_key(
        dataset_id=dataset_id, split_id=split_id, generator=generator_cls.name,
        config={**config_dict, "n_cells": params.get("n_cells")}, seed=seed,
    )
    existing = workspace.get_run(key)
    if existing is not None:
        context.progress(1.0, "found a stored run with the same inputs")
        return {"run_key": key, "cached": True, "message": "Returned the stored run."}

    train = None
    if generator_cls.capabilities.needs_training_data:
        if not split_id:
            raise UserFacingError(
                f"{generator_cls.label} learns from real cells: make a split on the Split "
                "page first, so it trains on the training donors only."
            )
        context.progress(0.02, "reading the training cells")
        train = workspace.load_split_side(
            split_id, "train", backed=generator_cls.capabilities.streams_from_disk)
    elif split is not None:
        train = workspace.load_split_side(split_id, "train")

    started = time.time()
    log_lines: list[str] = []

    def report(fraction: float, message: str = "", *,
               metrics: dict[str, float] | None = None) -> None:
        context.progress(0.05 + 0.45 * fraction, message or "fitting", metrics=metrics)
        if message:
            log_lines.append(f"{time.time() - started:8.2f}s fit {message}")

    model = generator_cls(config)
    model.fit(train, progress=report)

    def report_sampling(fraction: float, message: str = "") -> None:
        context.progress(0.5 + 0.4 * fraction, message or "sampling")
        if message:
            log_lines.append(f"{time.time() - started:8.2f}s sample {message}")

    n_cells = params.get("n_cells")
    synthetic = model.sample(int(n_cells) if n_cells else None, seed=seed,
                             progress=report_sampling)
    context.progress(0.92, "writing the run")
    provenance = {
        "run_key": key,
        "generator": generator_cls.name,
        "config": json.dumps(config_dict),
        "seed": seed,
        "dataset_id": dataset_id or "",
        "split_id": split_id or "",
        "split_label": split.label if split else "no split",
        "privacy_label": model.privacy_label,
        "privacy_spend": json.dumps(model.privacy_spend()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    synthetic.uns["synthcell"] = provenance
    duration = time.time() - started
    with workspace.building_run(key) as folder:
        atomic_write_json(folder / "config.json", {**provenance, "config": config_dict})
        model.save(folder / "model")
        synthetic.write_h5ad(folder / "synthetic.h5ad", compression="gzip")
        atomic_write_json(folder / "privacy.json",
                          {"label": model.privacy_label, **model.privacy_spend()})
        atomic_write_json(folder / "metrics.json", _basic_metrics(synthetic, train))
        (folder / "log.txt").write_text("\n".join(log_lines) + "\n")
        workspace.finish_run(
            folder,
            RunRecord(
                key=key, generator=generator_cls.name, config=config_dict, seed=seed,
                dataset_id=dataset_id, split_id=split_id, privacy_label=model.privacy_label,
                privacy=model.privacy_spend(), n_cells=int(synthetic.n_obs),
                n_genes=int(synthetic.n_vars), duration_s=round(duration, 3),
                job_id=getattr(getattr(context, "record", None), "id", None),
            ),
        )
    if train is not None and train.isbacked:
        train.file.close()
    workspace.set_state(run_key=key)
    context.progress(1.0, "run stored")
    return {
        "run_key": key,
        "cached": False,
        "message": f"Made {synthetic.n_obs:,} synthetic cells in {duration:.1f} s.",
    }


def _basic_metrics(synthetic: Any, train: Any) -> dict[str, Any]:
    """Return library-size and sparsity figures of the synthetic (and training) cells."""
    import scipy.sparse as sp

    def figures(adata: Any) -> dict[str, float]:
        libraries, nnz = [], 0
        step = 100_000  # a backed AnnData is read in blocks of rows, never whole
        for start in range(0, adata.n_obs, step):
            block = adata.X[start:start + step]
            block = block if sp.issparse(block) else sp.csr_matrix(block)
            libraries.append(np.asarray(block.sum(axis=1)).ravel())
            nnz += block.nnz
        library = np.concatenate(libraries) if libraries else np.zeros(0)
        return {
            "n_cells": int(adata.n_obs),
            "median_library_size": float(np.median(library)) if library.size else 0.0,
            "zero_fraction": 1.0 - nnz / max(1, adata.n_obs * adata.n_vars),
        }

    out = {"synthetic": figures(synthetic)}
    if train is not None:
        out["train"] = figures(train)
    return out


# -- evaluation ---------------------------------------------------------------------------------
def evaluate_run(params: dict[str, Any], context: Context) -> dict[str, Any]:
    """Compare a run's synthetic cells with the held-out cells of a split (and audit it).

    params: ``run_key``; optional ``split_id`` (default: the run's split), ``max_cells``,
    ``seed``. Cached per (split, run): writes ``runs/<key>/evaluation/<split_id>/`` once.
    """
    from engine.evaluate.report import write_report
    from engine.evaluate.suite import evaluate

    workspace = context.workspace
    run = workspace.get_run(params["run_key"])
    if run is None:
        raise UserFacingError("That run is no longer in the workspace; train it again.")
    split_id = params.get("split_id") or run.split_id
    split = workspace.get_split(split_id) if split_id else None
    if split is None:
        raise UserFacingError(
            "Evaluation compares synthetic cells with held-out real donors: choose a dataset "
            "and make a split on the Split page first."
        )
    folder = workspace.evaluation_dir(run.key, split.id)
    if (folder / "result.json").exists():
        context.progress(1.0, "found the stored evaluation")
        return {"run_key": run.key, "split_id": split.id, "cached": True,
                "message": "Returned the stored evaluation."}
    dataset = workspace.get_dataset(split.dataset_id)
    context.progress(0.01, "reading held-out, training and synthetic cells")
    real = workspace.load_split_side(split.id, "test")
    train = workspace.load_split_side(split.id, "train")
    synthetic = workspace.load_synthetic(run.key)

    def report(fraction: float, message: str = "") -> None:
        context.progress(0.02 + 0.93 * fraction, message)

    result = evaluate(real, synthetic, train=train, roles=dataset.roles if dataset else {},
                      max_cells=int(params.get("max_cells", 4000)),
                      seed=int(params.get("seed", 0)), progress=report)
    result.provenance.update({
        "run_key": run.key, "generator": run.generator, "config": run.config, "seed": run.seed,
        "privacy_label": run.privacy_label, "privacy_spend": run.privacy,
        "dataset": dataset.name if dataset else None,
        "dataset_fingerprint": dataset.fingerprint if dataset else None,
        "split_id": split.id, "split_label": split.label,
    })
    with workspace.building_evaluation(run.key, split.id) as scratch:
        result.save(scratch)
        write_report(result, scratch / "report.html",
                     title=f"{run.generator} run {run.key[:8]} vs held-out cells")
    context.progress(1.0, "evaluation stored")
    auroc, floor = result.metric("classifier_auroc_gbt")
    return {"run_key": run.key, "split_id": split.id, "cached": False,
            "message": f"Evaluated: real-vs-synthetic AUROC {auroc:.3f} (floor {floor:.3f})."}


def privacy_sweep(params: dict[str, Any], context: Context) -> dict[str, Any]:
    """The privacy–utility curve (see :func:`engine.privacy.sweep.privacy_sweep`)."""
    from engine.privacy.sweep import privacy_sweep as run_sweep

    return run_sweep(params, context)


def load_model(workspace: Workspace, run_key: str) -> Any:
    """Return the fitted generator of a stored run (read from ``runs/<key>/model``)."""
    from engine.generators.registry import get_generator

    run = workspace.get_run(run_key)
    if run is None:
        raise UserFacingError("That run is no longer in the workspace; train it again.")
    try:
        generator_cls = get_generator(run.generator)
    except ValueError as exc:
        raise UserFacingError(str(exc)) from exc
    return generator_cls.load(workspace.run_dir(run_key) / "model")


def counterfactual(params: dict[str, Any], context: Context) -> dict[str, Any]:
    """Predict chosen cells of a run's dataset in new contexts, and analyse the change.

    params: ``run_key``, ``changes`` ({field: new value}), and the cells: ``selection``
    ({column: [values]}, all must match) and/or ``cells`` (cell names); optional ``seed``,
    ``max_cells`` (a seeded random subset of the selection, default 5000). Cached: writes
    ``runs/<key>/counterfactuals/<id>/`` (``cells.h5ad``, ``genes.csv``, ``heads.csv``,
    ``embedding.parquet``, ``summary.json``) once per request.
    """
    from engine.evaluate.counterfactual import analyse, select_cells
    from engine.store import stable_hash

    workspace = context.workspace
    run = workspace.get_run(params["run_key"])
    if run is None:
        raise UserFacingError("That run is no longer in the workspace; train it again.")
    changes = {str(k): str(v) for k, v in (params.get("changes") or {}).items()}
    request = {"selection": params.get("selection") or {}, "cells": params.get("cells") or [],
               "changes": changes, "seed": int(params.get("seed", 0)),
               "max_cells": int(params.get("max_cells", 5000))}
    result_id = stable_hash(request, length=12)
    folder = workspace.evaluation_dir(run.key, result_id, kind="counterfactuals")
    if (folder / "summary.json").exists():
        context.progress(1.0, "found the stored counterfactual")
        return {"run_key": run.key, "counterfactual_id": result_id, "cached": True,
                "message": "Returned the stored counterfactual."}
    context.progress(0.05, "loading the model")
    model = load_model(workspace, run.key)
    if not getattr(model.capabilities, "counterfactual", False):
        raise UserFacingError(f"{model.label} cannot make counterfactuals; train a cycle "
                              "autoencoder.")
    if not run.dataset_id or workspace.get_dataset(run.dataset_id) is None:
        raise UserFacingError("The run's dataset is no longer in the workspace.")
    context.progress(0.1, "choosing the cells")
    real = workspace.load_dataset(run.dataset_id)
    rows = select_cells(real.obs, request["selection"], request["cells"])
    measured = np.asarray(real[rows].X.sum(axis=1)).ravel() > 0
    if not measured.any():
        raise UserFacingError("The chosen cells have no RNA counts (e.g. ATAC-only cells); "
                              "choose cells with measured expression.")
    skipped = int((~measured).sum())
    rows = rows[measured]
    if rows.size > request["max_cells"]:
        rng = np.random.default_rng(request["seed"])
        rows = np.sort(rng.choice(rows, size=request["max_cells"], replace=False))
    context.progress(0.3, f"decoding {rows.size:,} cells in the new contexts")
    result = analyse(model, real[rows], changes, real=real, seed=request["seed"])
    context.progress(0.9, "writing the counterfactual")
    result.summary["request"] = request
    with workspace.building_evaluation(run.key, result_id, kind="counterfactuals") as scratch:
        result.save(scratch)
    context.progress(1.0, "counterfactual stored")
    closeness = result.closeness.get("counterfactual")
    extra = (f"; R² of mean expression vs real target cells {closeness['r2_all']:.3f}"
             if closeness else "")
    if skipped:
        extra += f" ({skipped:,} chosen cells have no RNA counts and were left out)"
    return {"run_key": run.key, "counterfactual_id": result_id, "cached": False,
            "message": f"Made {rows.size:,} counterfactual cells{extra}."}


def _model_with(workspace: Workspace, run_key: str, capability: str, what: str) -> tuple[Any,
                                                                                      Any]:
    """Return (run record, fitted model) of a run whose generator has ``capability``."""
    run = workspace.get_run(run_key)
    if run is None:
        raise UserFacingError("That run is no longer in the workspace; train it again.")
    model = load_model(workspace, run.key)
    if not getattr(model.capabilities, capability, False):
        raise UserFacingError(f"{model.label} cannot {what}; train a conditional diffusion "
                              "model.")
    return run, model


def _real_cells_of(workspace: Workspace, run: Any) -> Any:
    """The training cells of a run's split (its whole dataset without a split), or None."""
    if run.split_id and workspace.get_split(run.split_id) is not None:
        return workspace.load_split_side(run.split_id, "train")
    if run.dataset_id and workspace.get_dataset(run.dataset_id) is not None:
        return workspace.load_dataset(run.dataset_id)
    return None


def design(params: dict[str, Any], context: Context) -> dict[str, Any]:
    """Inverse design: cells steered toward a target phenotype, with the report.

    params: ``run_key``, ``up`` and ``down`` (gene lists), optional ``strength`` (sds, default
    1), ``strengths`` ({gene: sds}), ``start`` ({field: value}), ``n_cells`` (default 500),
    ``scale`` (gradient guidance, default 1), ``guidance`` (classifier-free guidance scale),
    ``seed``. Cached: writes ``runs/<key>/designs/<id>/`` (``designed.h5ad``,
    ``start.h5ad``, ``genes.csv``, ``cell_types.csv``, ``embedding.parquet``,
    ``violins.parquet``, ``summary.json``) once per request.
    """
    from engine.evaluate.counterfactual import log_normalised
    from engine.evaluate.design import analyse_design
    from engine.generators.diffusion import DesignTarget
    from engine.store import stable_hash

    workspace = context.workspace
    run, model = _model_with(workspace, params["run_key"], "inverse_design",
                             "design cells toward a phenotype")
    request = {"up": [str(g) for g in params.get("up") or []],
               "down": [str(g) for g in params.get("down") or []],
               "strength": float(params.get("strength", 1.0)),
               "strengths": {str(k): float(v) for k, v in (params.get("strengths") or {})
                             .items()},
               "start": {str(k): str(v) for k, v in (params.get("start") or {}).items() if v},
               "n_cells": int(params.get("n_cells", 500)),
               "scale": float(params.get("scale", 1.0)),
               "guidance": (float(params["guidance"]) if params.get("guidance") is not None
                            else None),
               "seed": int(params.get("seed", 0))}
    if not 1 <= request["n_cells"] <= 100_000:
        raise UserFacingError("Ask for between 1 and 100,000 designed cells.")
    target = DesignTarget.from_lists(request["up"], request["down"], request["strength"],
                                     request["strengths"])
    result_id = stable_hash(request, length=12)
    folder = workspace.evaluation_dir(run.key, result_id, kind="designs")
    if (folder / "summary.json").exists():
        context.progress(1.0, "found the stored design")
        return {"run_key": run.key, "design_id": result_id, "cached": True,
                "message": "Returned the stored design."}
    model.gene_positions(target.genes)  # a sentence for unknown genes before any work
    designed, start = model.design(
        target, n=request["n_cells"], start=request["start"], scale=request["scale"],
        seed=request["seed"], guidance=request["guidance"],
        progress=lambda f, m="": context.progress(0.05 + 0.6 * f, m))
    context.progress(0.7, "comparing with real cells")
    real = _real_cells_of(workspace, run)
    dataset = workspace.get_dataset(run.dataset_id) if run.dataset_id else None
    label_key = (dataset.roles.get("cell_type") if dataset else None) or None
    real_expression = None
    if real is not None:
        real = real[np.asarray(real.X.sum(axis=1)).ravel() > 0]
        if real.n_obs > 5000:
            rows = np.sort(np.random.default_rng(request["seed"]).choice(
                real.n_obs, size=5000, replace=False))
            real = real[rows]
        real = real.to_memory() if real.isbacked else real
        real_expression = log_normalised(real, [str(g) for g in model.gene_names],
                                         model.config.target_sum)
    start_label = request["start"].get(label_key) if label_key else None
    result = analyse_design(designed, start, real=real, real_expression=real_expression,
                            label_key=label_key, start_label=start_label,
                            seed=request["seed"])
    result.summary["request"] = request
    result.summary["privacy_label"] = model.privacy_label
    result.summary["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    context.progress(0.95, "writing the design")
    with workspace.building_evaluation(run.key, result_id, kind="designs") as scratch:
        result.save(scratch)
        designed.write_h5ad(scratch / "designed.h5ad", compression="gzip")
        start.write_h5ad(scratch / "start.h5ad", compression="gzip")
    context.progress(1.0, "design stored")
    share = result.summary["share_meeting_all"]
    return {"run_key": run.key, "design_id": result_id, "cached": False,
            "message": f"Designed {designed.n_obs:,} cells; {share:.0%} meet every requested "
                       "gene's target."}


def denoise(params: dict[str, Any], context: Context) -> dict[str, Any]:
    """Denoise real cells with a diffusion run: partial noising to ``strength`` of the
    forward process, then the reverse process in the cells' own contexts.

    params: ``run_key``, optional ``dataset_id`` (default: the run's dataset), ``selection``
    ({column: [values]}), ``strength`` (0-1, default 0.2), ``max_cells`` (default 5000),
    ``seed``. Cached: writes ``runs/<key>/denoised/<id>/`` (``denoised.h5ad`` with
    ``layers['observed']`` and ``layers['denoised']``, ``embedding.parquet``,
    ``summary.json``) once per request."""
    from engine.evaluate.counterfactual import select_cells
    from engine.evaluate.denoise import analyse_denoising
    from engine.store import stable_hash

    workspace = context.workspace
    run, model = _model_with(workspace, params["run_key"], "inverse_design", "denoise cells")
    dataset_id = params.get("dataset_id") or run.dataset_id
    if not dataset_id or workspace.get_dataset(dataset_id) is None:
        raise UserFacingError("The dataset to denoise is not in the workspace.")
    request = {"dataset_id": dataset_id, "selection": params.get("selection") or {},
               "strength": float(params.get("strength", 0.2)),
               "max_cells": int(params.get("max_cells", 5000)),
               "seed": int(params.get("seed", 0))}
    if not 0.0 < request["strength"] <= 1.0:
        raise UserFacingError("The denoising strength must be above 0 and at most 1.")
    result_id = stable_hash(request, length=12)
    folder = workspace.evaluation_dir(run.key, result_id, kind="denoised")
    if (folder / "summary.json").exists():
        context.progress(1.0, "found the stored denoising")
        return {"run_key": run.key, "denoise_id": result_id, "cached": True,
                "message": "Returned the stored denoising."}
    real = workspace.load_dataset(dataset_id)
    rows = select_cells(real.obs, request["selection"], [])
    rows = rows[np.asarray(real[rows].X.sum(axis=1)).ravel() > 0]
    if rows.size == 0:
        raise UserFacingError("None of the chosen cells has counts to denoise.")
    if rows.size > request["max_cells"]:
        rng = np.random.default_rng(request["seed"])
        rows = np.sort(rng.choice(rows, size=request["max_cells"], replace=False))
    cells = real[rows].copy()
    out = model.denoise(cells, strength=request["strength"], seed=request["seed"],
                        progress=lambda f, m="": context.progress(0.05 + 0.75 * f, m))
    context.progress(0.85, "embedding before and after")
    dataset = workspace.get_dataset(dataset_id)
    summary, embedding = analyse_denoising(out, label_key=dataset.roles.get("cell_type"),
                                           seed=request["seed"])
    summary["request"] = request
    summary["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    with workspace.building_evaluation(run.key, result_id, kind="denoised") as scratch:
        out.write_h5ad(scratch / "denoised.h5ad", compression="gzip")
        embedding.to_parquet(scratch / "embedding.parquet")
        atomic_write_json(scratch / "summary.json", summary)
    context.progress(1.0, "denoised cells stored")
    return {"run_key": run.key, "denoise_id": result_id, "cached": False,
            "message": f"Denoised {out.n_obs:,} cells (noised to step {out.uns['denoise']['step']}"
                       f" of {out.uns['denoise']['timesteps']})."}


def posterior_checks(params: dict[str, Any], context: Context) -> dict[str, Any]:
    """Posterior-predictive checks of a Bayesian run on its training cells, and its held-out
    predictive RMSE on the split's test cells (see :mod:`engine.evaluate.posterior`).

    params: ``run_key``, optional ``seed`` (default 0), ``n_draws`` (replicated datasets,
    default 50), ``max_cells`` (cells checked / predicted, default 2000). Cached: writes
    ``runs/<key>/posterior/<id>/`` (``checks.parquet``, ``rmse.csv``, ``summary.json``) once
    per request.
    """
    from engine.evaluate.posterior import run_checks
    from engine.generators.registry import get_generator
    from engine.store import stable_hash

    workspace = context.workspace
    run = workspace.get_run(params["run_key"])
    if run is None:
        raise UserFacingError("That run is no longer in the workspace; train it again.")
    try:
        generator_cls = get_generator(run.generator)
    except ValueError as exc:
        raise UserFacingError(str(exc)) from exc
    if not generator_cls.capabilities.posterior:
        raise UserFacingError(f"{generator_cls.label} has no posterior to check; train a "
                              "Bayesian negative binomial model on the Train page.")
    request = {"seed": int(params.get("seed", 0)), "n_draws": int(params.get("n_draws", 50)),
               "max_cells": int(params.get("max_cells", 2000))}
    if not 2 <= request["n_draws"] <= 1000:
        raise UserFacingError("Ask for between 2 and 1,000 replicated datasets.")
    if not 10 <= request["max_cells"] <= 100_000:
        raise UserFacingError("Check between 10 and 100,000 cells.")
    result_id = stable_hash(request, length=12)
    folder = workspace.evaluation_dir(run.key, result_id, kind="posterior")
    if (folder / "summary.json").exists():
        context.progress(1.0, "found the stored checks")
        return {"run_key": run.key, "posterior_id": result_id, "cached": True,
                "message": "Returned the stored posterior checks."}
    context.progress(0.05, "loading the model")
    model = load_model(workspace, run.key)
    context.progress(0.1, "reading the training and held-out cells")
    train = _real_cells_of(workspace, run)
    if train is None:
        raise UserFacingError("The run's training cells are no longer in the workspace; "
                              "the checks need them.")
    heldout = (workspace.load_split_side(run.split_id, "test")
               if run.split_id and workspace.get_split(run.split_id) is not None else None)
    context.progress(0.2, f"{request['n_draws']} replicated datasets and held-out predictions")
    result = run_checks(model, train, heldout, n_draws=request["n_draws"],
                        max_cells=request["max_cells"], seed=request["seed"])
    result.summary["request"] = request
    result.summary["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    context.progress(0.95, "writing the checks")
    with workspace.building_evaluation(run.key, result_id, kind="posterior") as scratch:
        result.save(scratch)
    context.progress(1.0, "posterior checks stored")
    coverage = result.summary["checks"]["coverage"]
    message = (f"Checked {result.summary['checks']['n_cells']:,} training cells: "
               f"{coverage['mean']:.0%} of genes inside the 90% predictive interval of the "
               f"mean, {coverage['variance']:.0%} of the variance, "
               f"{coverage['zero_fraction']:.0%} of the zero fraction.")
    heldout_summary = result.summary["heldout"]
    if heldout_summary:
        rmse = heldout_summary["rmse"]
        message += (f" Held-out RMSE {rmse['model']:.3f} (without latent factors "
                    f"{rmse['model_without_factors']:.3f}, training mean {rmse['baseline']:.3f}).")
    else:
        message += " No held-out cells: the run has no split."
    return {"run_key": run.key, "posterior_id": result_id, "cached": False, "message": message}


TaskFn = Callable[[dict[str, Any], Context], dict[str, Any]]

TASKS: dict[str, TaskFn] = {
    "import_dataset": import_dataset,
    "mock_dataset": mock_dataset,
    "split": split_dataset,
    "train": train_generator,
    "evaluate": evaluate_run,
    "privacy_sweep": privacy_sweep,
    "counterfactual": counterfactual,
    "design": design,
    "denoise": denoise,
    "posterior_checks": posterior_checks,
}


def job_device(kind: str, params: dict[str, Any]) -> str:
    """Return ``"gpu"`` for a job that will use CUDA (GPU jobs run one at a time), else
    ``"cpu"``: a training job of an accelerated generator on a machine with CUDA."""
    if kind != "train":
        return "cpu"
    from engine.generators.registry import get_generator

    try:
        generator_cls = get_generator(params.get("generator", ""))
    except ValueError:
        return "cpu"
    if not generator_cls.capabilities.accelerated:
        return "cpu"
    try:
        import torch
    except ImportError:
        return "cpu"
    return "gpu" if torch.cuda.is_available() else "cpu"


def resolve_task(kind: str) -> TaskFn:
    """Return the task function for ``kind``: a name in :data:`TASKS`, or ``"module:function"``
    for tasks defined outside the engine (plugins, tests). Raises ValueError if unknown."""
    if kind in TASKS:
        return TASKS[kind]
    if ":" in kind:
        import importlib

        module_name, _, function_name = kind.partition(":")
        try:
            return getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot find task {kind!r}: {exc}") from exc
    raise ValueError(f"unknown job kind {kind!r}; known: {sorted(TASKS)}")
