"""The curated corpus on disk: the one definition every later stage reads.

`<corpus>/shards/part-*.parquet` rows (one per kept image) and `<corpus>/manifest.json`.

Rows whose source says only benign or malignant have the label `benign` / `malignant` (taxonomy
level `malignancy`) and are training rows like any other. Rows without even that (`label` null: a
melanoma-vs-rest column's negatives) are test rows only; `malignant` and `melanoma` are null where
the source does not tell. Corpora
written before the `melanoma` column existed lack it: readers derive it from `label`
(`with_melanoma`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

SPLITS = ("train", "val", "test")
MANIFEST_FILE = "manifest.json"
SHARD_DIR = "shards"
NO_DIAGNOSIS = "no_diagnosis"  # the label key of rows without a diagnosis in the manifest's nested counts

CORPUS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # "<source>:<original_id>", unique in the corpus
        pa.field("source", pa.string(), nullable=False),  # reader name, e.g. ham10000
        pa.field("original_id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # encoded bytes as found (JPEG/PNG)
        pa.field("image_format", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("label", pa.string()),  # taxonomy code: mel, nv, ..., scc, or benign/malignant; null: neither known
        pa.field("source_label", pa.string()),  # the label as the source wrote it
        pa.field("malignant", pa.bool_()),  # null: unknown (a melanoma-vs-rest column's negatives)
        pa.field("melanoma", pa.bool_()),  # label == mel where a diagnosis is known; else the source's flag
        pa.field("lesion_id", pa.string()),  # grouping keys for leakage-free splits
        pa.field("patient_id", pa.string()),
        pa.field("split", pa.string(), nullable=False),  # train | val | test
        pa.field("split_origin", pa.string()),  # "official" (kept as published) or "dermaflux"
        pa.field("phash", pa.string()),  # perceptual hash, hex
        pa.field("age", pa.float32()),
        pa.field("sex", pa.string()),
        pa.field("site", pa.string()),  # body site, normalised words ("lower extremity")
        pa.field("skin_type", pa.string()),  # Fitzpatrick I-VI where known
        pa.field("skin_tone", pa.string()),  # a source's coarser tone, with its scale: "fitzpatrick I-II" (DDI)
        pa.field("modality", pa.string()),  # dermoscopic | clinical | total-body crop; null: not told
        pa.field("diagnosis_method", pa.string()),  # e.g. histo, follow_up, consensus, confocal
        pa.field("mm_per_pixel", pa.float32()),  # physical scale where the source gives one
        pa.field("metadata_json", pa.string()),  # every other source field, verbatim
    ]
)


def with_melanoma(table: pa.Table) -> pa.Table:
    """`table` with a `melanoma` column: as stored where the corpus has one, else derived from
    `label` (older corpora), placed after `malignant` as in CORPUS_SCHEMA."""
    label = table.column("label")
    # null label -> null; a bare "malignant" (malignancy-only row) may or may not be a melanoma -> null
    derived = pc.if_else(pc.equal(label, "malignant"), pa.scalar(None, pa.bool_()), pc.equal(label, "mel"))
    if "melanoma" in table.column_names:
        return table.set_column(table.column_names.index("melanoma"), "melanoma",
                                pc.coalesce(table.column("melanoma"), derived))
    where = table.column_names.index("malignant") + 1 if "malignant" in table.column_names else table.num_columns
    return table.add_column(where, pa.field("melanoma", pa.bool_()), derived)


def class_counts(corpus_dir: str | Path, split: str = "train") -> dict[str, int]:
    """Images per diagnosis in one split of a corpus: from its manifest (`by_split_label`, checked
    against the shards when curate wrote it), else counted from the shards. Rows without a diagnosis
    are not a class."""
    corpus_dir = Path(corpus_dir)
    manifest = corpus_dir / MANIFEST_FILE
    if manifest.is_file():
        try:
            by_split = json.loads(manifest.read_text())["by_split_label"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{manifest}: not a corpus manifest (no by_split_label: {err})") from None
        return {label: int(n) for label, n in sorted(by_split.get(split, {}).items()) if label != NO_DIAGNOSIS and n}
    shards = corpus_dir / SHARD_DIR
    if not shards.is_dir() or not any(shards.glob("*.parquet")):
        raise FileNotFoundError(f"{corpus_dir}: not a corpus folder (no {MANIFEST_FILE}, no {SHARD_DIR}/*.parquet)")
    import pyarrow.dataset as ds

    table = ds.dataset(str(shards), format="parquet").to_table(columns=["label", "split"])
    counts: dict[str, int] = {}
    for label, row_split in zip(table["label"].to_pylist(), table["split"].to_pylist()):
        if row_split == split and label is not None:
            counts[label] = counts.get(label, 0) + 1
    return dict(sorted(counts.items()))
