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


def build_manifest(plan: CurationPlan, shards: list[dict], sources: list[dict], config: dict, fingerprint: str) -> dict:
    keys: Counter = Counter()
    for shard in shards:
        keys.update(shard["keys"])
    written = sum(s["rows"] for s in shards)
    summary = plan.summary
    if written != summary["kept"]:
        raise AssertionError(f"shards hold {written} rows but the plan kept {summary['kept']}")
    planned = Counter(zip(plan.kept["source"], plan.kept["label"], plan.kept["split"], plan.kept["malignant"])) \
        if len(plan.kept) else Counter()
    if planned != keys:
        raise AssertionError("shard counts per (source, label, split) differ from the plan")
    published = Counter()
    if len(plan.kept):
        official = plan.kept[plan.kept["split_origin"] == "official"]
        published = Counter(zip(official["source"], official["split"]))
    dups = plan.duplicates
    return {
        "version": MANIFEST_VERSION,
        "fingerprint": fingerprint,
        "sources": sources,
        "reconciliation": {**{k: summary[k] for k in ("input_rows", "kept", "duplicates", "quarantined")},
                           "shard_rows": written,
                           "balanced": summary["input_rows"] == summary["kept"] + summary["duplicates"] + summary["quarantined"]},
        "per_source": {
            name: {**entry,
                   "by_split": {split: sum(n for k, n in keys.items() if k[0] == name and k[2] == split)
                                for split in ("train", "val", "test")},
                   "by_label": {label: sum(n for k, n in keys.items() if k[0] == name and k[1] == label)
                                for label in sorted({k[1] for k in keys if k[0] == name})}}
            for name, entry in summary["per_source"].items()
        },
        "by_split": {split: sum(n for k, n in keys.items() if k[2] == split) for split in ("train", "val", "test")},
        "by_label": {label: sum(n for k, n in keys.items() if k[1] == label) for label in taxonomy.CODES
                     if any(k[1] == label for k in keys)},
        "by_malignancy": {"malignant": sum(n for k, n in keys.items() if k[3]),
                          "benign": sum(n for k, n in keys.items() if not k[3])},
        "by_split_label": _nested(keys, 2, 1),
        "by_split_malignancy": {split: {"malignant": sum(n for k, n in keys.items() if k[2] == split and k[3]),
                                        "benign": sum(n for k, n in keys.items() if k[2] == split and not k[3])}
                                for split in ("train", "val", "test")},
        # Published splits: rows the source published per split, and how many of them were kept
        # there (the rest are duplicates or quarantined, listed in their files).
        "published_splits": {
            source: {split: {"published": n, "kept": published[source, split]} for split, n in splits.items()}
            for source, splits in plan.published_splits.items()
        },
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
