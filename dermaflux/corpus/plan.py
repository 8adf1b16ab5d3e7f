"""From indexed rows + per-image scan results to the corpus plan (pure; runs on the driver).

Every input row ends in exactly one of: kept (a corpus row with a split), duplicate (dropped,
with the kept row it copies and the distance) or quarantined (with its reason).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pandas as pd

from dermaflux.corpus import dedup, splits
from dermaflux.lesion import taxonomy
from dermaflux.corpus.config import CurateConfig
from dermaflux.corpus.sources.base import Reject, SourceIndex, SourceRecord

# Which copy of a duplicate survives: a published test image first (the published test set stays
# whole), then other published splits, then the order sources were given in, then the larger image.
SPLIT_RANK = {"test": 0, "val": 1, "train": 2, None: 3}


@dataclass
class CurationPlan:
    kept: pd.DataFrame  # corpus columns except the image bytes, plus image_path and sha256
    duplicates: list[dict]
    quarantine: list[Reject]
    input_rows: dict[str, int]  # per source
    published_splits: dict[str, dict[str, int]]  # per source: input rows per published split
    audit_given: dict  # the published splits, before dedup
    audit_final: dict  # the written splits
    near_pairs: int
    summary: dict = field(default_factory=dict)


def _group_keys(record: SourceRecord) -> list[str]:
    keys = []
    if record.lesion_id:
        keys.append(f"{record.group_namespace}/lesion/{record.lesion_id}")
    if record.patient_id:
        keys.append(f"{record.group_namespace}/patient/{record.patient_id}")
    return keys


def build_plan(indexes: list[SourceIndex], scans: list[dict], cfg: CurateConfig) -> CurationPlan:
    records = [r for index in indexes for r in index.records]
    if len(scans) != len(records):
        raise ValueError(f"{len(scans)} scan results for {len(records)} indexed rows")
    quarantine: list[Reject] = [reject for index in indexes for reject in index.rejects]
    valid = _valid_rows(records, scans, quarantine)
    recs = [records[r] for r in valid]
    scan_ok = [scans[r] for r in valid]
    ids = [f"{r.source}:{r.original_id}" for r in recs]
    pairs = dedup.near_pairs(dedup.hash_words([s["phash"] for s in scan_ok]), cfg.phash_threshold)
    published = [r.official_split for r in recs]
    official = published if cfg.official_splits == "keep" else [None] * len(recs)

    source_order = {index.spec.name: k for k, index in enumerate(indexes)}
    priority = sorted(
        range(len(recs)),
        key=lambda i: (SPLIT_RANK[official[i]], source_order[recs[i].source],
                       -(scan_ok[i]["width"] * scan_ok[i]["height"]), i),
    )
    chosen = dedup.choose_kept(len(recs), pairs, priority)
    # Dropped copies still link groups: another image of a dropped copy's lesion follows the kept copy.
    groups = splits.group_rows([_group_keys(r) for r in recs], pairs)
    audit_given = splits.audit_splits([p or "" for p in published], groups, pairs, ids, [True] * len(recs))

    kept_mask = chosen.kept.tolist()
    strata = [f"{r.source}/{r.label}" for r in recs]
    assigned = splits.assign_splits(groups, strata, official, cfg.fractions, cfg.seed, active=kept_mask)
    audit_final = splits.audit_splits(assigned.split, groups, pairs, ids, kept_mask)

    duplicates = [_duplicate_row(recs, ids, i, int(chosen.duplicate_of[i]), int(chosen.distance[i]))
                  for i in range(len(recs)) if not kept_mask[i]]
    kept = pd.DataFrame([_corpus_row(recs[i], scan_ok[i], ids[i], assigned.split[i], assigned.origin[i])
                         for i in range(len(recs)) if kept_mask[i]])
    input_rows = {index.spec.name: index.input_rows for index in indexes}
    published_splits = {index.spec.name: index.published_splits for index in indexes if index.published_splits}
    result = CurationPlan(kept, duplicates, quarantine, input_rows, published_splits, audit_given, audit_final,
                          len(pairs))
    result.summary = reconcile(result)
    return result


def _valid_rows(records: list[SourceRecord], scans: list[dict], quarantine: list[Reject]) -> list[int]:
    """Rows whose image decoded and whose id is new within its source; the others join `quarantine`."""
    valid: list[int] = []
    seen_ids: set[str] = set()
    for row, (record, scan) in enumerate(zip(records, scans)):
        corpus_id = f"{record.source}:{record.original_id}"
        if scan.get("error"):
            quarantine.append(Reject(record.source, record.file, record.row, record.original_id,
                                     f"{scan['error']} ({record.image_path})"))
        elif corpus_id in seen_ids:
            quarantine.append(Reject(record.source, record.file, record.row, record.original_id,
                                     f"id {record.original_id!r} appears more than once in this source"))
        else:
            seen_ids.add(corpus_id)
            valid.append(row)
    return valid


def _duplicate_row(recs: list[SourceRecord], ids: list[str], i: int, j: int, distance: int) -> dict:
    """Row `i` dropped as a near-copy of kept row `j`."""
    return {
        "dropped_id": ids[i], "kept_id": ids[j], "distance": distance,
        "dropped_source": recs[i].source, "kept_source": recs[j].source,
        "dropped_file": recs[i].image_path, "kept_file": recs[j].image_path,
        "dropped_label": recs[i].label, "kept_label": recs[j].label,
        "label_conflict": recs[i].label != recs[j].label,
        "cross_source": recs[i].source != recs[j].source,
    }


def _corpus_row(record: SourceRecord, scan: dict, corpus_id: str, split: str, split_origin: str) -> dict:
    """A kept row: the corpus columns (CORPUS_SCHEMA) but the image bytes, plus where to read them."""
    return {
        "id": corpus_id, "source": record.source, "original_id": record.original_id,
        "image_format": scan["format"], "width": scan["width"], "height": scan["height"],
        "label": record.label, "source_label": record.source_label,
        "malignant": taxonomy.is_malignant(record.label),
        "lesion_id": record.lesion_id, "patient_id": record.patient_id,
        "split": split, "split_origin": split_origin, "phash": scan["phash"],
        "age": record.age, "sex": record.sex, "site": record.site, "skin_type": record.skin_type,
        "diagnosis_method": record.diagnosis_method, "mm_per_pixel": record.mm_per_pixel,
        "metadata_json": record.metadata_json,
        "image_path": record.image_path, "sha256": scan["sha256"],
    }


def reconcile(plan: CurationPlan) -> dict:
    """input rows = kept + duplicates + quarantined, per source and in total; raises when it does not hold."""
    kept = Counter(plan.kept["source"]) if len(plan.kept) else Counter()
    dups = Counter(d["dropped_source"] for d in plan.duplicates)
    quarantined = Counter(r.source for r in plan.quarantine)
    per_source = {}
    for source, total in plan.input_rows.items():
        entry = {"input_rows": total, "kept": kept[source], "duplicates": dups[source], "quarantined": quarantined[source]}
        if entry["kept"] + entry["duplicates"] + entry["quarantined"] != total:
            raise AssertionError(f"source {source}: {entry} does not reconcile (kept + duplicates + quarantined != input rows)")
        per_source[source] = entry
    totals = {key: sum(e[key] for e in per_source.values()) for key in ("input_rows", "kept", "duplicates", "quarantined")}
    return {**totals, "balanced": True, "per_source": per_source}
