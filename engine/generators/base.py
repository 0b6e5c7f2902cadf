"""The one interface every generator implements, and the config-to-form description.

A generator takes training data, a typed config and a progress callback; it knows nothing
of pages, jobs or the store. Configs are dataclasses whose fields carry form metadata
(``label``, ``help``, ``min``, ``max``, ``step``, ``choices``) so the Train page can render
a form for any generator without naming it.
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import anndata as ad
import pandas as pd

# progress(fraction, message, metrics=None): generators that train in epochs also pass
# ``metrics`` (a dict of numbers) for live curves.
Progress = Callable[..., None]


def no_progress(fraction: float, message: str = "", *,
                metrics: dict[str, float] | None = None) -> None:
    """A progress callback that ignores what it is told."""


@dataclass(frozen=True)
class Capabilities:
    """What a generator can do; the UI shows these and enables features by them."""

    needs_training_data: bool = True  # fit() requires the training cells of a split
    conditional: bool = False
    counterfactual: bool = False
    inverse_design: bool = False
    posterior: bool = False
    modalities: tuple[str, ...] = ("rna",)
    dp_mechanisms: tuple[str, ...] = ()
    accelerated: bool = False  # trains with torch: on CUDA when present, as a GPU job
    streams_from_disk: bool = False  # fit() reads a backed AnnData chunk by chunk

    def as_labels(self) -> list[str]:
        """Return short human labels of the capabilities that are present."""
        labels = [f"modalities: {', '.join(self.modalities)}"]
        for name in ("conditional", "counterfactual", "inverse_design", "posterior"):
            if getattr(self, name):
                labels.append(name.replace("_", " "))
        labels.append(
            f"DP options: {', '.join(self.dp_mechanisms)}" if self.dp_mechanisms
            else "not private"
        )
        if not self.needs_training_data:
            labels.append("trains without a split")
        return labels


@dataclass(frozen=True)
class FieldSpec:
    """One form field of a config: its name, type, default and widget hints."""

    name: str
    kind: str  # int | float | bool | choice | str
    default: Any
    label: str
    help: str = ""
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[Any, ...] = ()
    privacy: bool = False  # set on the Privacy page, not in the training form


def config_fields(config_class: type) -> list[FieldSpec]:
    """Describe the fields of a config dataclass for a form, in declaration order."""
    specs = []
    for f in dataclasses.fields(config_class):
        meta = dict(f.metadata)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if meta.get("choices"):
            kind = "choice"
        elif isinstance(default, bool):
            kind = "bool"
        elif isinstance(default, int):
            kind = "int"
        elif isinstance(default, float):
            kind = "float"
        else:
            kind = "str"
        specs.append(
            FieldSpec(
                name=f.name,
                kind=kind,
                default=default,
                label=meta.get("label", f.name.replace("_", " ")),
                help=meta.get("help", ""),
                minimum=meta.get("min"),
                maximum=meta.get("max"),
                step=meta.get("step"),
                choices=tuple(meta.get("choices", ())),
                privacy=bool(meta.get("privacy", False)),
            )
        )
    return specs


RUN_FIELDS = ("seed", "n_cells")
# Config fields naming a column of the data are filled from the dataset's column roles.
ROLE_FIELDS = {"donor_key": "donor", "cell_type_key": "cell_type", "condition_key": "condition"}


def form_fields(config_class: type) -> list[FieldSpec]:
    """The config fields a training form shows: all but the run-level ones (seed, number of
    cells), which the Train page asks for once for every generator, the column-name
    fields, which come from the dataset's roles, and the privacy fields, which come from
    the Privacy page."""
    return [f for f in config_fields(config_class)
            if f.name not in RUN_FIELDS and f.name not in ROLE_FIELDS and not f.privacy]


def privacy_fields(config_class: type) -> list[FieldSpec]:
    """The config fields the Privacy page sets (DP choice, budgets, δ, caps, clipping)."""
    return [f for f in config_fields(config_class) if f.privacy]


def fill_role_fields(config_class: type, values: dict[str, Any],
                     roles: dict[str, str | None]) -> dict[str, Any]:
    """Return ``values`` with each column-name field the caller left unset taken from the
    dataset's roles (``donor_key`` from the donor role, and so on; "" when unmapped)."""
    names = {f.name for f in config_fields(config_class)}
    filled = dict(values)
    for field_name, role in ROLE_FIELDS.items():
        if field_name in names and field_name not in filled:
            filled[field_name] = roles.get(role) or ""
    return filled


