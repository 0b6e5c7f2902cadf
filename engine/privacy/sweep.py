"""The privacy–utility curve: one DP generator trained at several total budgets, each run
compared with the held-out cells and audited.

Every point is an ordinary run (trained by :func:`engine.tasks.train_generator`, evaluated by
:func:`engine.tasks.evaluate_run`), so a point asked for twice is read from the store, and
every run of the curve can be opened on the Compare page. A point without DP (``dp="none"``)
is the reference. The curve is written to ``sweeps/<id>.json`` in the workspace.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from engine.errors import UserFacingError
from engine.store import Workspace, atomic_write_json, read_json

UTILITY_METRICS = ("classifier_auroc_gbt", "tstr_relative_f1", "ilisi")
ATTACKS = ("dcr", "domias", "classifier")


@dataclass
class _Slice:
    """A task context that maps a sub-task's progress into [start, end] of the parent's."""

    parent: Any
    start: float
    end: float
    label: str

    @property
    def workspace(self) -> Workspace:
        return self.parent.workspace

    def progress(self, fraction: float, message: str = "", *,
                 metrics: dict[str, float] | None = None) -> None:
        self.parent.progress(self.start + (self.end - self.start) * fraction,
                             f"{self.label}: {message}")

    def log(self, text: str) -> None:
        self.parent.log(text)


def parse_epsilons(text: str | list[float]) -> list[float]:
    """Return the sorted distinct budgets of ``"1, 4, 10"`` (or a list); a sentence when a
    value is not a positive number."""
    items = text if isinstance(text, list) else [t for t in str(text).replace(";", ",")
                                                 .split(",") if t.strip()]
    values = []
    for item in items:
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise UserFacingError(f"{item!r} is not a number: give budgets like 1, 4, 10."
                                  ) from None
        if not math.isfinite(value) or value <= 0:
            raise UserFacingError(f"Every ε must be a positive number; {item!r} is not.")
        values.append(value)
    if not values:
        raise UserFacingError("Give at least one ε, e.g. 1, 4, 10.")
    return sorted(set(values))


def sweep_id(params: dict[str, Any]) -> str:
    """Content hash of what defines a curve (split, generator, config, budgets, seed)."""
    keys = ("split_id", "generator", "config", "epsilons", "seed", "dp", "n_cells")
    payload = json.dumps({k: params.get(k) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _point(result: Any, *, epsilon: float | None, run: Any) -> dict[str, Any]:
    """One point of the curve: the run's budget, utility numbers and audit AUROC."""
    point: dict[str, Any] = {"epsilon_requested": epsilon, "run_key": run.key,
                             "privacy_label": run.privacy_label,
                             "epsilon": (run.privacy or {}).get("epsilon"),
                             "delta": (run.privacy or {}).get("delta")}
    for name in UTILITY_METRICS:
        value, floor = result.metric(name)
        point[name], point[f"{name}_floor"] = value, floor
    audit = result.to_json().get("audit", {})
    aurocs = [audit.get(f"audit_{a}_auroc") for a in ATTACKS]
    aurocs = [a for a in aurocs if a is not None]
    point["audit_auroc"] = max(aurocs) if aurocs else None
    bounds = [audit.get(f"audit_{a}_epsilon_lower_bound") for a in ATTACKS]
    bounds = [b for b in bounds if b is not None]
    point["audit_epsilon_lower_bound"] = max(bounds) if bounds else None
    point["audit_unit"] = audit.get("audit_unit")
    return point


