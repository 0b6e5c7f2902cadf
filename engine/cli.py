"""``python -m engine``: every job the app can start, headless.

Bad input prints the same sentence the app shows and exits with status 2; an unexpected
failure exits with 1. Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from engine.errors import UserFacingError
from engine.store import Workspace

EXIT_BAD_INPUT = 2


@dataclasses.dataclass
class ConsoleContext:
    """A task context that prints progress to stderr (used instead of a job worker)."""

    workspace: Workspace
    quiet: bool = False
    _last: float = 0.0

    def progress(
        self, fraction: float, message: str = "", *, metrics: dict[str, float] | None = None
    ) -> None:
        now = time.monotonic()
        if self.quiet or (now - self._last < 0.5 and fraction < 1.0):
            return
        self._last = now
        extra = " ".join(f"{k}={v:.4g}" for k, v in (metrics or {}).items())
        print(f"[{fraction * 100:5.1f}%] {message} {extra}".rstrip(), file=sys.stderr)

    def log(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr)


def _context(args: argparse.Namespace) -> ConsoleContext:
    return ConsoleContext(Workspace(args.workspace), quiet=args.quiet)


def _print(payload: Any) -> None:
    print(json.dumps(payload, indent=2, default=str))


def _read_json_file(path: str) -> dict[str, Any]:
    """Read a JSON config file named on the command line (UserFacingError when unusable)."""
    try:
        values = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UserFacingError(f"Cannot read the config file {path}: {exc.strerror}.") from exc
    except ValueError as exc:
        raise UserFacingError(f"The config file {path} is not valid JSON: {exc}.") from exc
    if not isinstance(values, dict):
        raise UserFacingError(f"The config file {path} must hold a JSON object ({{...}}).")
    return values


def _resolve_dataset(args: argparse.Namespace, context: ConsoleContext, ref: str) -> str:
    """Return a dataset id: ``ref`` is an id in the workspace or a path to import."""
    from engine.tasks import import_dataset

    if context.workspace.get_dataset(ref) is not None:
        return ref
    path = Path(ref)
    if not path.exists():
        raise UserFacingError(
            f"{ref} is neither a dataset id in the workspace nor a file or folder."
        )
    result = import_dataset(
        {"path": str(path), "cells_as_columns": getattr(args, "cells_as_columns", False)},
        context,
    )
    return result["dataset_id"]


# -- commands -------------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    from engine.data.readers import FORMATS, detect_format, read_dataset
    from engine.data.roles import guess_roles
    from engine.data.summary import summarize
    from engine.data.validate import validate_dataset

    path = Path(args.path)
    workspace = Workspace(args.workspace)
    scratch = workspace.scratch_dir()
    try:
        adata = read_dataset(path, cells_as_columns=args.cells_as_columns, workdir=scratch)
        fmt = detect_format(path)  # after reading, so errors match the page; zip: its content
        check = validate_dataset(adata)
        summary = summarize(adata)
    finally:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    _print(
        {
            "path": str(path),
            "format": FORMATS.get(fmt, fmt),
            "n_cells": summary.n_cells,
            "n_genes": summary.n_genes,
            "nnz": summary.nnz,
            "sparsity": round(summary.sparsity, 4),
            "is_counts": check.is_counts,
            "counts": check.message,
            "mito_genes": summary.mito_genes,
            "roles_guessed": guess_roles(adata.obs),
            "obs_columns": list(adata.obs.columns),
        }
    )
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from engine.tasks import import_dataset

    context = _context(args)
    result = import_dataset(
        {
            "path": args.path,
            "name": args.name,
            "cells_as_columns": args.cells_as_columns,
            "make_unique": args.make_unique,
            "layer": args.layer,
        },
        context,
    )
    _print(result)
    return 0


def cmd_roles(args: argparse.Namespace) -> int:
    workspace = Workspace(args.workspace)
    record = workspace.get_dataset(args.dataset)
    if record is None:
        raise UserFacingError(f"No dataset {args.dataset} in the workspace {workspace.root}.")
    from engine.data.roles import check_role_mapping

    roles = dict(record.roles)
    for item in args.set or []:
        role, _, column = item.partition("=")
        roles[role] = column or None
    check_role_mapping(roles, list(workspace.load_obs(record.id).columns))
    record = workspace.set_roles(record.id, roles)
    _print(record.roles)
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from engine.tasks import split_dataset

    context = _context(args)
    dataset_id = _resolve_dataset(args, context, args.dataset)
    record = context.workspace.get_dataset(dataset_id)
    donor_col = args.donor_col if args.donor_col is not None else record.roles.get("donor")
    stratify = args.stratify
    if stratify is None:
        stratify = [c for c in (record.roles.get("cell_type"), record.roles.get("condition")) if c]
    result = split_dataset(
        {
            "dataset_id": dataset_id,
            "donor_col": donor_col or None,
            "stratify": stratify,
            "test_fraction": args.test_fraction,
            "seed": args.seed,
        },
        context,
    )
    split = context.workspace.get_split(result["split_id"])
    _print({**result, "split_csv": str(context.workspace.split_csv(split.id)),
            "train_donors": split.train_donors, "test_donors": split.test_donors})
    return 0


def cmd_mock(args: argparse.Namespace) -> int:
    from engine.generators.base import config_from_dict
    from engine.generators.mock import SCENARIOS, MockConfig, config_to_kwargs

    config_values: dict[str, Any] = {}
    if args.config:
        config_values = _read_json_file(args.config)
    if args.write_config:
        template = dataclasses.asdict(MockConfig())
        template.update(config_values)
        Path(args.write_config).write_text(json.dumps(template, indent=2))
        print(f"wrote a config template to {args.write_config}", file=sys.stderr)
        if not (args.scenario or args.all):
            return 0
    scenarios = (
        list(SCENARIOS)
        if args.all
        else [args.scenario or config_values.get("problem_type") or "paired"]
    )
    for name in ("n_cells", "n_genes", "seed"):
        if getattr(args, name) is not None:
            config_values[name] = getattr(args, name)
    outputs = []
    context = _context(args)
    for scenario in scenarios:
        try:
            config = config_from_dict(MockConfig, {**config_values, "problem_type": scenario})
        except ValueError as exc:
            raise UserFacingError(str(exc)) from exc
        if args.out:
            outputs.append(_write_mock(config_to_kwargs(config), Path(args.out), len(scenarios)))
        else:
            from engine.tasks import mock_dataset

            outputs.append(mock_dataset(dataclasses.asdict(config), context))
    _print(outputs)
    return 0


def _write_mock(kwargs: dict[str, Any], out: Path, n_scenarios: int) -> dict[str, Any]:
    """Write one mock dataset to ``out`` (a file, or a folder when several scenarios)."""
    from engine.generators.mock import generate_mock_dataset
    from engine.store import write_h5ad_atomic

    adata, keys = generate_mock_dataset(**kwargs)
    adata.uns["mock_keys"] = json.dumps(keys)
    target = out / f"mock_{kwargs['problem_type']}.h5ad" if n_scenarios > 1 else out
    write_h5ad_atomic(adata, target)
    return {"path": str(target), "n_cells": adata.n_obs, "n_genes": adata.n_vars, "keys": keys}


def cmd_train(args: argparse.Namespace) -> int:
    from engine.tasks import train_generator

    context = _context(args)
    config = _config_from_args(args)
    dataset_id = _resolve_dataset(args, context, args.dataset) if args.dataset else None
    generator = args.generator or args.generator_name
    if not generator:
        raise UserFacingError("Name the generator to train, e.g. `train cae` or "
                              "`train --generator dp-nmf` (see `generators`).")
    result = train_generator(
        {
            "generator": generator,
            "config": config,
            "seed": args.seed,
            "dataset_id": dataset_id,
            "split_id": args.split,
            "n_cells": args.n_cells,
        },
        context,
    )
    _print({**result, "folder": str(context.workspace.run_dir(result["run_key"]))})
    return 0


def _config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """A config dict from ``--config FILE`` and ``--set NAME=VALUE`` pairs."""
    config = _read_json_file(args.config) if args.config else {}
    for item in args.set or []:
        name, _, value = item.partition("=")
        try:
            config[name] = json.loads(value)  # numbers, true/false, lists
        except ValueError:
            config[name] = value  # plain text, e.g. a choice
    return config


def cmd_privacy_plan(args: argparse.Namespace) -> int:
    """What DP-NMF settings spend, before training: the accountant's total and per stage."""
    from engine.generators.base import config_from_dict
    from engine.generators.dp_nmf import DPNMFConfig, plan_privacy

    try:
        config = config_from_dict(DPNMFConfig, _config_from_args(args))
    except ValueError as exc:
        raise UserFacingError(str(exc)) from exc
    plan = plan_privacy(config, n_units=args.units, n_labels=args.labels)
    _print(plan.to_dict())
    return 0


