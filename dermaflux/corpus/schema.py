"""The curated corpus on disk: the one definition every later stage reads.

`<corpus>/shards/part-*.parquet` rows (one per kept image) and `<corpus>/manifest.json`.
"""

from __future__ import annotations

import pyarrow as pa

SPLITS = ("train", "val", "test")

CORPUS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # "<source>:<original_id>", unique in the corpus
        pa.field("source", pa.string(), nullable=False),  # reader name, e.g. ham10000
        pa.field("original_id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # encoded bytes as found (JPEG/PNG)
        pa.field("image_format", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("label", pa.string(), nullable=False),  # taxonomy code: mel, nv, bcc, akiec, bkl, df, vasc, scc
        pa.field("source_label", pa.string()),  # the label as the source wrote it
        pa.field("malignant", pa.bool_(), nullable=False),
        pa.field("lesion_id", pa.string()),  # grouping keys for leakage-free splits
        pa.field("patient_id", pa.string()),
        pa.field("split", pa.string(), nullable=False),  # train | val | test
        pa.field("split_origin", pa.string()),  # "official" (kept as published) or "dermaflux"
        pa.field("phash", pa.string()),  # perceptual hash, hex
        pa.field("age", pa.float32()),
        pa.field("sex", pa.string()),
        pa.field("site", pa.string()),  # body site, normalised words ("lower extremity")
        pa.field("skin_type", pa.string()),  # Fitzpatrick I-VI where known
        pa.field("diagnosis_method", pa.string()),  # e.g. histo, follow_up, consensus, confocal
        pa.field("mm_per_pixel", pa.float32()),  # physical scale where the source gives one
        pa.field("metadata_json", pa.string()),  # every other source field, verbatim
    ]
)
