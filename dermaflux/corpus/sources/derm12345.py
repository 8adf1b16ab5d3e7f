"""DERM12345: `derm12345_metadata_train.csv` and `derm12345_metadata_test.csv` (image_id, split,
super_class, malignancy, main_class_1, main_class_2, sub_class, label) with images
`<part>/<label>/<image_id>.jpg`, found under PATH. The published train/test split is kept.

`sub_class` maps through the taxonomy (rows of `derm12345`, else the generic rows: melanoma,
nevus, ...); the rest keep `malignancy`'s benign/malignant label. Dermoscopic.
"""

from __future__ import annotations

import json
from pathlib import Path

from dermaflux.corpus.sources import register
from dermaflux.corpus.sources.base import (
    SPLIT_WORDS, RowChecks, SourceError, SourceIndex, SourceRecord, SourceSpec, index_images, labelled_fields,
    read_csv, text,
)

REQUIRED = ["image_id", "malignancy", "sub_class"]


def _malignant(value: object) -> bool | None:
    word = (text(value) or "").lower()
    return {"malignant": True, "benign": False}.get(word)


@register("derm12345")
def read(spec: SourceSpec) -> SourceIndex:
    root = Path(spec.path)
    tables = sorted(root.rglob("derm12345_metadata_*.csv")) if root.is_dir() else [root]
    if not tables:
        raise SourceError(f"derm12345: no derm12345_metadata_train.csv / _test.csv under {root}")
    images = index_images(Path(spec.options.get("images", root if root.is_dir() else root.parent)))
    records, rejects, input_rows, published = [], [], 0, {}
    for table in tables:
        rows = read_csv(table, REQUIRED, "derm12345")
        input_rows += len(rows)
        checks = RowChecks(spec.name, table)
        part = table.stem.rsplit("_", 1)[-1].lower()
        for line, row in rows:
            split = SPLIT_WORDS.get((text(row.get("split")) or part).lower())
            if split:
                published[split] = published.get(split, 0) + 1
            if (image_id := checks.row_id(line, row, "image_id")) is None:
                continue
            fields = labelled_fields(checks, line, image_id, spec.name, row.get("sub_class"), _malignant(row.get("malignancy")))
            if fields is None or (path := checks.image(line, image_id, images, image_id)) is None:
                continue
            records.append(SourceRecord(
                source=spec.name, original_id=image_id, file=str(table), row=line, image_path=str(path),
                source_label=f"{row.get('sub_class')}/{row.get('malignancy')}", group_namespace=spec.name, **fields,
                official_split=split, modality="dermoscopic",
                metadata_json=json.dumps({k: v for k, v in row.items() if k not in ("image_id", "split")}, sort_keys=True),
            ))
        rejects += checks.rejects
    return SourceIndex(spec, records, rejects, input_rows, [str(t) for t in tables], published)
