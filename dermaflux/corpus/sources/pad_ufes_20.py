"""PAD-UFES-20 (smartphone clinical images): `metadata.csv` + PNGs under `images/` or `imgs_part_*/`.

Columns used: img_id, diagnostic (ACK BCC MEL NEV SCC SEK), patient_id, lesion_id, age, gender,
region, fitspatrick, biopsed; the rest (diameters, itch, grew, ...) go to metadata_json.
No official split.
"""

from __future__ import annotations

import json
from pathlib import Path

from dermaflux.lesion import taxonomy
from dermaflux.corpus.sources import register
from dermaflux.corpus.sources.base import (
    RowChecks, SourceError, SourceIndex, SourceRecord, SourceSpec, fitzpatrick, index_images, number, read_csv,
    sex_word, site_words, text,
)

REQUIRED = ["img_id", "diagnostic", "patient_id", "lesion_id"]
USED = {"img_id", "diagnostic", "patient_id", "lesion_id", "age", "gender", "region", "fitspatrick", "biopsed"}


@register("pad-ufes-20")
def read(spec: SourceSpec) -> SourceIndex:
    root = Path(spec.path)
    metadata = Path(spec.options.get("metadata", root / "metadata.csv"))
    if not root.exists():
        raise SourceError(f"pad-ufes-20: {root} does not exist")
    images = index_images(Path(spec.options.get("images", root)))
    rows = read_csv(metadata, REQUIRED, "pad-ufes-20")
    records, checks = [], RowChecks(spec.name, metadata)
    known = "known: " + ", ".join(s.upper() for s in taxonomy.source_labels("pad-ufes-20"))
    for line, row in rows:
        if (image := checks.row_id(line, row, "img_id")) is None:
            continue
        if (label := checks.label(line, image, "pad-ufes-20", "diagnostic", row.get("diagnostic"), known)) is None:
            continue
        if (path := checks.image(line, image, images, image)) is None:
            continue
        biopsed = text(row.get("biopsed"))
        method = None if biopsed is None else ("histo" if biopsed.lower() == "true" else "clinical")
        records.append(SourceRecord(
            source=spec.name, original_id=image, file=str(metadata), row=line, image_path=str(path),
            source_label=row["diagnostic"], label=label, group_namespace=spec.name,
            lesion_id=text(row.get("lesion_id")), patient_id=text(row.get("patient_id")),
            age=number(row.get("age")), sex=sex_word(row.get("gender")), site=site_words(row.get("region")),
            skin_type=fitzpatrick(row.get("fitspatrick")), diagnosis_method=method,
            metadata_json=json.dumps({k: v for k, v in row.items() if k not in USED}, sort_keys=True),
        ))
    return SourceIndex(spec, records, checks.rejects, len(rows), [str(metadata)])