def cmd_privacy_sweep(args: argparse.Namespace) -> int:
    """The privacy–utility curve (the Privacy page's job) from the command line."""
    from engine.privacy.sweep import load_sweep, privacy_sweep

    context = _context(args)
    result = privacy_sweep({"split_id": args.split, "epsilons": args.epsilons,
                            "generator": args.generator, "config": _config_from_args(args),
                            "seed": args.seed, "max_cells": args.max_cells}, context)
    _print(load_sweep(context.workspace, result["sweep_id"]))
    return 0


def _pairs(items: list[str] | None, what: str) -> dict[str, str]:
    """Parse ``NAME=VALUE`` items; UserFacingError naming ``what`` for one without '='."""
    pairs = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UserFacingError(f"Write {what} as NAME=VALUE, not {item!r}.")
        pairs[name] = value
    return pairs


def cmd_counterfactual(args: argparse.Namespace) -> int:
    """Counterfactual cells of a cycle-autoencoder run, with their analysis."""
    from engine.evaluate.counterfactual import CounterfactualResult
    from engine.tasks import counterfactual

    context = _context(args)
    selection = {k: v.split("|") for k, v in _pairs(args.cells, "--cells").items()}
    names: list[str] = []
    if args.cell_names:
        try:
            names = [n.strip() for n in Path(args.cell_names).read_text().splitlines()
                     if n.strip()]
        except OSError as exc:
            raise UserFacingError(f"Cannot read {args.cell_names}: {exc.strerror}.") from exc
    result = counterfactual({"run_key": args.run, "selection": selection, "cells": names,
                             "changes": _pairs(args.set, "--set"), "seed": args.seed,
                             "max_cells": args.max_cells}, context)
    folder = context.workspace.evaluation_dir(args.run, result["counterfactual_id"],
                                              kind="counterfactuals")
    loaded = CounterfactualResult.load(folder)
    if args.out:
        from engine.store import write_h5ad_atomic

        write_h5ad_atomic(loaded.cells, Path(args.out))
    top = loaded.genes.head(10)
    _print({**result, "folder": str(folder), "closeness": loaded.closeness,
            "top_genes": {g: round(float(v), 3) for g, v in top["log2_fold_change"].items()},
            "head_norms": loaded.head_norms})
    return 0


