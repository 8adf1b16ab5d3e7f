"""Per-source caps: whole patient groups, reproducible, the malignant share kept (no Ray)."""

from collections import Counter

import pytest

from dermaflux.corpus.caps import SourceCaps, cap_source
from dermaflux.corpus.sources.base import SourceError, SourceSpec


def _source(patients: int = 300, seed_rows: int = 0):
    """Patients with 1-3 images each; one patient in 50 malignant (ISIC 2024-like imbalance)."""
    labels, malignant, groups, ids = [], [], [], []
    for p in range(patients):
        for k in range(1 + (p * 7 + seed_rows) % 3):
            labels.append("malignant" if p % 50 == 0 else "benign")
            malignant.append(p % 50 == 0)
            groups.append(p)
            ids.append(f"s:{p:04d}-{k}")
    return labels, malignant, groups, ids


def test_caps_take_whole_groups_and_the_same_rows_every_time():
    labels, malignant, groups, ids = _source()
    rows = list(range(len(labels)))
    caps = SourceCaps(max_rows=100)
    left_out = cap_source(rows, "s", caps, labels, malignant, groups, ids, seed=0)
    kept = [r for r in rows if r not in left_out]
    assert 95 <= len(kept) <= 100 and set(left_out.values()) == {"max_rows=100"}
    by_group = {}
    for r in rows:
        by_group.setdefault(groups[r], set()).add(r in left_out)
    assert all(len(v) == 1 for v in by_group.values())  # a patient is kept or left out whole
    # Reproducible, and independent of the order rows come in.
    assert cap_source(rows[::-1], "s", caps, labels, malignant, groups, ids, seed=0) == left_out
    assert cap_source(rows, "s", caps, labels, malignant, groups, ids, seed=1) != left_out


def test_malignant_share_keeps_every_malignant_row_and_down_samples_benign():
    labels, malignant, groups, ids = _source()
    rows = list(range(len(labels)))
    left_out = cap_source(rows, "s", SourceCaps(malignant_share=0.25), labels, malignant, groups, ids, seed=0)
    kept = Counter(labels[r] for r in rows if r not in left_out)
    assert kept["malignant"] == labels.count("malignant")
    assert 0.25 <= kept["malignant"] / sum(kept.values()) < 0.35
    per_label = cap_source(rows, "s", SourceCaps(max_per_label=20), labels, malignant, groups, ids, seed=0)
    kept = Counter(labels[r] for r in rows if r not in per_label)
    assert 17 <= kept["benign"] <= 20 and kept["malignant"] <= 20


def test_caps_are_checked_in_the_spec():
    assert SourceCaps.from_spec(SourceSpec.parse("csv=x.csv,max_rows=10,malignant_share=0.5")) == SourceCaps(10, None, 0.5)
    with pytest.raises(SourceError, match="max_rows='ten'"):
        SourceCaps.from_spec(SourceSpec.parse("csv=x.csv,max_rows=ten"))
    with pytest.raises(SourceError, match="malignant_share='2'"):
        SourceCaps.from_spec(SourceSpec.parse("csv=x.csv,malignant_share=2"))
