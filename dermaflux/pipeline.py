"""`dermaflux pipeline`: every available stage in order on one Ray instance, resumable.

<out>/corpus -> <out>/captions -> <out>/train (adapter in train/final) -> <out>/synthetic ->
<out>/report. A stage that finished leaves a marker in <out>/.done and is skipped on a re-run;
a stage that stopped half-way resumes through its own markers. A stage whose code is not
installed is reported as not available, and the stages that need its output as blocked.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from dermaflux.artifacts import atomic_write_json, claim_output, fingerprint, is_done, mark_done, read_json, marker_path
from dermaflux.config import ConfigError, DermaFluxConfig, save_effective_config
from dermaflux.stage_registry import StageSpec, get_stage
from dermaflux.validate import PRODUCED_BY, REQUIRED_INPUTS, capacity_from_ray, check_config, check_stages_in_order

HELP = "run every stage in order on a local Ray instance (curate, caption, train, generate, evaluate)"
log = logging.getLogger(__name__)

# Where each stage writes inside the run folder; the next stages read from there.
LAYOUT = {"curate": "corpus", "caption": "captions", "train": "train", "generate": "synthetic", "evaluate": "report"}
REPORT_NAMES = ("report.html", "report.md")


def add_arguments(parser) -> None:
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="folder of datasets to curate, one subfolder each (default: $DERMAFLUX_DATA or ../shared/data)")
    parser.add_argument("--out", default=None, metavar="DIR", help="run folder (re-run the same command to resume)")
    parser.add_argument("--stages", default=None, metavar="LIST",
                        help="comma-separated subset, e.g. curate,caption (default: all)")


def config_overrides(args) -> dict:
    section: dict = {}
    if args.data is not None:
        section["data"] = args.data
    if args.out is not None:
        section["out"] = args.out
    if args.stages is not None:
        section["stages"] = [s.strip() for s in args.stages.split(",") if s.strip()]
    return {"pipeline": section} if section else {}


def data_dir(cfg) -> Path:
    return Path(cfg.pipeline.data or os.environ.get("DERMAFLUX_DATA") or "../shared/data").expanduser()


def discover_sources(data: Path) -> list[str]:
    """A source spec per dataset folder whose name starts with a reader's name (ham10000-224 -> ham10000)."""
    from dermaflux.corpus.sources import readers

    def squash(name: str) -> str:
        return name.lower().replace("-", "").replace("_", "")

    names = sorted(readers(), key=len, reverse=True)  # longest first: the most specific reader wins
    specs = []
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        reader = next((n for n in names if squash(folder.name).startswith(squash(n))), None)
        if reader is None or reader == "csv":  # the generic CSV reader needs column options: never guessed
            log.info("pipeline: %s matches no source reader; skipped", folder)
            continue
        specs.append(f"{reader}={folder.resolve()}")
    return specs


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def plan(cfg) -> tuple[object, list[str], dict[str, str]]:
    """The config each stage runs with, the stages to run, and why the others will not run."""
    out = Path(cfg.pipeline.out).expanduser().resolve()
    data = cfg.model_dump(mode="json")
    data = _merge(data, {k: v for k, v in cfg.pipeline.stage_settings.items() if k in data})
    skipped: dict[str, str] = {}
    runnable: list[str] = []
    for name in cfg.pipeline.stages:
        spec = get_stage(name)
        if not spec.available() or spec.section not in data:
            skipped[name] = f"not available ({spec.module} is not installed)"
            continue
        blocked = [
            producer for (stage, field), producer in PRODUCED_BY.items()
            if stage == name and (stage, field) in REQUIRED_INPUTS and producer not in runnable
            and not data[spec.section].get(field)
        ]
        if blocked:
            skipped[name] = f"blocked: needs the output of {', '.join(blocked)}"
            continue
        runnable.append(name)

    def wire(section: str, field: str, value, producer: str | None = None) -> None:
        # A path the user set stays; otherwise the standard layout (inputs only when made in this run).
        if data[section].get(field) in (None, [], "") and (producer is None or producer in runnable):
            data[section][field] = value

    if "curate" in runnable:
        wire("curate", "out", str(out / LAYOUT["curate"]))
        if not data["curate"].get("sources"):
            folder = data_dir(cfg)
            if not folder.is_dir():
                raise ConfigError(f"pipeline.data: {folder} is not a folder (give --data DIR holding the datasets)")
            data["curate"]["sources"] = discover_sources(folder)
            if not data["curate"]["sources"]:
                raise ConfigError(f"pipeline.data: no dataset folder in {folder} matches a source reader")
    if "caption" in runnable:
        wire("caption", "corpus", str(out / LAYOUT["curate"]), "curate")
        wire("caption", "out", str(out / LAYOUT["caption"]))
    if "train" in runnable:
        wire("train", "captions", str(out / LAYOUT["caption"]), "caption")
        wire("train", "out", str(out / LAYOUT["train"]))
    if "generate" in runnable:
        wire("synth", "adapters", [str(out / LAYOUT["train"] / "final")], "train")
        wire("synth", "corpus", str(out / LAYOUT["curate"]), "curate")
        wire("synth", "out", str(out / LAYOUT["generate"]))
    if "evaluate" in runnable:
        wire("evaluate", "corpus", str(out / LAYOUT["curate"]), "curate")
        wire("evaluate", "synthetic", str(out / LAYOUT["generate"]), "generate")
        wire("evaluate", "out", str(out / LAYOUT["evaluate"]))
    try:
        stage_cfg = DermaFluxConfig.model_validate(data)
    except Exception as err:  # pydantic names the field the stage settings got wrong
        raise ConfigError(f"pipeline.stage_settings do not fit the stage sections: {err}") from None
    return stage_cfg, runnable, skipped


