"""A small captioned set in CAPTION_SCHEMA built from real HAM10000 images (train-stage tests).

Stand-in for `dermaflux caption` output: the captions are simple sentences from the metadata,
enough for the transformer to learn a label/site-conditioned distribution.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dermaflux.caption.schema import CAPTION_SCHEMA

NAMES = {
    "mel": "melanoma", "nv": "melanocytic nevus", "bcc": "basal cell carcinoma", "akiec": "actinic keratosis",
    "bkl": "benign keratosis", "df": "dermatofibroma", "vasc": "vascular lesion",
}
MALIGNANT = {"mel", "bcc", "akiec", "scc"}


def build_captions(ham_dir: Path, out_dir: Path, n_train: int, n_test: int, shard_rows: int = 64) -> Path:
    """Write `out_dir/shards/part-*.parquet` with the first n_train + n_test metadata rows (sorted by image id)."""
    with open(ham_dir / "HAM10000_metadata.csv") as fh:
        meta = sorted(csv.DictReader(fh), key=lambda r: r["image_id"])
    rows = []
    for i, rec in enumerate(meta[: n_train + n_test]):
        blob = (ham_dir / "images" / f"{rec['image_id']}.jpg").read_bytes()
        site = rec["localization"] or "unknown"
        rows.append({
            "id": f"ham10000:{rec['image_id']}", "source": "ham10000", "original_id": rec["image_id"],
            "image": blob, "image_format": "jpeg", "width": 224, "height": 224, "label": rec["dx"],
            "source_label": rec["dx"], "malignant": rec["dx"] in MALIGNANT, "lesion_id": rec["lesion_id"],
            "patient_id": None, "split": "train" if i < n_train else "test", "split_origin": "dermaflux",
            "phash": None, "age": float(rec["age"]) if rec["age"] else None, "sex": rec["sex"], "site": site,
            "skin_type": None, "diagnosis_method": rec["dx_type"], "mm_per_pixel": None, "metadata_json": "{}",
            "attributes_json": json.dumps({"label": rec["dx"], "site": site}),
            "caption": f"dermoscopic image of a {NAMES[rec['dx']]} on the {site}",
            "caption_writer": "template", "caption_flags": [],
        })
    shards = out_dir / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    for part, start in enumerate(range(0, len(rows), shard_rows)):
        table = pa.Table.from_pylist(rows[start : start + shard_rows], schema=CAPTION_SCHEMA)
        pq.write_table(table, shards / f"part-{part:05d}.parquet")
    return out_dir
