"""An ISIC Archive collection export (isic-cli `image download`: HIBA and other collections):
`metadata.csv` (isic_id, attribution, copyright_license, then sorted fields: diagnosis_1..5,
benign_malignant, fitzpatrick_skin_type, image_type, lesion_id, patient_id, ...) with `<isic_id>.jpg` beside it.

The most specific diagnosis level the taxonomy knows (ISIC's hierarchy, the rows of `isic2024`) is
the label, else `benign_malignant` (or diagnosis_1 Benign/Malignant) gives `benign`/`malignant`.
"""

from __future__ import annotations

import json
from pathlib import Path

from dermaflux.corpus.sources import register
from dermaflux.corpus.sources.base import (
    RowChecks, SourceIndex, SourceRecord, SourceSpec, find_file, fitzpatrick, index_images, labelled_fields, number,
    read_csv, sex_word, site_words, text,
)
from dermaflux.lesion import taxonomy

LEVELS = ("diagnosis_5", "diagnosis_4", "diagnosis_3", "diagnosis_2", "diagnosis_1")
MODALITY = {"dermoscopic": "dermoscopic", "clinical: close-up": "clinical", "clinical: overview": "clinical",
            "tbp tile: close-up": "total-body crop"}


def _malignant(row: dict) -> bool | None:
    for value in (row.get("benign_malignant"), row.get("diagnosis_1")):
        word = (text(value) or "").lower()
        if word in ("benign", "malignant"):
            return word == "malignant"
    return None


@register("isic-archive")
def read(spec: SourceSpec) -> SourceIndex:
    metadata = find_file("isic-archive", Path(spec.path), ("metadata.csv",), "metadata.csv")
    images = index_images(Path(spec.options.get("images", metadata.parent)))
    rows = read_csv(metadata, ["isic_id"], "isic-archive")
    records, checks = [], RowChecks(spec.name, metadata)
    for line, row in rows:
        if (isic_id := checks.row_id(line, row, "isic_id")) is None:
            continue
        diagnosis = next((v for v in (text(row.get(level)) for level in LEVELS)
                          if v and taxonomy.map_label("isic2024", v)), None)
        if (fields := labelled_fields(checks, line, isic_id, "isic2024", diagnosis, _malignant(row))) is None:
            continue
        if (path := checks.image(line, isic_id, images, isic_id)) is None:
            continue
        records.append(SourceRecord(
            source=spec.name, original_id=isic_id, file=str(metadata), row=line, image_path=str(path),
            source_label=diagnosis or str(row.get("benign_malignant")), group_namespace="isic-archive", **fields,
            lesion_id=text(row.get("lesion_id")), patient_id=text(row.get("patient_id")),
            age=number(row.get("age_approx")), sex=sex_word(row.get("sex")),
            site=site_words(row.get("anatom_site_general")), skin_type=fitzpatrick(row.get("fitzpatrick_skin_type")),
            modality=MODALITY.get((text(row.get("image_type")) or "").lower()),
            metadata_json=json.dumps({k: v for k, v in row.items() if k not in ("isic_id", *LEVELS)}, sort_keys=True),
        ))
    return SourceIndex(spec, records, checks.rejects, len(rows), [str(metadata)])
