"""PAD-UFES-20 (smartphone clinical images): `metadata.csv` + PNGs under `images/` or `imgs_part_*/`.

Columns used: img_id, diagnostic (ACK BCC MEL NEV SCC SEK), patient_id, lesion_id, age, gender,
region, fitspatrick, biopsed; the rest (diameters, itch, grew, ...) go to metadata_json.
No official split.
"""

from __future__ import annotations

import json
from pathlib import Path

from dermaflux.corpus import taxonomy
from dermaflux.corpus.sources import register
from dermaflux.corpus.sources.base import (
    Reject, SourceError, SourceIndex, SourceRecord, SourceSpec, fitzpatrick, index_images, lookup_image, number,
    read_csv, sex_word, site_words, text,
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
    records, rejects = [], []
    for line, row in rows:
        image = text(row.get("img_id"))
        if image is None:
            rejects.append(Reject(spec.name, str(metadata), line, None, "img_id is empty"))
            continue
        label = taxonomy.map_label("pad-ufes-20", row.get("diagnostic"))
        if label is None:
            rejects.append(Reject(spec.name, str(metadata), line, image,
                                  f"unknown label diagnostic={row.get('diagnostic')!r} "
                                  f"(known: {', '.join(s.upper() for s in taxonomy.source_labels('pad-ufes-20'))})"))
            continue
        path, problem = lookup_image(images, image)
        if path is None:
            rejects.append(Reject(spec.name, str(metadata), line, image, problem))
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
    return SourceIndex(spec, records, rejects, len(rows), [str(metadata)])
