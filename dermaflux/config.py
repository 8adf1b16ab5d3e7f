"""Typed configuration: one model per stage, named presets as YAML data, `--set` overrides.

Precedence: field defaults < preset YAML (`dermaflux/presets/<name>.yaml`) < user YAML
(`--config`) < `--set a.b=value`. Validation errors name the field path and where it came from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from dermaflux.configbase import ConfigModel
from dermaflux.model.spec import TinyFluxSpec

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A config that cannot run, with the field path and the reason."""


class ModelConfig(ConfigModel):
    pretrained: str = Field(
        "builtin:tiny",
        description="hub id (black-forest-labs/FLUX.1-dev), a local diffusers folder, or builtin:tiny",
    )
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    resolution: int = Field(64, description="training and default generation side, multiple of 16")
    tiny: TinyFluxSpec = Field(default_factory=TinyFluxSpec, description="sizes when pretrained is builtin:tiny")
    cache_dir: str | None = Field(None, description="where builtin models are built; default $DERMAFLUX_CACHE")
    train_guidance: float = Field(1.0, description="guidance embedding value while training (FLUX.1-dev LoRAs: 1.0)")
    guidance_scale: float = Field(3.5, description="inference guidance")
    num_inference_steps: int = 20
    max_sequence_length: int = Field(512, description="T5 tokens")


class RayConfig(ConfigModel):
    address: str | None = Field(
        None, description="cluster address; None uses RAY_ADDRESS when set (Ray jobs), else a new local instance"
    )
    num_cpus: int | None = Field(None, description="CPUs of the local instance (None: all)")
    num_gpus: int | None = None


def _stage_sections() -> dict[str, type[ConfigModel]]:
    """Stage config models, imported here so each stage owns its own module."""
    sections: dict[str, type[ConfigModel]] = {}
    import importlib

    for name, module in STAGE_CONFIG_MODULES.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name is None or not (module == err.name or module.startswith(err.name + ".")):
                raise  # a real import error inside the stage's config module
            continue
        sections[name] = mod.CONFIG
    return sections


# section name -> module defining CONFIG (a ConfigModel subclass); absent modules are skipped.
STAGE_CONFIG_MODULES = {
    "curate": "dermaflux.corpus.config",
    "caption": "dermaflux.caption.config",
    "train": "dermaflux.train.config",
    "synth": "dermaflux.synth.config",
    "evaluate": "dermaflux.evaluate.config",
    "pipeline": "dermaflux.pipeline_config",
}


def _build_root_model() -> type[ConfigModel]:
    from pydantic import create_model

    fields: dict[str, Any] = {
        "preset": (str, "tiny"),
        "model": (ModelConfig, Field(default_factory=ModelConfig)),
        "ray": (RayConfig, Field(default_factory=RayConfig)),
    }
    for name, model in _stage_sections().items():
        fields[name] = (model, Field(default_factory=model))
    return create_model("DermaFluxConfig", __base__=ConfigModel, **fields)


DermaFluxConfig = _build_root_model()


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_override(text: str) -> dict:
    """`train.steps=300` -> {"train": {"steps": 300}}; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.steps=300")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(
    preset: str | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    extra: dict | None = None,
):
    """Build the effective config. `extra` holds CLI flags already mapped to field paths."""
    data: dict = {}
    if config_file is not None:
        data = _read_yaml(Path(config_file))
    name = preset or data.get("preset") or "tiny"
    preset_path = PRESET_DIR / f"{name}.yaml"
    if not preset_path.exists():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(available_presets())}")
    merged = _deep_merge(_read_yaml(preset_path), data)
    merged["preset"] = name
    for text in overrides:
        merged = _deep_merge(merged, parse_override(text))
    if extra:
        merged = _deep_merge(merged, extra)
    try:
        return DermaFluxConfig.model_validate(merged)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
        source = f" (preset {name}" + (f", file {config_file}" if config_file else "") + ")"
        raise ConfigError(f"invalid config{source}:\n" + "\n".join(lines)) from None


def dump_config(cfg) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_effective_config(cfg, out_dir: str | os.PathLike) -> Path:
    """Each run writes the config it actually used beside its outputs."""
    from dermaflux.artifacts import atomic_write_text

    return atomic_write_text(Path(out_dir) / "config.yaml", dump_config(cfg))


def cache_dir(model_cfg: ModelConfig | None = None) -> Path:
    if model_cfg is not None and model_cfg.cache_dir:
        return Path(model_cfg.cache_dir).expanduser()
    return Path(os.environ.get("DERMAFLUX_CACHE", Path.home() / ".cache" / "dermaflux")).expanduser()
