"""Per-batch work of the caption stage on pandas frames (no Ray): what the Ray Data UDFs and the
single-process loop (bench, debugging) both call.

A row that cannot be captioned keeps its place and carries `uncaptioned_reason`; the writer skips
it and the driver lists it in uncaptioned.jsonl, so every corpus image is accounted for.
"""

from __future__ import annotations

import math

import pandas as pd
from pydantic import ValidationError

from dermaflux.caption.extract import attributes_from, decode_image, measure_lesion
from dermaflux.corpus.config import DEFAULT_MAX_PIXELS
from dermaflux.corpus.images import ImageRefused
from dermaflux.lesion.attributes import LesionAttributes
from dermaflux.caption.writers import CaptionRequest, CaptionWriter, caption_seed

EXTRACTED_COLUMNS = ["attributes_json", "extract_flags", "uncaptioned_reason"]
WRITTEN_COLUMNS = ["caption", "caption_writer", "caption_flags"]


def _scale(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _flag(value) -> str:
    return "unknown" if value is None or (isinstance(value, float) and math.isnan(value)) else str(bool(value)).lower()


def extract_row(row: dict, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, list[str], str | None]:
    """(attributes JSON, flags, reason-if-uncaptioned) for one corpus row."""
    if not isinstance(row.get("label"), str):  # null (or NaN from pandas)
        return "", [], (f"no diagnosis: the source says only melanoma={_flag(row.get('melanoma'))}, malignant="
                        f"{_flag(row.get('malignant'))} (a test-only row); a caption names a diagnosis")
    try:
        rgb = decode_image(row["image"], max_pixels)
    except ImageRefused as err:  # empty, not an image, or above curate.max_pixels: the reason says which
        return "", [], f"unreadable image: {err}"
    except Exception as err:  # PIL raises several types for broken bytes
        return "", [], f"unreadable image: {type(err).__name__}"
    measurement = measure_lesion(rgb, _scale(row.get("mm_per_pixel")))
    try:
        attrs = attributes_from(measurement, row)
    except ValidationError as err:
        fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        return "", [], f"attributes invalid ({fields})"
    flags = [] if measurement.mask_found else ["no_lesion_mask"]
    return attrs.to_json(), flags, None


def extract_batch(batch: pd.DataFrame, max_pixels: int = DEFAULT_MAX_PIXELS) -> pd.DataFrame:
    results = [extract_row(row, max_pixels) for row in batch.to_dict("records")]
    batch = batch.copy()
    batch["attributes_json"] = [r[0] for r in results]
    batch["extract_flags"] = [r[1] for r in results]
    batch["uncaptioned_reason"] = [r[2] for r in results]
    return batch


def write_batch(writer: CaptionWriter, batch: pd.DataFrame, run_seed: int) -> pd.DataFrame:
    batch = batch.copy()
    todo = [i for i, reason in enumerate(batch["uncaptioned_reason"]) if not isinstance(reason, str) or not reason]
    requests = [
        CaptionRequest(
            id=batch["id"].iloc[i],
            attributes=LesionAttributes.model_validate_json(batch["attributes_json"].iloc[i]),
            seed=caption_seed(batch["id"].iloc[i], run_seed),
            image=batch["image"].iloc[i] if "image" in batch else None,
        )
        for i in todo
    ]
    written = writer.write(requests) if requests else []
    captions, writers, flags = [""] * len(batch), [""] * len(batch), [list(f) for f in batch["extract_flags"]]
    for i, result in zip(todo, written):
        captions[i], writers[i] = result.caption, result.writer
        flags[i] = flags[i] + result.flags
    batch["caption"], batch["caption_writer"], batch["caption_flags"] = captions, writers, flags
    return batch
