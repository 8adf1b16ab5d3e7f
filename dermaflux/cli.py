"""`dermaflux <command>`: one subcommand per row of the command table (each stage, and `pipeline`).

Each subcommand takes the shared `--preset/--config/--set` and its row's flags (each one a config
field, see `dermaflux.stages`), loads the config and calls the row's `run`. `jobs/<command>.py`
call this `main` with `job=True`: the same parser and path, `--config` required, one JSON result
line for the Ray job's log. `dermaflux model random` is a tool, not a command: no config, no Ray.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback

from dermaflux.commands import COMMANDS, USER_ERRORS, Command, get_command

log = logging.getLogger("dermaflux")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the example's line as written; never breaks a word such as `csv=FILE` across lines."""

    def _split_lines(self, text, width):
        import textwrap

        return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)


MODEL_RANDOM_HELP = ("write a Flux pipeline with seeded random weights in the Hugging Face layout, "
                     "for full-size runs without the hub")
MODEL_RANDOM_EXAMPLE = ("dermaflux model random --like flux-dev --out models/flux-dev-random\n"
                        "  dermaflux train --preset flux-dev --set model.pretrained=models/flux-dev-random ...")


def _add_model_tool(sub) -> None:
    """`dermaflux model random`: the logic is in `dermaflux.model.random_weights`."""
    from dermaflux.model.random_weights import DEFAULT_SHARD_SIZE, LIKES

    model = sub.add_parser("model", help="model tools (not a stage): `model random` writes a random-weight pipeline",
                           description="model tools (not a stage)", formatter_class=_HelpFormatter)
    actions = model.add_subparsers(dest="action", metavar="ACTION", required=True)
    tool = actions.add_parser("random", help=MODEL_RANDOM_HELP, formatter_class=_HelpFormatter,
                              description=f"{MODEL_RANDOM_HELP}\n\nexample:\n  {MODEL_RANDOM_EXAMPLE}")
    tool.add_argument("--like", required=True, choices=tuple(LIKES),
                      help="whose shapes: flux-dev (FLUX.1-dev: 12B transformer, T5-XXL, CLIP-L, VAE; 34 GB in "
                           "bf16) or tiny (the tiny preset's sizes)")
    tool.add_argument("--out", required=True, metavar="DIR",
                      help="folder to write; must be missing, empty or hold a model this command wrote")
    tool.add_argument("--seed", type=int, default=0, help="seed of the weights: the same seed writes the same bytes")
    tool.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                      help="weight dtype (default: the preset's model.dtype: bfloat16 for flux-dev, float32 for tiny)")
    tool.add_argument("--max-shard-size", default=DEFAULT_SHARD_SIZE, metavar="SIZE",
                      help=f"largest safetensors shard (tensor bytes), e.g. 5GB or 200MB; default {DEFAULT_SHARD_SIZE}")
    tool.add_argument("--workers", type=int, default=None, metavar="N",
                      help="threads drawing random tensors (default: the CPUs this process may use)")
    tool.add_argument("--dry-run", action="store_true",
                      help="print the plan (components, parameters, bytes, shards, free disk) and write nothing")
    tool.add_argument("--force", action="store_true", help="replace DIR when it holds a different random model")
    tool.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _run_model_tool(args: argparse.Namespace) -> int:
    from dermaflux.model.random_weights import format_plan, plan_random_model, write_random_model

    try:
        plan = plan_random_model(args.like, seed=args.seed, dtype=args.dtype, max_shard_size=args.max_shard_size)
        if args.dry_run:
            print(format_plan(plan, args.out), flush=True)
            return 0
        summary = write_random_model(plan, args.out, force=args.force, workers=args.workers,
                                     echo=lambda line: print(line, flush=True))
    except USER_ERRORS as err:
        print(f"dermaflux model random: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2), flush=True)
    return 0


def add_config_arguments(parser: argparse.ArgumentParser, *, config_required: bool = False) -> None:
    """`--preset`, `--config`, `--set`: how every entry point picks its configuration."""
    parser.add_argument("--preset", default=None, help="named preset: tiny (CPU, the default) or flux-dev")
    parser.add_argument("--config", default=None, required=config_required, metavar="YAML",
                        help="config file (sections as in the preset; overrides it)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field, e.g. --set train.steps=300 (repeatable)")


def _add_command(sub, command: Command, job: bool) -> None:
    kwargs = {"prog": f"jobs/{command.name}.py"} if job else {}
    parser = sub.add_parser(command.name, help=command.help, formatter_class=_HelpFormatter,
                            description=f"{command.help}\n\nexample:\n  {command.example}", **kwargs)
    add_config_arguments(parser, config_required=job)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show everything on the console: Ray's and the libraries' output, debug logging "
                             "(otherwise it goes to the run's log file, whose path is printed)")
    if job:
        parser.add_argument("--skip-resource-check", action="store_true",
                            help="do not compare the stage's CPU/GPU requests with the cluster's nodes")
    for option in command.options:
        option.add_to(parser)
    parser.set_defaults(_options=command.options)


