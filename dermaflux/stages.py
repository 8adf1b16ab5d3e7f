"""The stage table: the one place that says which stages exist and how they connect.

Everything else is derived from `STAGES`: the command table (`dermaflux.commands`), which the
CLI subcommands and their flags, the Ray job entrypoints (`jobs/<name>.py`) and the pipeline
read; the pipeline's order and run-folder layout (`pipeline.py`); the preflight checks of input
folders and cluster resources (`dermaflux.checks`, beside this table). Adding a stage is one
`StageSpec` here, its package, its config section in `config.py` and its `jobs/<name>.py`.
Light on purpose: no Ray, no torch.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from dermaflux.core.preflight import Demand
from dermaflux.core.storage import staged_section
from dermaflux.corpus.config import SourceSpec
from dermaflux.synth.config import adapter_entry
from dermaflux.train.config import may_train_in_process

if TYPE_CHECKING:
    from dermaflux.caption.config import CaptionConfig
    from dermaflux.config import DermaFluxConfig
    from dermaflux.core.config import ConfigModel
    from dermaflux.corpus.config import CurateConfig
    from dermaflux.evaluate.config import EvaluateConfig
    from dermaflux.synth.config import SynthConfig
    from dermaflux.train.config import TrainConfig


@dataclass(frozen=True)
class Option:
    """A CLI flag that sets config fields: `--steps 7` -> train.steps=7 (None: the flag was not given)."""

    flag: str
    fields: tuple[str, ...]  # config field paths it sets (usually one)
    help: str
    type: Callable | None = None
    action: str | None = None  # "store_true" or "append"
    const: Any = None  # store_true flags: the value set instead of True
    choices: tuple | None = None
    metavar: str | None = None

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        kwargs: dict[str, Any] = {"default": None, "help": self.help, "dest": self.dest}
        if self.action:
            kwargs["action"] = self.action
        if self.type is not None:
            kwargs["type"] = self.type
        if self.choices is not None:
            kwargs["choices"] = self.choices
        if self.metavar is not None:
            kwargs["metavar"] = self.metavar
        parser.add_argument(self.flag, **kwargs)

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def settings(self, args: argparse.Namespace) -> dict[str, Any]:
        value = getattr(args, self.dest, None)
        if value is None:
            return {}
        if self.action == "store_true" and self.const is not None:
            value = self.const
        return {path: value for path in self.fields}


@dataclass(frozen=True)
class Input:
    """A path field of the stage's section that it reads."""

    field: str
    made_by: str | None = None  # the stage whose output it is in a pipeline run (None: outside data)
    required: bool = False
    subpath: str = ""  # where inside the producer's folder (train -> "final": the adapter)
    many: bool = False  # a list of paths
    path_of: Callable[[str], str] | None = None  # the path inside an entry (e.g. NAME=DIR -> DIR)
    remote_ok: bool = True  # a cloud URI is copied down before the stage runs


@dataclass(frozen=True)
class StageSpec:
    name: str  # CLI subcommand, jobs/<name>.py, pipeline marker
    section: str  # config section holding its settings
    help: str
    example: str  # shown by `dermaflux <name> --help`
    run: str  # "module:function", function(cfg) -> summary dict
    demands: Callable[[Any], list[Demand]]
    options: tuple[Option, ...] = ()
    inputs: tuple[Input, ...] = ()
    output: str | None = "out"  # the section field naming its output folder (None: writes none)
    folder: str | None = None  # subfolder of a pipeline run (None: not a pipeline stage)
    headline: str | None = None  # a line printed after the summary, formatted with it
    # Whether Ray starts (and the capacity check runs) before the stage; None: always. A stage that says no for a
    # config starts Ray itself where it needs it.
    starts_ray: Callable[[Any], bool] | None = None

    def section_of(self, cfg: DermaFluxConfig) -> ConfigModel:
        return getattr(cfg, self.section)

    def run_function(self) -> Callable[[Any], dict]:
        module, _, function = self.run.partition(":")
        return getattr(importlib.import_module(module), function)

    def execute(self, cfg: DermaFluxConfig) -> dict:
        """The run function with cloud URIs staged through local folders (see core.storage)."""
        section = self.section_of(cfg)
        inputs = tuple(needed.field for needed in self.inputs if needed.remote_ok)
        with staged_section(section, inputs, self.output) as original:
            summary = self.run_function()(cfg)
        if self.output and self.output in original:  # report the URI the user gave, not the staging folder
            summary = {**summary, "out": original[self.output]}
        return summary


def _bundle(cpus: float, gpus: float = 0.0) -> dict[str, float]:
    return {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}


