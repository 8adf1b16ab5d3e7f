"""What every `jobs/<stage>.py` does: parse, validate, run the stage, print a JSON summary.

Runs as the entrypoint of a Ray job (`ray job submit --working-dir . -- python jobs/train.py
--config run.yaml`): Ray sets RAY_ADDRESS, so init_ray joins the job's cluster. Exit codes:
0 done, 2 a config problem found before anything ran, 1 the stage failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback

log = logging.getLogger("dermaflux.job")


def build_parser(stage: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"jobs/{stage}.py", description=f"Run the DermaFlux {stage} stage as a Ray job."
    )
    parser.add_argument("--config", required=True, metavar="YAML", help="config file (preset, sections, paths)")
    parser.add_argument("--preset", default=None, help="named preset, overriding the file's `preset:`")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one field, e.g. --set train.steps=300 (repeatable)",
    )
    parser.add_argument("--skip-resource-check", action="store_true",
                        help="do not compare the stage's CPU/GPU requests with the cluster's nodes")
    return parser


def _fail(stage: str, message: str, code: int) -> int:
    print(f"dermaflux job {stage}: error: {message}", file=sys.stderr, flush=True)
    print(json.dumps({"stage": stage, "status": "failed", "error": message}), flush=True)
    return code


def run_stage_job(stage: str, argv: list[str] | None = None) -> int:
    from dermaflux.artifacts import OutputConflict
    from dermaflux.config import ConfigError, load_config
    from dermaflux.ray_runtime import init_ray
    from dermaflux.remote_paths import staged_section
    from dermaflux.stage_registry import get_stage
    from dermaflux.validate import capacity_from_ray, check_config

    args = build_parser(stage).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = get_stage(stage)
    if not spec.available():
        return _fail(stage, f"the {stage} stage is not available in this install ({spec.module} is missing)", 2)
    try:
        cfg = load_config(args.preset, args.config, args.overrides)
        check_config(cfg, [stage])  # paths and preset: before Ray starts
        init_ray(cfg.ray)
        if not args.skip_resource_check:
            check_config(cfg, [stage], capacity=capacity_from_ray())
    except ConfigError as err:
        return _fail(stage, str(err), 2)

    started = time.time()
    try:
        section = spec.section_of(cfg)
        with staged_section(section, spec.inputs, spec.output) as original:
            summary = spec.run(cfg)
        if spec.output in original:  # report the URI the user gave, not the staging folder
            summary = {**summary, "out": original[spec.output]}
    except (ConfigError, OutputConflict, FileNotFoundError) as err:
        return _fail(stage, str(err), 2)
    except Exception as err:  # the stage failed: keep the traceback in the job log
        traceback.print_exc()
        return _fail(stage, f"{type(err).__name__}: {err}", 1)
    result = {"stage": stage, "status": "succeeded", "seconds": round(time.time() - started, 1), **summary}
    print(json.dumps(result, default=str), flush=True)
    return 0


def main(stage: str) -> None:
    sys.exit(run_stage_job(stage))


def run_pipeline_job(argv: list[str] | None = None) -> int:
    from dermaflux.artifacts import OutputConflict
    from dermaflux.config import ConfigError, load_config
    from dermaflux.pipeline import format_summary, run_pipeline

    parser = build_parser("pipeline")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.preset, args.config, args.overrides)
        summary = run_pipeline(cfg, capacity_check=not args.skip_resource_check)
    except (ConfigError, OutputConflict, FileNotFoundError) as err:
        return _fail("pipeline", str(err), 2)
    except Exception as err:
        traceback.print_exc()
        return _fail("pipeline", f"{type(err).__name__}: {err}", 1)
    print(format_summary(summary), file=sys.stderr, flush=True)
    print(json.dumps({"stage": "pipeline", "status": "succeeded", **summary}, default=str), flush=True)
    return 0


def main_pipeline() -> None:
    sys.exit(run_pipeline_job())
