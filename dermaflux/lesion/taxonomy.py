"""The one label taxonomy across sources, read from two data tables beside this module.

`taxonomy_codes.csv`: code, display name, malignant flag (the benign-vs-malignant task is the
reference work's headline), level: `diagnosis` codes are the multiclass task's classes;
`malignancy` codes (`benign`, `malignant`) label rows whose source says only that (ISIC 2024's
`target`, a Kaggle benign/malignant folder, ISIC 2020's `unknown` diagnoses): such rows are trained
on, captioned ("a benign lesion") and generated like any class, and scored by the binary task only. `taxonomy.csv`: (source, source label) -> code; rows of source "*"
apply to sources with no rows of their own (generic CSV). A label with no row is unknown: callers
quarantine it, never guess.

Other stages import `LABELS`, `is_malignant(code)` and `display_name(code)`.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).parent
CODES_TABLE = HERE / "taxonomy_codes.csv"
MAPPING_TABLE = HERE / "taxonomy.csv"
ANY_SOURCE = "*"


@dataclass(frozen=True)
class Label:
    code: str
    name: str
    malignant: bool
    level: str  # diagnosis | malignancy


LEVELS = ("diagnosis", "malignancy")


def _rows(path: Path) -> list[dict[str, str]]:
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return list(csv.DictReader(io.StringIO("\n".join(lines))))


def _read_labels() -> dict[str, Label]:
    labels = {}
    for row in _rows(CODES_TABLE):
        flag = row["malignant"].strip().lower()
        if flag not in ("true", "false"):
            raise ValueError(f"{CODES_TABLE}: code {row['code']!r}: malignant must be true or false, got {flag!r}")
        level = row["level"].strip().lower()
        if level not in LEVELS:
            raise ValueError(f"{CODES_TABLE}: code {row['code']!r}: level must be one of {', '.join(LEVELS)}, got {level!r}")
        labels[row["code"]] = Label(row["code"], row["name"], flag == "true", level)
    return labels


LABELS: dict[str, Label] = _read_labels()
CODES: tuple[str, ...] = tuple(LABELS)
MALIGNANT_CODES: frozenset[str] = frozenset(c for c, label in LABELS.items() if label.malignant)
DIAGNOSIS_CODES: tuple[str, ...] = tuple(c for c, label in LABELS.items() if label.level == "diagnosis")
MALIGNANCY_CODES: dict[bool, str] = {label.malignant: c for c, label in LABELS.items() if label.level == "malignancy"}


def is_diagnosis(code: str) -> bool:
    """A diagnosis (a multiclass class), not a bare benign/malignant label."""
    return _label(code).level == "diagnosis"


def malignancy_code(malignant: bool) -> str:
    """The label of a row whose source says only benign or malignant."""
    return MALIGNANCY_CODES[bool(malignant)]


def is_malignant(code: str) -> bool:
    return _label(code).malignant


def display_name(code: str) -> str:
    return _label(code).name


def _label(code: str) -> Label:
    try:
        return LABELS[code]
    except KeyError:
        raise KeyError(f"unknown taxonomy code {code!r}; known: {', '.join(CODES)}") from None


@lru_cache(maxsize=None)
def _mapping() -> dict[tuple[str, str], str]:
    mapping: dict[tuple[str, str], str] = {}
    for number, row in enumerate(_rows(MAPPING_TABLE), start=2):
        if row["code"] not in LABELS:
            raise ValueError(f"{MAPPING_TABLE}: row {number}: code {row['code']!r} is not in {CODES_TABLE.name}")
        mapping[(row["source"], row["source_label"].strip().lower())] = row["code"]
    return mapping


def map_label(vocabulary: str, source_label: object) -> str | None:
    """The taxonomy code for a source's label, or None when the table has no row for it."""
    if source_label is None:
        return None
    key = str(source_label).strip().lower()
    table = _mapping()
    if vocabulary in _vocabularies():
        # A source with its own rows gets only those: a stray label there is news, not a synonym.
        return table.get((vocabulary, key))
    return table.get((ANY_SOURCE, key))


@lru_cache(maxsize=None)
def _vocabularies() -> frozenset[str]:
    return frozenset(source for source, _ in _mapping() if source != ANY_SOURCE)


def source_labels(vocabulary: str) -> dict[str, str]:
    """{source label: code} the table knows for one source (documentation, error messages)."""
    return {label: code for (source, label), code in _mapping().items() if source == vocabulary}


def markdown_table() -> str:
    """The taxonomy as a Markdown table (TAXONOMY.md is generated from this)."""
    lines = ["| code | name | malignant | source labels |", "|---|---|---|---|"]
    by_code: dict[str, list[str]] = {code: [] for code in CODES}
    for (source, label), code in _mapping().items():
        by_code[code].append(f"{source}:{label}")
    for code, label in LABELS.items():
        lines.append(f"| {code} | {label.name} | {'yes' if label.malignant else 'no'} | {', '.join(by_code[code])} |")
    return "\n".join(lines)
