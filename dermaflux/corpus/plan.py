"""From indexed rows + per-image scan results to the corpus plan (pure; runs on the driver).

Every input row ends in exactly one of: kept (a corpus row with a split), duplicate (dropped,
with the kept row it copies and the distance), test overlap (a test-only source's row that
repeats a training source's image or lesion, dropped by default) or quarantined (with its reason).

Test-only sources (`split=test`, or every row published as test): an external test set. Their rows
never displace, group with or dedup against the training sources' rows, so adding a test set never
changes what the training sources contribute; instead every near-duplicate pair (pHash) and shared
lesion/patient id between the two is a test overlap, listed and, with `curate.test_overlap: drop`
(the default), dropped from the test set.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field

import pandas as pd

from dermaflux.corpus import caps as caps_mod, dedup, splits
from dermaflux.corpus.config import CurateConfig
from dermaflux.corpus.sources.base import Reject, SourceIndex, SourceRecord, is_placeholder_id

# Which copy of a duplicate survives: a published test image first (the published test set stays
# whole), then other published splits, then the order sources were given in, then the larger image.
SPLIT_RANK = {"test": 0, "val": 1, "train": 2, None: 3}
# More images than any lesion has (HAM10000: at most 6 per lesion): a lesion id this common in one
# source is a placeholder, and as a key it would pull a whole source into one split.
MAX_IMAGES_PER_LESION = 100
BUCKETS = ("input_rows", "kept", "duplicates", "test_overlap", "quarantined", "capped")


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
    test_overlap: list[dict] = field(default_factory=list)  # test-only row ~ training-source row pairs
    test_only: list[str] = field(default_factory=list)  # sources whose rows are all test rows
    fixed_splits: dict[str, str] = field(default_factory=dict)  # source -> split=... of its spec
    placeholder_ids: dict[str, dict] = field(default_factory=dict)  # source -> grouping ids ignored
    capped: list[dict] = field(default_factory=list)  # rows a source cap left out (after dedup)
    caps: dict[str, dict] = field(default_factory=dict)  # source -> its caps as given
    summary: dict = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # dedup, splits: where the driver's time went


@dataclass
class _Rows:
    """The valid rows of a run and what the plan knows about each, by row index."""

    recs: list[SourceRecord]
    scans: list[dict]
    ids: list[str]
    external: list[bool]  # from a test-only source
    lesion: list[str | None]  # grouping ids, placeholders removed
    patient: list[str | None]

    def keys(self, i: int) -> list[str]:
        namespace = self.recs[i].group_namespace
        return [f"{namespace}/{kind}/{value}" for kind, value in (("lesion", self.lesion[i]), ("patient", self.patient[i]))
                if value]

    def split_keys(self, i: int) -> list[str]:
        # A test-only source's ids group only its own rows: the overlap audit handles the rest.
        return [f"test-only:{self.recs[i].source}/{k}" if self.external[i] else k for k in self.keys(i)]

    def same_side(self, i: int, j: int) -> bool:
        """Rows that dedup against each other: both from training sources, or both from one test-only source."""
        if self.external[i] or self.external[j]:
            return self.recs[i].source == self.recs[j].source
        return True


def external_test_sources(indexes: list[SourceIndex], cfg: CurateConfig) -> list[str]:
    """Sources whose every row is a test row: `split=test` in the spec, or (published splits kept)
    every indexed row published as test."""
    names = []
    for index in indexes:
        published_test = cfg.official_splits == "keep" and index.records and all(
            r.official_split == "test" for r in index.records)
        if index.spec.fixed_split == "test" or published_test:
            names.append(index.spec.name)
    return names


def _grouping_ids(recs: list[SourceRecord]) -> tuple[list, list, dict[str, dict]]:
    """Lesion and patient ids with placeholders (see base.PLACEHOLDER_ID, MAX_IMAGES_PER_LESION) as None,
    and per source how many ids were ignored and a few of their values."""
    per_lesion = Counter((r.source, r.lesion_id) for r in recs if r.lesion_id)
    lesion, patient, ignored = [], [], {}
    for r in recs:
        values = []
        for value, crowded in ((r.lesion_id, per_lesion[r.source, r.lesion_id] > MAX_IMAGES_PER_LESION),
                               (r.patient_id, False)):
            if value and (crowded or is_placeholder_id(value)):
                entry = ignored.setdefault(r.source, {"ids": 0, "values": []})
                entry["ids"] += 1
                if value not in entry["values"] and len(entry["values"]) < 5:
                    entry["values"].append(value)
                value = None
            values.append(value)
        lesion.append(values[0])
        patient.append(values[1])
    return lesion, patient, ignored


def _overlaps(rows: _Rows, pairs: list[tuple[int, int, int]]) -> list[dict]:
    """Every (test-only row, training-source row) pair that is a near-duplicate or shares a grouping id."""
    found = []
    for i, j, distance in pairs:
        if rows.external[i] != rows.external[j]:
            test, train = (i, j) if rows.external[i] else (j, i)
            found.append({"test_row": test, "train_row": train, "kind": "near_duplicate", "distance": distance, "key": ""})
    training_keys: dict[str, int] = {}
    for i in range(len(rows.recs)):
        if not rows.external[i]:
            for key in rows.keys(i):
                training_keys.setdefault(key, i)
    for i in range(len(rows.recs)):
        for key in rows.keys(i) if rows.external[i] else []:
            if key in training_keys:
                found.append({"test_row": i, "train_row": training_keys[key], "kind": key.split("/")[-2],
                              "distance": None, "key": key})
    return found


def build_plan(indexes: list[SourceIndex], scans: list[dict], cfg: CurateConfig) -> CurationPlan:
    records = [r for index in indexes for r in index.records]
    if len(scans) != len(records):
        raise ValueError(f"{len(scans)} scan results for {len(records)} indexed rows")
    quarantine: list[Reject] = [reject for index in indexes for reject in index.rejects]
    valid = _valid_rows(records, scans, quarantine)
    recs = [records[r] for r in valid]
    test_only = external_test_sources(indexes, cfg)
    lesion, patient, placeholders = _grouping_ids(recs)
    rows = _Rows(recs, [scans[r] for r in valid], [f"{r.source}:{r.original_id}" for r in recs],
                 [r.source in test_only for r in recs], lesion, patient)
    dedup_started = time.perf_counter()
    pairs = dedup.indexed_near_pairs(dedup.hash_words([s["phash"] for s in rows.scans]), cfg.phash_threshold)
    dedup_seconds = time.perf_counter() - dedup_started
    fixed = {index.spec.name: index.spec.fixed_split for index in indexes if index.spec.fixed_split}
    pinned = [fixed.get(r.source) or (r.official_split if cfg.official_splits == "keep" else None) for r in recs]
    overlap = _overlaps(rows, pairs)
    dropped = {o["test_row"] for o in overlap} if cfg.test_overlap == "drop" else set()
    dedup_pairs = [p for p in pairs if rows.same_side(p[0], p[1])]

    source_order = {index.spec.name: k for k, index in enumerate(indexes)}
    priority = sorted(
        (i for i in range(len(recs)) if i not in dropped),
        key=lambda i: (SPLIT_RANK[pinned[i]], source_order[recs[i].source],
                       -(rows.scans[i]["width"] * rows.scans[i]["height"]), i),
    )
    chosen = dedup.choose_kept(len(recs), dedup_pairs, priority)
    # Dropped copies still link groups: another image of a dropped copy's lesion follows the kept copy.
    groups = splits.group_rows([rows.split_keys(i) for i in range(len(recs))], dedup_pairs)
    audit_given = splits.audit_splits([r.official_split or "" for r in recs], groups, pairs, rows.ids,
                                      [True] * len(recs))
    kept_mask = chosen.kept.tolist()
    source_caps = {index.spec.name: caps_mod.SourceCaps.from_spec(index.spec) for index in indexes}
    capped = _apply_caps(rows, source_caps, kept_mask, groups, cfg.seed)
    for row in capped:
        kept_mask[row] = False
    strata = [f"{r.source}/{r.label}" for r in recs]
    assigned = splits.assign_splits(groups, strata, pinned, cfg.fractions, cfg.seed, active=kept_mask)
    origin = ["spec" if recs[i].source in fixed else assigned.origin[i] for i in range(len(recs))]
    result = CurationPlan(
        _kept_frame(rows, kept_mask, assigned.split, origin),
        [_duplicate_row(rows, i, int(chosen.duplicate_of[i]), int(chosen.distance[i]))
         for i in range(len(recs)) if not kept_mask[i] and i not in dropped and i not in capped],
        quarantine, {index.spec.name: index.input_rows for index in indexes},
        {index.spec.name: index.published_splits for index in indexes if index.published_splits},
        audit_given, splits.audit_splits(assigned.split, groups, pairs, rows.ids, kept_mask), len(pairs),
        [_overlap_row(rows, o, assigned.split, kept_mask, o["test_row"] in dropped) for o in overlap],
        test_only, fixed, placeholders,
        [{"id": rows.ids[i], "source": recs[i].source, "label": recs[i].label, "reason": reason,
          "file": recs[i].image_path} for i, reason in sorted(capped.items())],
        {name: c.describe() for name, c in source_caps.items() if c.any},
    )
    result.summary = reconcile(result)
    result.seconds = {"dedup": round(dedup_seconds, 3), "plan": round(time.perf_counter() - dedup_started, 3)}
    return result


def _apply_caps(rows: _Rows, source_caps: dict, kept: list[bool], groups: list[int], seed: int) -> dict[int, str]:
    """{row: cap} of the kept rows each source's caps leave out (see corpus/caps.py)."""
    left_out: dict[int, str] = {}
    for source, caps in source_caps.items():
        if caps.any:
            members = [i for i, r in enumerate(rows.recs) if r.source == source and kept[i]]
            left_out.update(caps_mod.cap_source(members, source, caps, [r.label for r in rows.recs],
                                                [r.malignant for r in rows.recs], groups, rows.ids, seed))
    return left_out


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


