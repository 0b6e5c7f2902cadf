"""The seed tool's `run-singlecell-generator` with its config.yaml, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _config(folder: Path, **dp_config: float) -> Path:
    train = ad.read_h5ad(REPO / "sample_data" / "mock_paired_demo.h5ad")[:400].copy()
    train.write_h5ad(folder / "train.h5ad")
    payload = {
        "dir_list": {"home": str(folder)},
        "dataset_config": {"name": "tiny", "train_count_file": "train.h5ad"},
        "nmf_sampler_config": {"seed": 3, "n_components": 5, "nmf_batch_size": 128,
                               "n_clusters": 3, "n_synth_samples": 200,
                               "sampling_method": "poisson", "proportion_aware": True},
        "dp_config": dict(dp_config),
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(payload))
    return path


def _run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine", "--quiet",
                           "run-singlecell-generator", "--config", str(config), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_dp_all_writes_the_seed_path_with_the_accounted_total(tmp_path: Path) -> None:
    config = _config(tmp_path, eps_nmf=2.0, eps_kmeans=1.0, eps_summaries=1.0,
                     nmf_noise_scale=0.1)
    proc = _run(config, "--experiment_name", "exp1", "--dp", "all")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "data_splits/tiny/synthetic/dp-nmf/exp1/tiny_annotated_synthetic.h5ad"
    assert json.loads(proc.stdout)["output"] == str(out)
    synthetic = ad.read_h5ad(out)
    assert synthetic.n_obs == 200
    assert synthetic.X.dtype == np.int32 and synthetic.X.min() >= 0
    privacy = synthetic.uns["privacy"]
    # each stage spends its own budget; composed, the total is above the largest and at
    # most their sum (2 + 1 + 1)
    assert 2.0 < float(privacy["epsilon"]) <= 4.0 + 1e-9
    assert 0 < float(privacy["delta"]) <= 1 / (10 * 400)
    assert "nmf_noise_scale is ignored" in proc.stderr
    provenance = synthetic.uns["synthcell"]
    assert json.loads(provenance["config"])["budget_mode"] == "per_stage"
    assert int(provenance["seed"]) == json.loads(provenance["config"])["seed"]
    assert len(provenance["data_fingerprint"]) >= 16


def test_dp_none_is_labelled_not_private_and_is_reproducible(tmp_path: Path) -> None:
    config = _config(tmp_path)
    first = _run(config, "--experiment_name", "a", "--dp", "none")
    second = _run(config, "--experiment_name", "b", "--dp", "none")
    assert first.returncode == second.returncode == 0, first.stderr
    base = tmp_path / "data_splits/tiny/synthetic/dp-nmf"
    a = ad.read_h5ad(base / "a/tiny_annotated_synthetic.h5ad")
    b = ad.read_h5ad(base / "b/tiny_annotated_synthetic.h5ad")
    assert a.uns["privacy"]["label"] == "not private"
    assert (a.X != b.X).nnz == 0  # same seed, same counts


@pytest.mark.parametrize(("args", "sentence"), [
    (["--dp", "kmeans"], "needs dp_config.eps_kmeans > 0"),
    (["--dp", "bogus"], "--dp must be one of"),
])
def test_bad_settings_are_sentences(tmp_path: Path, args: list[str], sentence: str) -> None:
    proc = _run(_config(tmp_path), "--experiment_name", "x", *args)
    assert proc.returncode == 2 and sentence in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data_splits").exists()
