"""CLI: `dermaflux train --captions DIR --out DIR [--steps N] [--workers N] [--zero-stage 2|3] [--resume]`."""

from __future__ import annotations

import json

HELP = "fine-tune the Flux transformer (LoRA or full) with Ray Train + DeepSpeed ZeRO on a captioned corpus"


def add_arguments(parser) -> None:
    parser.add_argument("--captions", metavar="DIR", help="captioned corpus folder (train.captions)")
    parser.add_argument("--out", metavar="DIR", help="run folder; the adapter goes to DIR/final (train.out)")
    parser.add_argument("--steps", type=int, help="optimizer steps (train.steps)")
    parser.add_argument("--workers", type=int, help="Ray Train workers (train.workers)")
    parser.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage (train.zero_stage)")
    parser.add_argument("--mode", choices=["lora", "full"], help="LoRA adapter or full fine-tuning (train.mode)")
    parser.add_argument("--resume", action="store_true", help="continue a stopped run from its last checkpoint")


def config_overrides(args) -> dict:
    train = {
        "captions": args.captions, "out": args.out, "steps": args.steps, "workers": args.workers,
        "zero_stage": args.zero_stage, "mode": args.mode,
    }
    return {"train": {k: v for k, v in train.items() if v is not None}}


def run(args, cfg) -> int:
    from dermaflux.train.stage import run as run_stage

    summary = run_stage(cfg, resume=args.resume)
    print(json.dumps(summary, indent=2, default=str))
    return 0
