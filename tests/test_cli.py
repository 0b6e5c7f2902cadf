"""The command line (``python -m engine``) run as a real subprocess: outputs, numbers, errors.

Every command is started as ``[sys.executable, "-m", "engine", "--workspace", ws, ...]`` from
the repository root. Bad input must exit with status 2, print the sentence the app shows (the
DataError of the readers / validation for the same file) and no traceback, and leave nothing
behind in the workspace. Subprocesses cost about a second each, so datasets that several tests
need are imported once per module.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
from anndata.io import read_elem
from conftest import KANG, PBMC3K_10X, PBMC_SMALL, REPO

from engine.data.readers import read_dataset
from engine.data.validate import check_counts, validate_dataset
from engine.errors import DataError
from engine.generators.base import config_from_dict
from engine.generators.mock import SCENARIOS, MockConfig
from engine.generators.mock_generator import MockGeneratorConfig

KANG_DONORS = {"101", "1015", "1016", "1039", "107", "1244", "1256", "1488"}


# --------------------------------------------------------------------------- helpers
def cli(ws: Path, *args: object, expect: int = 0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m engine --workspace ws ARGS`` and check its exit status."""
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "--workspace", str(ws), *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == expect, (
        f"exit {proc.returncode} (wanted {expect})\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    if expect == 0:
        assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def cli_json(ws: Path, *args: object) -> Any:
    """Run a command that must succeed and return its JSON output."""
    return json.loads(cli(ws, *args).stdout)


def assert_bad_input(proc: subprocess.CompletedProcess[str], message: str) -> None:
    """Exit 2 (checked by :func:`cli`), the app's sentence on stderr, no traceback, no stdout."""
    assert f"error: {message}" in proc.stderr.splitlines(), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""


def assert_workspace_empty(ws: Path) -> None:
    """Nothing stored and no scratch left: every workspace sub-folder is empty (or absent)."""
    for sub in ("datasets", "splits", "runs", "uploads", ".tmp"):
        folder = ws / sub
        assert not folder.exists() or sorted(p.name for p in folder.iterdir()) == [], sub
    assert not (ws / "state.json").exists()


def app_error(path: Path, workdir: Path) -> DataError:
    """The DataError the app shows for ``path``: from reading it, else from validating it."""
    with pytest.raises(DataError) as info:
        validate_dataset(read_dataset(path, workdir=workdir))
    return info.value


def read_obs(path: Path) -> pd.DataFrame:
    """Read only ``obs`` of an .h5ad file."""
    with h5py.File(path, "r") as handle:
        return read_elem(handle["obs"])


class _CreatesFileWhenUnpickled:
    """Unpickling this object creates a marker file: proof that the pickle was opened."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


# --------------------------------------------------------------------------- inspect
@pytest.mark.shared_data
def test_inspect_kang_h5ad(workspace: Path) -> None:
    out = cli_json(workspace, "inspect", KANG)
    assert (out["n_cells"], out["n_genes"]) == (2000, 9015)
    assert out["format"].startswith("AnnData file")
    assert out["is_counts"] is True and out["counts"] == "X holds raw integer counts."
    assert out["nnz"] == 1_129_806
    assert out["sparsity"] == pytest.approx(1 - 1_129_806 / (2000 * 9015), abs=1e-4)
    assert out["roles_guessed"] == {
        "donor": "donor", "cell_type": "cell_type", "condition": "condition", "batch": None
    }
    assert {"donor", "condition", "cell_type", "sample"} <= set(out["obs_columns"])
    assert_workspace_empty(workspace)  # inspect stores nothing


@pytest.mark.shared_data
def test_inspect_pbmc3k_10x_folder(workspace: Path) -> None:
    out = cli_json(workspace, "inspect", PBMC3K_10X)
    assert (out["n_cells"], out["n_genes"]) == (2700, 32738)
    assert out["format"].startswith("10x Genomics matrix folder")
    assert out["is_counts"] is True
    assert out["mito_genes"] == 13
    assert out["roles_guessed"] == dict.fromkeys(("donor", "cell_type", "condition", "batch"))
    assert_workspace_empty(workspace)


# --------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small bad file (or folder) per case, made from pbmc_small (80 cells x 230 genes)."""
    root = tmp_path_factory.mktemp("bad")
    small = ad.read_h5ad(PBMC_SMALL)
    files: dict[str, Path] = {}

    files["unknown_format"] = root / "data.loom"
    files["unknown_format"].write_bytes(b"not a dataset")

    content = PBMC_SMALL.read_bytes()
    files["truncated_h5ad"] = root / "cut.h5ad"
    files["truncated_h5ad"].write_bytes(content[: len(content) // 2])

    values = small.X.toarray().astype(np.float32)
    values[3, 4] = np.nan
    ad.AnnData(values, obs=small.obs[[]], var=small.var[[]]).write_h5ad(root / "nan.h5ad")
    files["nan_values"] = root / "nan.h5ad"

    normalised = small.copy()
    normalised.X = sp.csr_matrix(np.log1p(small.X.toarray()).astype(np.float32))
    normalised.write_h5ad(root / "normalised.h5ad")
    files["normalised"] = root / "normalised.h5ad"

    duplicated = small.copy()
    names = list(duplicated.var_names)
    names[5] = names[4]
    duplicated.var_names = names
    duplicated.write_h5ad(root / "duplicated.h5ad")
    files["duplicated_genes"] = root / "duplicated.h5ad"

    chunks = root / "chunks"
    chunks.mkdir()
    sp.save_npz(chunks / "human_counts_0.npz", sp.csr_matrix(np.ones((2, 3))))
    marker = root / "pwned.txt"
    (chunks / "human_metadata_0.pkl").write_bytes(
        pickle.dumps(_CreatesFileWhenUnpickled(marker))
    )
    files["pickle_metadata"] = chunks

    files["zip_slip"] = root / "evil.zip"
    with zipfile.ZipFile(files["zip_slip"], "w") as archive:
        archive.writestr("data/ok.txt", b"fine")
        archive.writestr("../../escaped.txt", b"evil")
    return files


BAD_CASES = {
    # case: words the message must hold
    "unknown_format": "not in a format we can read",
    "truncated_h5ad": "corrupt or truncated",
    "nan_values": "NaN (missing) value",
    "duplicated_genes": "Make the names unique",
    "pickle_metadata": "arbitrary code",
    "zip_slip": "points outside the folder",
}


@pytest.mark.shared_data
@pytest.mark.filterwarnings("ignore:Variable names are not unique")
@pytest.mark.parametrize("case", list(BAD_CASES))
def test_inspect_bad_input(
    case: str, bad_inputs: dict[str, Path], workspace: Path, tmp_path: Path
) -> None:
    path = bad_inputs[case]
    expected = app_error(path, tmp_path / "work")
    assert BAD_CASES[case] in str(expected)
    assert_bad_input(cli(workspace, "inspect", path, expect=2), str(expected))
    assert_workspace_empty(workspace)
    if case == "pickle_metadata":
        assert not (path.parent / "pwned.txt").exists()  # refused without being opened
    if case == "zip_slip":
        assert not list(path.parent.rglob("escaped.txt"))
        assert not list(workspace.rglob("escaped.txt"))


@pytest.mark.shared_data
def test_normalised_data_is_not_an_error_for_inspect(
    bad_inputs: dict[str, Path], workspace: Path
) -> None:
    path = bad_inputs["normalised"]
    out = cli_json(workspace, "inspect", path)
    assert (out["n_cells"], out["n_genes"]) == (80, 230)
    assert out["is_counts"] is False
    assert out["counts"] == check_counts(read_dataset(path)).message
    assert "normalised or log-transformed" in out["counts"]
    assert_workspace_empty(workspace)


@pytest.mark.shared_data
@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_duplicated_genes_then_import_make_unique(
    bad_inputs: dict[str, Path], workspace: Path, tmp_path: Path
) -> None:
    path = bad_inputs["duplicated_genes"]
    expected = app_error(path, tmp_path / "work")
    assert expected.fix == "make_unique"  # the app offers a button for it
    assert "1 gene name" in str(expected) and "unique" in str(expected)
    assert_bad_input(cli(workspace, "import", path, expect=2), str(expected))
    assert_workspace_empty(workspace)

    out = cli_json(workspace, "import", path, "--make-unique")
    stored = ad.read_h5ad(workspace / "datasets" / out["dataset_id"] / "data.h5ad")
    assert stored.shape == (80, 230) and stored.var_names.is_unique
    assert stored.var_names[5] == f"{stored.var_names[4]}-1"
    assert sorted(p.name for p in (workspace / ".tmp").iterdir()) == []


# --------------------------------------------------------------------------- import, roles
@pytest.fixture(scope="module")
def kang(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A workspace with Kang imported once (through the CLI): ws, id and the import output."""
    ws = tmp_path_factory.mktemp("kang") / "workspace"
    out = cli_json(ws, "import", KANG)
    return {"ws": ws, "id": out["dataset_id"], "import": out}


@pytest.fixture(scope="module")
def kang_split(kang: dict[str, Any]) -> dict[str, Any]:
    """The default split of Kang (donor role, stratified by cell type and condition)."""
    return cli_json(kang["ws"], "split", kang["id"])


@pytest.mark.shared_data
def test_import_then_datasets_and_roles(kang: dict[str, Any]) -> None:
    ws, dataset_id = kang["ws"], kang["id"]
    assert kang["import"]["message"] == "Opened kang_ifnb_pbmc_2k.h5ad: 2,000 cells × 9,015 genes."
    listed = cli_json(ws, "datasets")
    assert [d["id"] for d in listed] == [dataset_id]
    record = listed[0]
    assert (record["n_cells"], record["n_genes"], record["is_counts"]) == (2000, 9015, True)
    assert record["source"] == str(KANG) and record["origin"] == "file"
    assert record["roles"]["donor"] == "donor" and record["roles"]["condition"] == "condition"
    assert {"summary.json", "qc.parquet", "data.h5ad"} <= {
        p.name for p in (ws / "datasets" / dataset_id).iterdir()
    }
    assert json.loads((ws / "state.json").read_text())["dataset_id"] == dataset_id

    meta_path = ws / "datasets" / dataset_id / "meta.json"
    before = json.loads(meta_path.read_text())["roles"]
    try:
        roles = cli_json(ws, "roles", dataset_id, "donor=sample", "condition=")
        assert roles == {**before, "donor": "sample", "condition": None}
        assert json.loads(meta_path.read_text())["roles"] == roles  # persisted
        bad = {
            "species=donor": "Unknown role 'species'",
            "donor=individual": "There is no column 'individual'",
            "batch=sample": "Each column can take one role only",
        }
        for setting, sentence in bad.items():
            proc = cli(ws, "roles", dataset_id, setting, expect=2)
            assert sentence in proc.stderr and "Traceback" not in proc.stderr
        assert json.loads(meta_path.read_text())["roles"] == roles  # unchanged by bad input
    finally:
        from engine.store import Workspace

        Workspace(ws).set_roles(dataset_id, before)


# --------------------------------------------------------------------------- split
@pytest.mark.shared_data
def test_split_kang_is_donor_disjoint_and_repeatable(
    kang: dict[str, Any], kang_split: dict[str, Any]
) -> None:
    ws, out = kang["ws"], kang_split
    train, test = set(out["train_donors"]), set(out["test_donors"])
    assert not train & test
    assert train | test == KANG_DONORS
    assert len(test) == 2  # floor(0.2 * 8 + 0.5)
    assert out["message"].startswith("donor-disjoint split: 6 train donors / 2 test donors")

    frame = pd.read_csv(out["split_csv"], dtype=str)
    assert len(frame) == 2000 and frame["cell_id"].is_unique
    obs = read_obs(KANG)
    assert set(frame["cell_id"]) == set(obs.index.astype(str))
    donors = obs["donor"].astype(str).reindex(frame["cell_id"]).to_numpy()
    assert (frame["donor"].to_numpy() == donors).all()
    assert set(frame.loc[frame["side"] == "test", "donor"]) == test
    assert set(frame.loc[frame["side"] == "train", "donor"]) == train
    meta = json.loads((ws / "splits" / out["split_id"] / "meta.json").read_text())
    assert meta["n_train"] == (frame["side"] == "train").sum()
    assert meta["n_train"] + meta["n_test"] == 2000

    again = cli_json(ws, "split", kang["id"])
    assert again["split_id"] == out["split_id"]
    assert again["train_donors"] == out["train_donors"]


@pytest.mark.shared_data
def test_split_cell_level_without_donor_column(
    kang: dict[str, Any], kang_split: dict[str, Any]
) -> None:
    out = cli_json(kang["ws"], "split", kang["id"], "--donor-col", "")
    assert out["split_id"] != kang_split["split_id"]
    assert out["train_donors"] == [] and out["test_donors"] == []
    assert out["message"].startswith("cell-level split")
    frame = pd.read_csv(out["split_csv"], dtype=str)
    assert len(frame) == 2000 and "donor" not in frame.columns
    assert (frame["side"] == "test").sum() == 400
    # cells of one donor on both sides: that is what a cell-level split means
    donor = read_obs(KANG)["donor"].astype(str).reindex(frame["cell_id"]).to_numpy()
    sides_per_donor = frame.assign(donor=donor).groupby("donor")["side"].nunique()
    assert (sides_per_donor == 2).any()


# --------------------------------------------------------------------------- train, runs
@pytest.mark.shared_data
def test_train_mock_on_a_split_then_cached(
    kang: dict[str, Any], kang_split: dict[str, Any]
) -> None:
    ws, split_id = kang["ws"], kang_split["split_id"]
    n_train = json.loads((ws / "splits" / split_id / "meta.json").read_text())["n_train"]
    args = ("train", "--generator", "mock", "--dataset", kang["id"], "--split", split_id)
    out = cli_json(ws, *args)
    assert out["cached"] is False
    folder = Path(out["folder"])
    assert folder == ws.resolve() / "runs" / out["run_key"]
    names = {p.name for p in folder.iterdir()}
    assert {"synthetic.h5ad", "meta.json", "config.json", "privacy.json", "metrics.json",
            "log.txt", "model"} <= names
    assert sorted(p.name for p in (ws / ".tmp").iterdir()) == []

    synthetic = ad.read_h5ad(folder / "synthetic.h5ad")
    assert synthetic.n_obs == n_train  # as many cells as the training cells
    assert synthetic.n_vars == 2000
    with h5py.File(KANG, "r") as handle:
        kang_genes = set(read_elem(handle["var"]).index)
    assert set(synthetic.var_names) <= kang_genes  # named after the training genes
    assert synthetic.uns["synthcell"]["run_key"] == out["run_key"]
    assert synthetic.uns["synthcell"]["split_id"] == split_id
    meta = json.loads((folder / "meta.json").read_text())
    assert (meta["n_cells"], meta["n_genes"], meta["generator"]) == (n_train, 2000, "mock")
    assert meta["size_bytes"] > 0
    assert json.loads((folder / "privacy.json").read_text())["label"] == "not private"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["synthetic"]["n_cells"] == n_train and metrics["train"]["n_cells"] == n_train
    assert 0 < metrics["synthetic"]["zero_fraction"] < 1
    config = json.loads((folder / "config.json").read_text())
    assert config["config"] == dataclasses.asdict(MockGeneratorConfig())

    stamp = (folder / "synthetic.h5ad").stat().st_mtime_ns
    started = time.monotonic()
    again = cli_json(ws, *args)
    assert time.monotonic() - started < 20
    assert again["cached"] is True and again["run_key"] == out["run_key"]
    assert (folder / "synthetic.h5ad").stat().st_mtime_ns == stamp  # nothing rewritten

    runs = cli_json(ws, "runs")
    assert [r["key"] for r in runs] == [out["run_key"]]
    assert runs[0]["generator"] == "mock" and runs[0]["cells"] == n_train
    assert runs[0]["dataset"] == kang["id"] and runs[0]["split"] == split_id
    assert runs[0]["path"] == str(folder / "synthetic.h5ad")


def test_generators_lists_mock_with_its_config(workspace: Path) -> None:
    out = cli_json(workspace, "generators")
    mock = next(g for g in out if g["name"] == "mock")
    assert mock["label"] == "Multimodal mock"
    assert mock["config"] == dataclasses.asdict(MockGeneratorConfig())
    assert "trains without a split" in mock["capabilities"]


# --------------------------------------------------------------------------- mock
def test_mock_bridge_file_has_the_masks(workspace: Path, tmp_path: Path) -> None:
    target = tmp_path / "f.h5ad"
    out = cli_json(workspace, "mock", "--scenario", "bridge", "--n-cells", 400, "--out", target)
    assert out[0]["path"] == str(target) and out[0]["n_cells"] == 400
    assert out[0]["keys"]["masks"] == {m: f"obs/has_{m}" for m in ("rna", "atac", "adt")}
    adata = ad.read_h5ad(target)
    assert adata.n_obs == 400 and adata.uns["mock_scenario"] == "bridge"
    rna, atac = adata.obs["has_rna"].to_numpy(), adata.obs["has_atac"].to_numpy()
    n_bridge = round(0.05 * 400)
    assert int((rna & atac).sum()) == n_bridge
    assert int((rna & ~atac).sum()) == int((~rna & atac).sum()) == (400 - n_bridge) // 2
    assert not (~rna & ~atac).any()
    # the observed RNA counts are empty exactly for the cells without RNA
    library = np.asarray(adata.X.sum(axis=1)).ravel()
    assert (library[~rna] == 0).all() and (library[rna] > 0).all()
    assert json.loads(adata.uns["mock_keys"])["scenario"] == "uns/mock_scenario"
    assert_workspace_empty(workspace)  # --out does not store in the workspace


def test_mock_all_scenarios_into_a_folder(workspace: Path, tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    out = cli_json(workspace, "mock", "--all", "--n-cells", 300, "--out", folder)
    assert len(out) == len(SCENARIOS) == 6
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"mock_{s}.h5ad" for s in SCENARIOS
    )
    for scenario in SCENARIOS:
        with h5py.File(folder / f"mock_{scenario}.h5ad", "r") as handle:
            assert read_elem(handle["uns/mock_scenario"]) == scenario
            assert len(read_elem(handle["obs"])) == 300


def test_mock_config_template_round_trip(workspace: Path, tmp_path: Path) -> None:
    template = tmp_path / "t.json"
    cli(workspace, "mock", "--write-config", template)
    values = json.loads(template.read_text())
    assert values == dataclasses.asdict(MockConfig())
    values.update(problem_type="mosaic", n_cells=250, n_genes=120, seed=7)
    template.write_text(json.dumps(values))
    target = tmp_path / "x.h5ad"
    out = cli_json(workspace, "mock", "--config", template, "--out", target)
    assert (out[0]["n_cells"], out[0]["n_genes"]) == (250, 120)
    adata = ad.read_h5ad(target)
    assert adata.shape == (250, 120)
    assert adata.uns["mock_scenario"] == "mosaic"  # the config's scenario is used
    assert adata.uns["mock_config"]["seed"] == 7


def test_mock_bad_scenario(workspace: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        config_from_dict(MockConfig, {"problem_type": "nope"})
    assert str(info.value).startswith("Scenario must be one of paired, unpaired, bridge")
    target = tmp_path / "y.h5ad"
    proc = cli(workspace, "mock", "--scenario", "nope", "--out", target, expect=2)
    assert_bad_input(proc, str(info.value))
    assert not target.exists() and list(tmp_path.iterdir()) == [workspace]


# --------------------------------------------------------------------------- other bad input
@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["train", "--generator", "nope"],
                     "Unknown generator 'nope'; known generators: bayes-nb, cae, diffusion, "
                     "dp-nmf, mock.",
                     id="unknown-generator"),
        pytest.param(["train", "--generator", "mock", "--split", "deadbeef"],
                     "There is no split deadbeef in the workspace; make one on the Split page "
                     "first.", id="unknown-split"),
        pytest.param(["train", "--generator", "mock", "--set", "n_cells=abc"],
                     "Cells must be a whole number, not 'abc'.", id="bad-config-value"),
        pytest.param(["mock", "--config", "{tmp}/missing.json", "--out", "{tmp}/x.h5ad"],
                     "Cannot read the config file {tmp}/missing.json: No such file or directory.",
                     id="missing-config"),
        pytest.param(["generate-data-splits", str(PBMC_SMALL), "--indices", "{tmp}/no.yaml",
                      "--out-dir", "{tmp}/parts"],
                     "{tmp}/no.yaml does not exist: give the file generate-split-indices wrote.",
                     id="missing-indices", marks=pytest.mark.shared_data),
    ],
)
def test_other_bad_input_exits_2(
    args: list[str], message: str, workspace: Path, tmp_path: Path
) -> None:
    fill = {"tmp": tmp_path}
    proc = cli(workspace, *(a.format(**fill) for a in args), expect=2)
    assert_bad_input(proc, message.format(**fill))
    assert_workspace_empty(workspace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["workspace"]  # nothing written


# --------------------------------------------------------------------------- seed-tool verbs
@pytest.mark.shared_data
def test_generate_split_indices_then_data_splits(workspace: Path, tmp_path: Path) -> None:
    common = ("--donor-col", "donor", "--stratify", "cell_type", "--seed", "3")
    yaml_path, csv_path = tmp_path / "kang_splits.yaml", tmp_path / "kang_splits.csv"
    out = cli_json(workspace, "generate-split-indices", KANG, "--out", yaml_path, *common)
    assert out["train"] + out["test"] == 2000
    layout = yaml.safe_load(yaml_path.read_text())
    split = layout["splits"]["split_1"]
    train_ids, test_ids = split["train_index"], split["test_index"]
    assert (len(train_ids), len(test_ids)) == (out["train"], out["test"])
    assert not set(train_ids) & set(test_ids)
    obs = read_obs(KANG)
    assert set(train_ids) | set(test_ids) == set(obs.index.astype(str))
    donor = obs["donor"].astype(str)
    assert not set(donor[train_ids]) & set(donor[test_ids])
    assert set(donor[train_ids]) | set(donor[test_ids]) == KANG_DONORS

    cli(workspace, "generate-split-indices", KANG, "--out", csv_path, *common)
    frame = pd.read_csv(csv_path, dtype=str)
    assert list(frame.columns) == ["cell_id", "side"]
    assert list(frame.loc[frame["side"] == "train", "cell_id"]) == train_ids  # same split
    assert list(frame.loc[frame["side"] == "test", "cell_id"]) == test_ids

    written = cli_json(workspace, "generate-data-splits", KANG, "--indices", yaml_path,
                       "--out-dir", tmp_path / "parts")
    train = ad.read_h5ad(written["train"]["path"])
    test = ad.read_h5ad(written["test"]["path"])
    assert train.n_obs + test.n_obs == 2000
    assert (train.n_obs, test.n_obs) == (len(train_ids), len(test_ids))
    assert train.n_vars == test.n_vars == 9015
    assert list(train.obs_names) == train_ids and list(test.obs_names) == test_ids
    assert not set(train.obs["donor"].astype(str)) & set(test.obs["donor"].astype(str))
    assert set(train.obs["split"]) == {"train"} and set(test.obs["split"]) == {"test"}
    full = ad.read_h5ad(KANG)
    assert (train.X != full[train_ids].X).nnz == 0  # counts carried over unchanged
    assert_workspace_empty(workspace)


# --------------------------------------------------------------------------- cae
@pytest.mark.shared_data
def test_train_cae_then_counterfactual(
    kang: dict[str, Any], kang_split: dict[str, Any], tmp_path: Path
) -> None:
    """`train cae` (generator named positionally) and `counterfactual --run --cells --set`."""
    ws, split_id = kang["ws"], kang_split["split_id"]
    out = cli_json(ws, "train", "cae", "--dataset", kang["id"], "--split", split_id,
                   "--set", "epochs=3", "n_genes=300")
    meta = json.loads((Path(out["folder"]) / "meta.json").read_text())
    assert meta["generator"] == "cae" and meta["n_genes"] == 300
    assert meta["config"]["condition_key"] == "condition"  # from the dataset's roles
    target = tmp_path / "b_stim.h5ad"
    result = cli_json(ws, "counterfactual", "--run", out["run_key"], "--cells",
                      "cell_type=B cells", "condition=ctrl", "--set", "condition=stim",
                      "--out", target)
    n_b_ctrl = int(((read_obs(KANG)["cell_type"] == "B cells")
                    & (read_obs(KANG)["condition"] == "ctrl")).sum())
    cells = ad.read_h5ad(target)
    assert cells.n_obs == n_b_ctrl and (cells.obs["condition"] == "stim").all()
    assert (cells.obs["source_condition"] == "ctrl").all()
    assert result["closeness"]["n_real_target_cells"] > 50
    assert len(result["top_genes"]) == 10
    assert set(result["head_norms"]) == {"base", "condition", "cell_type"}
    bad = cli(ws, "counterfactual", "--run", out["run_key"], "--cells", "cell_type=B cells",
              "--set", "condition=heat", expect=2)
    assert "The model never saw condition = heat; known values: ctrl, stim." in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = cli(ws, "train", "--dataset", kang["id"], "--split", split_id, expect=2)
    assert "Name the generator to train" in missing.stderr


# --------------------------------------------------------------------------- diffusion
@pytest.mark.shared_data
def test_train_diffusion_then_design_and_denoise(
    kang: dict[str, Any], kang_split: dict[str, Any], tmp_path: Path
) -> None:
    """`train diffusion`, `design --run --up --down --start` and `denoise --run --cells`."""
    ws, split_id = kang["ws"], kang_split["split_id"]
    out = cli_json(ws, "train", "diffusion", "--dataset", kang["id"], "--split", split_id,
                   "--set", "train_steps=300", "n_genes=400", "hidden=64", "depth=2",
                   "timesteps=100", "sampling_steps=10")
    meta = json.loads((Path(out["folder"]) / "meta.json").read_text())
    assert meta["generator"] == "diffusion" and meta["n_genes"] == 400
    assert meta["config"]["cell_type_key"] == "cell_type"  # from the dataset's roles
    model_genes = ad.read_h5ad(Path(out["folder"]) / "synthetic.h5ad").var_names
    up, down = str(model_genes[0]), str(model_genes[1])
    target = tmp_path / "designed.h5ad"
    result = cli_json(ws, "design", "--run", out["run_key"], "--up", up, "--down", down,
                      "--start", "cell_type=CD4 T cells", "--n-cells", "60", "--out", target)
    designed = ad.read_h5ad(target)
    assert designed.n_obs == 60 and (designed.obs["cell_type"] == "CD4 T cells").all()
    genes = {row["gene"]: row for row in result["genes"]}
    assert genes[up]["direction"] == "up" and genes[down]["direction"] == "down"
    assert genes[up]["designed_mean"] > genes[up]["start_mean"]
    assert genes[down]["designed_mean"] <= genes[down]["start_mean"]
    assert 0.0 <= result["share_meeting_all"] <= 1.0 and result["nn_distance_ratio"] > 0
    again = cli_json(ws, "design", "--run", out["run_key"], "--up", up, "--down", down,
                     "--start", "cell_type=CD4 T cells", "--n-cells", "60")
    assert again["cached"] and again["design_id"] == result["design_id"]
    denoised_path = tmp_path / "denoised.h5ad"
    cleaned = cli_json(ws, "denoise", "--run", out["run_key"], "--cells", "cell_type=B cells",
                       "--strength", "0.3", "--out", denoised_path)
    n_b = int((read_obs(KANG)["cell_type"] == "B cells").sum())
    denoised = ad.read_h5ad(denoised_path)
    assert denoised.n_obs == cleaned["n_cells"] == n_b
    assert set(denoised.layers) == {"observed", "denoised"} and cleaned["step"] == 30
    bad = cli(ws, "design", "--run", out["run_key"], "--up", "NOT_A_GENE", expect=2)
    assert "The model does not include NOT_A_GENE" in bad.stderr
    assert "Traceback" not in bad.stderr
