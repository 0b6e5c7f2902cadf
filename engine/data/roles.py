"""Map a dataset's ``obs`` columns to the roles the app uses: donor, cell type, condition, batch.

Datasets name these columns differently (``donor``, ``individual``, ``patient`` ...).
:func:`guess_roles` proposes a mapping from common names, the user confirms or edits it on
the Data page, and :func:`validate_roles` lists what looks wrong with a mapping.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import pandas as pd

from engine.errors import DataError

__all__ = ["ROLES", "ROLE_NAMES", "guess_roles", "is_categorical_like", "validate_roles"]

ROLES: tuple[str, ...] = ("donor", "cell_type", "condition", "batch")

#: Column names recognised for each role, best first (compared case-insensitively, ignoring
#: ``_``, ``-``, ``.`` and spaces).
ROLE_NAMES: dict[str, tuple[str, ...]] = {
    "donor": (
        "donor",
        "donor_id",
        "individual",
        "individual_id",
        "patient",
        "patient_id",
        "subject",
        "subject_id",
        "sample_id",
        "sample",
    ),
    "cell_type": (
        "cell_type",
        "celltype",
        "cell_label",
        "cell_types",
        "annotation",
        "cell_ontology_class",
        "seurat_annotations",
        "labels",
        "cell_annotation",
        "cluster",
    ),
    "condition": (
        "condition",
        "stim",
        "stimulation",
        "treatment",
        "perturbation",
        "group",
        "disease",
        "status",
    ),
    "batch": (
        "batch",
        "batch_id",
        "dataset",
        "study",
        "assay",
        "library",
        "library_id",
        "plate",
    ),
}

#: Substrings that make a column a weaker candidate when no exact name matches.
_ROLE_SUBSTRINGS: dict[str, tuple[str, ...]] = {
    "donor": ("donor", "patient", "individual"),
    "cell_type": ("celltype",),
    "condition": ("condition", "treatment"),
    "batch": ("batch",),
}

_MAX_LEVELS = 5000
_SUBSTRING_RANK = 1000


def _normalise(name: object) -> str:
    """Return a column name lower-cased without ``_``, ``-``, ``.`` and spaces."""
    return re.sub(r"[\s_\-.]+", "", str(name).lower())


def is_categorical_like(series: pd.Series) -> bool:
    """Return True for columns of labels: categories, strings, booleans or integers.

    Floats (QC metrics such as ``nCount_RNA``) are not labels.
    """
    dtype = series.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        return True
    if pd.api.types.is_bool_dtype(dtype) or pd.api.types.is_integer_dtype(dtype):
        return True
    return bool(pd.api.types.is_string_dtype(dtype) or pd.api.types.is_object_dtype(dtype))


def _level_ok(series: pd.Series, role: str, n_cells: int) -> bool:
    """Return True if the number of levels of ``series`` fits ``role``."""
    n_levels = int(series.nunique(dropna=True))
    upper = min(_MAX_LEVELS, max(n_cells // 2, 1))
    lower = 1 if role in ("condition", "batch") else 2
    return lower <= n_levels <= upper


def _rank(column: object, role: str) -> int | None:
    """Return how well a column name matches a role (lower is better), None if not at all."""
    name = _normalise(column)
    choices = [_normalise(c) for c in ROLE_NAMES[role]]
    if name in choices:
        return choices.index(name)
    if name.endswith("s") and name[:-1] in choices:
        return len(choices) + choices.index(name[:-1])
    for i, sub in enumerate(_ROLE_SUBSTRINGS[role]):
        if sub in name:
            return _SUBSTRING_RANK + i
    return None


def guess_roles(obs: pd.DataFrame) -> dict[str, str | None]:
    """Guess which ``obs`` column plays each role.

    A column is a candidate when its name is one of :data:`ROLE_NAMES` (or a plural of one,
    or contains a role word such as ``donor``) and it holds labels (categories, strings,
    booleans or integers) with 2 to ``min(5000, n_cells / 2)`` levels (1 level is enough for
    condition and batch). The best-named candidates are assigned first; no column is used
    for two roles.

    Returns
    -------
    A dict mapping every role of :data:`ROLES` to a column name or None.
    """
    n_cells = len(obs)
    candidates: list[tuple[int, int, str, str]] = []
    for role_order, role in enumerate(ROLES):
        for column in obs.columns:
            rank = _rank(column, role)
            if rank is None:
                continue
            series = obs[column]
            if not is_categorical_like(series) or not _level_ok(series, role, n_cells):
                continue
            candidates.append((rank, role_order, role, str(column)))
    result: dict[str, str | None] = dict.fromkeys(ROLES)
    used: set[str] = set()
    for _rank_value, _order, role, column in sorted(candidates):
        if result[role] is None and column not in used:
            result[role] = column
            used.add(column)
    return result


def validate_roles(obs: pd.DataFrame, roles: dict[str, str | None]) -> list[str]:
    """List what looks wrong with a role mapping, as sentences for the user.

    Checks: unknown roles or columns, a column used for two roles, a role column with a
    single level, missing values (a donor column with NaN in particular), a donor column with
    one level per cell, and fewer than 2 donors (no donor-disjoint split possible).

    Returns
    -------
    Warning sentences; empty when the mapping looks fine.
    """
    warnings: list[str] = []
    seen: dict[str, str] = {}
    for role, column in roles.items():
        if column is None:
            continue
        label = role.replace("_", " ")
        if role not in ROLES:
            warnings.append(f"'{role}' is not a known role (known: {', '.join(ROLES)}).")
            continue
        if column not in obs.columns:
            warnings.append(f"The {label} column '{column}' is not in the cell metadata.")
            continue
        if column in seen:
            warnings.append(
                f"The column '{column}' is used both as {seen[column].replace('_', ' ')} and "
                f"as {label}; each role needs its own column."
            )
        seen[column] = role
        series = obs[column]
        n_levels = int(series.nunique(dropna=True))
        n_missing = int(series.isna().sum())
        if n_levels <= 1:
            warnings.append(
                f"The {label} column '{column}' has a single level"
                + (f" ('{series.dropna().iloc[0]}')" if n_levels == 1 else "")
                + ", so it cannot tell cells apart."
            )
        if n_missing:
            if role == "donor":
                warnings.append(
                    f"{n_missing:,} cells have no donor in '{column}'; they cannot be assigned "
                    "to a donor-disjoint split and will be left out of it."
                )
            else:
                warnings.append(f"{n_missing:,} cells have no {label} in '{column}'.")
        if role == "donor":
            if len(obs) > 1 and n_levels == len(obs):
                warnings.append(
                    f"The donor column '{column}' has a different value for every cell: it "
                    "looks like a cell ID, not a donor."
                )
            elif n_levels == 1:
                warnings.append(
                    "With a single donor, train and test cells cannot come from different "
                    "donors; privacy is then per cell."
                )
        if role in ("cell_type", "condition", "batch") and not is_categorical_like(series):
            warnings.append(f"The {label} column '{column}' holds decimal numbers, not labels.")
    return warnings


def check_role_mapping(roles: Mapping[str, str | None], columns: Sequence[str]) -> None:
    """Raise DataError unless every key is a known role, every column exists in ``columns``,
    and no column takes two roles."""
    unknown = [role for role in roles if role not in ROLES]
    if unknown:
        raise DataError(
            f"Unknown role {unknown[0]!r}: the roles are {', '.join(ROLES)}."
        )
    missing = [c for c in roles.values() if c and c not in columns]
    if missing:
        raise DataError(
            f"There is no column {missing[0]!r} in this dataset's cell metadata; "
            f"the columns are {', '.join(map(str, columns))}."
        )
    used = [c for c in roles.values() if c]
    if len(used) != len(set(used)):
        raise DataError("Each column can take one role only; pick different columns.")