def privacy_sweep(params: dict[str, Any], context: Any) -> dict[str, Any]:
    """Train and evaluate ``generator`` (default ``dp-nmf``) at each ε of ``epsilons``.

    params: ``split_id``, ``epsilons`` (list or "1, 4, 10"), optional ``dataset_id``,
    ``generator``, ``config`` (the privacy settings and other options; ``dp`` defaults to
    ``"all"``), ``seed``, ``n_cells``, ``max_cells``. Budgets use the total mode. Writes
    ``sweeps/<id>.json`` with one point per budget plus the no-DP reference.
    """
    from engine.evaluate.suite import EvaluationResult
    from engine.tasks import evaluate_run, train_generator

    workspace: Workspace = context.workspace
    split = workspace.get_split(params.get("split_id") or "")
    if split is None:
        raise UserFacingError("The privacy–utility curve compares runs with held-out donors: "
                              "make a split on the Split page first.")
    epsilons = parse_epsilons(params.get("epsilons") or "")
    config = dict(params.get("config") or {})
    dp = config.get("dp") if config.get("dp") not in (None, "none") else "all"
    request = {**params, "split_id": split.id, "generator": params.get("generator", "dp-nmf"),
               "epsilons": epsilons, "config": config, "dp": dp,
               "seed": int(params.get("seed", 0))}
    identifier = sweep_id(request)
    path = workspace.root / "sweeps" / f"{identifier}.json"
    if path.exists():
        context.progress(1.0, "found the stored curve")
        return {"sweep_id": identifier, "cached": True, "message": "Returned the stored curve."}
    budgets: list[float | None] = [None, *epsilons]
    points = []
    for i, epsilon in enumerate(budgets):
        label = "no DP" if epsilon is None else f"ε = {epsilon:g}"
        start, end = i / len(budgets), (i + 1) / len(budgets)
        options = {**config, "dp": "none"} if epsilon is None else {
            **config, "dp": dp, "budget_mode": "total", "epsilon_total": epsilon}
        trained = train_generator(
            {"generator": request["generator"], "config": options, "seed": request["seed"],
             "dataset_id": split.dataset_id, "split_id": split.id,
             "n_cells": params.get("n_cells")},
            _Slice(context, start, start + 0.5 * (end - start), f"{label}, training"))
        evaluate_run({"run_key": trained["run_key"], "split_id": split.id,
                      "max_cells": int(params.get("max_cells", 4000)),
                      "seed": request["seed"]},
                     _Slice(context, start + 0.5 * (end - start), end, f"{label}, comparing"))
        run = workspace.get_run(trained["run_key"])
        result = EvaluationResult.load(workspace.evaluation_dir(run.key, split.id))
        points.append(_point(result, epsilon=epsilon, run=run))
        context.log(f"{label}: {json.dumps(points[-1], default=str)}")
    curve = {"sweep_id": identifier, "split_id": split.id, "split_label": split.label,
             "dataset_id": split.dataset_id, "generator": request["generator"], "dp": dp,
             "config": config, "seed": request["seed"], "points": points}
    atomic_write_json(path, curve)
    context.progress(1.0, "curve stored")
    return {"sweep_id": identifier, "cached": False,
            "message": f"Privacy–utility curve stored: {len(epsilons)} budgets and no DP."}


def load_sweep(workspace: Workspace, identifier: str) -> dict[str, Any] | None:
    """Return a stored curve, or None."""
    return read_json(workspace.root / "sweeps" / f"{identifier}.json", None)


def list_sweeps(workspace: Workspace) -> list[dict[str, Any]]:
    """Return the stored curves, newest first."""
    folder = workspace.root / "sweeps"
    if not folder.exists():
        return []
    files = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    return [curve for f in files if (curve := read_json(f, None))]


CURVE_SERIES = (
    ("tstr_relative_f1", "train-on-synthetic F1 (relative)", "higher is better"),
    ("classifier_auroc_gbt", "real-vs-synthetic AUROC", "0.5 is ideal"),
    ("ilisi", "iLISI (mixing)", "higher is better"),
    ("audit_auroc", "membership audit AUROC (strongest attack)", "0.5: nothing learnt"),
)


def curve_frame(curve: dict[str, Any]) -> Any:
    """The curve as a table: one row per budget (the no-DP reference labelled as such)."""
    import pandas as pd

    rows = []
    for point in curve["points"]:
        row = {"budget": "no DP" if point["epsilon_requested"] is None
               else f"ε = {point['epsilon_requested']:g}",
               "ε (accountant)": point.get("epsilon"), "δ": point.get("delta")}
        row.update({label: point.get(key) for key, label, _ in CURVE_SERIES})
        row["run"] = point["run_key"]
        rows.append(row)
    return pd.DataFrame(rows)


def curve_figure(curve: dict[str, Any]) -> Any:
    """A plotly figure: each utility number and the audit AUROC against ε (log axis), the
    no-DP reference as a dashed line of the same colour."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative

    figure = go.Figure()
    private = [p for p in curve["points"] if p["epsilon_requested"] is not None]
    reference = next((p for p in curve["points"] if p["epsilon_requested"] is None), None)
    x = [p["epsilon_requested"] for p in private]
    for (key, label, hint), colour in zip(CURVE_SERIES, qualitative.Plotly, strict=False):
        figure.add_trace(go.Scatter(x=x, y=[p.get(key) for p in private], name=label,
                                    mode="lines+markers", line={"color": colour},
                                    hovertemplate=f"{label} ({hint})<br>ε=%{{x}}: "
                                    "%{y:.3f}<extra></extra>"))
        if reference is not None and reference.get(key) is not None:
            figure.add_hline(y=reference[key], line={"color": colour, "dash": "dash"},
                             opacity=0.6)
    figure.update_layout(xaxis={"type": "log", "title": "total ε (δ as set)"},
                         yaxis={"title": "value"}, legend={"orientation": "h", "y": -0.25},
                         title="Privacy–utility curve (dashed: the same settings without DP)",
                         margin={"t": 50})
    return figure
