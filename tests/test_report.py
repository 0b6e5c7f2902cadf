"""The evaluation figures and the self-contained HTML report, from hand-built results."""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from engine.evaluate import figures as F
from engine.evaluate.report import not_privacy_sentence, render_report, write_report
from engine.evaluate.suite import EvaluationResult
from engine.privacy.audit import ATTACK_LABELS, NOT_PRIVACY_SENTENCE

CELL_TYPES = ("B cells", "CD14 Mono", "NK cells")
GENES = [f"G{i}" for i in range(12)]
FEASIBILITY = "Only 2 training donors: the audit can show leakage, not rule it out."


@dataclass
class HandAudit:
    """What the suite's audit result offers the report and the page."""

    table: pd.DataFrame
    roc: dict[str, pd.DataFrame]
    feasibility: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"table": json.loads(self.table.to_json(orient="records")),
                "feasibility": self.feasibility, "notes": self.notes}


def metric_rows() -> pd.DataFrame:
    rows = [
        ("classifier_auroc_gbt", "whole distribution", "all", 0.91, 0.55, "lower", "poor"),
        ("mmd", "whole distribution", "all", 0.021, 0.012, "lower", "good"),
        ("gene_mean_pearson", "gene by gene", "all", 0.93, 0.99, "higher", "fair"),
        ("ks_library_size", "data properties", "all", 0.2, float("nan"), "lower", "n/a"),
        ("mmd", "biology", "B cells", 0.03, 0.01, "lower", "fair"),
    ]
    frame = pd.DataFrame(rows, columns=["metric", "family", "group", "value", "floor",
                                        "direction", "status"])
    frame["description"] = "what " + frame["metric"] + " means"
    return frame


def hand_result(*, n_real: int = 60, n_synthetic: int = 40, seed: int = 0,
                audit: bool = True, privacy_label: str = "not private") -> EvaluationResult:
    rng = np.random.default_rng(seed)
    n = n_real + n_synthetic
    source = ["real"] * n_real + ["synthetic"] * n_synthetic
    umap = pd.DataFrame({
        "x": rng.normal(size=n), "y": rng.normal(size=n), "source": source,
        "cell_type": rng.choice(CELL_TYPES, size=n),
        "condition": rng.choice(["ctrl", "stim"], size=n),
        "donor": [f"d{i % 3}" for i in range(n_real)] + ["synthetic"] * n_synthetic,
    })
    expression = sp.random(n, len(GENES), density=0.4, format="csr", random_state=seed,
                           dtype=np.float32)
    properties = pd.concat([
        pd.DataFrame({"property": name, "source": s, "value": rng.gamma(2.0, scale, size)})
        for name, scale, size in (("library_size", 1000.0, 50), ("gene_mean", 1.0, 12))
        for s in ("real", "synthetic")
    ], ignore_index=True)
    mean_variance = pd.DataFrame({
        "gene": GENES * 2, "mean": rng.random(24), "variance": rng.random(24),
        "source": ["real"] * 12 + ["synthetic"] * 12,
    })
    corr = np.corrcoef(rng.normal(size=(30, 5)), rowvar=False)
    markers = []
    for s in ("real", "synthetic"):
        for i, marked in enumerate(CELL_TYPES):
            for rank in (1, 2):
                gene = GENES[3 * i + rank - 1]
                for cell_type in CELL_TYPES:
                    markers.append({"marker_of": marked, "marker_rank": rank, "gene": gene,
                                    "cell_type": cell_type, "lfc": rng.normal(),
                                    "mean_expression": rng.random(),
                                    "fraction_expressing": rng.random(), "source": s})
    figures = {
        "umap": umap, "umap_expression": expression, "umap_genes": GENES,
        "properties_long": properties, "mean_variance": mean_variance,
        "gene_corr": {"genes": GENES[:5], "real": corr, "synthetic": corr * 0.5},
        "markers": pd.DataFrame(markers),
    }
    audit_result = None
    if audit:
        table = pd.DataFrame({
            "attack": ["dcr", "domias"], "auroc": [0.52, 0.61],
            "tpr_at_1pct_fpr": [0.011, 0.05], "tpr_at_10pct_fpr": [0.1, 0.2],
            "epsilon_lower_bound": [0.0, 0.4], "epsilon_ci_low": [0.0, 0.1],
            "epsilon_ci_high": [0.3, 0.9], "n_members": [6, 6], "n_nonmembers": [2, 2],
            "unit": ["donor", "donor"],
        })
        roc = {a: pd.DataFrame({"fpr": [0.0, 0.5, 1.0], "tpr": [0.0, 0.6, 1.0]})
               for a in table["attack"]}
        audit_result = HandAudit(table=table, roc=roc, feasibility=FEASIBILITY,
                                 notes=["Attacks see the PCA features only.",
                                        NOT_PRIVACY_SENTENCE])
    provenance = {
        "run_key": "abcdef0123456789", "generator": "mock", "config": {"n_genes": 200},
        "seed": 7, "privacy_label": privacy_label,
        "privacy_spend": {"epsilon": None, "delta": None},
        "dataset": "kang_ifnb_pbmc_2k.h5ad", "dataset_fingerprint": "fp0123456789abcdef",
        "split_id": "split42", "split_label": "donor split (2 of 8 donors held out)",
        "floor_unit": "donor", "n_real_held_out": n_real, "n_synthetic": n_synthetic,
    }
    return EvaluationResult(metrics=metric_rows(), figures=figures, provenance=provenance,
                            notes=["12 of 20 real genes are in the synthetic data."],
                            audit=audit_result)


