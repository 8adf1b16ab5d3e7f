"""`dermaflux generate`: a labelled synthetic augmentation set, offline on Ray Data (resumable)."""

from __future__ import annotations

HELP = "generate a labelled synthetic set offline (Ray Data actor pool; resumable)"


def add_arguments(parser) -> None:
    parser.add_argument("--lora", action="append", default=None, metavar="DIR",
                        help="adapter folder, or NAME=DIR (repeatable; the first one is sampled unless --adapter)")
    parser.add_argument("--adapter", default=None, help="adapter name to sample with")
    parser.add_argument("--per-class", type=int, default=None, metavar="N", help="images for every taxonomy class")
    parser.add_argument("--out", default=None, metavar="DIR", help="output folder (a synthetic set)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="inference steps (default: the preset's)")
    parser.add_argument("--actors", type=int, default=None, help="pipeline copies in the actor pool")
    parser.add_argument("--fuse-lora", action="store_true", default=None,
                        help="merge the LoRA into the base weights (faster; equal to the service's images within rounding)")


def config_overrides(args) -> dict:
    synth = {
        "adapters": args.lora, "adapter": args.adapter, "per_class": args.per_class, "out": args.out,
        "seed": args.seed, "num_inference_steps": args.steps, "generate_actors": args.actors,
        "fuse_lora": args.fuse_lora,
    }
    return {"synth": {k: v for k, v in synth.items() if v is not None}}


def run(args, cfg) -> int:
    from dermaflux.synth.stage import run as run_stage

    summary = run_stage(cfg)
    print(f"wrote {summary['done']} of {summary['total']} images ({summary['done_by_class']}) to {summary['out']}"
          + (" (resumed)" if summary["resumed"] else ""))
    return 0