def build_parser(*, job: bool = False) -> argparse.ArgumentParser:
    """One subcommand per command; `job`: the Ray job entrypoints' variant (`--config` required)."""
    from dermaflux import __version__

    parser = argparse.ArgumentParser(prog="dermaflux", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dermaflux {__version__}")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for command in COMMANDS:
        _add_command(sub, command, job)
    if not job:
        _add_model_tool(sub)
    return parser


def flag_settings(args: argparse.Namespace) -> dict:
    """The config fields the given flags set, as {section: {field: value}}."""
    from dermaflux.config import flag_settings as nested_settings

    settings: dict = {}
    for option in args._options:
        settings.update(option.settings(args))
    return nested_settings(settings)


def main(argv: list[str] | None = None, *, job: bool = False) -> int:
    """`dermaflux ...`, and (`job=True`) `jobs/<command>.py`; returns the exit code."""
    from dermaflux.core.progress import session

    args = build_parser(job=job).parse_args(argv)
    if args.stage == "model":
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return _run_model_tool(args)
    command = get_command(args.stage)
    if job:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return _run_job(command, args)
    with session(verbose=args.verbose):
        return _run(command, args)


def _load_and_run(command: Command, args: argparse.Namespace, capacity_check: bool = True) -> dict:
    from dermaflux.config import load_config

    cfg = load_config(args.preset, args.config, args.overrides, extra=flag_settings(args))
    return command.run(cfg, capacity_check=capacity_check)


def _run(command: Command, args: argparse.Namespace) -> int:
    """Load the config, run the command, print its result; the exit code."""
    from dermaflux.core.progress import announce

    try:
        summary = _load_and_run(command, args)
    except USER_ERRORS as err:
        announce(f"dermaflux {command.name}: error: {err}")
        return 2
    except Exception:  # the stage failed: the traceback on the console and in the run log
        log.exception("dermaflux %s failed", command.name)
        return 1
    print(command.show(summary), flush=True)
    return 1 if command.failed(summary) else 0


def _run_job(command: Command, args: argparse.Namespace) -> int:
    """A Ray job: the summary on stderr, then one JSON line (`{"stage": ...}`) that is the job's result."""
    started = time.time()
    try:
        summary = _load_and_run(command, args, capacity_check=not args.skip_resource_check)
    except USER_ERRORS as err:
        return _job_failed(command.name, str(err), 2)
    except Exception as err:  # the stage failed: keep the traceback in the job log
        traceback.print_exc()
        return _job_failed(command.name, f"{type(err).__name__}: {err}", 1)
    print(command.show(summary), file=sys.stderr, flush=True)
    result = {"stage": command.name, "status": "succeeded", "seconds": round(time.time() - started, 1), **summary}
    print(json.dumps(result, default=str), flush=True)
    return 0


def _job_failed(name: str, message: str, code: int) -> int:
    print(f"dermaflux job {name}: error: {message}", file=sys.stderr, flush=True)
    print(json.dumps({"stage": name, "status": "failed", "error": message}), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
