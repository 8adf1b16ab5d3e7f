"""`dermaflux caption`: attributes and a caption for every corpus image."""

from __future__ import annotations

import json

HELP = "caption a curated corpus (attributes measured from each image; template or LLM writer)"


def add_arguments(parser) -> None:
    parser.add_argument("--corpus", metavar="DIR", help="curated corpus folder (caption.corpus)")
    parser.add_argument("--out", metavar="DIR", help="captions folder (caption.out)")
    parser.add_argument("--writer", help="caption writer: template (default) or llm")
    parser.add_argument("--model", metavar="ID_OR_PATH", help="llm writer's chat model (caption.model)")
    parser.add_argument("--concurrency", type=int, help="writer actors (caption.concurrency)")
    parser.add_argument("--force", action="store_true", default=None, help="replace a different run in --out")


def config_overrides(args) -> dict:
    fields = {"corpus": args.corpus, "out": args.out, "writer": args.writer, "model": args.model,
              "concurrency": args.concurrency, "force": args.force}
    return {"caption": {k: v for k, v in fields.items() if v is not None}}


def run(args, cfg) -> int:
    from dermaflux.caption.stage import run as run_stage

    summary = run_stage(cfg)
    print(json.dumps(summary, indent=2))
    return 0
