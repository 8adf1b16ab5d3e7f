"""HAM10000: `HAM10000_metadata.csv` + JPEG folders (`HAM10000_images_part_1/2`, or `images/`).

Options: `metadata=FILE` (default: the CSV under PATH), `images=DIR` (default: PATH, searched
recursively). No official split (the ISIC 2018 test set is separate): DermaFlux makes one.
"""

from __future__ import annotations

import json
from pathlib import Path

from dermaflux.lesion import taxonomy
from dermaflux.corpus.sources import register
from dermaflux.corpus.sources.base import (
    RowChecks, SourceError, SourceIndex, SourceRecord, SourceSpec, index_images, number, read_csv, sex_word,
    site_words, text,
)

REQUIRED = ["lesion_id", "image_id", "dx"]
USED = {"lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"}
# HAM10000 lesion ids (HAM_xxxxxxx) are ISIC-archive ids: ISIC 2019 metadata uses the same ones.
NAMESPACE = "isic-archive"


def find_metadata(root: Path) -> Path:
    if root.is_file():
        return root
    hits = sorted(root.rglob("HAM10000_metadata*.csv")) or sorted(root.glob("*.csv"))
    if not hits:
        raise SourceError(f"ham10000: no HAM10000_metadata.csv under {root}")
    return hits[0]


@register("ham10000")
def read(spec: SourceSpec) -> SourceIndex:
    root = Path(spec.path)
    if not root.exists():
        raise SourceError(f"ham10000: {root} does not exist")
    metadata = Path(spec.options["metadata"]) if "metadata" in spec.options else find_metadata(root)
    image_root = Path(spec.options.get("images", root if root.is_dir() else root.parent))
    images = index_images(image_root)
    records, checks = [], RowChecks(spec.name, metadata)
    rows = read_csv(metadata, REQUIRED, "ham10000")
    known = "known: " + ", ".join(taxonomy.source_labels("ham10000"))
    for line, row in rows:
        if (image_id := checks.row_id(line, row, "image_id")) is None:
            continue
        if (label := checks.label(line, image_id, "ham10000", "dx", row.get("dx"), known)) is None:
            continue
        if (path := checks.image(line, image_id, images, image_id, f" under {image_root}")) is None:
            continue
        records.append(SourceRecord(
            source=spec.name, original_id=image_id, file=str(metadata), row=line, image_path=str(path),
            source_label=row["dx"], label=label, group_namespace=NAMESPACE,
            lesion_id=text(row.get("lesion_id")), age=number(row.get("age")), sex=sex_word(row.get("sex")),
            site=site_words(row.get("localization")), diagnosis_method=text(row.get("dx_type")),
            metadata_json=json.dumps({k: v for k, v in row.items() if k not in USED}, sort_keys=True),
        ))
    return SourceIndex(spec, records, checks.rejects, len(rows), [str(metadata)])
