"""The corpus manifest and the side files (quarantine.csv, duplicates.csv): counts a person checks."""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from dermaflux.lesion import taxonomy
from dermaflux.corpus.plan import CurationPlan
from dermaflux.corpus.sources.base import Reject

MANIFEST_VERSION = 1
QUARANTINE_FILE = "quarantine.csv"
DUPLICATES_FILE = "duplicates.csv"
QUARANTINE_COLUMNS = ["source", "file", "row", "original_id", "reason"]
DUPLICATE_COLUMNS = ["dropped_id", "kept_id", "distance", "dropped_source", "kept_source", "dropped_label",
                     "kept_label", "label_conflict", "cross_source", "dropped_file", "kept_file"]
REASON_KINDS = [
    ("unknown_label", re.compile(r"unknown label")),
    ("missing_image", re.compile(r"not found|is missing")),
    ("bad_image", re.compile(r"does not decode|cannot be read|smaller than")),
    ("repeated_id", re.compile(r"more than once")),
]


def reason_kind(reason: str) -> str:
    return next((kind for kind, pattern in REASON_KINDS if pattern.search(reason)), "bad_field")


def csv_text(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def quarantine_rows(rejects: list[Reject]) -> list[dict]:
    return [r.to_dict() for r in sorted(rejects, key=lambda r: (r.source, r.file, r.row))]


def shard_counts(shard_dir: Path) -> list[dict]:
    """Rows per shard and per (split, label, source), read back from the written files."""
    shards = []
    for path in sorted(shard_dir.glob("*.parquet")):
        table = pq.read_table(path, columns=["source", "label", "split", "malignant"])
        shards.append({
            "file": f"shards/{path.name}",
            "rows": table.num_rows,
            "keys": Counter(zip(*(table.column(c).to_pylist() for c in ("source", "label", "split", "malignant")))),
        })
    return shards


def _nested(counter: Counter, *positions: int) -> dict:
    out: dict = {}
    for key, n in sorted(counter.items(), key=lambda kv: str(kv[0])):
        node = out
        parts = [str(key[p]) for p in positions]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = node.get(parts[-1], 0) + n
    return out


SPLITS = ("train", "val", "test")


def _count(keys: Counter, **match) -> int:
    """Rows of shard keys (source, label, split, malignant) matching every given position."""
    position = {"source": 0, "label": 1, "split": 2, "malignant": 3}
    return sum(n for k, n in keys.items() if all(k[position[name]] == value for name, value in match.items()))


def _shard_keys(plan: CurationPlan, shards: list[dict]) -> Counter:
    """Counts per (source, label, split, malignant) as written, checked against the plan."""
    keys: Counter = Counter()
    for shard in shards:
        keys.update(shard["keys"])
    written = sum(s["rows"] for s in shards)
    if written != plan.summary["kept"]:
        raise AssertionError(f"shards hold {written} rows but the plan kept {plan.summary['kept']}")
    planned = Counter(zip(plan.kept["source"], plan.kept["label"], plan.kept["split"], plan.kept["malignant"])) \
        if len(plan.kept) else Counter()
    if planned != keys:
        raise AssertionError("shard counts per (source, label, split) differ from the plan")
    return keys


def _per_source(plan: CurationPlan, keys: Counter) -> dict:
    return {
        name: {**entry,
               "by_split": {split: _count(keys, source=name, split=split) for split in SPLITS},
               "by_label": {label: _count(keys, source=name, label=label)
                            for label in sorted({k[1] for k in keys if k[0] == name})}}
        for name, entry in plan.summary["per_source"].items()
    }


def _published(plan: CurationPlan) -> dict:
    """Rows each source published per split, and how many were kept there (the rest are duplicates
    or quarantined, listed in their files)."""
    kept = Counter()
    if len(plan.kept):
        official = plan.kept[plan.kept["split_origin"] == "official"]
        kept = Counter(zip(official["source"], official["split"]))
    return {source: {split: {"published": n, "kept": kept[source, split]} for split, n in published.items()}
            for source, published in plan.published_splits.items()}


def build_manifest(plan: CurationPlan, shards: list[dict], sources: list[dict], config: dict, fingerprint: str) -> dict:
    keys = _shard_keys(plan, shards)
    summary, dups = plan.summary, plan.duplicates
    totals = {k: summary[k] for k in ("input_rows", "kept", "duplicates", "quarantined")}
    return {
        "version": MANIFEST_VERSION,
        "fingerprint": fingerprint,
        "sources": sources,
        "reconciliation": {**totals, "shard_rows": sum(s["rows"] for s in shards),
                           "balanced": totals["input_rows"] == totals["kept"] + totals["duplicates"] + totals["quarantined"]},
        "per_source": _per_source(plan, keys),
        "by_split": {split: _count(keys, split=split) for split in SPLITS},
        "by_label": {label: _count(keys, label=label) for label in taxonomy.CODES if any(k[1] == label for k in keys)},
        "by_malignancy": {"malignant": _count(keys, malignant=True), "benign": _count(keys, malignant=False)},
        "by_split_label": _nested(keys, 2, 1),
        "by_split_malignancy": {split: {"malignant": _count(keys, split=split, malignant=True),
                                        "benign": _count(keys, split=split, malignant=False)} for split in SPLITS},
        "published_splits": _published(plan),
        "duplicates": {
            "near_pairs_within_threshold": plan.near_pairs,
            "dropped": len(dups),
            "cross_source": sum(d["cross_source"] for d in dups),
            "label_conflicts": sum(d["label_conflict"] for d in dups),
            "file": DUPLICATES_FILE,
        },
        "quarantine": {
            "rows": len(plan.quarantine),
            "by_reason": dict(Counter(reason_kind(r.reason) for r in plan.quarantine)),
            "file": QUARANTINE_FILE,
        },
        "split_audit": {"published_splits": plan.audit_given, "written_splits": plan.audit_final},
        "shards": [{"file": s["file"], "rows": s["rows"]} for s in shards],
        "taxonomy": {code: {"name": label.name, "malignant": label.malignant} for code, label in taxonomy.LABELS.items()},
        "config": config,
    }