# -- figures -------------------------------------------------------------------------------
def test_umap_figure_by_source_and_side_by_side() -> None:
    result = hand_result()
    frame = result.figures["umap"]
    figure, caption = F.umap_figure(frame, color="source")
    assert [t.name for t in figure.data] == ["real", "synthetic"]
    assert [len(t.x) for t in figure.data] == [60, 40]
    assert caption == "Joint UMAP of 60 real cells and 40 synthetic cells."
    # every point carries its row, so a lasso selection maps back to the table
    rows = np.concatenate([t.customdata for t in figure.data])
    assert sorted(rows) == list(range(100))

    figure, _ = F.umap_figure(frame, color="cell_type", side_by_side=True)
    assert {t.name for t in figure.data} == set(CELL_TYPES)
    assert len(figure.data) == 2 * len(CELL_TYPES)  # one trace per type and panel
    assert sum(t.showlegend for t in figure.data) == len(CELL_TYPES)
    assert {t.xaxis for t in figure.data} == {"x", "x2"}
    colours = {t.name: t.marker.color for t in figure.data}
    assert len(set(colours.values())) == len(CELL_TYPES)

    values = F.umap_gene_values(result.figures, "G3")
    assert values.shape == (100,)
    np.testing.assert_allclose(values, result.figures["umap_expression"][:, 3].toarray().ravel())
    figure, _ = F.umap_figure(frame, values=values, value_label="G3")
    assert len(figure.data) == 1 and figure.data[0].marker.colorscale


def test_umap_figure_downsamples_each_side_and_says_so() -> None:
    frame = hand_result(n_real=300, n_synthetic=50).figures["umap"]
    keep = np.zeros(len(frame), dtype=bool)
    keep[[5, 7]] = True
    figure, caption = F.umap_figure(frame, max_points=100, keep=keep)
    real, synthetic = figure.data
    assert 95 <= len(real.x) <= 105 and len(synthetic.x) == 50
    assert {5, 7} <= set(real.customdata)
    assert caption.startswith("Joint UMAP of ")
    assert "of 300 real cells and 50 synthetic cells" in caption
    assert "Downsampled for display to at most 100 points per side" in caption


def test_selection_summary_counts_and_composition() -> None:
    frame = hand_result().figures["umap"]
    points = [{"customdata": 0}, {"customdata": [1]}, {"customdata": 61}, {"x": 0.0}]
    rows = F.selection_rows(points)
    assert list(rows) == [0, 1, 61]
    counts, table = F.selection_summary(frame, rows)
    assert counts == {"real": 2, "synthetic": 1}
    assert table["real cells"].sum() == 2 and table["synthetic cells"].sum() == 1
    assert list(table.columns) == ["cell type", "real cells", "real fraction",
                                   "synthetic cells", "synthetic fraction"]


def test_distribution_figures() -> None:
    figures = hand_result().figures
    overlay = F.property_overlay(figures["properties_long"], "library_size")
    assert [t.name for t in overlay.data] == ["real", "synthetic"]
    assert all(t.type == "bar" for t in overlay.data)
    assert sum(overlay.data[0].y) == pytest.approx(1.0)
    assert overlay.layout.barmode == "overlay"

    mean_variance = F.mean_variance_figure(figures["mean_variance"])
    assert [t.name for t in mean_variance.data] == ["real", "synthetic"]
    assert [len(t.x) for t in mean_variance.data] == [12, 12]

    heatmaps = F.corr_heatmaps(figures["gene_corr"])
    assert [t.type for t in heatmaps.data] == ["heatmap", "heatmap"]
    assert [t.name for t in heatmaps.data] == ["real", "synthetic"]
    assert list(heatmaps.data[0].x) == GENES[:5]
    assert heatmaps.data[0].zmin == -1 and heatmaps.data[0].zmax == 1


def test_marker_dotplot_shows_the_real_markers_on_both_sides() -> None:
    figures = hand_result().figures
    assert F.marker_genes(figures["markers"], n_genes=1) == ["G0", "G3", "G6"]
    table = F.marker_dot_table(figures, n_genes=2)
    assert set(table["gene"]) == {"G0", "G1", "G3", "G4", "G6", "G7"}
    assert set(table["source"]) == {"real", "synthetic"}
    # the same genes on both sides, from the expression behind the UMAP
    frame, expression = figures["umap"], figures["umap_expression"]
    rows = np.flatnonzero((frame["source"] == "synthetic") & (frame["cell_type"] == "NK cells"))
    expected = np.asarray((expression[rows][:, 4] > 0).mean())
    got = table[(table["source"] == "synthetic") & (table["cell_type"] == "NK cells")
                & (table["gene"] == "G4")]["fraction_expressing"].iloc[0]
    assert got == pytest.approx(float(expected))

    figure = F.marker_dotplot(figures, n_genes=2)
    assert [t.name for t in figure.data] == ["real", "synthetic"]
    assert all(len(t.x) == 6 * len(CELL_TYPES) for t in figure.data)

    empty = F.marker_dotplot({**figures, "markers": pd.DataFrame()})
    assert not empty.data and "no cell-type labels" in empty.layout.title.text