def _gene_list(items: list[str] | None) -> list[str]:
    """Genes given as repeated or comma-separated arguments."""
    return [g.strip() for item in items or [] for g in item.split(",") if g.strip()]


def cmd_design(args: argparse.Namespace) -> int:
    """Inverse design with a diffusion run: cells steered toward genes up / down."""
    from engine.evaluate.design import DesignResult
    from engine.tasks import design

    context = _context(args)
    strengths = {k: float(v) for k, v in _pairs(args.gene_strength, "--gene-strength").items()}
    result = design({"run_key": args.run, "up": _gene_list(args.up),
                     "down": _gene_list(args.down), "strength": args.strength,
                     "strengths": strengths, "start": _pairs(args.start, "--start"),
                     "n_cells": args.n_cells, "scale": args.scale, "guidance": args.guidance,
                     "seed": args.seed}, context)
    folder = context.workspace.evaluation_dir(args.run, result["design_id"], kind="designs")
    loaded = DesignResult.load(folder)
    if args.out:
        import shutil

        shutil.copyfile(folder / "designed.h5ad", Path(args.out))
    keys = ("share_meeting_all", "share_start_meeting_all", "top_assigned_type",
            "share_top_assigned_type", "share_assigned_start_type", "nn_distance_ratio",
            "nn_distance_ratio_start")
    _print({**result, "folder": str(folder),
            **{k: loaded.summary[k] for k in keys if k in loaded.summary},
            "genes": loaded.genes.round(3).to_dict(orient="records")})
    return 0