def config_from_dict(config_class: type, values: dict[str, Any]) -> Any:
    """Build a config from a dict, ignoring unknown keys and checking choices and bounds.

    Raises ValueError with a sentence naming the field when a value is out of range.
    """
    known = {f.name: f for f in config_fields(config_class)}
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        spec = known.get(name)
        if spec is None:
            continue
        try:
            if spec.kind == "int":
                value = int(value)
            elif spec.kind == "float":
                value = float(value)
        except (TypeError, ValueError):
            what = "a whole number" if spec.kind == "int" else "a number"
            raise ValueError(f"{spec.label} must be {what}, not {value!r}.") from None
        if spec.kind == "bool":
            value = bool(value)
        if spec.choices and value not in spec.choices:
            raise ValueError(f"{spec.label} must be one of {', '.join(map(str, spec.choices))}.")
        if spec.minimum is not None and value < spec.minimum:
            raise ValueError(f"{spec.label} must be at least {spec.minimum}.")
        if spec.maximum is not None and value > spec.maximum:
            raise ValueError(f"{spec.label} must be at most {spec.maximum}.")
        kwargs[name] = value
    return config_class(**kwargs)


class Generator(ABC):
    """A generator of synthetic cells: fit on training data, then sample.

    Subclasses set ``name``, ``label``, ``description``, ``config_class`` and
    ``capabilities``, and implement :meth:`fit`, :meth:`sample`, :meth:`_state` and
    :meth:`_restore`. State is saved as JSON plus ``.h5ad``/``.npz`` files, never pickle.
    """

    name: ClassVar[str]
    label: ClassVar[str]
    description: ClassVar[str]
    config_class: ClassVar[type]
    capabilities: ClassVar[Capabilities]

    def __init__(self, config: Any | None = None) -> None:
        self.config = config if config is not None else self.config_class()

    @property
    def privacy_label(self) -> str:
        """``"not private"`` unless the generator releases only DP statistics."""
        return "not private"

    def privacy_spend(self) -> dict[str, Any]:
        """Return the accounted (epsilon, delta) of the fitted model; empty when none."""
        return {}

    @abstractmethod
    def fit(self, train: ad.AnnData | None, *, progress: Progress = no_progress) -> None:
        """Learn from the training cells (``train`` may be None for generators that use no
        real data)."""

    @abstractmethod
    def sample(
        self,
        n: int | None = None,
        *,
        contexts: pd.DataFrame | None = None,
        seed: int = 0,
        progress: Progress = no_progress,
    ) -> ad.AnnData:
        """Return synthetic cells as AnnData with raw counts in ``X`` (CSR)."""

    def save(self, folder: Path) -> None:
        """Write ``config.json`` and the model state into ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        payload = {"generator": self.name, "config": dataclasses.asdict(self.config)}
        (folder / "config.json").write_text(json.dumps(payload, indent=2))
        self._state(folder)

    @classmethod
    def load(cls, folder: Path) -> Generator:
        """Read a generator saved by :meth:`save`."""
        payload = json.loads((folder / "config.json").read_text())
        model = cls(config_from_dict(cls.config_class, payload["config"]))
        model._restore(folder)
        return model

    def _state(self, folder: Path) -> None:
        """Write the fitted state into ``folder`` (default: nothing to save)."""
        return None

    def _restore(self, folder: Path) -> None:
        """Read the fitted state from ``folder`` (default: nothing to read)."""
        return None