def _settings(section) -> dict:
    # Defaults left out: a field added to a stage later does not make a finished stage look changed.
    return section.model_dump(mode="json", exclude_defaults=True)


def stage_fingerprint(stage_cfg, spec: StageSpec) -> str:
    return fingerprint(_settings(stage_cfg.model), _settings(spec.section_of(stage_cfg)))


def find_report(stage_out: Path, summary: dict) -> str | None:
    for key in ("report", "report_html", "report_md"):
        if summary.get(key):
            return str(summary[key])
    for name in REPORT_NAMES:
        if (stage_out / name).exists():
            return str(stage_out / name)
    return None


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", file=sys.stderr, flush=True)


def run_pipeline(cfg, *, capacity_check: bool = True) -> dict:
    """Run the planned stages; returns the summary also written to <out>/pipeline.json."""
    from dermaflux.ray_runtime import init_ray

    if not cfg.pipeline.out:
        raise ConfigError("pipeline.out: not set; give --out DIR")
    out = Path(cfg.pipeline.out).expanduser().resolve()
    stage_cfg, runnable, skipped = plan(cfg)
    # Everything before a stage runs: paths, preset, then (with Ray up) the resources.
    check_stages_in_order(stage_cfg, runnable)
    # The folder belongs to one preset and model; each stage's own settings are checked per stage.
    resumed = claim_output(out, "pipeline", fingerprint(stage_cfg.preset, _settings(stage_cfg.model)))
    save_effective_config(stage_cfg, out)
    init_ray(stage_cfg.ray)
    if capacity_check:
        check_config(stage_cfg, runnable, produced=set(runnable), capacity=capacity_from_ray())

    results: dict[str, dict] = {name: {"status": reason} for name, reason in skipped.items()}
    total = len(runnable)
    log.info("pipeline: %s %s -> %s", "resuming" if resumed else "starting", ", ".join(runnable), out)
    for index, name in enumerate(runnable, 1):
        spec: StageSpec = get_stage(name)
        marker = f"stage-{name}"
        settings = stage_fingerprint(stage_cfg, spec)
        if is_done(out, marker):
            done = read_json(marker_path(out, marker))
            if done.get("settings") == settings:
                results[name] = {**done.get("summary", {}), "status": "done earlier", "seconds": done.get("seconds")}
                _banner(f"[{index}/{total}] {name}: done earlier, skipped")
                continue
            # Changed settings: the stage decides (resume, or refuse a folder holding a different run).
            log.info("pipeline: %s settings changed since it ran; running it again", name)
        _banner(f"[{index}/{total}] {name} -> {getattr(spec.section_of(stage_cfg), spec.output)}")
        started = time.time()
        try:
            summary = spec.run(stage_cfg)
        except BaseException as err:
            results[name] = {"status": f"failed: {type(err).__name__}: {err}", "seconds": round(time.time() - started, 1)}
            _write_summary(out, results, runnable, stage_cfg)
            raise
        seconds = round(time.time() - started, 1)
        mark_done(out, marker, {"summary": summary, "seconds": seconds, "settings": settings})
        results[name] = {**summary, "status": "succeeded", "seconds": seconds}
        _banner(f"[{index}/{total}] {name}: done in {seconds:.0f}s")
    return _write_summary(out, results, runnable, stage_cfg)


def _write_summary(out: Path, results: dict, runnable: list[str], stage_cfg) -> dict:
    report = None
    if "evaluate" in results and results["evaluate"].get("status") in ("succeeded", "done earlier"):
        report = find_report(Path(stage_cfg.evaluate.out), results["evaluate"])
    ordered = {name: results[name] for name in LAYOUT if name in results}
    summary = {"out": str(out), "report": report, "stages": ordered}
    atomic_write_json(out / "pipeline.json", summary)
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"{'stage':<10} {'status':<28} {'seconds':>8}  output"]
    for name, info in summary["stages"].items():
        seconds = info.get("seconds")
        lines.append(f"{name:<10} {str(info.get('status'))[:28]:<28} {seconds if seconds is not None else '':>8}  {info.get('out', '')}")
    lines.append(f"summary: {summary['out']}/pipeline.json")
    lines.append(f"report: {summary['report']}" if summary["report"] else "report: none (the evaluate stage did not run)")
    return "\n".join(lines)


def run(args, cfg) -> int:
    summary = run_pipeline(cfg)
    print(format_summary(summary), flush=True)
    failed = [n for n, info in summary["stages"].items() if str(info.get("status")).startswith("failed")]
    return 1 if failed else 0
