"""ISIC Challenge layout: a ground-truth CSV with one-hot diagnosis columns + optional metadata CSV.

Ground truth: `image` plus one-hot columns (ISIC 2019: MEL NV BCC AK BKL DF VASC SCC UNK;
ISIC 2018: ... AKIEC ...). Metadata (joined on `image`): age_approx, sex,
anatom_site_general(_challenge), lesion_id, patient_id. Images: `<image>.jpg` anywhere under PATH.
Options: `gt=FILE`, `metadata=FILE`, `images=DIR`, `split=train|val|test` (the published split the
whole folder belongs to, e.g. the challenge test set).
"""

from __future__ import annotations

import json
from pathlib import Path

from dermaflux.lesion import taxonomy
from dermaflux.corpus.sources import register
from dermaflux.corpus.sources.base import (
    RowChecks, SourceError, SourceIndex, SourceRecord, SourceSpec, index_images, number, read_csv,
    sex_word, site_words, text,
)

NAMESPACE = "isic-archive"  # lesion_id / patient_id are ISIC-archive ids (HAM10000 shares them)
SITE_COLUMNS = ("anatom_site_general_challenge", "anatom_site_general")


def _pick(root: Path, option: str | None, pattern: str, what: str, required: bool) -> Path | None:
    if option:
        return Path(option)
    hits = sorted(p for p in root.rglob("*.csv") if pattern in p.name.lower())
    if len(hits) > 1:
        raise SourceError(f"isic: several {what} CSVs under {root} ({', '.join(p.name for p in hits)}); "
                          f"name one with {what}=FILE")
    if not hits and required:
        raise SourceError(f"isic: no ground-truth CSV (*GroundTruth*.csv) under {root}; name one with gt=FILE")
    return hits[0] if hits else None


@register("isic")
def read(spec: SourceSpec) -> SourceIndex:
    root = Path(spec.path)
    if not root.exists():
        raise SourceError(f"isic: {root} does not exist")
    gt = _pick(root, spec.options.get("gt"), "groundtruth", "gt", required=True)
    meta_path = _pick(root, spec.options.get("metadata"), "metadata", "metadata", required=False)
    split = spec.options.get("split")
    if split not in (None, "train", "val", "test"):
        raise SourceError(f"isic: split={split!r}: expected train, val or test")
    gt_rows = read_csv(gt, ["image"], "isic ground truth")
    known = taxonomy.source_labels("isic")
    header = list(gt_rows[0][1]) if gt_rows else []
    onehot = [c for c in header if c != "image"]
    if gt_rows and not any(c.lower() in known for c in onehot):
        raise SourceError(f"isic: {gt} has no one-hot diagnosis columns (expected some of "
                          f"{', '.join(c.upper() for c in known)}; found {', '.join(onehot)})")
    metadata: dict[str, dict[str, str]] = {}
    if meta_path is not None:
        metadata = {row["image"]: row for _, row in read_csv(meta_path, ["image"], "isic metadata")}
    images = index_images(Path(spec.options.get("images", root)))
    records, checks = [], RowChecks(spec.name, gt)
    for line, row in gt_rows:
        if (image := checks.row_id(line, row, "image")) is None:
            continue
        hot = []
        for column in onehot:
            value = number(row.get(column))
            if value is None:
                checks.reject(line, image, f"column {column}={row.get(column)!r} is not a number")
                break
            if value >= 0.5:
                hot.append(column)
        else:
            if len(hot) != 1:
                checks.reject(line, image, f"expected exactly one diagnosis column set to 1, got {hot or 'none'}")
                continue
            source_label = hot[0]
            label = taxonomy.map_label("isic", source_label)
            if label is None:
                checks.reject(line, image, f"unknown label {source_label} (not in the taxonomy)")
                continue
            if (path := checks.image(line, image, images, image)) is None:
                continue
            meta = metadata.get(image, {})
            site = next((meta[c] for c in SITE_COLUMNS if c in meta), None)
            used = {"image", "age_approx", "sex", "lesion_id", "patient_id", *SITE_COLUMNS}
            records.append(SourceRecord(
                source=spec.name, original_id=image, file=str(gt), row=line, image_path=str(path),
                source_label=source_label, label=label, group_namespace=NAMESPACE,
                lesion_id=text(meta.get("lesion_id")), patient_id=text(meta.get("patient_id")), official_split=split,
                age=number(meta.get("age_approx")), sex=sex_word(meta.get("sex")), site=site_words(site),
                metadata_json=json.dumps({k: v for k, v in meta.items() if k not in used}, sort_keys=True),
            ))
    files = [str(gt)] + ([str(meta_path)] if meta_path else [])
    return SourceIndex(spec, records, checks.rejects, len(gt_rows), files, {split: len(gt_rows)} if split else {})
