"""`curate` section: which sources, where the corpus goes, how to dedup and split."""

from __future__ import annotations

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
    num_workers: int | None = Field(None, ge=1, description="concurrent per-image Ray tasks (None: as many as fit)")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each per-image task reserves")

    @field_validator("sources")
    @classmethod
    def _parse_specs(cls, sources: list[str]) -> list[str]:
        from dermaflux.corpus.sources.base import SourceSpec

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
