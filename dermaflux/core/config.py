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


# A config is a page of settings: these bounds make a hostile file fail at once, not after minutes
# and gigabytes (a "billion laughs" of YAML aliases builds nothing until something walks it).
MAX_CONFIG_BYTES = 1024 * 1024
MAX_YAML_VALUES = 100_000


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's several-line report as one line: what it was doing, what is wrong, where."""
    if not isinstance(err, yaml.MarkedYAMLError):
        return " ".join(str(err).split())
    mark = err.problem_mark or err.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return "; ".join(part for part in (err.context, err.problem) if part) + where


def _expanded_values(root: yaml.Node, limit: int) -> int:
    """How many values the document holds once every alias is expanded (stops counting past `limit`).

    Aliases share one node, so the count is memoised per node: linear in the file, not in its expansion.
    An alias inside its own anchor (`&a [*a]`) would expand forever: counted as over the limit.
    """
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if sizes.get(id(node)) == 0:  # still being counted: the node contains itself
            return limit + 1
        if id(node) not in sizes:
            sizes[id(node)] = 0
            if isinstance(node, yaml.MappingNode):
                children = [part for pair in node.value for part in pair]
            else:
                children = node.value if isinstance(node, yaml.SequenceNode) else []
            total = 1
            for child in children:
                total += size(child)
                if total > limit:
                    break
            sizes[id(node)] = total
        return sizes[id(node)]

    return size(root)


def load_yaml_text(text: str, where: str):
    """`yaml.safe_load` with the expansion bound; ConfigError (one line, naming `where`) otherwise."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_values(node, MAX_YAML_VALUES) > MAX_YAML_VALUES:
            raise ConfigError(f"{where}: YAML aliases expand to more than {MAX_YAML_VALUES:,} values; "
                              "a config never needs that many")
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML ({_yaml_problem(err)})") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply") from None
    finally:
        loader.dispose()


def read_small_text(path: Path, what: str, max_bytes: int, kind: str = "file", bounded: str = "it") -> str:
    """The UTF-8 text of a small regular file (a config, a token); ConfigError naming `what` when it is
    a folder, missing, a device/FIFO/socket, over `max_bytes` (read no further) or not UTF-8."""
    if path.is_dir():
        raise ConfigError(f"{what} is a folder, not a {kind}")
    if not path.exists():
        raise ConfigError(f"{what} does not exist")
    if not path.is_file():
        raise ConfigError(f"{what} is not a regular file (a device, FIFO or socket)")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(max_bytes + 1)
            if len(raw) > max_bytes:
                size = os.fstat(fh.fileno()).st_size
                raise ConfigError(f"{what} holds {size:,} bytes; {bounded} is at most {max_bytes:,}")
        return raw.decode("utf-8")
    except OSError as err:
        raise ConfigError(f"{what} cannot be read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} is not UTF-8 text (byte {err.start})") from None


def read_yaml(path: Path) -> dict:
    """A config file: a regular file of at most MAX_CONFIG_BYTES of UTF-8 YAML holding a mapping."""
    text = read_small_text(path, f"config file {path}", MAX_CONFIG_BYTES, kind="YAML file", bounded="a config")
    data = load_yaml_text(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_override(text: str) -> dict:
    """`train.steps=300` -> {"train": {"steps": 300}}; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.steps=300")
    key, raw = text.split("=", 1)
    value = load_yaml_text(raw, f"--set {text!r}") if raw != "" else ""
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
    # A preset is a name from PRESET_DIR, never a path: `--preset ../../x` would read any YAML.
    if name not in available_presets():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(available_presets())}")
    merged = deep_merge(read_yaml(PRESET_DIR / f"{name}.yaml"), data)
    merged["preset"] = name
    for text in overrides:
        merged = deep_merge(merged, parse_override(text))
    return name, merged


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
