"""The `evaluate` section: which classifiers to train on which mixes of real and synthetic images.

Defaults are the tiny preset (a reduced grid that finishes in minutes on a 2-core CPU);
flux-dev.yaml sets the reference protocol (sizes 2,500-10,000, ratios 1:0-1:4, ten seeds,
ResNeXt and ViT at 224 px).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from dermaflux.core.config import ConfigModel

# binary: malignant vs benign; melanoma: melanoma vs every other diagnosis; multiclass: the diagnosis code.
Task = Literal["binary", "melanoma", "multiclass"]
Adjustment = Literal["holm", "benjamini-hochberg"]


class EvaluateConfig(ConfigModel):
    corpus: str | None = Field(None, description="curated corpus folder (shards/*.parquet + manifest.json)")
    synthetic: str | None = Field(None, description="synthetic set folder (shards/*.parquet); None: real-only grid")
    captions: str | None = Field(
        None, description="caption folder of the same corpus (optional): the test images' skin tones come from its "
        "measured attributes; without it (or for an image it lacks) they are measured here, about 0.15 s per image"
    )
    out: str | None = Field(None, description="report folder: report.html, report.md, results.json, cells/")

    # The protocol grid: every combination of these is one cell.
    sizes: list[int] | None = Field(
        None, description="real training-set sizes in images (reference: 2500,5000,7500,10000); overrides fractions"
    )
    fractions: list[float] = Field(
        [0.25, 1.0], description="fractions of the real train split, used when sizes is None"
    )
    ratios: list[float] = Field(
        [0.0, 1.0], description="synthetic images added per real image (1:x); 0 is the real-only baseline"
    )
    seeds: int = Field(2, ge=1, description="seeds per cell (subsample, init, order)")
    models: list[str] = Field(["resnet18"], description="timm model names, e.g. resnext50_32x4d, vit_small_patch16_224")
    tasks: list[Task] = Field(
        ["binary"], description="binary: malignant vs benign; melanoma: melanoma vs rest; multiclass: the diagnosis"
    )
    primary_task: Task | None = Field(
        None, description="the task the verdict lines are about (None: the first of tasks); named in the report"
    )
    synthetic_only: bool = Field(False, description="also train on synthetic images alone (as many as the real set)")
    controls: bool = Field(
        False, description="add the positive control (held-back real train images passed as synthetic), the "
        "negative control (the same images, labels shuffled) and, with a synthetic set, the matched control (real "
        "images drawn to the synthetic images' class mix, duplicated where a class runs out) at every non-zero ratio"
    )

    # Training of one cell. A fixed number of optimiser steps keeps compute equal across cells: with a
    # fixed number of epochs, 1:x synthetic buys (1+x) times the steps and confounds data with compute.
    steps: int = Field(
        200, ge=0, description="optimiser steps per cell, the same for every cell; 0: train `epochs` epochs instead"
    )
    validations: int = Field(
        4, ge=1, description="steps mode: val checks, evenly spaced; the best by val AUROC is kept"
    )
    epochs: int = Field(3, ge=1, description="epochs per cell when steps is 0")
    patience: int = Field(2, ge=1, description="epochs mode: early stopping after this many epochs without val gain")
    image_size: int = Field(32, ge=16, description="classifier input side in pixels")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    # HAM10000 is 84% benign: unbalanced short runs predict the majority class (balanced accuracy
    # stuck at 0.5 while AUROC is ~0.78), so inverse-frequency loss weights are the default.
    balancing: Literal["none", "sampler", "loss"] = Field(
        "loss", description="class balancing: weighted sampler, inverse-frequency loss weights, or none"
    )
    pretrained: bool = Field(
        True, description="use timm pretrained weights when they are already in the local cache; never downloads"
    )
    max_test_images: int | None = Field(None, description="cap on the images of each test set (None: all)")
    # DeLong's variance needs two images of each class; below that a test set/task pair is not scored.
    min_test_per_class: int = Field(
        2, ge=1, description="a test set scores a task only when at least two of its classes have this many "
        "images; otherwise it is reported as not scorable for the task (counts, no metric, Δ or verdict)"
    )

    # Paired statistics (recomputed from the saved predictions at every report).
    bootstrap: int = Field(2000, ge=100, description="paired bootstrap resamples (test images and seeds)")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="two-sided level of the CIs and tests")
    power: float = Field(0.8, gt=0, lt=1, description="power of the resolvable difference")
    adjustment: Adjustment = Field("holm", description="multiple-comparison control across the grid")

    # Results by subgroup (evaluate/subgroups.py).
    subgroup_attributes: list[Literal["skin_tone", "fitzpatrick", "site", "sex", "age_band", "source", "modality"]] = (
        Field(["skin_tone", "fitzpatrick", "site", "sex", "age_band", "source", "modality"],
              description="test-image attributes the results are broken down by"))
    subgroup_min_per_class: int = Field(
        10, ge=1, description="a subgroup with fewer test images than this in some class is 'not resolvable': "
        "counted, not scored")

    report_only: bool = Field(
        False, description="train nothing: write the report from the cells already finished in `out`"
    )

    # Parallelism: each cell is one Ray task.
    parallel_cells: int = Field(2, ge=1, description="cells running at once")
    cpus_per_cell: float = Field(1.0, gt=0, description="CPUs (and torch threads) reserved per cell")
    gpus_per_cell: float = Field(0.0, ge=0)

    # Quality and memorisation checks of the synthetic set.
    quality: bool = Field(True, description="FID/KID, precision/recall and the memorisation check")
    quality_k: int = Field(3, ge=1, description="k of the k-NN manifolds (Kynkaenniemi et al. 2019)")
    kid_subset_size: int = Field(100, ge=2)
    # Calibrated on HAM10000 (224 px): nearest distinct lesions (val vs train) are >= 52 bits apart
    # in the 256-bit pHash and correlate <= 0.977 in 32 px grey pixels; resized (64-160 px) and
    # JPEG-recompressed (q50-85) copies stay within 22 bits and above 0.987. Either test flags.
    near_copy_phash_max: int = Field(
        32, ge=0, le=256, description="near-copy: 256-bit pHash within this Hamming distance of a train image, or"
    )
    near_copy_pixel_corr_min: float = Field(
        0.985, gt=0, le=1, description="...32 px grey pixels correlating at least this much with one"
    )
    grid_images_per_class: int = Field(6, ge=1, description="images per class in the report's real/synthetic grids")
    adherence: bool = Field(
        True, description="requested vs measured attributes of the synthetic images (in the assessment: needs quality)"
    )
    adherence_max_images: int = Field(
        500, ge=1, description="synthetic images measured for adherence (a seeded sample when the set is larger)"
    )

    @field_validator("fractions")
    @classmethod
    def _fractions_in_range(cls, value: list[float]) -> list[float]:
        for f in value:
            if not 0 < f <= 1:
                raise ValueError(f"each fraction must be in (0, 1], got {f}")
        return sorted(set(value))

    @field_validator("ratios")
    @classmethod
    def _ratios_non_negative(cls, value: list[float]) -> list[float]:
        for r in value:
            if r < 0:
                raise ValueError(f"each ratio must be >= 0, got {r}")
        return sorted(set(value))

    @model_validator(mode="after")
    def _needs_something_to_train(self):
        if not self.models:
            raise ValueError("models: give at least one timm model name")
        if not self.tasks:
            raise ValueError("tasks: give binary, melanoma and/or multiclass")
        if self.primary_task is not None and self.primary_task not in self.tasks:
            raise ValueError(f"primary_task {self.primary_task!r} is not one of tasks {self.tasks}")
        return self

    @property
    def main_task(self) -> str:
        return self.primary_task or self.tasks[0]
