"""Any CSV + image folder, with the column mapping in the spec:

    csv=labels.csv,images=DIR,id=COL,label=COL[,image=COL][,lesion=COL][,patient=COL]
        [,split=train|val|test | split_col=COL][,positive=mel|malignant]
        [,age=COL][,sex=COL][,site=COL][,skin_type=COL][,method=COL][,vocab=SOURCE][,name=NAME]

`image` defaults to `id` (a file name with or without extension). Labels go through the
taxonomy's generic rows (codes and English names), or through another source's rows with
`vocab=ham10000`. `split=test` sends every row to the test split (an external test set);
`split_col=COL` reads each row's split from a column (`split=COL` with a column name, the older
spelling, still works). `positive=mel` reads `label` as a binary column (1/0, 1.0/0.0, true/false,
yes/no): 1 is a melanoma, 0 "not a melanoma" with no diagnosis (test rows only, so it needs
`split=test`); `positive=malignant` reads a malignant/benign column (also the words
malignant/benign): its rows get the labels `malignant` / `benign` and are training rows like any
other. Several CSV sources in one run need distinct `name=`s.
"""

from __future__ import annotations

import json
from pathlib import Path

from dermaflux.corpus.sources import register
from dermaflux.corpus.sources.base import (
    POSITIVES, SPLIT_WORDS, RowChecks, SourceError, SourceIndex, SourceRecord, SourceSpec, binary_record_fields,
    binary_value, fitzpatrick, index_images, number, read_csv, sex_word, site_words, text,
)

MAPPED = ("id", "label", "image", "lesion", "patient", "age", "sex", "site", "skin_type", "method")
OPTIONS = {*MAPPED, "images", "vocab", "name", "split", "split_col", "positive", "max_rows", "max_per_label",
           "malignant_share"}  # the last three: caps, read by corpus/caps.py for every reader
# Words a binary column may hold besides 0/1, true/false, yes/no, per `positive=`.
BINARY_WORDS = {"mel": (("mel", "melanoma"), ()), "malignant": (("malignant",), ("benign",))}


def _check_options(spec: SourceSpec) -> str | None:
    """The spec's `positive=` code (None: a diagnosis column); fails on options the reader cannot use."""
    unknown = set(spec.options) - OPTIONS
    if unknown:
        raise SourceError(f"csv source {spec.path}: unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(OPTIONS))}")
    for needed in ("id", "label"):
        if needed not in spec.options:
            raise SourceError(f"csv source {spec.path}: the spec needs {needed}=COLUMN (e.g. csv=FILE,images=DIR,id=image,label=dx)")
    if "positive" not in spec.options:
        return None
    positive = POSITIVES.get(spec.options["positive"].lower())
    if positive is None:
        raise SourceError(f"csv source {spec.name}: positive={spec.options['positive']!r}: expected mel or malignant")
    if positive == "mel" and spec.fixed_split != "test":
        raise SourceError(f"csv source {spec.name}: positive={spec.options['positive']} gives rows without a diagnosis, "
                          "which can only be test rows: add split=test (an external test set)")
    return positive


def _diagnosis(checks: RowChecks, line: int, original_id: str, raw: object, column: str, vocab: str,
               positive: str | None) -> dict | None:
    """source_label/label/malignant/melanoma fields of one row, or None (rejected) when the cell cannot be read."""
    if positive is None:
        label = checks.label(line, original_id, vocab, column, raw, "see dermaflux/lesion/taxonomy.csv")
        return None if label is None else {"source_label": str(raw), "label": label}
    flag = binary_value(raw, *BINARY_WORDS[positive])
    if flag is None:
        words = "/".join(w for pair in BINARY_WORDS[positive] for w in pair)
        checks.reject(line, original_id, f"unknown label {column}={raw!r} (positive={positive}: expected 1/0, "
                                         f"1.0/0.0, true/false, yes/no or {words})")
        return None
    return {"source_label": f"{column}={raw}", **binary_record_fields(positive, flag)}


def _row_split(checks: RowChecks, line: int, original_id: str, row: dict, column: str | None) -> tuple[bool, str | None]:
    """(ok, the row's split from its split column); a value that is no split word rejects the row."""
    if column is None:
        return True, None
    split = SPLIT_WORDS.get((text(row.get(column)) or "").lower())
    if split is None:
        checks.reject(line, original_id, f"column {column}={row.get(column)!r}: expected train, val or test")
    return split is not None, split


@register("csv")
def read(spec: SourceSpec) -> SourceIndex:
    positive = _check_options(spec)
    path = Path(spec.path)
    columns = {key: spec.options[key] for key in MAPPED if key in spec.options}
    columns.setdefault("image", columns["id"])
    split_column = spec.split_column
    rows = read_csv(path, sorted({*columns.values(), *([split_column] if split_column else [])}), f"csv source {spec.name}")
    images = index_images(Path(spec.options.get("images", path.parent)))
    vocab = spec.options.get("vocab", spec.name)
    used = {*columns.values(), split_column}
    records, checks = [], RowChecks(spec.name, path)
    for line, row in rows:
        if (original_id := checks.row_id(line, row, columns["id"], f"column {columns['id']}")) is None:
            continue
        diagnosis = _diagnosis(checks, line, original_id, row.get(columns["label"]), columns["label"], vocab, positive)
        if diagnosis is None:
            continue
        ok, split = _row_split(checks, line, original_id, row, split_column)
        if not ok or (image := checks.image(line, original_id, images, row.get(columns["image"]) or "")) is None:
            continue
        get = lambda key: row.get(columns[key]) if key in columns else None  # noqa: E731
        records.append(SourceRecord(
            source=spec.name, original_id=original_id, file=str(path), row=line, image_path=str(image),
            group_namespace=spec.name, **diagnosis,
            lesion_id=text(get("lesion")), patient_id=text(get("patient")), official_split=split,
            age=number(get("age")), sex=sex_word(get("sex")), site=site_words(get("site")),
            skin_type=fitzpatrick(get("skin_type")), diagnosis_method=text(get("method")),
            metadata_json=json.dumps({k: v for k, v in row.items() if k not in used}, sort_keys=True),
        ))
    return SourceIndex(spec, records, checks.rejects, len(rows), [str(path)], _published(rows, split_column))


def _published(rows: list[tuple[int, dict]], column: str | None) -> dict[str, int]:
    published: dict[str, int] = {}
    for _, row in rows if column else []:
        split = SPLIT_WORDS.get((text(row.get(column)) or "").lower())
        if split:
            published[split] = published.get(split, 0) + 1
    return published