def _curate_demands(s: CurateConfig) -> list[Demand]:
    return [Demand("curate per-image task", _bundle(s.cpus_per_worker))]


def _caption_demands(s: CaptionConfig) -> list[Demand]:
    writer = _bundle(s.cpus_per_actor, s.gpus_per_actor)
    return [Demand(f"caption writer actor {writer}", writer, s.concurrency, gang=False),
            Demand("caption extraction task", _bundle(s.extract_cpus))]


def _train_demands(s: TrainConfig) -> list[Demand]:
    bundle = _bundle(s.cpus_per_worker, 1.0 if s.use_gpu else 0.0)
    return [Demand(f"train.workers={s.workers} x {bundle}", bundle, s.workers)]


def _generate_demands(s: SynthConfig) -> list[Demand]:
    # The offline job's actors run side by side, but Ray Data starts with what fits.
    bundle = _bundle(s.cpus_per_replica, s.gpus_per_replica)
    return [Demand(f"synth.generate_actors={s.generate_actors} x {bundle}", bundle)]


def _serve_demands(s: SynthConfig) -> list[Demand]:
    bundle = _bundle(s.cpus_per_replica, s.gpus_per_replica)
    return [Demand(f"synthesis replica {bundle}", bundle, max(s.autoscaling.min_replicas, 1), gang=False)]


def _evaluate_demands(s: EvaluateConfig) -> list[Demand]:
    return [Demand(f"evaluate cell {_bundle(s.cpus_per_cell, s.gpus_per_cell)}", _bundle(s.cpus_per_cell, s.gpus_per_cell))]


def source_path(spec: str) -> str:
    """`READER=PATH[,key=value...]` -> PATH, read by the one source-spec parser."""
    return SourceSpec.parse(spec).path


def adapter_path(entry: str) -> str:
    """`NAME=DIR` (an adapter served under NAME) -> DIR; a plain folder or URI unchanged."""
    return adapter_entry(entry)[1]


