"""`dermaflux <stage>`: one subcommand per stage; each loads the config and calls the stage.

A stage module defines HELP, add_arguments(parser), optionally config_overrides(args) -> dict
(CLI flags mapped to config field paths), and run(args, cfg) -> exit code.
Stages whose module is not there are simply not offered.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

STAGES = {
    "curate": "dermaflux.corpus.command",
    "caption": "dermaflux.caption.command",
    "train": "dermaflux.train.command",
    "generate": "dermaflux.synth.generate_command",
    "serve": "dermaflux.synth.serve_command",
    "evaluate": "dermaflux.evaluate.command",
    "pipeline": "dermaflux.pipeline",
}


def available_stages() -> dict[str, str]:
    found = {}
    for name, module in STAGES.items():
        try:
            if importlib.util.find_spec(module) is not None:
                found[name] = module
        except ModuleNotFoundError:
            pass
    return found


def build_parser() -> argparse.ArgumentParser:
    from dermaflux import __version__

    parser = argparse.ArgumentParser(prog="dermaflux", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dermaflux {__version__}")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, module_name in available_stages().items():
        module = importlib.import_module(module_name)
        stage = sub.add_parser(name, help=module.HELP, description=module.HELP)
        stage.add_argument("--preset", default=None, help="named preset: tiny (CPU) or flux-dev (default: tiny)")
        stage.add_argument("--config", default=None, metavar="YAML", help="config file (overrides the preset)")
        stage.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override one field, e.g. --set train.steps=300 (repeatable)",
        )
        stage.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        module.add_arguments(stage)
        stage.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    from dermaflux.config import ConfigError, load_config
    from dermaflux.artifacts import OutputConflict

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    module = args._module
    try:
        extra = module.config_overrides(args) if hasattr(module, "config_overrides") else None
        cfg = load_config(args.preset, args.config, args.overrides, extra=extra)
        return int(module.run(args, cfg) or 0)
    except (ConfigError, OutputConflict, FileNotFoundError, ValueError) as err:
        print(f"dermaflux {args.stage}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
