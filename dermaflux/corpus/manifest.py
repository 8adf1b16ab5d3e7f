"""The corpus manifest and the side files (quarantine.csv, duplicates.csv, test_overlap.csv): counts a
person checks. (Later stages read a corpus' class counts with `schema.class_counts`.)"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from dermaflux.lesion import taxonomy
from dermaflux.corpus.plan import BUCKETS, CurationPlan
from dermaflux.corpus.schema import NO_DIAGNOSIS, SPLITS
from dermaflux.corpus.sources.base import Reject

MANIFEST_VERSION = 2  # 2: rows without a diagnosis, melanoma counts, test-only sources, test overlap
QUARANTINE_FILE = "quarantine.csv"
DUPLICATES_FILE = "duplicates.csv"
OVERLAP_FILE = "test_overlap.csv"
CAPPED_FILE = "capped.csv"
CAPPED_COLUMNS = ["id", "source", "label", "reason", "file"]
QUARANTINE_COLUMNS = ["source", "file", "row", "original_id", "reason"]
DUPLICATE_COLUMNS = ["dropped_id", "kept_id", "distance", "dropped_source", "kept_source", "dropped_label",
                     "kept_label", "label_conflict", "cross_source", "dropped_file", "kept_file"]
OVERLAP_COLUMNS = ["test_id", "test_source", "train_id", "train_source", "train_split", "kind", "distance", "key",
                   "action", "test_file", "train_file"]
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


KEY_COLUMNS = ("source", "label", "split", "malignant", "melanoma")


def shard_counts(shard_dir: Path) -> list[dict]:
    """Rows per shard and per (source, label, split, malignant, melanoma), read back from the written files."""
    shards = []
    for path in sorted(shard_dir.glob("*.parquet")):
        table = pq.read_table(path, columns=list(KEY_COLUMNS))
        shards.append({
            "file": f"shards/{path.name}",
            "rows": table.num_rows,
            "keys": Counter(zip(*(table.column(c).to_pylist() for c in KEY_COLUMNS))),
        })
    return shards


def _nested(counter: Counter, *positions: int) -> dict:
    out: dict = {}
    for key, n in sorted(counter.items(), key=lambda kv: str(kv[0])):
        node = out
        parts = [NO_DIAGNOSIS if key[p] is None and p == 1 else str(key[p]) for p in positions]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = node.get(parts[-1], 0) + n
    return out


def _count(keys: Counter, **match) -> int:
    """Rows of shard keys (KEY_COLUMNS) matching every given position (`is` for None/True/False)."""
    position = {name: k for k, name in enumerate(KEY_COLUMNS)}

    def same(stored, wanted) -> bool:
        # Keys hold plain None/True/False (see _plain): flags by identity, so None never equals False.
        return stored is wanted if wanted is None or isinstance(wanted, bool) else stored == wanted

    return sum(n for k, n in keys.items() if all(same(k[position[name]], value) for name, value in match.items()))


def _flags(keys: Counter, column: str, words: tuple[str, str], **match) -> dict:
    """{true word: n, false word: n, "unknown": n} of one flag column."""
    return {words[0]: _count(keys, **{column: True}, **match), words[1]: _count(keys, **{column: False}, **match),
            "unknown": _count(keys, **{column: None}, **match)}


def _shard_keys(plan: CurationPlan, shards: list[dict]) -> Counter:
    """Counts per KEY_COLUMNS as written, checked against the plan."""
    keys: Counter = Counter()
    for shard in shards:
        keys.update(shard["keys"])
    written = sum(s["rows"] for s in shards)
    if written != plan.summary["kept"]:
        raise AssertionError(f"shards hold {written} rows but the plan kept {plan.summary['kept']}")
    planned = Counter(zip(*([_plain(v) for v in plan.kept[c].tolist()] for c in KEY_COLUMNS))) \
        if len(plan.kept) else Counter()
    if planned != keys:
        raise AssertionError(f"shard counts per {KEY_COLUMNS} differ from the plan")
    return keys


def _plain(value):
    """A pandas cell as the Parquet reader gives it back: None for a missing value (pandas' string dtype
    holds it as NaN), bool for numpy bools."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    return bool(value) if type(value).__name__ == "bool_" else value


