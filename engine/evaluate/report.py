"""One self-contained HTML report of an evaluation: figures, metrics with their noise floor,
the privacy audit beside the utility numbers, notes and provenance.

The file embeds plotly.js once and loads nothing from the network, so it opens offline and
can be mailed around. The figures are the same functions the Compare page draws
(:mod:`engine.evaluate.figures`).
"""

from __future__ import annotations

import html
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.io as pio
from plotly.offline import get_plotlyjs

from engine.evaluate import figures as F

PROVENANCE_FIELDS = (  # shown first, in this order, with these labels
    ("dataset", "Dataset"),
    ("dataset_fingerprint", "Data fingerprint"),
    ("split_label", "Split"),
    ("split_id", "Split id"),
    ("generator", "Generator"),
    ("run_key", "Run"),
    ("config", "Config"),
    ("seed", "Seed"),
    ("privacy_label", "Privacy"),
    ("privacy_spend", "Privacy spend"),
    ("floor_unit", "Noise-floor halves by"),
    ("n_real_held_out", "Held-out real cells used"),
    ("n_synthetic", "Synthetic cells compared"),
    ("n_genes_compared", "Genes compared"),
)
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto;
       max-width: 1200px; color: #222; padding: 0 1rem; }
h1 { margin-bottom: .2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
.badge { display: inline-block; padding: .15rem .6rem; border-radius: 1rem; font-weight: 600;
         font-size: .9rem; }
.badge.private { background: #C8E6C9; color: #1B5E20; }
.badge.not-private { background: #FFCDD2; color: #B71C1C; }
.columns { display: flex; gap: 2rem; flex-wrap: wrap; } .columns > div { flex: 1 1 420px; }
table { border-collapse: collapse; font-size: .85rem; margin: .5rem 0; }
th, td { border-bottom: 1px solid #e5e5e5; padding: .25rem .5rem; text-align: left;
         vertical-align: top; }
th { background: #fafafa; }
.sentence { background: #FFF8E1; border-left: 4px solid #F9A825; padding: .5rem .8rem; }
.note { color: #555; font-size: .9rem; }
pre { background: #f6f6f6; padding: .8rem; overflow-x: auto; font-size: .8rem; }
.caption { color: #666; font-size: .85rem; margin-top: -.3rem; }
"""


def not_privacy_sentence() -> str:
    """Return the sentence that stands beside every audit: a low attack score is no proof."""
    from engine.privacy.audit import NOT_PRIVACY_SENTENCE

    return NOT_PRIVACY_SENTENCE


def write_report(result: Any, path: Path, *, title: str) -> None:
    """Write ``result`` (an :class:`~engine.evaluate.suite.EvaluationResult`) as one
    self-contained HTML file at ``path``: written to a temporary file beside it and renamed,
    so a reader never sees half a report."""
    path = Path(path)
    document = render_report(result, title=title)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(document, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def render_report(result: Any, *, title: str) -> str:
    """Return the HTML text of the report (see :func:`write_report`)."""
    esc = html.escape
    provenance = dict(result.provenance or {})
    figures = result.figures or {}
    privacy = str(provenance.get("privacy_label") or "unknown")
    _figure = _Figures()
    parts: list[str] = [
        "<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title>", f"<style>{_CSS}</style>",
        f"<script type='text/javascript'>{get_plotlyjs()}</script>", "</head><body>",
        f"<h1>{esc(title)}</h1>",
        f"<p><span class='badge {_privacy_class(privacy)}'>{esc(privacy)}</span> "
        f"{esc(_one_line(provenance))}</p>",
        "<p class='note'>Synthetic cells are compared with real cells of <b>held-out</b> "
        "donors. Beside every metric stands its <b>noise floor</b>: the same metric between "
        "two donor-disjoint halves of the real held-out cells. A value near its floor is as "
        "close as two real samples are.</p>",
    ]

    parts.append("<h2>Summary</h2>")
    parts.append(_figure(F.metrics_summary_figure({_run_label(provenance): result.metrics})))
    parts.append("<h2>Utility and privacy, side by side</h2><div class='columns'>")
    parts.append("<div><h3>Key utility metrics</h3>")
    key_rows = result.metrics[result.metrics["metric"].isin(F.KEY_METRICS)
                              & (result.metrics["group"] == "all")]
    parts.append(_styled_metrics(key_rows, "key-metrics",
                                 columns=["metric", "value", "floor", "better", "status"]))
    parts.append("</div><div><h3>Membership-inference audit</h3>")
    sentence = not_privacy_sentence()
    parts.extend(_audit_summary(result.audit, sentence))
    parts.append("</div></div>")
    parts.extend(_audit_details(result.audit, sentence, _figure))

    parts.append("<h2>All metrics</h2>")
    parts.append("<p class='note'>Status compares each value with its floor: good (within "
                 "noise), fair, poor. Rows with a cell type as group compare that type "
                 "only; “per-type (weighted)” averages them by real proportions.</p>")
    parts.append(_styled_metrics(result.metrics, "all-metrics"))

    parts.append("<h2>Pictures</h2>")
    if "umap" in figures:
        for color in ("source", "cell_type"):
            figure, caption = F.umap_figure(figures["umap"], color=color)
            figure.update_layout(dragmode="zoom")
            parts.append(_figure(figure))
            if color == "source":
                parts.append(f"<p class='caption'>{esc(caption)}</p>")
    properties = figures.get("properties_long")
    if properties is not None and not properties.empty:
        names = [n for n in F.REPORT_PROPERTIES if n in set(properties["property"])]
        parts.append("<div class='columns'>")
        for name in names:
            parts.append(f"<div>{_figure(F.property_overlay(properties, name))}</div>")
        parts.append("</div>")
    if figures.get("mean_variance") is not None:
        parts.append(_figure(F.mean_variance_figure(figures["mean_variance"])))
    if figures.get("gene_corr") is not None:
        parts.append(_figure(F.corr_heatmaps(figures["gene_corr"])))
    if figures.get("markers") is not None and not figures["markers"].empty:
        parts.append(_figure(F.marker_dotplot(figures)))

    parts.append("<h2>Notes</h2>")
    notes = list(result.notes or [])
    parts.append("<ul>" + "".join(f"<li>{esc(str(n))}</li>" for n in notes) + "</ul>"
                 if notes else "<p class='note'>None.</p>")

    parts.append("<h2>Provenance</h2>")
    parts.append(_provenance_table(provenance))
    parts.append("<details><summary>Everything recorded (JSON)</summary><pre>"
                 f"{esc(json.dumps(provenance, indent=2, default=str))}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


# -- pieces --------------------------------------------------------------------------------
_CONFIG = {"displaylogo": False, "responsive": True}


class _Figures:
    """Turns figures into HTML divs with stable ids (the same result gives the same file)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, figure: Any) -> str:
        self.count += 1
        return pio.to_html(figure, include_plotlyjs=False, full_html=False, config=_CONFIG,
                           div_id=f"figure-{self.count}")


def _privacy_class(label: str) -> str:
    lowered = label.lower()
    return "not-private" if ("not" in lowered or lowered == "unknown") else "private"


def _one_line(provenance: dict[str, Any]) -> str:
    bits = [f"{label}: {_text(provenance[key])}" for key, label in PROVENANCE_FIELDS[:6]
            if provenance.get(key) not in (None, "")]
    return " · ".join(bits)


def _run_label(provenance: dict[str, Any]) -> str:
    key = str(provenance.get("run_key") or "")[:8]
    return " ".join(str(p) for p in (provenance.get("generator"), key) if p) or "this run"


def _text(value: Any) -> str:
    if isinstance(value, float):
        return "—" if not math.isfinite(value) else f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value, default=str, sort_keys=True)
    return str(value)


def _styled_metrics(metrics: pd.DataFrame, uuid: str,
                    columns: list[str] | None = None) -> str:
    if metrics is None or metrics.empty:
        return "<p class='note'>No metrics.</p>"
    table = F.metrics_table(metrics)
    return F.style_metrics(table[columns] if columns else table, uuid=uuid).to_html()


def _audit_table_html(table: pd.DataFrame, *, compact: bool) -> str:
    return F.audit_table(table, compact=compact).to_html(
        index=False, na_rep="—", border=0, float_format=lambda v: f"{v:.3f}")


def _audit_summary(audit: Any, sentence: str) -> list[str]:
    """The sentence, the feasibility verdict and the key numbers of each attack."""
    esc = html.escape
    parts = [f"<p class='sentence'>{esc(sentence)}</p>"]
    if audit is None:
        parts.append("<p class='note'>No audit was run (it needs the training cells of the "
                     "run's split).</p>")
        return parts
    feasibility = getattr(audit, "feasibility", None)
    if feasibility:
        parts.append(f"<p class='sentence'>{esc(str(feasibility))}</p>")
    table = getattr(audit, "table", None)
    if table is not None and not table.empty:
        parts.append(_audit_table_html(table, compact=True))
    return parts


def _audit_details(audit: Any, sentence: str, _figure: _Figures) -> list[str]:
    """Every audit number, the ROC curves and the audit's notes."""
    if audit is None:
        return []
    esc = html.escape
    parts = ["<h3>The audit in full</h3>"]
    table = getattr(audit, "table", None)
    if table is not None and not table.empty:
        parts.append(_audit_table_html(table, compact=False))
    roc = getattr(audit, "roc", None) or {}
    if roc:
        parts.append(_figure(F.audit_roc_figure(roc)))
    parts.extend(f"<p class='note'>{esc(n)}</p>" for n in F.audit_notes(audit, sentence))
    return parts


def _provenance_table(provenance: dict[str, Any]) -> str:
    esc = html.escape
    rows = [(label, provenance[key]) for key, label in PROVENANCE_FIELDS if key in provenance]
    if not rows:
        return "<p class='note'>No provenance recorded.</p>"
    body = "".join(f"<tr><th>{esc(label)}</th><td>{esc(_text(value))}</td></tr>"
                   for label, value in rows)
    return f"<table>{body}</table>"
