"""Configuration machinery: the base class every section derives from, YAML layering, errors.

The sections live beside their stages (`dermaflux/<stage>/config.py`) and the root model that
holds them in `dermaflux/config.py`; this module knows none of them, so any section can import it.
Precedence: field defaults < preset YAML (`dermaflux/presets/<name>.yaml`) < user YAML
(`--config`) < `--set a.b=value` < stage flags.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict

PRESET_DIR = Path(__file__).resolve().parents[1] / "presets"


class ConfigModel(BaseModel):
    """Unknown keys are errors and assignments are validated, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ConfigError(ValueError):
    """A config that cannot run, with the field path and the reason."""


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def deep_merge(base: dict, update: dict) -> dict:
    """`update` over `base`, recursing into mappings present in both; neither input is changed."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: Path) -> dict:
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
    return nested(key.strip(), value)


def nested(field_path: str, value) -> dict:
    """`a.b.c`, v -> {"a": {"b": {"c": v}}}."""
    out: dict = {}
    node = out
    parts = field_path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def layered(preset: str | None, config_file: str | os.PathLike | None, overrides=()) -> tuple[str, dict]:
    """(preset name, the merged dict) of preset < file < `--set` overrides, before validation."""
    data: dict = read_yaml(Path(config_file)) if config_file is not None else {}
    name = preset or data.get("preset") or "tiny"
    preset_path = PRESET_DIR / f"{name}.yaml"
    if not preset_path.exists():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(available_presets())}")
    merged = deep_merge(read_yaml(preset_path), data)
    merged["preset"] = name
    for text in overrides:
        merged = deep_merge(merged, parse_override(text))
    return name, merged


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
