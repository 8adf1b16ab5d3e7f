"""The `pipeline` config section: which stages `dermaflux pipeline` runs, where, and at what size.

Defaults are the tiny demo (`bash scripts/demo.sh`): stage settings below are merged over the
stages' own sections before anything runs, so the whole demo finishes in minutes on 2 CPU cores
while a single-stage run keeps the stage's own defaults.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from dermaflux.configbase import ConfigModel

StageName = Literal["curate", "caption", "train", "generate", "evaluate"]
ALL_STAGES: list[str] = ["curate", "caption", "train", "generate", "evaluate"]

# Stage sections whose settings the pipeline may override (the generate stage's section is `synth`).
OVERRIDABLE_SECTIONS = ("curate", "caption", "train", "synth", "evaluate")


def _tiny_demo_overrides() -> dict[str, dict[str, Any]]:
    # Sizes measured on a 2-core machine to keep the whole demo short (see README, "Pipeline").
    return {
        "train": {"steps": 120, "checkpoint_every": 40, "validate_every": 120, "max_images": 1024,
                  "vae_fit": {"steps": 150, "max_images": 1024}},
        "synth": {"per_class": 8},
        "evaluate": {"fractions": [1.0], "ratios": [0.0, 1.0], "seeds": 1, "epochs": 2},
    }


class PipelineConfig(ConfigModel):
    data: str | None = Field(
        None, description="folder holding the datasets to curate (one subfolder each); default $DERMAFLUX_DATA or ../shared/data"
    )
    out: str | None = Field(None, description="run folder: one subfolder per stage, the pipeline's markers and summary")
    stages: list[StageName] = Field(default_factory=lambda: list(ALL_STAGES), description="stages to run, in pipeline order")
    stage_settings: dict[str, dict[str, Any]] = Field(
        default_factory=_tiny_demo_overrides,
        description="per-section settings merged over the stage sections for a pipeline run (e.g. train: {steps: 120})",
    )

    @field_validator("stages")
    @classmethod
    def _in_pipeline_order(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"stages listed twice: {value}")
        return sorted(value, key=ALL_STAGES.index)

    @field_validator("stage_settings")
    @classmethod
    def _known_sections(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        unknown = sorted(set(value) - set(OVERRIDABLE_SECTIONS))
        if unknown:
            raise ValueError(f"unknown sections {unknown}; expected some of {list(OVERRIDABLE_SECTIONS)}")
        return value


CONFIG = PipelineConfig
