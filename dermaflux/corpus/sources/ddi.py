"""DDI (Diverse Dermatology Images, Stanford): `ddi_metadata.csv` (DDI_ID, DDI_file, skin_tone 12/34/56,
malignant True/False, disease) with the images beside it, found under PATH.

Clinical photographs. `skin_tone` is a Fitzpatrick pair (12: I-II, 34: III-IV, 56: V-VI), recorded as
`skin_tone` ("fitzpatrick I-II"); `disease` maps through the taxonomy rows of `ddi`, the rest keep
the `malignant` flag's `benign`/`malignant` label. No patient ids: each image is its own group.
"""

from __future__ import annotations

import json

from dermaflux.corpus.sources import register
from dermaflux.corpus.sources.base import (
    SourceIndex, SourceRecord, SourceSpec, labelled_fields, metadata_rows, text,
)

REQUIRED = ["DDI_file", "skin_tone", "malignant", "disease"]
TONES = {"12": "fitzpatrick I-II", "34": "fitzpatrick III-IV", "56": "fitzpatrick V-VI"}


@register("ddi")
def read(spec: SourceSpec) -> SourceIndex:
    metadata, image_root, images, rows, checks = metadata_rows(spec, "ddi", ("ddi_metadata.csv",), "ddi_metadata.csv",
                                                               REQUIRED)
    records = []
    for line, row in rows:
        if (name := checks.row_id(line, row, "DDI_file")) is None:
            continue
        if (flag := checks.flag(line, name, row, "malignant", "True or False")) is None:
            continue
        tone = TONES.get((text(row.get("skin_tone")) or "").removesuffix(".0"))
        if tone is None:
            checks.reject(line, name, f"skin_tone={row.get('skin_tone')!r}: expected 12, 34 or 56")
            continue
        if (fields := labelled_fields(checks, line, name, "ddi", row.get("disease"), flag)) is None:
            continue
        if (path := checks.image(line, name, images, name, f" under {image_root}")) is None:
            continue
        records.append(SourceRecord(
            source=spec.name, original_id=name.rsplit(".", 1)[0], file=str(metadata), row=line, image_path=str(path),
            source_label=f"{row.get('disease')}/malignant={row.get('malignant')}", group_namespace=spec.name, **fields,
            skin_tone=tone, modality="clinical",
            metadata_json=json.dumps({k: v for k, v in row.items() if k not in REQUIRED}, sort_keys=True),
        ))
    return SourceIndex(spec, records, checks.rejects, len(rows), [str(metadata)])
