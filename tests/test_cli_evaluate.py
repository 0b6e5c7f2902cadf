"""`python -m engine evaluate` and `audit` headless: JSON with every metric and its floor,
an HTML report, and bad input as a sentence with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import pytest

from engine.data.split import apply_split, split_cells
from engine.generators.mock_generator import MockGenerator, MockGeneratorConfig
from tests.conftest import KANG

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.shared_data


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli_evaluate")
    adata = ad.read_h5ad(KANG)
    result = split_cells(adata.obs, donor_col="donor", stratify=["cell_type"],
                         test_fraction=0.5, seed=0)
    train, test = apply_split(adata, result)
    model = MockGenerator(MockGeneratorConfig(n_genes=1000))
    model.fit(train)
    paths = {"train": folder / "train.h5ad", "test": folder / "test.h5ad",
             "synthetic": folder / "mock.h5ad"}
    train.write_h5ad(paths["train"])
    test.write_h5ad(paths["test"])
    model.sample(seed=0).write_h5ad(paths["synthetic"])
    return paths


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine", "--quiet", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_evaluate_writes_json_with_floors_and_a_report(files, tmp_path: Path) -> None:
    out_json, out_html = tmp_path / "metrics.json", tmp_path / "report.html"
    proc = cli("evaluate", "--real", files["test"], "--synthetic", files["synthetic"],
               "--train", files["train"], "--json", out_json, "--report", out_html,
               "--max-cells", 500)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(out_json.read_text())
    aurocs = {k: v for k, v in payload["metrics"].items() if "auroc" in k}
    assert "classifier_auroc_gbt" in aurocs
    gbt = payload["metrics"]["classifier_auroc_gbt"]
    assert gbt["value"] > gbt["floor"] + 0.2  # the mock is told apart from real cells
    assert all({"value", "floor", "direction", "status"} <= set(v)
               for v in payload["metrics"].values())
    assert any(k.startswith("audit_") for k in payload["audit"])
    html = out_html.read_text()
    assert "classifier_auroc_gbt" in html and "not privacy" in html
    assert "<script src=\"http" not in html


def test_audit_prints_the_attacks(files) -> None:
    proc = cli("audit", "--real", files["test"], "--synthetic", files["synthetic"],
               "--train", files["train"], "--max-cells", 400)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert any(k.endswith("_auroc") for k in payload)
    assert payload["feasibility"]  # 4 held-out donors: too few for a donor-level audit


def test_bad_input_is_a_sentence_with_exit_2(files, tmp_path: Path) -> None:
    proc = cli("evaluate", "--real", tmp_path / "missing.h5ad", "--synthetic",
               files["synthetic"])
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    other = ad.read_h5ad(files["synthetic"])
    other.var_names = [f"x{i}" for i in range(other.n_vars)]
    renamed = tmp_path / "renamed.h5ad"
    other.write_h5ad(renamed)
    proc = cli("evaluate", "--real", files["test"], "--synthetic", renamed)
    assert proc.returncode == 2 and "shares only 0 gene names" in proc.stderr
