"""`dermaflux <stage>`: one subcommand per stage of the stage table, plus `pipeline`.

Each subcommand takes the shared `--preset/--config/--set`, its stage's flags (each one a
config field, see `dermaflux.stages`), loads the config and calls `core.entry.run`: the same
path as the Ray jobs.
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
        stage.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        for option in options:
            option.add_to(stage)
        stage.set_defaults(_options=options)
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
    from dermaflux.config import load_config
    from dermaflux.core.entry import USER_ERRORS, run

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = load_config(args.preset, args.config, args.overrides, extra=flag_settings(args))
        summary = run(args.stage, cfg)
    except USER_ERRORS as err:
        print(f"dermaflux {args.stage}: error: {err}", file=sys.stderr)
        return 2
    _print_result(args.stage, summary)
    return 1 if _failed(args.stage, summary) else 0


if __name__ == "__main__":
    sys.exit(main())
