"""Any CSV + image folder, with the column mapping in the spec:

    csv=labels.csv,images=DIR,id=COL,label=COL[,image=COL][,lesion=COL][,patient=COL][,split=COL]
        [,age=COL][,sex=COL][,site=COL][,skin_type=COL][,method=COL][,vocab=SOURCE][,name=NAME]

`image` defaults to `id` (a file name with or without extension). Labels go through the
taxonomy's generic rows (codes and English names), or through another source's rows with
`vocab=ham10000`. Several CSV sources in one run need distinct `name=`s.
"""

from __future__ import annotations

import json
from pathlib import Path

from dermaflux.corpus.sources import register
from dermaflux.corpus.sources.base import (
    RowChecks, SourceError, SourceIndex, SourceRecord, SourceSpec, fitzpatrick, index_images, number, read_csv,
    sex_word, site_words, text,
)

MAPPED = ("id", "label", "image", "lesion", "patient", "split", "age", "sex", "site", "skin_type", "method")
OPTIONS = {*MAPPED, "images", "vocab", "name"}
SPLIT_WORDS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@register("csv")
def read(spec: SourceSpec) -> SourceIndex:
    unknown = set(spec.options) - OPTIONS
    if unknown:
        raise SourceError(f"csv source {spec.path}: unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(OPTIONS))}")
    for needed in ("id", "label"):
        if needed not in spec.options:
            raise SourceError(f"csv source {spec.path}: the spec needs {needed}=COLUMN (e.g. csv=FILE,images=DIR,id=image,label=dx)")
    path = Path(spec.path)
    columns = {key: spec.options[key] for key in MAPPED if key in spec.options}
    columns.setdefault("image", columns["id"])
    rows = read_csv(path, sorted(set(columns.values())), f"csv source {spec.name}")
    images = index_images(Path(spec.options.get("images", path.parent)))
    vocab = spec.options.get("vocab", spec.name)
    used = set(columns.values())
    records, checks = [], RowChecks(spec.name, path)
    for line, row in rows:
        if (original_id := checks.row_id(line, row, columns["id"], f"column {columns['id']}")) is None:
            continue
        raw_label = row.get(columns["label"])
        label = checks.label(line, original_id, vocab, columns["label"], raw_label, "see dermaflux/lesion/taxonomy.csv")
        if label is None:
            continue
        split = None
        if "split" in columns:
            split = SPLIT_WORDS.get((text(row.get(columns["split"])) or "").lower())
            if split is None:
                checks.reject(line, original_id,
                              f"column {columns['split']}={row.get(columns['split'])!r}: expected train, val or test")
                continue
        if (image := checks.image(line, original_id, images, row.get(columns["image"]) or "")) is None:
            continue
        get = lambda key: row.get(columns[key]) if key in columns else None  # noqa: E731
        records.append(SourceRecord(
            source=spec.name, original_id=original_id, file=str(path), row=line, image_path=str(image),
            source_label=str(raw_label), label=label, group_namespace=spec.name,
            lesion_id=text(get("lesion")), patient_id=text(get("patient")), official_split=split,
            age=number(get("age")), sex=sex_word(get("sex")), site=site_words(get("site")),
            skin_type=fitzpatrick(get("skin_type")), diagnosis_method=text(get("method")),
            metadata_json=json.dumps({k: v for k, v in row.items() if k not in used}, sort_keys=True),
        ))
    published: dict[str, int] = {}
    if "split" in columns:
        for _, row in rows:
            split = SPLIT_WORDS.get((text(row.get(columns["split"])) or "").lower())
            if split:
                published[split] = published.get(split, 0) + 1
    return SourceIndex(spec, records, checks.rejects, len(rows), [str(path)], published)