def _per_source(plan: CurationPlan, keys: Counter) -> dict:
    return {
        name: {**entry,
               "test_only": name in plan.test_only,
               "split": plan.fixed_splits.get(name),  # split=... of the spec: every row there
               "by_split": {split: _count(keys, source=name, split=split) for split in SPLITS},
               "by_label": {label: _count(keys, source=name, label=label)
                            for label in sorted({k[1] for k in keys if k[0] == name and k[1] is not None})},
               NO_DIAGNOSIS: _count(keys, source=name, label=None),
               "placeholder_ids": plan.placeholder_ids.get(name, {"ids": 0, "values": []})}
        for name, entry in plan.summary["per_source"].items()
    }


def _no_diagnosis(keys: Counter) -> dict:
    """Rows without a diagnosis (test rows only): left out of multiclass scoring, kept for the binary tasks."""
    sources = sorted({k[0] for k in keys if k[1] is None})
    return {"rows": _count(keys, label=None),
            "by_split": {split: _count(keys, label=None, split=split) for split in SPLITS},
            "by_source": {source: _count(keys, label=None, source=source) for source in sources},
            "melanoma": _flags(keys, "melanoma", ("melanoma", "not_melanoma"), label=None),
            "malignant": _flags(keys, "malignant", ("malignant", "benign"), label=None)}


def _malignancy_only(keys: Counter) -> dict:
    """Rows labelled only benign/malignant: trained on and scored by the binary task; the multiclass
    task leaves them out."""
    codes = taxonomy.MALIGNANCY_CODES
    return {"rows": sum(_count(keys, label=code) for code in codes.values()),
            "by_split": {split: {code: _count(keys, label=code, split=split) for code in sorted(codes.values())}
                         for split in SPLITS}}


def _caps_summary(plan: CurationPlan) -> dict:
    """Each capped source's caps and what they left out, by cap and by label (rows in capped.csv)."""
    out = {}
    for source, caps in plan.caps.items():
        rows = [c for c in plan.capped if c["source"] == source]
        out[source] = {"caps": caps, "left_out": len(rows), "by_reason": dict(Counter(c["reason"] for c in rows)),
                       "by_label": dict(Counter(str(c["label"]) for c in rows))}
    return {"sources": out, "rows": len(plan.capped), "file": CAPPED_FILE}


def _overlap_summary(plan: CurationPlan, policy: str) -> dict:
    pairs = plan.test_overlap
    rows = {(o["test_source"], o["test_id"]): o["action"] for o in pairs}
    return {
        "policy": policy,
        "pairs": len(pairs),
        "test_rows": len(rows),
        "dropped": sum(action == "dropped" for action in rows.values()),
        "by_kind": dict(Counter(o["kind"] for o in pairs)),
        "by_source": dict(Counter(source for source, _ in rows)),
        "test_only_sources": plan.test_only,
        "file": OVERLAP_FILE,
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
    totals = {k: summary[k] for k in BUCKETS}
    return {
        "version": MANIFEST_VERSION,
        "fingerprint": fingerprint,
        "sources": sources,
        "reconciliation": {**totals, "shard_rows": sum(s["rows"] for s in shards),
                           "balanced": totals["input_rows"] == sum(totals[k] for k in BUCKETS[1:])},
        "per_source": _per_source(plan, keys),
        "by_split": {split: _count(keys, split=split) for split in SPLITS},
        "by_label": {label: _count(keys, label=label) for label in taxonomy.CODES if any(k[1] == label for k in keys)},
        NO_DIAGNOSIS: _no_diagnosis(keys),
        "malignancy_only": _malignancy_only(keys),
        "by_malignancy": _flags(keys, "malignant", ("malignant", "benign")),
        "by_melanoma": _flags(keys, "melanoma", ("melanoma", "not_melanoma")),
        "by_split_label": _nested(keys, 2, 1),
        "by_split_malignancy": {split: _flags(keys, "malignant", ("malignant", "benign"), split=split)
                                for split in SPLITS},
        "published_splits": _published(plan),
        "test_overlap": _overlap_summary(plan, config.get("test_overlap", "drop")),
        "caps": _caps_summary(plan),
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
