"""`dermaflux pipeline`: the pipeline stages of the stage table in order on one Ray instance, resumable.

<out>/corpus -> <out>/captions -> <out>/train (adapter in train/final) -> <out>/synthetic ->
<out>/report (each stage's `folder` in `dermaflux.stages`). `plan` works out the steps once (each
stage's config section, output folder and fingerprint); `run_pipeline` checks their paths once,
starts Ray once and runs each step. A stage that finished leaves a marker
in <out>/.done and is skipped on a re-run; a stage that stopped half-way resumes through its own
markers. A stage whose required input is made by a stage left out of the run is reported as blocked.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from dermaflux.checks import check_resources, check_stages_in_order
from dermaflux.config import ConfigError, DermaFluxConfig
from dermaflux.core.artifacts import atomic_write_json, claim_run, fingerprint, is_done, mark_done, marker_path, read_json
from dermaflux.core.config import ConfigModel, deep_merge
from dermaflux.core.preflight import capacity_from_ray
from dermaflux.core.progress import announce, shown
from dermaflux.core.runtime import init_ray
from dermaflux.corpus.config import SourceSpec
from dermaflux.stages import PIPELINE, StageSpec, get_stage, pipeline_names

log = logging.getLogger(__name__)

REPORT_NAMES = ("report.html", "report.md")


def data_dir(cfg: DermaFluxConfig) -> Path:
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


@dataclass(frozen=True)
class Step:
    """One stage of a planned run: its config section, its output folder and its settings' fingerprint."""

    spec: StageSpec
    section: ConfigModel
    out: str
    fingerprint: str  # a finished stage whose marker holds the same fingerprint is skipped


@dataclass(frozen=True)
class Plan:
    cfg: DermaFluxConfig  # the config every step runs with (stage settings and run-folder paths merged in)
    out: Path  # the run folder
    steps: tuple[Step, ...]  # in pipeline order
    skipped: dict[str, str]  # requested stages that will not run, and why

    @property
    def stages(self) -> list[str]:
        return [step.spec.name for step in self.steps]


def plan(cfg: DermaFluxConfig) -> Plan:
    """The steps to run, each with the config it runs with, and why the other requested stages will not run."""
    if not cfg.pipeline.out:
        raise ConfigError("pipeline.out: not set; give --out DIR")
    out = Path(cfg.pipeline.out).expanduser().resolve()
    data = deep_merge(cfg.model_dump(mode="json"), _pipeline_settings(cfg.pipeline.stage_settings))
    data["pipeline"]["stages"] = requested = requested_stages(cfg.pipeline.stages)
    runnable, skipped = _runnable([get_stage(name) for name in requested], data)
    made = {spec.name for spec in runnable}
    for spec in runnable:
        # A path the user set stays; otherwise the standard layout (inputs only when made in this run).
        section = data[spec.section]
        if not section.get(spec.output):
            section[spec.output] = str(out / spec.folder)
        for needed in spec.inputs:
            if needed.made_by in made and not section.get(needed.field):
                path = str(out / get_stage(needed.made_by).folder / needed.subpath)
                section[needed.field] = [path] if needed.many else path
    if "curate" in made and not data["curate"].get("sources"):
        data["curate"]["sources"] = _discovered_sources(cfg)
    try:
        stage_cfg = DermaFluxConfig.model_validate(data)
    except Exception as err:  # pydantic names the field the stage settings got wrong
        raise ConfigError(f"pipeline.stage_settings do not fit the stage sections: {err}") from None
    return Plan(stage_cfg, out, tuple(_step(spec, stage_cfg) for spec in runnable), skipped)


def _pipeline_settings(stage_settings: dict[str, dict]) -> dict[str, dict]:
    """The config checked that each is a stage's section; here, that a pipeline stage reads it."""
    sections = sorted({spec.section for spec in PIPELINE})
    unknown = sorted(set(stage_settings) - set(sections))
    if unknown:
        raise ConfigError(f"pipeline.stage_settings: sections {unknown} belong to no pipeline stage; "
                          f"expected some of {sections}")
    return stage_settings


def _step(spec: StageSpec, stage_cfg: DermaFluxConfig) -> Step:
    section = spec.section_of(stage_cfg)
    return Step(spec, section, getattr(section, spec.output), stage_fingerprint(stage_cfg, spec))


def requested_stages(stages: list[str] | None) -> list[str]:
    """`pipeline.stages` checked against the stage table, in pipeline order (None: every pipeline stage)."""
    order = pipeline_names()
    if stages is None:
        return order
    unknown = [name for name in stages if name not in order]
    if unknown:
        raise ConfigError(f"pipeline.stages: unknown stage(s) {unknown}; pipeline stages: {', '.join(order)}")
    if len(set(stages)) != len(stages):
        raise ConfigError(f"pipeline.stages: stages listed twice: {stages}")
    return sorted(stages, key=order.index)


