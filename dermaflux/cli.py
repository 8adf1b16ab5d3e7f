"""`dermaflux <stage>`: one subcommand per stage of the stage table, plus `pipeline`.

Each subcommand takes the shared `--preset/--config/--set`, its stage's flags (each one a
config field, see `dermaflux.stages`), loads the config and calls `core.entry.run`: the same
path as the Ray jobs. `dermaflux model random` is a tool, not a stage: no config, no Ray.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from dermaflux.stages import STAGES, Option

PIPELINE_HELP = "run every stage in order on one Ray instance (curate, caption, train, generate, evaluate); resumable"
PIPELINE_EXAMPLE = "dermaflux pipeline --preset tiny --data ../shared/data --out runs/demo"
PIPELINE_OPTIONS = (
    Option("--data", ("pipeline.data",), "folder of datasets to curate, one subfolder each "
           "(default: $DERMAFLUX_DATA or ../shared/data)", metavar="DIR"),
    Option("--out", ("pipeline.out",), "run folder (re-run the same command to resume)", metavar="DIR"),
    Option("--stages", ("pipeline.stages",), "comma-separated subset, e.g. curate,caption (default: all)",
           type=lambda text: [s.strip() for s in text.split(",") if s.strip()], metavar="LIST"),
)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the example's line as written; never breaks a word such as `csv=FILE` across lines."""

    def _split_lines(self, text, width):
        import textwrap

        return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)


def _subcommands() -> list[tuple[str, str, str, tuple[Option, ...]]]:
    rows = [(spec.name, spec.help, spec.example, spec.options) for spec in STAGES]
    return rows + [("pipeline", PIPELINE_HELP, PIPELINE_EXAMPLE, PIPELINE_OPTIONS)]


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
    from dermaflux.core.entry import USER_ERRORS
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


def build_parser() -> argparse.ArgumentParser:
    from dermaflux import __version__
    from dermaflux.core.entry import add_config_arguments

    parser = argparse.ArgumentParser(prog="dermaflux", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dermaflux {__version__}")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, help_text, example, options in _subcommands():
        stage = sub.add_parser(name, help=help_text, description=f"{help_text}\n\nexample:\n  {example}",
                               formatter_class=_HelpFormatter)
        add_config_arguments(stage)
        stage.add_argument("-v", "--verbose", action="store_true",
                           help="show everything on the console: Ray's and the libraries' output, debug logging "
                                "(otherwise it goes to the run's log file, whose path is printed)")
        for option in options:
            option.add_to(stage)
        stage.set_defaults(_options=options)
    _add_model_tool(sub)
    return parser


def flag_settings(args: argparse.Namespace) -> dict:
    """The config fields the given flags set, as {section: {field: value}}."""
    from dermaflux.config import flag_settings as nested_settings

    settings: dict = {}
    for option in args._options:
        settings.update(option.settings(args))
    return nested_settings(settings)


def _print_result(name: str, summary: dict) -> None:
    from dermaflux.stages import BY_NAME

    if name == "pipeline":
        from dermaflux.pipeline import format_summary

        print(format_summary(summary), flush=True)
        return
    print(json.dumps(summary, indent=2, default=str), flush=True)
    headline = BY_NAME[name].headline
    if headline:
        print(headline.format(**summary), flush=True)


def _failed(name: str, summary: dict) -> bool:
    if name == "pipeline":
        return any(str(info.get("status")).startswith("failed") for info in summary["stages"].values())
    return bool(summary.get("failed"))


def main(argv: list[str] | None = None) -> int:
    from dermaflux.core.progress import session

    args = build_parser().parse_args(argv)
    if args.stage == "model":
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return _run_model_tool(args)
    with session(verbose=args.verbose):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """Load the config, run the stage (or pipeline), print its result; the exit code."""
    from dermaflux.config import load_config
    from dermaflux.core.entry import USER_ERRORS, run
    from dermaflux.core.progress import announce

    try:
        cfg = load_config(args.preset, args.config, args.overrides, extra=flag_settings(args))
        summary = run(args.stage, cfg)
    except USER_ERRORS as err:
        announce(f"dermaflux {args.stage}: error: {err}")
        return 2
    except Exception:  # the stage failed: the traceback on the console and in the run log
        logging.getLogger("dermaflux").exception("dermaflux %s failed", args.stage)
        return 1
    _print_result(args.stage, summary)
    return 1 if _failed(args.stage, summary) else 0


if __name__ == "__main__":
    sys.exit(main())
