"""`curate` section: which sources, where the corpus goes, how to dedup and split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, field_validator, model_validator

from dermaflux.core.config import ConfigModel

# Pixels an image may have before it is decoded: the presets train at 512 px and full-size
# dermoscopy is 1-30 MP, so 50 MP leaves room while one decode stays near 150 MB of RGB.
DEFAULT_MAX_PIXELS = 50_000_000
# Bytes an image file may have before it is read: 50 MP of 16-bit RGB is 300 MB uncompressed; a
# dermoscopy JPEG is 1-20 MB. A sparse or endless file is refused from its size, never read.
DEFAULT_MAX_IMAGE_BYTES = 256 * 1024 * 1024
RESERVED_NAME = "internal"  # evaluate's name for the test rows of the sources that also have train rows
SPLIT_WORDS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class SourceSpec:
    """`READER=PATH[,key=value...]`, e.g. `csv=labels.csv,images=imgs,id=file,label=dx`."""

    reader: str
    path: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The source's name in the corpus (ids are `<name>:<original_id>`); `name=` renames it."""
        return self.options.get("name", self.reader)

    @property
    def fixed_split(self) -> str | None:
        """`split=train|val|test`: every row of the source goes to that split (any reader)."""
        return SPLIT_WORDS.get(self.options.get("split", "").strip().lower())

    @property
    def split_column(self) -> str | None:
        """`split_col=COL` (csv): the column holding each row's split. A csv's `split=` that is not a
        split word is read as a column too (the older spelling)."""
        if "split_col" in self.options:
            return self.options["split_col"]
        legacy = self.options.get("split")
        return legacy if legacy and self.fixed_split is None and self.reader == "csv" else None

    @classmethod
    def parse(cls, text: str) -> "SourceSpec":
        head, *rest = [part.strip() for part in str(text).split(",")]
        if "=" not in head or not head.split("=", 1)[1]:
            raise ValueError(f"source {text!r}: expected READER=PATH[,key=value...], e.g. ham10000=/data/ham10000")
        reader, path = (s.strip() for s in head.split("=", 1))
        options = {}
        for part in rest:
            if "=" not in part:
                raise ValueError(f"source {text!r}: option {part!r} is not key=value")
            key, value = (s.strip() for s in part.split("=", 1))
            options[key] = value
        spec = cls(reader, path, options)
        if "split" in options and spec.fixed_split is None and reader != "csv":
            raise ValueError(f"source {text!r}: split={options['split']!r}: expected train, val or test")
        if "split_col" in options and "split" in options:
            raise ValueError(f"source {text!r}: give split=train|val|test (one split for every row) or "
                             "split_col=COLUMN (a split per row), not both")
        return spec


class CurateConfig(ConfigModel):
    sources: list[str] = Field(
        default_factory=list,
        description="source specs READER=PATH[,key=value...]: ham10000, dermamnist, isic, pad-ufes-20, csv",
    )
    out: str | None = Field(None, description="corpus folder: shards/*.parquet, manifest.json, quarantine.csv")
    force: bool = Field(False, description="replace an output folder that holds a different curate run")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of rows without an official split")
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of rows without an official split")
    seed: int = Field(0, description="split assignment seed")
    official_splits: Literal["keep", "resplit"] = Field(
        "keep",
        description="keep: published splits as they are (audited, leaks reported); resplit: ignore them "
        "and split every source grouped by lesion/patient/near-duplicate",
    )
    test_overlap: Literal["drop", "keep"] = Field(
        "drop",
        description="a row of a test-only source (split=test: an external test set) that is a near-duplicate of, or "
        "shares a lesion/patient id with, a row of a training source: drop it from the test set (so external scores "
        "are honest and adding a test set never changes the training rows) or keep it (the leak is then audited as "
        "one). Either way every such pair is listed in test_overlap.csv and counted in the manifest",
    )
    phash_size: int = Field(
        16, ge=4, le=32,
        description="imagehash.phash hash_size (bits = size^2). 8 (64 bits) is too coarse for dermoscopy: on "
        "HAM10000 distinct lesions come within distance 2; at 16, distinct >= 40 and re-encodes/resizes <= 14",
    )
    phash_threshold: int = Field(24, ge=0, description="Hamming distance at or below which two images are duplicates")
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=1,
        description="largest width x height decoded (checked from the header first); larger images are "
        "quarantined, and caption workers refuse them too",
    )
    max_image_bytes: int = Field(
        DEFAULT_MAX_IMAGE_BYTES, ge=1,
        description="largest image file read (its size checked first; devices and FIFOs are refused unread); "
        "larger files are quarantined",
    )
    rows_per_shard: int = Field(1000, ge=1, description="rows per Parquet shard (about; Ray Data may round)")
    batch_size: int = Field(64, ge=1, description="images per Ray Data batch in the per-image tasks")
    scan_batch: int | None = Field(
        None, ge=1, description="images per scan task (None: the corpus over 16 tasks per task slot, between batch_size "
        "and 1024: each task costs Ray ~0.1 s, so 500,000 images in batches of 64 spent more on tasks than on hashing)"
    )
    num_workers: int | None = Field(None, ge=1, description="concurrent per-image Ray tasks (None: as many as fit)")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each per-image task reserves")

    @field_validator("sources")
    @classmethod
    def _parse_specs(cls, sources: list[str]) -> list[str]:
        names = []
        for text in sources:
            names.append(SourceSpec.parse(text).name)
        if RESERVED_NAME in names:
            raise ValueError(f"source name {RESERVED_NAME!r} is reserved: evaluate calls the test rows of the training "
                             "sources the internal test set; pick another with name=...")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"source name(s) {', '.join(repeated)} given twice; add name=... to tell them apart")
        return sources

    @model_validator(mode="after")
    def _fractions(self) -> "CurateConfig":
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction} leaves no train rows")
        return self

    @property
    def fractions(self) -> dict[str, float]:
        return {"train": 1.0 - self.val_fraction - self.test_fraction, "val": self.val_fraction, "test": self.test_fraction}
