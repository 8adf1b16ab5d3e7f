"""Check a config before any stage starts: paths, preset, and what each stage asks of the cluster.

These checks know the stages, so they live beside the stage table (`dermaflux.stages`): each
reads a stage's inputs, output and demands from its row. What the cluster can give and how a
demand is compared with it is the ground floor's (`core.preflight`). A wrong path, an unknown
preset or a GPU count no node can satisfy is reported up front, all problems at once, naming the
config field.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dermaflux.core.config import available_presets
from dermaflux.core.preflight import Capacity, demand_problems, path_problem, raise_problems
from dermaflux.core.storage import local_path
from dermaflux.stages import get_stage

if TYPE_CHECKING:
    from dermaflux.config import DermaFluxConfig


def resource_problems(cfg: DermaFluxConfig, stages: list[str], capacity: Capacity) -> list[str]:
    problems = []
    for stage in stages:
        spec = get_stage(stage)
        problems += demand_problems(stage, spec.demands(spec.section_of(cfg)), capacity)
    return problems


def path_problems(cfg: DermaFluxConfig, stages: list[str], produced: set[str] = frozenset()) -> list[str]:
    """Inputs that must exist now (those not made by an earlier stage of the same run) and outputs that are set."""
    problems = []
    for stage in stages:
        spec = get_stage(stage)
        section = spec.section_of(cfg)
        if spec.output and getattr(section, spec.output) in (None, ""):
            problems.append(f"{spec.section}.{spec.output}: not set; give the output folder (--out or --set)")
        for needed in spec.inputs:
            if needed.made_by in produced:
                continue
            field_path = f"{spec.section}.{needed.field}"
            value = getattr(section, needed.field)
            if value in (None, "", []):
                if needed.required:
                    source = f"the {needed.made_by} stage's output folder" if needed.made_by else "at least one"
                    problems.append(f"{field_path}: not set; give {source}")
                continue
            for i, item in enumerate(value if needed.many else [value]):
                where = f"{field_path}[{i}]" if needed.many else field_path
                problem = _input_problem(where, item, needed.path_of)
                if problem:
                    problems.append(problem)
    return problems


def _input_problem(where: str, item: str, path_of) -> str | None:
    try:
        path = path_of(item) if path_of else item
    except ValueError as err:  # the spec's own parser says what is wrong with it
        return f"{where}: {err}"
    return path_problem(where, path) if path else f"{where}: {item!r} names no path"


def model_problems(cfg: DermaFluxConfig) -> list[str]:
    problems = []
    if cfg.preset not in available_presets():
        problems.append(f"preset: unknown preset {cfg.preset!r}; available: {', '.join(available_presets())}")
    pretrained = cfg.model.pretrained
    looks_local = pretrained.startswith(("/", "./", "../", "~", "file://"))
    if looks_local and not Path(local_path(pretrained)).expanduser().exists():
        problems.append(f"model.pretrained: local model folder {pretrained} does not exist")
    return problems


def check_config(cfg: DermaFluxConfig, stages: list[str], *, produced: set[str] = frozenset(), capacity: Capacity | None = None) -> None:
    """Raise ConfigError listing every problem, or return when the stages can start."""
    problems = model_problems(cfg) + path_problems(cfg, stages, produced)
    if capacity is not None:
        problems += resource_problems(cfg, stages, capacity)
    raise_problems(", ".join(stages), problems)


def check_resources(cfg: DermaFluxConfig, stages: list[str], capacity: Capacity) -> None:
    """Once Ray is up: only what the cluster can give (the paths were checked before it started)."""
    raise_problems(", ".join(stages), resource_problems(cfg, stages, capacity))


def check_stages_in_order(cfg: DermaFluxConfig, stages: list[str]) -> None:
    """A pipeline run: each stage's inputs may come from the stages before it; all problems at once."""
    problems = model_problems(cfg)
    produced: set[str] = set()
    for stage in stages:
        problems += path_problems(cfg, [stage], produced)
        produced.add(stage)
    raise_problems(", ".join(stages), problems)
