"""`dermaflux evaluate`: the classifier grid, synthetic-set checks and the report."""

from __future__ import annotations

import argparse
import json

HELP = "train timm classifiers on real (+ synthetic) images, score them on real test images, write the report"


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", metavar="DIR", help="curated corpus folder")
    parser.add_argument("--synthetic", metavar="DIR", help="synthetic set folder (optional)")
    parser.add_argument("--out", metavar="DIR", help="report folder")
    parser.add_argument("--fractions", type=_floats, metavar="F,F", help="fractions of the real train split")
    parser.add_argument("--sizes", type=_ints, metavar="N,N", help="real train sizes in images (override fractions)")
    parser.add_argument("--ratios", type=_floats, metavar="X,X", help="synthetic per real image, e.g. 0,1,2")
    parser.add_argument("--seeds", type=int, metavar="N")
    parser.add_argument("--model", action="append", metavar="NAME", help="timm model name (repeatable)")
    parser.add_argument("--task", action="append", choices=["binary", "multiclass"], help="(repeatable)")
    parser.add_argument("--epochs", type=int, metavar="N")
    parser.add_argument("--image-size", type=int, metavar="PX")
    parser.add_argument("--parallel", type=int, metavar="N", help="grid cells running at once")
    parser.add_argument("--balancing", choices=["none", "sampler", "loss"])
    parser.add_argument("--synthetic-only", action="store_true", default=None, help="add synthetic-only cells")
    parser.add_argument("--report-only", action="store_true", default=None,
                        help="train nothing: report the cells already finished in --out")


def config_overrides(args) -> dict:
    mapping = {
        "corpus": args.corpus, "synthetic": args.synthetic, "out": args.out, "fractions": args.fractions,
        "sizes": args.sizes, "ratios": args.ratios, "seeds": args.seeds, "models": args.model, "tasks": args.task,
        "epochs": args.epochs, "image_size": args.image_size, "parallel_cells": args.parallel,
        "balancing": args.balancing, "synthetic_only": args.synthetic_only, "report_only": args.report_only,
    }
    section = {k: v for k, v in mapping.items() if v is not None}
    return {"evaluate": section} if section else {}


def run(args, cfg) -> int:
    from dermaflux.evaluate.stage import run as run_stage

    summary = run_stage(cfg)
    print(json.dumps(summary, indent=2))
    print(f"report: {summary['report']}")
    return 1 if summary["failed"] else 0
