"""A synthetic augmentation set on disk: what `generate`, the Serve bulk jobs and `evaluate` share.

`<set>/shards/part-*.parquet` with the rows below (image bytes inline, PNG), and
`<set>/manifest.json` with counts per label and the settings used. Synthetic rows carry
split = "synthetic" so they can never be mistaken for real test images.
"""

from __future__ import annotations

import pyarrow as pa

SYNTHETIC_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # "synthetic:<job>:<label>:<index>"
        pa.field("image", pa.binary(), nullable=False),  # PNG bytes
        pa.field("image_format", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("label", pa.string(), nullable=False),  # taxonomy code, as in the corpus
        pa.field("malignant", pa.bool_(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # always "synthetic"
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("attributes_json", pa.string()),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("adapter", pa.string()),  # adapter name or path; null for the base model
        pa.field("num_inference_steps", pa.int32()),
        pa.field("guidance_scale", pa.float32()),
    ]
)