def _numbers(kind: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None

    parse.__name__ = f"{kind.__name__} list"
    return parse


def _out(section: str, what: str) -> Option:
    return Option("--out", (f"{section}.out",), what, metavar="DIR")


def _force(section: str) -> Option:
    return Option("--force", (f"{section}.force",), "replace an output folder that holds a different run of this "
                  "stage (only folders DermaFlux wrote)", action="store_true")


STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        "curate", "curate",
        "curate sources (ham10000, dermamnist, isic, pad-ufes-20, csv) into one de-duplicated, split Parquet corpus",
        "dermaflux curate --source ham10000=../shared/data/ham10000-224 --out runs/corpus",
        "dermaflux.corpus.stage:run", _curate_demands,
        options=(
            Option("--source", ("curate.sources",), "a source, repeatable: ham10000=DIR, dermamnist=FILE.npz, "
                   "isic=DIR, pad-ufes-20=DIR, csv=FILE,images=DIR,id=COL,label=COL[,lesion=COL,patient=COL,"
                   "split_col=COL,positive=mel|malignant (a 0/1 label column)]; any source takes split=train|val|test "
                   "(split=test: an external test set) and name=NAME",
                   action="append", metavar="READER=PATH[,k=v]"),
            _out("curate", "corpus folder"), _force("curate"),
            Option("--seed", ("curate.seed",), "split assignment seed", type=int, metavar="N"),
            Option("--phash-threshold", ("curate.phash_threshold",), "pHash Hamming distance at or below which two "
                   "images are duplicates", type=int, metavar="BITS"),
            Option("--resplit", ("curate.official_splits",), "ignore published splits and re-split every source "
                   "(grouped, stratified)", action="store_true", const="resplit"),
            Option("--workers", ("curate.num_workers",), "concurrent per-image Ray tasks", type=int, metavar="N"),
        ),
        inputs=(Input("sources", required=True, many=True, path_of=source_path, remote_ok=False),),
        folder="corpus",
    ),
    StageSpec(
        "caption", "caption", "caption a curated corpus (attributes measured from each image; template or LLM writer)",
        "dermaflux caption --corpus runs/corpus --out runs/captions",
        "dermaflux.caption.stage:run", _caption_demands,
        options=(
            Option("--corpus", ("caption.corpus",), "curated corpus folder", metavar="DIR"),
            _out("caption", "captions folder"),
            Option("--writer", ("caption.writer",), "caption writer: template (default) or llm", metavar="NAME"),
            Option("--model", ("caption.model",), "the llm writer's chat model (hub id or folder)", metavar="ID_OR_PATH"),
            Option("--concurrency", ("caption.concurrency",), "writer actors in the pool", type=int, metavar="N"),
            _force("caption"),
        ),
        inputs=(Input("corpus", made_by="curate", required=True),),
        folder="captions",
    ),
    StageSpec(
        "train", "train",
        "fine-tune the Flux transformer (LoRA or full) with Ray Train + DeepSpeed ZeRO on a captioned corpus",
        "dermaflux train --captions runs/captions --out runs/train --steps 120",
        "dermaflux.train.stage:run", _train_demands,
        options=(
            Option("--captions", ("train.captions",), "captioned corpus folder", metavar="DIR"),
            _out("train", "run folder; the adapter goes to DIR/final"),
            Option("--steps", ("train.steps",), "optimizer steps", type=int, metavar="N"),
            Option("--workers", ("train.workers",), "Ray Train workers (one per GPU on a GPU cluster)", type=int,
                   metavar="N"),
            Option("--zero-stage", ("train.zero_stage",), "DeepSpeed ZeRO stage (0 turns ZeRO off)", type=int,
                   choices=(0, 1, 2, 3)),
            Option("--mode", ("train.mode",), "LoRA adapter or full fine-tuning", choices=("lora", "full")),
            Option("--resume", ("train.resume",), "continue a stopped run from its last checkpoint (error when "
                   "there is none)", action="store_true"),
        ),
        inputs=(Input("captions", made_by="caption", required=True),),
        folder="train",
        starts_ray=lambda cfg: not may_train_in_process(cfg.train),  # a short run may need no Ray at all
    ),
    StageSpec(
        "generate", "synth", "generate a labelled synthetic set offline (Ray Data actor pool; resumable)",
        "dermaflux generate --lora runs/train/final --per-class 8 --out runs/synthetic",
        "dermaflux.synth.stage:run", _generate_demands,
        options=(
            Option("--lora", ("synth.adapters",), "adapter folder, or NAME=DIR (repeatable; the first one is "
                   "sampled unless --adapter)", action="append", metavar="DIR"),
            Option("--adapter", ("synth.adapter",), "adapter name to sample with", metavar="NAME"),
            Option("--per-class", ("synth.per_class",), "images for every class of the corpus' train split "
                   "(synth.corpus; every taxonomy class when none is given)", type=int, metavar="N"),
            Option("--targets", ("synth.targets",), "targets over label x subgroup, e.g. "
                   "'mel:skin_tone=brown:200,nv:300'", metavar="SPEC"),
            Option("--balance", ("synth.balance",), "top every subgroup of each class of synth.corpus up to its "
                   "best-represented one", choices=("skin_tone", "sex", "site"), metavar="ATTRIBUTE"),
            _out("synth", "output folder (a synthetic set)"),
            Option("--seed", ("synth.seed",), "base seed of the per-image seeds", type=int, metavar="N"),
            Option("--steps", ("synth.num_inference_steps",), "inference steps (default: the preset's)", type=int,
                   metavar="N"),
            Option("--actors", ("synth.generate_actors",), "pipeline copies in the actor pool", type=int, metavar="N"),
            Option("--fuse-lora", ("synth.fuse_lora",), "merge the LoRA into the base weights (faster; equal to the "
                   "service's images within rounding)", action="store_true"),
            Option("--compile", ("synth.compile",), "torch.compile the transformer's blocks (with --fuse-lora or no "
                   "adapter; eager, with one warning, if it fails)", action="store_true"),
        ),
        inputs=(Input("adapters", made_by="train", subpath="final", many=True, path_of=adapter_path),
                Input("corpus", made_by="curate")),
        folder="synthetic",
        headline="wrote {done} of {total} images ({done_by_class}) to {out}",
    ),
    StageSpec(
        "serve", "synth", "serve the synthesis HTTP API on Ray Serve (loopback by default; blocks until Ctrl-C)",
        "dermaflux serve --lora runs/train/final --port 8000",
        "dermaflux.synth.serve_app:serve_forever", _serve_demands,
        options=(
            Option("--lora", ("synth.adapters",), "adapter folder, or NAME=DIR (repeatable; all are served at once)",
                   action="append", metavar="DIR"),
            Option("--max-adapters", ("synth.max_adapters_per_replica",), "adapters a replica keeps loaded, least "
                   "recently used evicted", type=int, metavar="N"),
            Option("--host", ("synth.host",), "bind address (default 127.0.0.1; beyond loopback a token is "
                   "required: $DERMAFLUX_API_TOKEN or --token-file)", metavar="HOST"),
            Option("--port", ("synth.port",), "HTTP port (default 8000)", type=int, metavar="PORT"),
            Option("--replicas", ("synth.autoscaling.min_replicas", "synth.autoscaling.max_replicas"),
                   "fixed number of synthesis replicas", type=int, metavar="N"),
            Option("--jobs-root", ("synth.jobs_root",), "the folder bulk jobs write under (default: "
                   "<cache>/synth-jobs)", metavar="DIR"),
            Option("--token-file", ("synth.auth.token_file",), "file holding the API's bearer token", metavar="FILE"),
            Option("--fuse-lora", ("synth.fuse_lora",), "merge the one --lora into the base weights (faster); the "
                   "service then samples only that adapter", action="store_true"),
            Option("--compile", ("synth.compile",), "torch.compile the transformer's blocks (with --fuse-lora or no "
                   "adapter; eager, with one warning, if it fails)", action="store_true"),
        ),
        inputs=(Input("adapters", many=True, path_of=adapter_path),),
        output=None,
    ),
    StageSpec(
        "evaluate", "evaluate",
        "train timm classifiers on real (+ synthetic) images, score them on each real test set, compare pairwise, "
        "write the report",
        "dermaflux evaluate --corpus runs/corpus --synthetic runs/synthetic --out runs/report --seeds 10 --controls",
        "dermaflux.evaluate.stage:run", _evaluate_demands,
        options=(
            Option("--corpus", ("evaluate.corpus",), "curated corpus folder", metavar="DIR"),
            Option("--synthetic", ("evaluate.synthetic",), "synthetic set folder (optional)", metavar="DIR"),
            Option("--captions", ("evaluate.captions",), "caption folder of the corpus (optional): skin tones "
                   "for the results by subgroup without measuring them again", metavar="DIR"),
            _out("evaluate", "report folder"),
            Option("--fractions", ("evaluate.fractions",), "fractions of the real train split", type=_numbers(float),
                   metavar="F,F"),
            Option("--sizes", ("evaluate.sizes",), "real train sizes in images (override --fractions)",
                   type=_numbers(int), metavar="N,N"),
            Option("--ratios", ("evaluate.ratios",), "synthetic images per real image, e.g. 0,1,2",
                   type=_numbers(float), metavar="X,X"),
            Option("--seeds", ("evaluate.seeds",), "seeds per grid cell (subsample, init, order)", type=int,
                   metavar="N"),
            Option("--model", ("evaluate.models",), "timm model name (repeatable)", action="append", metavar="NAME"),
            Option("--task", ("evaluate.tasks",), "binary (malignant vs benign), melanoma (melanoma vs rest) or "
                   "multiclass (repeatable)", action="append", choices=("binary", "melanoma", "multiclass")),
            Option("--primary-task", ("evaluate.primary_task",), "the task the verdict lines are about (default: "
                   "the first --task)", choices=("binary", "melanoma", "multiclass")),
            Option("--steps", ("evaluate.steps",), "optimiser steps per cell, the same for every cell so that added "
                   "images add no compute (0: train --epochs epochs instead)", type=int, metavar="N"),
            Option("--epochs", ("evaluate.epochs",), "training epochs per cell, used with --steps 0 only", type=int,
                   metavar="N"),
            Option("--image-size", ("evaluate.image_size",), "classifier input side in pixels", type=int,
                   metavar="PX"),
            Option("--parallel", ("evaluate.parallel_cells",), "grid cells running at once", type=int, metavar="N"),
            Option("--balancing", ("evaluate.balancing",), "class balancing: inverse-frequency loss weights, a "
                   "weighted sampler, or none", choices=("none", "sampler", "loss")),
            Option("--synthetic-only", ("evaluate.synthetic_only",), "add cells trained on synthetic images alone",
                   action="store_true"),
            Option("--controls", ("evaluate.controls",), "add the built-in controls beside the synthetic set: "
                   "real-extra (held-back real train images passed as synthetic: must help) and shuffled (the same "
                   "images, labels permuted: must not), at every non-zero ratio", action="store_true"),
            Option("--report-only", ("evaluate.report_only",), "train nothing: report the cells already finished "
                   "in --out", action="store_true"),
        ),
        inputs=(Input("corpus", made_by="curate", required=True), Input("synthetic", made_by="generate"),
                Input("captions", made_by="caption")),
        folder="report",
        headline="report: {report}",
    ),
)

BY_NAME: dict[str, StageSpec] = {spec.name: spec for spec in STAGES}
PIPELINE: tuple[StageSpec, ...] = tuple(spec for spec in STAGES if spec.folder)  # in run order


def get_stage(name: str) -> StageSpec:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(BY_NAME)}") from None


def pipeline_names() -> list[str]:
    return [spec.name for spec in PIPELINE]

