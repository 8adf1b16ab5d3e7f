"""CLI flags of `dermaflux curate`, mapped onto the `curate` config section."""

from __future__ import annotations

import argparse
import json

HELP = "curate sources (ham10000, dermamnist, isic, pad-ufes-20, csv) into one de-duplicated, split Parquet corpus"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", dest="sources", action="append", default=None, metavar="READER=PATH[,k=v]",
                        help="a source, repeatable: ham10000=DIR, dermamnist=FILE.npz, isic=DIR, pad-ufes-20=DIR, "
                             "csv=FILE,images=DIR,id=COL,label=COL[,lesion=COL,patient=COL,split=COL,...]")
    parser.add_argument("--out", default=None, help="corpus folder")
    parser.add_argument("--force", action="store_true", default=None, help="replace a folder holding a different run")
    parser.add_argument("--seed", type=int, default=None, help="split seed")
    parser.add_argument("--phash-threshold", type=int, default=None, help="duplicate Hamming distance")
    parser.add_argument("--resplit", action="store_true", default=None,
                        help="ignore published splits and re-split every source (grouped, stratified)")
    parser.add_argument("--workers", type=int, default=None, help="concurrent per-image Ray tasks")


def config_overrides(args: argparse.Namespace) -> dict:
    section = {
        "sources": args.sources, "out": args.out, "force": args.force, "seed": args.seed,
        "phash_threshold": args.phash_threshold, "num_workers": args.workers,
        "official_splits": "resplit" if args.resplit else None,
    }
    return {"curate": {k: v for k, v in section.items() if v is not None}}


def run(args: argparse.Namespace, cfg) -> int:
    from dermaflux.corpus import stage

    summary = stage.run(cfg)
    print(json.dumps(summary, indent=2))
    return 0