def cmd_denoise(args: argparse.Namespace) -> int:
    """Denoise real cells of a run's dataset with a diffusion run."""
    from engine.tasks import denoise

    context = _context(args)
    selection = {k: v.split("|") for k, v in _pairs(args.cells, "--cells").items()}
    result = denoise({"run_key": args.run, "selection": selection, "strength": args.strength,
                      "max_cells": args.max_cells, "seed": args.seed}, context)
    folder = context.workspace.evaluation_dir(args.run, result["denoise_id"], kind="denoised")
    summary = json.loads((folder / "summary.json").read_text())
    if args.out:
        import shutil

        shutil.copyfile(folder / "denoised.h5ad", Path(args.out))
    _print({**result, "folder": str(folder),
            **{k: v for k, v in summary.items() if k != "request"}})
    return 0


def cmd_posterior(args: argparse.Namespace) -> int:
    """Posterior-predictive checks and held-out RMSE of a Bayesian NB run."""
    from engine.evaluate.posterior import PosteriorChecks
    from engine.tasks import posterior_checks

    context = _context(args)
    result = posterior_checks({"run_key": args.run, "n_draws": args.draws,
                               "max_cells": args.max_cells, "seed": args.seed}, context)
    folder = context.workspace.evaluation_dir(args.run, result["posterior_id"],
                                              kind="posterior")
    summary = PosteriorChecks.load(folder).summary
    checks, heldout = summary["checks"], summary["heldout"]
    _print({**result, "folder": str(folder),
            "coverage": {k: round(v, 4) for k, v in checks["coverage"].items()},
            "cells_checked": checks["n_cells"], "genes": checks["n_genes"],
            "replicates": checks["n_draws"],
            "heldout_rmse": ({k: round(v, 4) for k, v in heldout["rmse"].items()}
                             if heldout else None),
            "heldout_cells": heldout["n_cells"] if heldout else 0})
    return 0


def cmd_generators(args: argparse.Namespace) -> int:
    from engine.generators.base import config_fields
    from engine.generators.registry import list_generators

    _print(
        [
            {
                "name": g.name,
                "label": g.label,
                "capabilities": g.capabilities.as_labels(),
                "config": {f.name: f.default for f in config_fields(g.config_class)},
            }
            for g in list_generators()
        ]
    )
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    workspace = Workspace(args.workspace)
    rows = [
        {
            "key": r.key,
            "generator": r.generator,
            "cells": r.n_cells,
            "genes": r.n_genes,
            "privacy": r.privacy_label,
            "duration_s": r.duration_s,
            "size_mb": round(r.size_bytes / 1e6, 2),
            "dataset": r.dataset_id,
            "split": r.split_id,
            "path": str(workspace.synthetic_path(r.key)),
        }
        for r in workspace.list_runs()
    ]
    _print(rows)
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    workspace = Workspace(args.workspace)
    _print([dataclasses.asdict(r) for r in workspace.list_datasets()])
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from engine.jobs import JobManager

    manager = JobManager(Workspace(args.workspace), start_scheduler=False)
    _print(
        [
            {"id": r.id, "title": r.title, "status": r.status, "progress": r.progress,
             "message": r.message, "error": r.error}
            for r in manager.list(limit=args.limit)
        ]
    )
    return 0


def _read_for_split(args: argparse.Namespace) -> Any:
    from engine.data.readers import read_dataset

    workspace = Workspace(args.workspace)
    scratch = workspace.scratch_dir()
    try:
        return read_dataset(Path(args.path), workdir=scratch)
    finally:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)


