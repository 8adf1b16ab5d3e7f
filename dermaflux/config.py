"""The configuration: one typed root model of every section, and `load_config`.

A leaf: it imports the section models and `core.config`, nothing of DermaFlux above them (what
depends on the stage table, such as the pipeline's stage names, is checked by the planner).

Each section is a class in its stage's package (`corpus/config.py`, ...); the defaults are the
tiny preset. `presets/tiny.yaml` holds the demo's pipeline sizes and `presets/flux-dev.yaml`
what differs for FLUX.1-dev: a preset is data, in one place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from dermaflux.caption.config import CaptionConfig
from dermaflux.core.config import ConfigError, ConfigModel, deep_merge, layered, nested, read_yaml
from dermaflux.core.runtime import RayConfig
from dermaflux.corpus.config import CurateConfig
from dermaflux.evaluate.config import EvaluateConfig
from dermaflux.model.config import ModelConfig
from dermaflux.synth.config import SynthConfig
from dermaflux.train.config import TrainConfig

__all__ = ["ConfigError", "DermaFluxConfig", "PipelineConfig", "load_config", "stage_sections"]

# Sections every stage reads; each other section belongs to the stage(s) that the stage table names.
SHARED_SECTIONS = ("model", "ray")


class PipelineConfig(ConfigModel):
    """`dermaflux pipeline`: which stages run, on which data, into which run folder, at what size.

    The stage names and their order are the stage table's (`dermaflux.stages`): the pipeline's
    planner checks `stages` against it, so this model imports nothing above the configuration.
    """

    data: str | None = Field(
        None, description="folder holding the datasets to curate (one subfolder each); default $DERMAFLUX_DATA or ../shared/data"
    )
    out: str | None = Field(None, description="run folder: one subfolder per stage, the pipeline's markers and summary")
    stages: list[str] | None = Field(None, description="stages to run, in pipeline order (default: every pipeline stage)")
    stage_settings: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per-section settings merged over the stage sections for a pipeline run only "
        "(the tiny preset's demo sizes, e.g. train: {steps: 120})",
    )

    @field_validator("stage_settings")
    @classmethod
    def _known_sections(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        sections = stage_sections()
        unknown = sorted(set(value) - set(sections))
        if unknown:
            raise ValueError(f"unknown sections {unknown}; expected some of {sections}")
        return value


class DermaFluxConfig(ConfigModel):
    """Every setting of a run. Stages read their own section; `model` and `ray` are shared."""

    preset: str = Field("tiny", description="the preset this config started from")
    model: ModelConfig = Field(default_factory=ModelConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)
    caption: CaptionConfig = Field(default_factory=CaptionConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig, description="synthesis: the `generate` and `serve` stages")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)


def stage_sections() -> list[str]:
    """The sections a stage owns (what `pipeline.stage_settings` may tune): all but the shared ones."""
    return sorted(set(DermaFluxConfig.model_fields) - {"preset", "pipeline", *SHARED_SECTIONS})


def load_config(
    preset: str | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    extra: dict | None = None,
) -> DermaFluxConfig:
    """Preset < `config_file` < `--set` overrides < `extra` (stage flags as {section: {field: value}}).

    A validation error names each field path and where its value came from.
    """
    name, merged = layered(preset, config_file, overrides)
    if extra:
        merged = deep_merge(merged, extra)
    try:
        return DermaFluxConfig.model_validate(merged)
    except ValidationError as err:
        origins = _origins(name, config_file, overrides, extra)
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r}; from {_origin_of(loc, origins)})")
        raise ConfigError("invalid config:\n" + "\n".join(lines)) from None


def flag_settings(settings: dict[str, Any]) -> dict:
    """{"train.steps": 7, ...} (what stage flags set) -> the nested dict `load_config(extra=...)` takes."""
    out: dict = {}
    for path, value in settings.items():
        out = deep_merge(out, nested(path, value))
    return out


def _origins(preset: str, config_file, overrides, extra) -> list[tuple[str, str]]:
    """(field path prefix, where it was set), most specific source last."""
    origins: list[tuple[str, str]] = [("", f"preset {preset}")]
    if config_file is not None:
        origins += [(path, f"file {config_file}") for path in _leaf_paths(read_yaml(Path(config_file)))]
    for text in overrides:
        origins.append((text.split("=", 1)[0].strip(), f"--set {text}"))
    for path in _leaf_paths(extra or {}):
        origins.append((path, "a command-line flag"))
    return origins


def _leaf_paths(tree: dict, prefix: str = "") -> list[str]:
    paths = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        paths += _leaf_paths(value, path + ".") if isinstance(value, dict) and value else [path]
    return paths


def _origin_of(loc: str, origins: list[tuple[str, str]]) -> str:
    found = origins[0][1]
    for prefix, origin in origins:
        if prefix == "" or loc == prefix or loc.startswith(prefix + ".") or prefix.startswith(loc + "."):
            found = origin
    return found