def label_conflict(a: SourceRecord, b: SourceRecord) -> bool:
    """Two copies of one image that disagree on what the source says: both diagnoses known and
    different, or a known melanoma/malignant flag that differs."""
    if a.label is not None and b.label is not None:
        return a.label != b.label
    return any(x is not None and y is not None and x != y for x, y in ((a.melanoma, b.melanoma),
                                                                       (a.malignant, b.malignant)))


def _duplicate_row(rows: _Rows, i: int, j: int, distance: int) -> dict:
    """Row `i` dropped as a near-copy of kept row `j`."""
    recs, ids = rows.recs, rows.ids
    return {
        "dropped_id": ids[i], "kept_id": ids[j], "distance": distance,
        "dropped_source": recs[i].source, "kept_source": recs[j].source,
        "dropped_file": recs[i].image_path, "kept_file": recs[j].image_path,
        "dropped_label": recs[i].label, "kept_label": recs[j].label,
        "label_conflict": label_conflict(recs[i], recs[j]),
        "cross_source": recs[i].source != recs[j].source,
    }


def _overlap_row(rows: _Rows, found: dict, split: list[str], kept: list[bool], dropped: bool) -> dict:
    test, train = found["test_row"], found["train_row"]
    return {
        "test_id": rows.ids[test], "test_source": rows.recs[test].source, "train_id": rows.ids[train],
        "train_source": rows.recs[train].source, "train_split": split[train] if kept[train] else "duplicate",
        "kind": found["kind"], "distance": found["distance"], "key": found["key"],
        "action": "dropped" if dropped else "kept", "test_file": rows.recs[test].image_path,
        "train_file": rows.recs[train].image_path,
    }


