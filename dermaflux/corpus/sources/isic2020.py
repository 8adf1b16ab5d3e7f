"""ISIC 2020 (SIIM-ISIC melanoma challenge): `ISIC_2020_Training_GroundTruth_v2.csv` (or `_GroundTruth.csv`,
or Kaggle's `train.csv`) + the JPEG folder (`train/`, `ISIC_2020_Training_JPEG/`), found under PATH.

Columns: image_name, patient_id, sex, age_approx, anatom_site_general_challenge, diagnosis,
benign_malignant, target (and lesion_id in v2). 27,124 of 33,126 diagnoses are `unknown`: those
rows keep the `benign`/`malignant` label of `target`; known diagnoses map through the taxonomy
rows of `isic2020`. Dermoscopic. `ISIC_2020_Training_Duplicates.csv` is not needed: dedup finds them.
"""

from __future__ import annotations

import json

from dermaflux.corpus.sources import register
from dermaflux.corpus.sources.base import (
    SourceIndex, SourceRecord, SourceSpec, labelled_fields, metadata_rows, number, sex_word,
    site_words, text,
)

METADATA = ("ISIC_2020_Training_GroundTruth_v2.csv", "ISIC_2020_Training_GroundTruth.csv", "train.csv")
REQUIRED = ["image_name", "patient_id", "diagnosis", "target"]
USED = {"image_name", "patient_id", "lesion_id", "sex", "age_approx", "anatom_site_general_challenge", "diagnosis",
        "benign_malignant", "target"}
NAMESPACE = "isic-archive"  # ISIC patient/lesion ids are archive-wide


@register("isic2020")
def read(spec: SourceSpec) -> SourceIndex:
    metadata, image_root, images, rows, checks = metadata_rows(spec, "isic2020", METADATA, "ground-truth CSV", REQUIRED)
    records = []
    for line, row in rows:
        if (image_id := checks.row_id(line, row, "image_name")) is None:
            continue
        if (flag := checks.flag(line, image_id, row, "target", "0 or 1")) is None:
            continue
        if (fields := labelled_fields(checks, line, image_id, "isic2020", row.get("diagnosis"), flag)) is None:
            continue
        if (path := checks.image(line, image_id, images, image_id, f" under {image_root}")) is None:
            continue
        records.append(SourceRecord(
            source=spec.name, original_id=image_id, file=str(metadata), row=line, image_path=str(path),
            source_label=f"{row.get('diagnosis')}/target={row.get('target')}", group_namespace=NAMESPACE, **fields,
            lesion_id=text(row.get("lesion_id")), patient_id=text(row.get("patient_id")),
            age=number(row.get("age_approx")), sex=sex_word(row.get("sex")),
            site=site_words(row.get("anatom_site_general_challenge")), modality="dermoscopic",
            metadata_json=json.dumps({k: v for k, v in row.items() if k not in USED}, sort_keys=True),
        ))
    return SourceIndex(spec, records, checks.rejects, len(rows), [str(metadata)])
