"""MILK10k: `MILK10k_Training_Metadata.csv` (lesion_id, isic_id, image_type, age_approx, sex,
skin_tone_class 0-5, site, MONET_*) + `MILK10k_Training_GroundTruth.csv` (lesion_id, one-hot AKIEC BCC
BEN_OTH BKL DF INF MAL_OTH MEL NV SCCKA VASC) + images `<lesion_id>/<isic_id>.jpg`, found under PATH.

Each lesion has a dermoscopic and a clinical image: both carry the lesion's label and its
lesion_id, so they never part across splits. `skin_tone_class` is recorded as "milk10k class N".
"""

from __future__ import annotations

import json
from pathlib import Path

from dermaflux.corpus.sources import register
from dermaflux.corpus.sources.base import (
    RowChecks, SourceIndex, SourceRecord, SourceSpec, find_file, index_images, number, read_csv, sex_word,
    site_words, text,
)
from dermaflux.lesion import taxonomy

CLASSES = ("AKIEC", "BCC", "BEN_OTH", "BKL", "DF", "INF", "MAL_OTH", "MEL", "NV", "SCCKA", "VASC")
USED = {"lesion_id", "isic_id", "image_type", "age_approx", "sex", "skin_tone_class", "site"}


def _modality(image_type: str | None) -> str | None:
    kind = (image_type or "").lower()
    return "dermoscopic" if "dermoscop" in kind else "clinical" if "clinical" in kind else None


def _lesion_labels(path: Path, checks: RowChecks) -> dict[str, str]:
    labels = {}
    for line, row in read_csv(path, ["lesion_id", *CLASSES], "milk10k ground truth"):
        hot = [c for c in CLASSES if (number(row.get(c)) or 0.0) >= 0.5]
        if len(hot) != 1:
            checks.reject(line, row.get("lesion_id"), f"{path.name}: expected one class set to 1, got {hot or 'none'}")
            continue
        labels[row["lesion_id"]] = taxonomy.map_label("milk10k", hot[0])
    return labels


@register("milk10k")
def read(spec: SourceSpec) -> SourceIndex:
    root = Path(spec.path)
    metadata = find_file("milk10k", root, ("MILK10k_Training_Metadata.csv",), "MILK10k_Training_Metadata.csv")
    truth = find_file("milk10k", root, ("MILK10k_Training_GroundTruth.csv",), "MILK10k_Training_GroundTruth.csv")
    images = index_images(Path(spec.options.get("images", root)))
    checks = RowChecks(spec.name, metadata)
    lesion_labels = _lesion_labels(truth, RowChecks(spec.name, truth))
    rows = read_csv(metadata, ["lesion_id", "isic_id", "image_type"], "milk10k")
    records = []
    for line, row in rows:
        if (isic_id := checks.row_id(line, row, "isic_id")) is None:
            continue
        label = lesion_labels.get(row.get("lesion_id", ""))
        if label is None:
            checks.reject(line, isic_id, f"lesion {row.get('lesion_id')!r} has no class in {truth.name}")
            continue
        if (path := checks.image(line, isic_id, images, isic_id)) is None:
            continue
        tone = text(row.get("skin_tone_class"))
        records.append(SourceRecord(
            source=spec.name, original_id=isic_id, file=str(metadata), row=line, image_path=str(path),
            source_label=label, label=label, group_namespace="isic-archive", lesion_id=text(row.get("lesion_id")),
            age=number(row.get("age_approx")), sex=sex_word(row.get("sex")), site=site_words(row.get("site")),
            skin_tone=f"milk10k class {tone.removesuffix('.0')}" if tone else None,
            modality=_modality(row.get("image_type")),
            metadata_json=json.dumps({k: v for k, v in row.items() if k not in USED and not k.startswith("MONET")},
                                     sort_keys=True),
        ))
    return SourceIndex(spec, records, checks.rejects, len(rows), [str(metadata), str(truth)])
