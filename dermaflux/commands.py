"""The command table: every `dermaflux <command>` and `jobs/<command>.py`, one row each.

A row per stage of the stage table (`dermaflux.stages`) plus the pipeline's: the CLI builds a
subcommand from each row, every `jobs/<name>.py` calls the CLI's `main` with its row's name, and
each row's `run` checks the config (paths and preset before Ray starts, then the cluster's
resources), starts or joins Ray once and runs. Exit codes: 0 done, 2 a problem the user must fix
(found before or while running), 1 the stage failed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable

from dermaflux.checks import check_config, check_resources
from dermaflux.core.artifacts import OutputConflict
from dermaflux.core.config import ConfigError
from dermaflux.core.preflight import capacity_from_ray
from dermaflux.core.progress import open_run_log
from dermaflux.core.runtime import init_ray
from dermaflux.model.config import cache_dir
from dermaflux.pipeline import failed as pipeline_failed
from dermaflux.pipeline import format_summary, run_pipeline
from dermaflux.stages import STAGES, Option, StageSpec

if TYPE_CHECKING:
    from dermaflux.config import DermaFluxConfig

# What the user must fix (a message, no traceback): exit 2.
USER_ERRORS = (ConfigError, OutputConflict, FileNotFoundError, ValueError)


@dataclass(frozen=True)
class Command:
    name: str  # CLI subcommand and jobs/<name>.py
    help: str
    example: str  # shown by `dermaflux <name> --help`
    options: tuple[Option, ...]  # its flags, each setting config fields
    run: Callable[..., dict]  # run(cfg, *, capacity_check=True) -> summary
    show: Callable[[dict], str]  # the summary as the CLI prints it
    failed: Callable[[dict], bool]  # a summary that says part of the work failed (CLI exit 1)


def run_stage(spec: StageSpec, cfg: DermaFluxConfig, *, capacity_check: bool = True) -> dict:
    """Preflight, Ray, then the stage; returns its summary (with the output as the user named it)."""
    check_config(cfg, [spec.name])  # paths and preset: before Ray starts
    if not spec.output:  # no folder of its own (serve): its run log goes to the cache folder
        open_run_log(cache_dir(cfg.model), spec.name)
    if spec.starts_ray is None or spec.starts_ray(cfg):
        init_ray(cfg.ray)
        if capacity_check:
            check_resources(cfg, [spec.name], capacity_from_ray())
    return spec.execute(cfg)


def _show_stage(spec: StageSpec, summary: dict) -> str:
    text = json.dumps(summary, indent=2, default=str)
    return f"{text}\n{spec.headline.format(**summary)}" if spec.headline else text


def _stage_failed(summary: dict) -> bool:
    return bool(summary.get("failed"))


def _stage_command(spec: StageSpec) -> Command:
    return Command(spec.name, spec.help, spec.example, spec.options, run=partial(run_stage, spec),
                   show=partial(_show_stage, spec), failed=_stage_failed)


PIPELINE = Command(
    "pipeline",
    "run every stage in order on one Ray instance (curate, caption, train, generate, evaluate); resumable",
    "dermaflux pipeline --preset tiny --data ../shared/data --out runs/demo",
    (
        Option("--data", ("pipeline.data",), "folder of datasets to curate, one subfolder each "
               "(default: $DERMAFLUX_DATA or ../shared/data)", metavar="DIR"),
        Option("--out", ("pipeline.out",), "run folder (re-run the same command to resume)", metavar="DIR"),
        Option("--stages", ("pipeline.stages",), "comma-separated subset, e.g. curate,caption (default: all)",
               type=lambda text: [s.strip() for s in text.split(",") if s.strip()], metavar="LIST"),
    ),
    run=run_pipeline, show=format_summary, failed=pipeline_failed,
)

COMMANDS: tuple[Command, ...] = (*(_stage_command(spec) for spec in STAGES), PIPELINE)
BY_NAME: dict[str, Command] = {command.name: command for command in COMMANDS}


def get_command(name: str) -> Command:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown command {name!r}; commands: {', '.join(BY_NAME)}") from None


def run(name: str, cfg: DermaFluxConfig, *, capacity_check: bool = True) -> dict:
    """A command by name: a stage, or the whole pipeline."""
    return get_command(name).run(cfg, capacity_check=capacity_check)
