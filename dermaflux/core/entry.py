"""The one entry path: `dermaflux <stage>` and `jobs/<stage>.py` both end in `run`.

`run` checks the config (paths and preset before Ray starts, then the cluster's resources),
starts or joins Ray once, stages cloud inputs and outputs through local folders, and calls the
stage. Exit codes: 0 done, 2 a problem the user must fix (found before or while running),
1 the stage failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from typing import TYPE_CHECKING

from dermaflux.core.artifacts import OutputConflict
from dermaflux.core.config import ConfigError

if TYPE_CHECKING:
    from dermaflux.config import DermaFluxConfig
    from dermaflux.stages import StageSpec

log = logging.getLogger("dermaflux")

# What the user must fix (a message, no traceback): exit 2.
USER_ERRORS = (ConfigError, OutputConflict, FileNotFoundError, ValueError)


def add_config_arguments(parser: argparse.ArgumentParser, *, config_required: bool = False) -> None:
    """`--preset`, `--config`, `--set`: how every entry point picks its configuration."""
    parser.add_argument("--preset", default=None, help="named preset: tiny (CPU, the default) or flux-dev")
    parser.add_argument("--config", default=None, required=config_required, metavar="YAML",
                        help="config file (sections as in the preset; overrides it)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field, e.g. --set train.steps=300 (repeatable)")


def run_stage(name: str, cfg: DermaFluxConfig, *, capacity_check: bool = True) -> dict:
    """Preflight, Ray, then the stage; returns its summary (with the output as the user named it)."""
    from dermaflux.core.preflight import capacity_from_ray, check_config
    from dermaflux.core.runtime import init_ray
    from dermaflux.stages import get_stage

    spec = get_stage(name)
    check_config(cfg, [name])  # paths and preset: before Ray starts
    if not spec.output:  # no folder of its own (serve): its run log goes to the cache folder
        from dermaflux.core.progress import open_run_log
        from dermaflux.model.config import cache_dir

        open_run_log(cache_dir(cfg.model), name)
    init_ray(cfg.ray)
    if capacity_check:
        check_config(cfg, [name], capacity=capacity_from_ray())
    return execute(spec, cfg)


def execute(spec: StageSpec, cfg: DermaFluxConfig) -> dict:
    """The stage's run function with cloud URIs staged through local folders (see core.storage)."""
    from dermaflux.core.storage import staged_section

    section = spec.section_of(cfg)
    inputs = tuple(needed.field for needed in spec.inputs if needed.remote_ok)
    with staged_section(section, inputs, spec.output) as original:
        summary = spec.run_function()(cfg)
    if spec.output and spec.output in original:  # report the URI the user gave, not the staging folder
        summary = {**summary, "out": original[spec.output]}
    return summary


def run(name: str, cfg: DermaFluxConfig, *, capacity_check: bool = True) -> dict:
    """A stage by name, or the whole pipeline."""
    if name == "pipeline":
        from dermaflux.pipeline import run_pipeline

        return run_pipeline(cfg, capacity_check=capacity_check)
    return run_stage(name, cfg, capacity_check=capacity_check)


def _fail(stage: str, message: str, code: int) -> int:
    print(f"dermaflux job {stage}: error: {message}", file=sys.stderr, flush=True)
    print(json.dumps({"stage": stage, "status": "failed", "error": message}), flush=True)
    return code


def run_job(stage: str, argv: list[str] | None = None) -> int:
    """What every `jobs/<stage>.py` does: parse, run, print one JSON summary line (the job's result)."""
    from dermaflux.config import load_config

    parser = argparse.ArgumentParser(prog=f"jobs/{stage}.py", description=f"Run the DermaFlux {stage} stage as a Ray job.")
    add_config_arguments(parser, config_required=True)
    parser.add_argument("--skip-resource-check", action="store_true",
                        help="do not compare the stage's CPU/GPU requests with the cluster's nodes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.time()
    try:
        cfg = load_config(args.preset, args.config, args.overrides)
        summary = run(stage, cfg, capacity_check=not args.skip_resource_check)
    except USER_ERRORS as err:
        return _fail(stage, str(err), 2)
    except Exception as err:  # the stage failed: keep the traceback in the job log
        traceback.print_exc()
        return _fail(stage, f"{type(err).__name__}: {err}", 1)
    if stage == "pipeline":
        from dermaflux.pipeline import format_summary

        print(format_summary(summary), file=sys.stderr, flush=True)
    result = {"stage": stage, "status": "succeeded", "seconds": round(time.time() - started, 1), **summary}
    print(json.dumps(result, default=str), flush=True)
    return 0


def main(stage: str) -> None:
    sys.exit(run_job(stage))