def test_metrics_summary_compares_runs_with_floor_ticks() -> None:
    first = metric_rows()
    second = first.assign(value=first["value"] * 0.9)
    figure = F.metrics_summary_figure({"run A": first, "run B": second})
    bars = [t for t in figure.data if t.type == "bar" and t.x[0] is not None]
    ticks = [t for t in figure.data if t.type == "scatter"]
    assert [t.name for t in bars] == ["classifier_auroc_gbt", "mmd", "gene_mean_pearson",
                                      "ks_library_size"]  # key metrics of group "all"
    assert list(bars[0].x) == ["run A", "run B"]
    assert list(bars[0].y) == pytest.approx([0.91, 0.819])
    assert list(bars[0].marker.color) == [F.STATUS_COLORS["poor"]] * 2
    assert list(ticks[0].y) == pytest.approx([0.55, 0.55])
    assert sum(bool(t.showlegend) for t in ticks) == 1
    assert "↓ better" in figure.layout.annotations[0].text


def test_metrics_styler_colours_status() -> None:
    table = F.metrics_table(metric_rows())
    assert list(table.columns) == ["metric", "family", "group", "value", "floor", "better",
                                   "status", "description"]
    assert table["better"].iloc[0] == "lower ↓"
    rendered = F.style_metrics(table).to_html()
    for status in ("good", "fair", "poor", "n/a"):
        assert F.STATUS_BACKGROUNDS[status].lower() in rendered.lower()


# -- the report ----------------------------------------------------------------------------
def test_report_is_one_self_contained_file(tmp_path: Path) -> None:
    result = hand_result()
    path = tmp_path / "report.html"
    write_report(result, path, title="mock run abcdef01 vs held-out cells")
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temp file left
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert "<title>mock run abcdef01 vs held-out cells</title>" in text
    # nothing is loaded from the network: plotly.js is inline, once
    assert not re.search(r"<script[^>]+src=", text)
    assert not re.search(r"<link[^>]+href=[\"']https?:", text)
    assert text.count("Plotly.newPlot") >= 8
    assert text.count("/*! For license information please see plotly") <= 1
    assert len(re.findall(r"<script type='text/javascript'>", text)) == 1
    # the metrics with their floor and status, the audit with its sentences
    for name in ("classifier_auroc_gbt", "mmd", "gene_mean_pearson", "ks_library_size"):
        assert name in text
    assert "0.910" in text and "0.550" in text  # value and floor of the AUROC
    assert "noise floor" in text
    assert F.STATUS_BACKGROUNDS["poor"] in text
    sentence = not_privacy_sentence()
    assert "not privacy" in sentence
    assert text.count(html.escape(sentence)) == 1  # once, though the audit notes repeat it
    assert FEASIBILITY in text
    assert ATTACK_LABELS["dcr"] in text and ATTACK_LABELS["domias"] in text
    assert "Attacks see the PCA features only." in text
    assert "12 of 20 real genes are in the synthetic data." in text
    # provenance
    for value in ("fp0123456789abcdef", "donor split (2 of 8 donors held out)", "split42",
                  "abcdef0123456789", "kang_ifnb_pbmc_2k.h5ad", "Seed", "Data fingerprint",
                  "Privacy spend", "{&quot;n_genes&quot;: 200}"):
        assert value in text, value
    assert "badge not-private'>not private</span>" in text
    assert text == render_report(result, title="mock run abcdef01 vs held-out cells")


def test_report_without_audit_still_says_what_an_audit_is_not(tmp_path: Path) -> None:
    result = hand_result(audit=False, privacy_label="DP (ε = 4)")
    result.figures["markers"] = pd.DataFrame()
    path = tmp_path / "report.html"
    write_report(result, path, title="t")
    text = path.read_text(encoding="utf-8")
    assert html.escape(not_privacy_sentence()) in text
    assert "No audit was run" in text
    assert "badge private'>DP (ε = 4)</span>" in text


def test_report_survives_a_save_and_load(tmp_path: Path) -> None:
    result = hand_result()
    result.save(tmp_path / "evaluation")
    loaded = EvaluationResult.load(tmp_path / "evaluation")
    write_report(loaded, tmp_path / "report.html", title="loaded")
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert FEASIBILITY in text and ATTACK_LABELS["dcr"] in text
    assert "fp0123456789abcdef" in text


def test_failed_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.evaluate.report as report

    def boom(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_report(hand_result(), tmp_path / "report.html", title="t")
    assert list(tmp_path.iterdir()) == []
