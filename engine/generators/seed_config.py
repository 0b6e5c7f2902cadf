"""The SingleCellNMFGenerator seed tool's ``config.yaml`` and ``run-singlecell-generator``.

Keys read (the seed's names):

- ``dir_list.home``: the base folder; relative paths below are taken from it.
- ``dataset_config.{name, train_count_file, test_count_file}``: the count files (``.h5ad``).
- ``nmf_sampler_config.{sample_fraction, seed, n_components, nmf_batch_size, n_clusters,
  n_synth_samples, proportion_aware, sampling_method}``.
- ``dp_config.{eps_nmf, eps_kmeans, eps_summaries, nmf_noise_scale, laplace_scale}``.

What the DP keys mean here: the seed added noise whose scale it computed from the private
data, which is not differential privacy. Here ``eps_nmf``, ``eps_kmeans`` and
``eps_summaries`` are the budgets of the chosen stages (DP-NMF's ``budget_mode="per_stage"``:
each stage's noise is calibrated to its own ε at δ / number of stages); one accountant
composes every release into the run's total ε, which never exceeds their sum.
``nmf_noise_scale`` and ``laplace_scale`` set data-dependent noise in the seed and
have no sound meaning: they are read, reported as ignored, and do not change the output.

The output goes to ``{home}/data_splits/{name}/synthetic/dp-nmf/{experiment_name}/
{name}_annotated_synthetic.h5ad``, with ``uns['privacy']`` holding the run's ``epsilon``
and ``delta`` (or ``label: not private`` for ``--dp none``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import UserFacingError

DP_MODES = ("all", "nmf", "kmeans", "sampling", "none")
STAGE_BUDGETS = {"nmf": "eps_nmf", "kmeans": "eps_kmeans", "sampling": "eps_summaries"}
IGNORED_DP_KEYS = ("nmf_noise_scale", "laplace_scale")


@dataclass
class SeedRun:
    """A parsed seed configuration: where to read and write, and the generator config."""

    train_path: Path
    test_path: Path | None
    output_path: Path
    config: dict[str, Any]
    n_synth_samples: int | None
    notes: list[str]


def _section(payload: dict[str, Any], name: str) -> dict[str, Any]:
    value = payload.get(name) or {}
    if not isinstance(value, dict):
        raise UserFacingError(f"config.yaml: '{name}' must be a mapping of keys to values.")
    return value


def read_seed_config(path: Path, *, experiment_name: str, dp: str) -> SeedRun:
    """Parse the seed tool's ``config.yaml``; return where to read and write and the
    DP-NMF config. Raises UserFacingError with a sentence for a missing file or key."""
    import yaml

    if dp not in DP_MODES:
        raise UserFacingError(f"--dp must be one of {', '.join(DP_MODES)}, not {dp!r}.")
    if not path.exists():
        raise UserFacingError(f"There is no {path}: give --config PATH or run where it is.")
    try:
        payload = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserFacingError(f"{path} is not valid YAML: {exc}") from exc
    home = Path(_section(payload, "dir_list").get("home") or path.parent)
    if not home.is_absolute():
        home = (path.parent / home).resolve()
    dataset = _section(payload, "dataset_config")
    name = dataset.get("name")
    train_file = dataset.get("train_count_file")
    if not name or not train_file:
        raise UserFacingError("config.yaml needs dataset_config.name and "
                              "dataset_config.train_count_file.")
    sampler = _section(payload, "nmf_sampler_config")
    dp_config = _section(payload, "dp_config")
    notes = [f"dp_config.{key} is ignored: the seed computed that noise from the private "
             "data, which is not differential privacy." for key in IGNORED_DP_KEYS
             if key in dp_config]
    stages = list(STAGE_BUDGETS) if dp == "all" else ([] if dp == "none" else [dp])
    budgets: dict[str, float] = {}
    for stage in stages:
        budget = dp_config.get(STAGE_BUDGETS[stage])
        if budget is None or float(budget) <= 0:
            raise UserFacingError(f"--dp {dp} needs dp_config.{STAGE_BUDGETS[stage]} > 0.")
        budgets[f"epsilon_{stage}"] = float(budget)
    config = {
        "sample_fraction": float(sampler.get("sample_fraction", 1.0)),
        "n_components": int(sampler.get("n_components", 20)),
        "nmf_batch_size": int(sampler.get("nmf_batch_size", 2048)),
        "n_clusters": int(sampler.get("n_clusters", 0) or 0),
        "proportion_aware": bool(sampler.get("proportion_aware", True)),
        "sampling_method": str(sampler.get("sampling_method", "zinb")),
        "seed": int(sampler.get("seed", 0)),
        "dp": dp,
        "clusters_from": "kmeans",  # the seed's method: its eps_kmeans is spent on k-means
    }
    if stages:
        config.update(budget_mode="per_stage", **budgets)
    test_file = dataset.get("test_count_file")
    n_synth = sampler.get("n_synth_samples")
    return SeedRun(
        train_path=(home / train_file) if not Path(train_file).is_absolute() else Path(
            train_file),
        test_path=(home / test_file) if test_file else None,
        output_path=home / "data_splits" / name / "synthetic" / "dp-nmf" / experiment_name
        / f"{name}_annotated_synthetic.h5ad",
        config=config,
        n_synth_samples=int(n_synth) if n_synth else None,
        notes=notes,
    )
