"""ISIC Challenge layout: a ground-truth CSV + optional metadata CSV.

Ground truth, one row per image (id column `image`, `image_id` or `isic_id`), in one of three shapes:
- one-hot diagnosis columns (ISIC 2019: MEL NV BCC AK BKL DF VASC SCC UNK; ISIC 2018: ... AKIEC ...);
- ISIC 2017: `melanoma` and `seborrheic_keratosis` 0/1 columns (neither set: a nevus);
- a `melanoma` column alone (ISIC 2016 style): a binary source, 1 a melanoma, 0 "not a melanoma"
  with no diagnosis, so it needs `split=test` (an external test set).
Cells may be 0/1, 0.0/1.0, true/false or yes/no. Metadata (joined on the id): age_approx, sex,
anatom_site_general(_challenge), lesion_id, patient_id. Images: `<id>.jpg` anywhere under PATH.
Options: `gt=FILE`, `metadata=FILE`, `images=DIR`, `split=train|val|test` (every row to that split,
e.g. a challenge test set).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from dermaflux.lesion import taxonomy
from dermaflux.corpus.sources import register
from dermaflux.corpus.sources.base import (
    SourceError, RowChecks, SourceIndex, SourceRecord, SourceSpec, binary_record_fields, binary_value, index_images,
    number, read_csv, sex_word, site_words, text,
)

NAMESPACE = "isic-archive"  # lesion_id / patient_id are ISIC-archive ids (HAM10000 shares them)
SITE_COLUMNS = ("anatom_site_general_challenge", "anatom_site_general")
ID_COLUMNS = ("image", "image_id", "isic_id")
MELANOMA, SEBORRHEIC = "melanoma", "seborrheic_keratosis"
# A row's diagnosis: (source label, SourceRecord label fields) or a reason to reject it.
Diagnose = Callable[[dict], "tuple[str, dict] | str"]


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


def _id_column(path: Path, header: list[str], what: str) -> str:
    column = next((c for c in ID_COLUMNS if c in header), None)
    if column is None:
        raise SourceError(f"isic {what}: {path} has no image id column (expected one of {', '.join(ID_COLUMNS)}; "
                          f"found {', '.join(header) or 'none'})")
    return column


def _flag(row: dict, column: str) -> bool | str:
    flag = binary_value(row.get(column))
    return f"column {column}={row.get(column)!r} is not 0/1, true/false or yes/no" if flag is None else flag


def _one_hot(columns: list[str]) -> Diagnose:
    def diagnose(row: dict) -> tuple[str, dict] | str:
        hot = []
        for column in columns:
            value = number(row.get(column))
            if value is None:
                return f"column {column}={row.get(column)!r} is not a number"
            if value >= 0.5:
                hot.append(column)
        if len(hot) != 1:
            return f"expected exactly one diagnosis column set to 1, got {hot or 'none'}"
        label = taxonomy.map_label("isic", hot[0])
        return (hot[0], {"label": label}) if label else f"unknown label {hot[0]} (not in the taxonomy)"

    return diagnose


def _isic2017(row: dict) -> tuple[str, dict] | str:
    mel, seb = _flag(row, MELANOMA), _flag(row, SEBORRHEIC)
    for flag in (mel, seb):
        if isinstance(flag, str):
            return flag
    if mel and seb:
        return f"both {MELANOMA} and {SEBORRHEIC} are set"
    word = MELANOMA if mel else "seborrheic keratosis" if seb else "nevus"
    return word, {"label": taxonomy.map_label("*", word)}


def _melanoma_only(row: dict) -> tuple[str, dict] | str:
    flag = _flag(row, MELANOMA)
    return flag if isinstance(flag, str) else (f"{MELANOMA}={row.get(MELANOMA)}", binary_record_fields("mel", flag))


def _diagnose_for(gt: Path, header: list[str], id_column: str) -> Diagnose:
    """How this ground truth says a diagnosis: one-hot columns, ISIC 2017's two flags, or melanoma alone."""
    known = taxonomy.source_labels("isic")
    others = [c for c in header if c != id_column]
    if any(c.lower() in known for c in others):
        return _one_hot(others)
    if MELANOMA in header:
        return _isic2017 if SEBORRHEIC in header else _melanoma_only
    raise SourceError(f"isic: {gt} has no diagnosis columns (expected one-hot columns, some of "
                      f"{', '.join(c.upper() for c in known)}; or {MELANOMA}[,{SEBORRHEIC}]; found {', '.join(others)})")


def _metadata(path: Path | None) -> dict[str, dict[str, str]]:
    if path is None:
        return {}
    rows = read_csv(path, [], "isic metadata")
    column = _id_column(path, list(rows[0][1]) if rows else [], "metadata")
    return {row[column]: row for _, row in rows}


@register("isic")
def read(spec: SourceSpec) -> SourceIndex:
    root = Path(spec.path)
    if not root.exists():
        raise SourceError(f"isic: {root} does not exist")
    gt = _pick(root, spec.options.get("gt"), "groundtruth", "gt", required=True)
    meta_path = _pick(root, spec.options.get("metadata"), "metadata", "metadata", required=False)
    gt_rows = read_csv(gt, [], "isic ground truth")
    header = list(gt_rows[0][1]) if gt_rows else []
    id_column = _id_column(gt, header, "ground truth") if gt_rows else "image"
    diagnose = _diagnose_for(gt, header, id_column) if gt_rows else _melanoma_only
    metadata = _metadata(meta_path)
    images = index_images(Path(spec.options.get("images", root)))
    records, checks = [], RowChecks(spec.name, gt)
    used = {*ID_COLUMNS, "age_approx", "sex", "lesion_id", "patient_id", *SITE_COLUMNS}
    for line, row in gt_rows:
        if (image := checks.row_id(line, row, id_column)) is None:
            continue
        diagnosis = diagnose(row)
        if isinstance(diagnosis, str):
            checks.reject(line, image, diagnosis)
            continue
        if (path := checks.image(line, image, images, image)) is None:
            continue
        meta = metadata.get(image, {})
        site = next((meta[c] for c in SITE_COLUMNS if c in meta), None)
        records.append(SourceRecord(
            source=spec.name, original_id=image, file=str(gt), row=line, image_path=str(path),
            source_label=diagnosis[0], group_namespace=NAMESPACE, **diagnosis[1],
            lesion_id=text(meta.get("lesion_id")), patient_id=text(meta.get("patient_id")),
            age=number(meta.get("age_approx")), sex=sex_word(meta.get("sex")), site=site_words(site),
            metadata_json=json.dumps({k: v for k, v in meta.items() if k not in used}, sort_keys=True),
        ))
    files = [str(gt)] + ([str(meta_path)] if meta_path else [])
    return SourceIndex(spec, records, checks.rejects, len(gt_rows), files)
