"""ISIC 2024 (SLICE-3D, total-body-photo crops): `train-metadata.csv` + `train-image.hdf5` (key
`isic_id`, a scalar dataset of JPEG bytes) or the JPEG folder `train-image/image/<isic_id>.jpg`,
found under PATH (the HDF5 file wins when both are there; `images=DIR` picks the folder).

`target` 0/1 is the label (`benign`/`malignant`); a finer diagnosis from the `iddx_*` levels (the
most specific one the taxonomy rows of `isic2024` know) replaces it. A metadata row without an
image and an HDF5 key without a metadata row are both quarantined, naming the file and the id.
"""

from __future__ import annotations

import json
from pathlib import Path

from dermaflux.corpus import hdf5
from dermaflux.corpus.sources import register
from dermaflux.corpus.sources.base import (
    Reject, RowChecks, SourceError, SourceIndex, SourceRecord, SourceSpec, index_images,
    labelled_fields, metadata_file, number, read_csv, sex_word, site_words, text,
)
from dermaflux.lesion import taxonomy

REQUIRED = ["isic_id", "target", "patient_id"]
LEVELS = ("iddx_5", "iddx_4", "iddx_3", "iddx_2", "iddx_1")
USED = {"isic_id", "target", "patient_id", "lesion_id", "age_approx", "sex", "anatom_site_general"}
NAMESPACE = "isic-archive"


def finest_diagnosis(row: dict) -> str | None:
    """The most specific iddx level the taxonomy knows (iddx_full's last `::` part first), else None."""
    levels = [part.strip() for part in (text(row.get("iddx_full")) or "").split("::")][::-1]
    levels += [text(row.get(level)) for level in LEVELS]
    return next((v for v in levels if v and taxonomy.map_label("isic2024", v)), None)


def _image_lookup(spec: SourceSpec, root: Path):
    """(function isic_id -> locator or None, where, the HDF5 file or None)."""
    if "images" not in spec.options and root.is_dir() and (found := sorted(root.rglob("train-image.hdf5"))):
        try:
            keys = set(hdf5.keys(str(found[0])))
        except OSError as err:
            raise SourceError(f"isic2024: {found[0]} cannot be opened as HDF5 ({err})") from None
        return (lambda isic_id: hdf5.locator(str(found[0]), isic_id) if isic_id in keys else None), str(found[0]), \
            (found[0], keys)
    image_root = Path(spec.options.get("images", root))
    images = index_images(image_root)

    def lookup(isic_id):
        hits = images.get(isic_id.lower(), [])
        return str(hits[0]) if len(hits) == 1 else None

    return lookup, str(image_root), None


@register("isic2024")
def read(spec: SourceSpec) -> SourceIndex:
    root = Path(spec.path)
    metadata = metadata_file(spec, "isic2024", ("train-metadata.csv",), "train-metadata.csv")
    lookup, where, store = _image_lookup(spec, root if root.is_dir() else metadata.parent)
    rows = read_csv(metadata, REQUIRED, "isic2024")
    records, checks, seen = [], RowChecks(spec.name, metadata), set()
    for line, row in rows:
        if (isic_id := checks.row_id(line, row, "isic_id")) is None:
            continue
        seen.add(isic_id)
        if (flag := checks.flag(line, isic_id, row, "target", "0 or 1")) is None:
            continue
        if (fields := labelled_fields(checks, line, isic_id, "isic2024", finest_diagnosis(row), flag)) is None:
            continue
        if (image := lookup(isic_id)) is None:
            checks.reject(line, isic_id, f"metadata row without an image: {isic_id!r} is not in {where}")
            continue
        records.append(SourceRecord(
            source=spec.name, original_id=isic_id, file=str(metadata), row=line, image_path=image,
            source_label=f"target={row.get('target')}" + (f"/{text(row.get('iddx_full'))}" if row.get("iddx_full") else ""),
            group_namespace=NAMESPACE, **fields, lesion_id=text(row.get("lesion_id")),
            patient_id=text(row.get("patient_id")), age=number(row.get("age_approx")), sex=sex_word(row.get("sex")),
            site=site_words(row.get("anatom_site_general")), modality="total-body crop",
            metadata_json=json.dumps({k: v for k, v in row.items() if k not in USED}, sort_keys=True),
        ))
    orphans = sorted(store[1] - seen) if store else []
    rejects = checks.rejects + [Reject(spec.name, str(store[0]), k, key, f"HDF5 key {key!r} has no row in {metadata}")
                                for k, key in enumerate(orphans)]
    files = [str(metadata)] + ([str(store[0])] if store else [])
    return SourceIndex(spec, records, rejects, len(rows) + len(orphans), files)