def _runnable(stages: list[StageSpec], data: dict) -> tuple[list[StageSpec], dict[str, str]]:
    """Stages whose required inputs are set or made earlier in this run; why the others are blocked."""
    runnable: list[StageSpec] = []
    skipped: dict[str, str] = {}
    for spec in stages:
        made = {earlier.name for earlier in runnable}
        blocked = [needed.made_by for needed in spec.inputs
                   if needed.required and needed.made_by and needed.made_by not in made
                   and not data[spec.section].get(needed.field)]
        if blocked:
            skipped[spec.name] = f"blocked: needs the output of {', '.join(blocked)}"
        else:
            runnable.append(spec)
    return runnable, skipped


def _discovered_sources(cfg: DermaFluxConfig) -> list[str]:
    folder = data_dir(cfg)
    if not folder.is_dir():
        raise ConfigError(f"pipeline.data: {folder} is not a folder (give --data DIR holding the datasets)")
    sources = discover_sources(folder)
    if not sources:
        raise ConfigError(f"pipeline.data: no dataset folder in {folder} matches a source reader")
    return sources


def _source_paths(stage_cfg: DermaFluxConfig) -> list[str]:
    """The datasets curate reads: the run folder may not be, contain or lie inside one of them."""
    return [SourceSpec.parse(text).path for text in stage_cfg.curate.sources]


def _settings(section: ConfigModel) -> dict:
    # Defaults left out: a field added to a stage later does not make a finished stage look changed.
    return section.model_dump(mode="json", exclude_defaults=True)


def stage_fingerprint(stage_cfg: DermaFluxConfig, spec: StageSpec) -> str:
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
    announce(f"\n=== {text} ===")


def run_pipeline(cfg: DermaFluxConfig, *, capacity_check: bool = True) -> dict:
    """Plan, check the paths once, start Ray once, run each step; returns the summary also written to
    <out>/pipeline.json."""
    planned = plan(cfg)
    stage_cfg, out = planned.cfg, planned.out
    check_stages_in_order(stage_cfg, planned.stages)  # paths and preset, each input made earlier or present
    # The folder belongs to one preset and model; each stage's own settings are checked per stage.
    resumed = claim_run(stage_cfg, out, "pipeline", fingerprint(stage_cfg.preset, _settings(stage_cfg.model)),
                        inputs=_source_paths(stage_cfg) if "curate" in planned.stages else [])
    init_ray(stage_cfg.ray)
    if capacity_check:
        check_resources(stage_cfg, planned.stages, capacity_from_ray())
    results: dict[str, dict] = {name: {"status": reason} for name, reason in planned.skipped.items()}
    log.info("pipeline: %s %s -> %s", "resuming" if resumed else "starting", ", ".join(planned.stages), shown(out))
    for index, step in enumerate(planned.steps, 1):
        progress = f"[{index}/{len(planned.steps)}] {step.spec.name}"
        try:
            results[step.spec.name] = _run_one(step, stage_cfg, out, progress)
        except BaseException as err:
            results[step.spec.name] = {"status": f"failed: {type(err).__name__}: {err}"}
            _write_summary(out, results, stage_cfg)
            raise
    return _write_summary(out, results, stage_cfg)


def _run_one(step: Step, stage_cfg: DermaFluxConfig, out: Path, progress: str) -> dict:
    """One step: skipped when its marker holds the same settings, else run (it resumes itself)."""
    marker = f"stage-{step.spec.name}"
    if is_done(out, marker):
        done = read_json(marker_path(out, marker))
        if done.get("settings") == step.fingerprint:
            _banner(f"{progress}: done earlier, skipped")
            return {**done.get("summary", {}), "status": "done earlier", "seconds": done.get("seconds")}
        # Changed settings: the stage decides (resume, or refuse a folder holding a different run).
        log.info("pipeline: %s settings changed since it ran; running it again", step.spec.name)
    _banner(f"{progress} -> {shown(step.out)}")
    started = time.time()
    summary = step.spec.execute(stage_cfg)
    seconds = round(time.time() - started, 1)
    mark_done(out, marker, {"summary": summary, "seconds": seconds, "settings": step.fingerprint})
    _banner(f"{progress}: done in {seconds:.0f}s")
    return {**summary, "status": "succeeded", "seconds": seconds}


def _write_summary(out: Path, results: dict, stage_cfg: DermaFluxConfig) -> dict:
    report = None
    if "evaluate" in results and results["evaluate"].get("status") in ("succeeded", "done earlier"):
        report = find_report(Path(stage_cfg.evaluate.out), results["evaluate"])
    ordered = {spec.name: results[spec.name] for spec in PIPELINE if spec.name in results}
    summary = {"out": str(out), "report": report, "stages": ordered}
    atomic_write_json(out / "pipeline.json", summary)
    return summary


def failed(summary: dict) -> bool:
    return any(str(info.get("status")).startswith("failed") for info in summary["stages"].values())


def format_summary(summary: dict) -> str:
    lines = [f"{'stage':<10} {'status':<28} {'seconds':>8}  output"]
    for name, info in summary["stages"].items():
        seconds = info.get("seconds")
        lines.append(f"{name:<10} {str(info.get('status'))[:28]:<28} {seconds if seconds is not None else '':>8}  {info.get('out', '')}")
    lines.append(f"summary: {summary['out']}/pipeline.json")
    lines.append(f"report: {summary['report']}" if summary["report"] else "report: none (the evaluate stage did not run)")
    return "\n".join(lines)