def _kept_frame(rows: _Rows, kept: list[bool], split: list[str], origin: list[str]) -> pd.DataFrame:
    return pd.DataFrame([_corpus_row(rows, i, split[i], origin[i]) for i in range(len(rows.recs)) if kept[i]])


def _corpus_row(rows: _Rows, i: int, split: str, split_origin: str) -> dict:
    """A kept row: the corpus columns (CORPUS_SCHEMA) but the image bytes, plus where to read them."""
    record, scan = rows.recs[i], rows.scans[i]
    metadata_json = record.metadata_json
    ignored = {f"{kind}_placeholder": raw for kind, raw, used in (("lesion_id", record.lesion_id, rows.lesion[i]),
                                                                   ("patient_id", record.patient_id, rows.patient[i]))
               if raw and not used}
    if ignored:  # the placeholder stays readable, just not as a grouping key
        metadata_json = json.dumps({**json.loads(metadata_json), **ignored}, sort_keys=True)
    return {
        "id": rows.ids[i], "source": record.source, "original_id": record.original_id,
        "image_format": scan["format"], "width": scan["width"], "height": scan["height"],
        "label": record.label, "source_label": record.source_label,
        "malignant": record.malignant, "melanoma": record.melanoma,
        "lesion_id": rows.lesion[i], "patient_id": rows.patient[i],
        "split": split, "split_origin": split_origin, "phash": scan["phash"],
        "age": record.age, "sex": record.sex, "site": record.site, "skin_type": record.skin_type,
        "skin_tone": record.skin_tone, "modality": record.modality,
        "diagnosis_method": record.diagnosis_method, "mm_per_pixel": record.mm_per_pixel,
        "metadata_json": metadata_json,
        "image_path": record.image_path, "sha256": scan["sha256"],
    }


def reconcile(plan: CurationPlan) -> dict:
    """input rows = kept + duplicates + test overlap dropped + quarantined, per source and in total;
    raises when it does not hold."""
    kept = Counter(plan.kept["source"]) if len(plan.kept) else Counter()
    dups = Counter(d["dropped_source"] for d in plan.duplicates)
    overlap = Counter(source for source, _ in {(o["test_source"], o["test_id"]) for o in plan.test_overlap
                                                if o["action"] == "dropped"})
    quarantined = Counter(r.source for r in plan.quarantine)
    capped = Counter(c["source"] for c in plan.capped)
    per_source = {}
    for source, total in plan.input_rows.items():
        entry = {"input_rows": total, "kept": kept[source], "duplicates": dups[source],
                 "test_overlap": overlap[source], "quarantined": quarantined[source], "capped": capped[source]}
        if sum(entry[k] for k in BUCKETS[1:]) != total:
            raise AssertionError(f"source {source}: {entry} does not reconcile "
                                 "(kept + duplicates + test_overlap + quarantined + capped != input rows)")
        per_source[source] = entry
    totals = {key: sum(e[key] for e in per_source.values()) for key in BUCKETS}
    return {**totals, "balanced": True, "per_source": per_source}
