"""Per-source caps: how many rows a source may contribute, per label, and its malignant share (pure).

Options of any source spec: `max_rows=N` (rows kept from the source), `max_per_label=N` (rows of
each label), `malignant_share=F` (down-sample the source's benign rows so malignant rows are at
least F of what it keeps: ISIC 2024 alone is 99.9 % benign). Caps apply after dedup, to whole
groups (rows sharing a patient, lesion or near-duplicate never part), in an order drawn from
`curate.seed` and the group's first id -- the same rows on every run, whatever the input order.
Groups holding a malignant row come first when a share is set, so the rare class is kept.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass

from dermaflux.corpus.sources.base import SourceError, SourceSpec

CAP_OPTIONS = ("max_rows", "max_per_label", "malignant_share")


@dataclass(frozen=True)
class SourceCaps:
    max_rows: int | None = None
    max_per_label: int | None = None
    malignant_share: float | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.max_rows, self.max_per_label, self.malignant_share))

    def describe(self) -> dict:
        return {k: v for k, v in (("max_rows", self.max_rows), ("max_per_label", self.max_per_label),
                                  ("malignant_share", self.malignant_share)) if v is not None}

    @classmethod
    def from_spec(cls, spec: SourceSpec) -> "SourceCaps":
        values: dict = {}
        for key in ("max_rows", "max_per_label"):
            if key in spec.options:
                raw = spec.options[key]
                if not raw.isdigit() or int(raw) < 1:
                    raise SourceError(f"source {spec.name}: {key}={raw!r}: expected a whole number >= 1")
                values[key] = int(raw)
        if "malignant_share" in spec.options:
            raw = spec.options["malignant_share"]
            try:
                share = float(raw)
            except ValueError:
                share = -1.0
            if not 0.0 < share <= 1.0:
                raise SourceError(f"source {spec.name}: malignant_share={raw!r}: expected a fraction in (0, 1]")
            values["malignant_share"] = share
        return cls(**values)


def _order(seed: int, source: str, group_ids: dict[int, str]) -> list[int]:
    """Groups in a seeded order that depends on each group's first corpus id, not on row positions."""
    return sorted(group_ids, key=lambda g: hashlib.sha256(f"{seed}:{source}:{group_ids[g]}".encode()).hexdigest())


def cap_source(rows: list[int], source: str, caps: SourceCaps, labels: list, malignant: list, groups: list[int],
               ids: list[str], seed: int) -> dict[int, str]:
    """{row: the cap that left it out} for one source's kept `rows` (indices into the per-row lists)."""
    members: dict[int, list[int]] = {}
    for row in rows:
        members.setdefault(groups[row], []).append(row)
    order = _order(seed, source, {g: min(ids[r] for r in rs) for g, rs in members.items()})
    if caps.malignant_share is not None:  # groups with a malignant row first: the share is kept by down-sampling benign
        order.sort(key=lambda g: not any(malignant[r] for r in members[g]))
    taken: Counter = Counter()
    left_out: dict[int, str] = {}
    taken_rows = benign_taken = malignant_taken = 0
    for group in order:
        group_rows = members[group]
        group_labels = Counter(labels[r] for r in group_rows)
        benign = sum(malignant[r] is False for r in group_rows)
        reason = None
        if caps.max_rows is not None and taken_rows + len(group_rows) > caps.max_rows:
            reason = f"max_rows={caps.max_rows}"
        elif caps.max_per_label is not None and any(taken[lab] + n > caps.max_per_label for lab, n in group_labels.items()):
            reason = f"max_per_label={caps.max_per_label}"
        elif caps.malignant_share is not None and benign and (
                malignant_taken / max(malignant_taken + benign_taken + benign, 1) < caps.malignant_share):
            reason = f"malignant_share={caps.malignant_share}"
        if reason:
            left_out.update(dict.fromkeys(group_rows, reason))
            continue
        taken.update(group_labels)
        taken_rows += len(group_rows)
        benign_taken += benign
        malignant_taken += sum(malignant[r] is True for r in group_rows)
    return left_out
