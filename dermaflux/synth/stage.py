"""The generate stage: a synthetic augmentation set from the config alone (offline, Ray Data)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dermaflux.lesion import taxonomy
from dermaflux.synth import bulk
from dermaflux.synth.requests import AugmentationRequest, check_labels

if TYPE_CHECKING:
    from dermaflux.config import DermaFluxConfig


def class_targets(cfg) -> dict[str, int]:
    """synth.class_targets, else per_class for every taxonomy class, else bring_to over synth.corpus."""
    synth = cfg.synth
    targets: dict[str, int] = {}
    if synth.bring_to is not None:
        if not synth.corpus:
            raise ValueError("synth.bring_to needs synth.corpus (the corpus folder whose classes are topped up)")
        targets = bulk.bring_to_targets(synth.corpus, synth.bring_to)
    elif synth.per_class is not None:
        targets = {code: synth.per_class for code in taxonomy.CODES}
    targets.update(synth.class_targets)
    if not targets or not sum(targets.values()):
        raise ValueError("nothing to generate: set synth.per_class (--per-class N), synth.class_targets or synth.bring_to")
    return check_labels(targets, "synth.class_targets")


def job_spec(cfg) -> bulk.JobSpec:
    """The job `synth` describes, built by the same `bulk.job_spec` as the service's bulk jobs."""
    from dermaflux.synth.adapter_pool import adapter_folders

    synth = cfg.synth
    if not synth.out:
        raise ValueError("synth.out is not set (--out DIR)")
    adapters = adapter_folders(synth.adapters)
    request = AugmentationRequest(
        job_id=Path(synth.out).name or "generate", class_targets=class_targets(cfg),
        adapter=synth.adapter or next(iter(adapters), None), seed=synth.seed,
    )
    return bulk.job_spec(cfg, request, adapters)


def run(cfg: DermaFluxConfig) -> dict:
    from dermaflux.core.config import save_effective_config
    from dermaflux.synth.ray_generate import run_generate_job

    spec = job_spec(cfg)
    out = Path(cfg.synth.out).resolve()
    resumed = bulk.prepare_job(out, spec)  # the job's own claim: a folder holds one job spec
    save_effective_config(cfg, out)
    status = run_generate_job(cfg, out, spec)
    return {**status, "resumed": resumed}
