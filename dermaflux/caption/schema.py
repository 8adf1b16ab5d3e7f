"""The captioned corpus on disk: what training (and the serve endpoint's writer) agree on.

`<captions>/shards/part-*.parquet`: every corpus column (see corpus.schema) plus the ones below.
Images that got no caption are not in the shards; they are listed with their reason in
`<captions>/uncaptioned.jsonl`, and `<captions>/manifest.json` reconciles the counts.
"""

from __future__ import annotations

import pyarrow as pa

from dermaflux.corpus.schema import CORPUS_SCHEMA

CAPTION_FIELDS = [
    pa.field("attributes_json", pa.string(), nullable=False),  # measured + metadata attributes (JSON object)
    pa.field("caption", pa.string(), nullable=False),
    pa.field("caption_writer", pa.string(), nullable=False),  # template | llm
    pa.field("caption_flags", pa.list_(pa.string())),  # e.g. llm_fallback:too_long, no_lesion_mask
]

CAPTION_SCHEMA = pa.schema(list(CORPUS_SCHEMA) + CAPTION_FIELDS)