def cmd_generate_split_indices(args: argparse.Namespace) -> int:
    """The seed tool's verb: write the split as ``{splits: {split_1: {train_index, test_index}}}``
    YAML (the challenge tools' layout, cell ids), or as a cell_id,side CSV when ``--out``
    ends in ``.csv``."""
    import pandas as pd
    import yaml

    from engine.data.split import generate_split_indices

    adata = _read_for_split(args)
    layout = generate_split_indices(
        adata.obs,
        donor_col=args.donor_col,
        test_fraction=args.test_fraction,
        seed=args.seed,
        stratify=args.stratify or [],
    )
    split = layout["splits"]["split_1"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if out.suffix.lower() == ".csv":
        frame = pd.DataFrame(
            {"cell_id": split["train_index"] + split["test_index"],
             "side": ["train"] * len(split["train_index"]) + ["test"] * len(split["test_index"])}
        )
        frame.to_csv(tmp, index=False)
    else:
        tmp.write_text(yaml.safe_dump(layout, sort_keys=False))
    tmp.replace(out)
    _print({"out": str(out), "train": len(split["train_index"]), "test": len(split["test_index"])})
    return 0


def _read_sides(path: Path) -> dict[str, str]:
    """Read cell id -> side from a split YAML (challenge layout) or a cell_id,side CSV."""
    import pandas as pd
    import yaml

    if not path.is_file():
        raise UserFacingError(f"{path} does not exist: give the file generate-split-indices "
                              "wrote.")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            layout = yaml.safe_load(path.read_text())
            split = next(iter(layout["splits"].values()))
            train, test = split["train_index"], split["test_index"]
        except (KeyError, TypeError, AttributeError, StopIteration, yaml.YAMLError) as exc:
            raise UserFacingError(
                f"{path} is not a split file: it needs splits: split_1: train_index / test_index."
            ) from exc
        return {**{str(c): "train" for c in train}, **{str(c): "test" for c in test}}
    frame = pd.read_csv(path, dtype=str)
    if not {"cell_id", "side"} <= set(frame.columns):
        raise UserFacingError(f"{path} needs the columns cell_id and side.")
    return dict(zip(frame["cell_id"], frame["side"], strict=True))


def cmd_generate_data_splits(args: argparse.Namespace) -> int:
    """The seed tool's verb: write train.h5ad and test.h5ad from a data file and its split."""
    from engine.store import write_h5ad_atomic

    adata = _read_for_split(args)
    sides = _read_sides(Path(args.indices))
    assigned = adata.obs_names.astype(str).map(lambda c: sides.get(c, ""))
    missing = int((assigned == "").sum())
    if missing:
        raise UserFacingError(
            f"{missing} cells of {args.path} are not in {args.indices}: "
            "make the split from the same data file."
        )
    out = Path(args.out_dir)
    written = {}
    for side in ("train", "test"):
        part = adata[(assigned == side)].copy()
        part.obs["split"] = side
        target = out / f"{side}.h5ad"
        write_h5ad_atomic(part, target)
        written[side] = {"path": str(target), "n_cells": int(part.n_obs)}
    _print(written)
    return 0


def _read_h5ad(path: str, what: str) -> Any:
    from engine.data.readers import read_dataset

    if not Path(path).exists():
        raise UserFacingError(f"The {what} file {path} does not exist.")
    return read_dataset(Path(path))


def _roles_for(real: Any, args: argparse.Namespace) -> dict[str, str | None]:
    from engine.data.roles import guess_roles

    roles = guess_roles(real.obs)
    for role in ("donor", "cell_type", "condition"):
        value = getattr(args, f"{role}_col", None)
        if value is not None:
            roles[role] = value or None
    return roles


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Compare synthetic cells with held-out real cells; optional report and JSON."""
    from engine.evaluate.report import write_report
    from engine.evaluate.suite import evaluate

    context = _context(args)
    if args.run:
        from engine.tasks import evaluate_run

        result = evaluate_run({"run_key": args.run, "split_id": args.split,
                               "max_cells": args.max_cells, "seed": args.seed}, context)
        folder = context.workspace.evaluation_dir(result["run_key"], result["split_id"])
        _print({**result, "folder": str(folder)})
        return 0
    if not (args.real and args.synthetic):
        raise UserFacingError("Give --real and --synthetic files, or --run KEY from the "
                              "workspace.")
    real = _read_h5ad(args.real, "real (held-out)")
    synthetic = _read_h5ad(args.synthetic, "synthetic")
    train = _read_h5ad(args.train, "training") if args.train else None
    result = evaluate(real, synthetic, train=train, roles=_roles_for(real, args),
                      max_cells=args.max_cells, seed=args.seed, audit=not args.no_audit,
                      progress=context.progress)
    payload = result.to_json()
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str))
    if args.report:
        write_report(result, Path(args.report), title=f"{Path(args.synthetic).name} vs "
                     f"{Path(args.real).name}")
    _print({name: payload["metrics"][name] for name in payload["metrics"]
            if "[" not in name} if not args.json else {"json": args.json,
                                                        "report": args.report})
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """The membership-inference audit alone (needs the training cells)."""
    from engine.evaluate.suite import evaluate

    context = _context(args)
    real = _read_h5ad(args.real, "real (held-out)")
    synthetic = _read_h5ad(args.synthetic, "synthetic")
    train = _read_h5ad(args.train, "training")
    result = evaluate(real, synthetic, train=train, roles=_roles_for(real, args),
                      max_cells=args.max_cells, seed=args.seed, progress=context.progress)
    payload = result.to_json().get("audit", {})
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str))
    _print(payload)
    return 0


def cmd_run_singlecell_generator(args: argparse.Namespace) -> int:
    """The seed tool's verb: fit DP-NMF on the configured training counts and write the
    annotated synthetic .h5ad where the seed put it."""
    from engine.data.readers import read_dataset
    from engine.data.validate import validate_dataset
    from engine.generators.base import config_from_dict
    from engine.generators.dp_nmf import DPNMFConfig, DPNMFGenerator
    from engine.generators.seed_config import read_seed_config
    from engine.store import fingerprint_adata, write_h5ad_atomic

    config_path = Path(args.config) if args.config else Path.cwd() / "config.yaml"
    run = read_seed_config(config_path, experiment_name=args.experiment_name, dp=args.dp)
    for note in run.notes:
        print(f"note: {note}", file=sys.stderr)
    if not run.train_path.exists():
        raise UserFacingError(f"The training count file {run.train_path} does not exist.")
    train = read_dataset(run.train_path)
    validate_dataset(train, require_counts=True)
    try:
        config = config_from_dict(DPNMFConfig, run.config)
    except ValueError as exc:
        raise UserFacingError(str(exc)) from exc
    context = _context(args)
    model = DPNMFGenerator(config)
    model.fit(train, progress=context.progress)
    synthetic = model.sample(run.n_synth_samples, seed=config.seed, progress=context.progress)
    synthetic.uns["synthcell"] = {
        "generator": DPNMFGenerator.name, "config": json.dumps(dataclasses.asdict(config)),
        "seed": config.seed, "train_count_file": str(run.train_path),
        "data_fingerprint": fingerprint_adata(train), "privacy_label": model.privacy_label,
        "privacy_spend": json.dumps(model.privacy_spend()),
        "experiment_name": args.experiment_name,
    }
    write_h5ad_atomic(synthetic, run.output_path)
    _print({"output": str(run.output_path), "n_cells": int(synthetic.n_obs),
            "privacy": model.privacy_label, "epsilon": model.privacy_spend().get("epsilon")})
    return 0


# -- parser ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__)
    parser.add_argument("--workspace", help="workspace folder (default: $SYNTHCELL_WORKSPACE "
                        "or ./workspace)")
    parser.add_argument("--quiet", action="store_true", help="print no progress")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="read a dataset and report format, shape, counts, roles")
    p.add_argument("path")
    p.add_argument("--cells-as-columns", action="store_true",
                   help="CSV/TSV: cells are columns, genes rows")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("import", help="read a dataset, check it and store it in the workspace")
    p.add_argument("path")
    p.add_argument("--name")
    p.add_argument("--cells-as-columns", action="store_true")
    p.add_argument("--make-unique", action="store_true", help="make duplicated names unique")
    p.add_argument("--layer", help="use this layer (or 'raw') as the counts")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("datasets", help="list datasets in the workspace")
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser("roles", help="show or set column roles: roles ID donor=individual ...")
    p.add_argument("dataset")
    p.add_argument("set", nargs="*", metavar="ROLE=COLUMN")
    p.set_defaults(func=cmd_roles)

    p = sub.add_parser("split", help="donor-disjoint train/test split of a dataset (id or path)")
    p.add_argument("dataset")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--donor-col", help="donor column (default: the dataset's donor role); "
                   "'' for a cell-level split")
    p.add_argument("--stratify", nargs="*", help="columns to balance (default: cell type "
                   "and condition roles)")
    p.add_argument("--cells-as-columns", action="store_true")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("mock", help="make a multimodal mock dataset")
    p.add_argument("--scenario", help="paired|unpaired|bridge|mosaic|prediction|hierarchical")
    p.add_argument("--all", action="store_true", help="every scenario")
    p.add_argument("--config", help="JSON config (see --write-config)")
    p.add_argument("--write-config", metavar="FILE", help="write a config template")
    p.add_argument("--n-cells", type=int)
    p.add_argument("--n-genes", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="write .h5ad here (a folder with --all) instead of storing "
                   "it in the workspace")
    p.set_defaults(func=cmd_mock)

    p = sub.add_parser("generators", help="list generators, capabilities and default configs")
    p.set_defaults(func=cmd_generators)

    p = sub.add_parser("train", help="train a generator and sample synthetic cells")
    p.add_argument("generator_name", nargs="?", metavar="GENERATOR",
                   help="generator name (see `generators`), e.g. cae or dp-nmf")
    p.add_argument("--generator", help="the generator name (same as GENERATOR)")
    p.add_argument("--dataset", help="dataset id or path")
    p.add_argument("--split", help="split id (from `split`)")
    p.add_argument("--config", help="JSON config file")
    p.add_argument("--set", nargs="*", metavar="NAME=VALUE", help="config values")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-cells", type=int, help="synthetic cells to sample")
    p.set_defaults(func=cmd_train)

    for name, helptext in (("evaluate", "compare synthetic with held-out real cells"),
                           ("audit", "membership-inference audit of a synthetic dataset")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--real", required=name == "audit", help="held-out real cells (.h5ad)")
        p.add_argument("--synthetic", required=name == "audit", help="synthetic cells (.h5ad)")
        p.add_argument("--train", required=name == "audit",
                       help="training cells (.h5ad), for memorisation and the audit")
        p.add_argument("--json", help="write every metric with its floor to this JSON file")
        p.add_argument("--max-cells", type=int, default=4000,
                       help="cells per compared sample (stratified subsample)")
        p.add_argument("--seed", type=int, default=0)
        for role in ("donor", "cell-type", "condition"):
            p.add_argument(f"--{role}-col", help=f"{role} column of the real data "
                           "(default: guessed; '' for none)")
        if name == "evaluate":
            p.add_argument("--report", help="write a self-contained HTML report here")
            p.add_argument("--no-audit", action="store_true", help="skip the audit")
            p.add_argument("--run", help="evaluate a run of the workspace (cached)")
            p.add_argument("--split", help="with --run: the split (default: the run's)")
            p.set_defaults(func=cmd_evaluate)
        else:
            p.set_defaults(func=cmd_audit)

    p = sub.add_parser("run-singlecell-generator",
                       help="(seed tool verb) DP-NMF from the seed's config.yaml")
    p.add_argument("--experiment_name", "--experiment-name", dest="experiment_name",
                   required=True)
    p.add_argument("--dp", default="none", help="all|nmf|kmeans|sampling|none")
    p.add_argument("--config", help="config.yaml (default: ./config.yaml)")
    p.set_defaults(func=cmd_run_singlecell_generator)

    p = sub.add_parser("privacy-plan",
                       help="DP-NMF: the accountant's total for settings, before training")
    p.add_argument("--units", type=int, required=True,
                   help="privacy units (donors, or cells without a donor column)")
    p.add_argument("--labels", type=int, default=0, help="number of cell types")
    p.add_argument("--config", help="JSON config file")
    p.add_argument("--set", nargs="*", metavar="NAME=VALUE", help="config values")
    p.set_defaults(func=cmd_privacy_plan)

    p = sub.add_parser("privacy-sweep",
                       help="privacy-utility curve: train, compare and audit at each ε")
    p.add_argument("--split", required=True, help="split id (from `split`)")
    p.add_argument("--epsilons", default="1,4,10", help="total budgets, e.g. 1,4,10")
    p.add_argument("--generator", default="dp-nmf")
    p.add_argument("--config", help="JSON config file")
    p.add_argument("--set", nargs="*", metavar="NAME=VALUE", help="config values")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-cells", type=int, default=4000)
    p.set_defaults(func=cmd_privacy_sweep)

    p = sub.add_parser("counterfactual",
                       help="cycle autoencoder: chosen cells of a run's dataset in new contexts")
    p.add_argument("--run", required=True, help="run key of a trained cycle autoencoder")
    p.add_argument("--cells", nargs="*", metavar="COLUMN=VALUE[|VALUE...]",
                   help="which cells, e.g. cell_type='CD14+ Monocytes' condition=ctrl "
                   "(all must match; default: every cell)")
    p.add_argument("--cell-names", help="a text file with one cell name per line")
    p.add_argument("--set", nargs="+", required=True, metavar="FIELD=VALUE",
                   help="the new contexts, e.g. condition=stim")
    p.add_argument("--max-cells", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the counterfactual cells (.h5ad) here")
    p.set_defaults(func=cmd_counterfactual)

    p = sub.add_parser("design",
                       help="diffusion: generate cells with chosen genes up or down")
    p.add_argument("--run", required=True, help="run key of a trained diffusion model")
    p.add_argument("--up", nargs="*", metavar="GENE[,GENE...]", help="genes to raise")
    p.add_argument("--down", nargs="*", metavar="GENE[,GENE...]", help="genes to lower")
    p.add_argument("--strength", type=float, default=1.0,
                   help="shift asked of every gene, in sds of the starting population")
    p.add_argument("--gene-strength", nargs="*", metavar="GENE=SDS",
                   help="a gene's own strength, e.g. IL2RA=2")
    p.add_argument("--start", nargs="*", metavar="FIELD=VALUE",
                   help="starting context, e.g. cell_type='CD4 T cells'")
    p.add_argument("--n-cells", type=int, default=500)
    p.add_argument("--scale", type=float, default=1.0,
                   help="gradient guidance: share of each gene's shortfall closed per step")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the designed cells (.h5ad) here")
    p.set_defaults(func=cmd_design)

    p = sub.add_parser("denoise", help="diffusion: denoise real cells of a run's dataset")
    p.add_argument("--run", required=True, help="run key of a trained diffusion model")
    p.add_argument("--cells", nargs="*", metavar="COLUMN=VALUE[|VALUE...]",
                   help="which cells (default: every cell, up to --max-cells)")
    p.add_argument("--strength", type=float, default=0.2,
                   help="share of the forward process to noise to (0-1)")
    p.add_argument("--max-cells", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the denoised cells (.h5ad) here")
    p.set_defaults(func=cmd_denoise)

    p = sub.add_parser("posterior",
                       help="Bayesian NB: posterior-predictive checks and held-out RMSE")
    p.add_argument("--run", required=True, help="run key of a trained Bayesian NB model")
    p.add_argument("--draws", type=int, default=50, help="replicated datasets")
    p.add_argument("--max-cells", type=int, default=2000,
                   help="training cells checked and held-out cells predicted, at most")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_posterior)

    p = sub.add_parser("runs", help="list runs")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("jobs", help="list background jobs of the app")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("generate-split-indices",
                       help="(seed tool verb) write the split as YAML (or CSV with .csv)")
    p.add_argument("path")
    p.add_argument("--out", required=True)
    p.add_argument("--donor-col")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stratify", nargs="*")
    p.set_defaults(func=cmd_generate_split_indices)

    p = sub.add_parser("generate-data-splits",
                       help="(seed tool verb) write train.h5ad and test.h5ad from indices")
    p.add_argument("path")
    p.add_argument("--indices", required=True, help="the YAML or CSV from generate-split-indices")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_generate_data_splits)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserFacingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
