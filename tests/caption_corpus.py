"""Small curated corpora in CORPUS_SCHEMA built straight from the real HAM10000 images (caption tests, bench)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dermaflux.corpus.schema import CORPUS_SCHEMA

MALIGNANT = {"mel", "bcc", "akiec", "scc"}


def ham_rows(ham_dir: Path, per_label: int | None = None, labels: tuple[str, ...] | None = None) -> list[dict]:
    with open(ham_dir / "HAM10000_metadata.csv", newline="") as fh:
        meta = sorted(csv.DictReader(fh), key=lambda r: r["image_id"])
    taken: dict[str, int] = {}
    rows = []
    for m in meta:
        dx = m["dx"]
        if labels and dx not in labels or per_label is not None and taken.get(dx, 0) >= per_label:
            continue
        taken[dx] = taken.get(dx, 0) + 1
        image = (ham_dir / "images" / f"{m['image_id']}.jpg").read_bytes()
        rows.append({
            "id": f"ham10000:{m['image_id']}", "source": "ham10000", "original_id": m["image_id"], "image": image,
            "image_format": "jpeg", "width": 224, "height": 224, "label": dx, "source_label": dx,
            "malignant": dx in MALIGNANT, "lesion_id": m["lesion_id"], "patient_id": None, "split": "train",
            "split_origin": "dermaflux", "phash": None, "age": float(m["age"]) if m["age"] else None,
            "sex": m["sex"] if m["sex"] in ("male", "female") else None,
            "site": m["localization"] if m["localization"] != "unknown" else None, "skin_type": None,
            "diagnosis_method": m["dx_type"], "mm_per_pixel": None, "metadata_json": json.dumps({"dataset": m["dataset"]}),
        })
    return rows


def write_corpus(rows: list[dict], out: Path, shards: int = 2) -> Path:
    (out / "shards").mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        part = rows[k::shards]
        pq.write_table(pa.Table.from_pylist(part, schema=CORPUS_SCHEMA), out / "shards" / f"part-{k:05d}.parquet")
    (out / "manifest.json").write_text(json.dumps({"rows": len(rows), "shards": shards}))
    return out
