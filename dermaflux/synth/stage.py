"""The generate stage: a synthetic augmentation set from the config alone (offline, Ray Data)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from dermaflux.lesion import taxonomy
from dermaflux.synth import bulk, subgroup_targets
from dermaflux.synth.requests import AugmentationRequest, check_labels

if TYPE_CHECKING:
    from dermaflux.config import DermaFluxConfig

log = logging.getLogger(__name__)


def subgroup_cells(cfg: DermaFluxConfig) -> tuple[dict[str, int], list]:
    """(plain per-class targets, subgroup cells) of synth.targets and synth.balance."""
    synth = cfg.synth
    plain, cells = subgroup_targets.parse_targets(synth.targets) if synth.targets else ({}, [])
    if synth.balance:
        if not synth.corpus:
            raise ValueError("synth.balance needs synth.corpus (the corpus whose subgroups are balanced)")
        counts = subgroup_targets.corpus_subgroups(synth.corpus, synth.balance)
        cells += subgroup_targets.balance_cells(counts, synth.balance)
        log.info("generate: balancing %s: %s", synth.balance, ", ".join(f"{c[0]}:{c[2]}+{c[3]}" for c in cells))
    return plain, cells


def class_targets(cfg: DermaFluxConfig, subgroups: tuple[dict[str, int], list] | None = None) -> dict[str, int]:
    """synth.class_targets, else per_class for every class of synth.corpus' train split (every taxonomy
    class when no corpus is given), else bring_to over synth.corpus. With a corpus, a class it lacks is an error."""
    synth = cfg.synth
    targets: dict[str, int] = {}
    if synth.bring_to is not None:
        if not synth.corpus:
            raise ValueError("synth.bring_to needs synth.corpus (the corpus folder whose classes are topped up)")
        targets = bulk.bring_to_targets(synth.corpus, synth.bring_to)
    elif synth.per_class is not None:
        if synth.corpus:
            classes = list(bulk.corpus_class_counts(synth.corpus))
            log.info("generate: %d per class for the classes of corpus %s: %s", synth.per_class, synth.corpus,
                     ", ".join(classes))
        else:
            classes = list(taxonomy.DIAGNOSIS_CODES)  # benign/malignant only where a corpus has them
            log.info("generate: no synth.corpus given, so %d per class for every taxonomy class (%s); set "
                     "synth.corpus to generate only the classes a corpus has", synth.per_class, ", ".join(classes))
        targets = {code: synth.per_class for code in classes}
    targets.update(synth.class_targets)
    plain, cells = subgroup_cells(cfg) if subgroups is None else subgroups
    for label, count in subgroup_targets.label_totals(plain, cells).items():
        targets[label] = targets.get(label, 0) + count
    if not targets or not sum(targets.values()):
        raise ValueError("nothing to generate: set synth.per_class (--per-class N), synth.class_targets or synth.bring_to")
    targets = check_labels(targets, "synth.class_targets")
    if synth.corpus:
        bulk.check_corpus_classes(targets, synth.corpus, "synth.class_targets")
    return targets


def job_spec(cfg: DermaFluxConfig) -> bulk.JobSpec:
    """The job `synth` describes, built by the same `bulk.job_spec` as the service's bulk jobs."""
    from dermaflux.synth.adapter_pool import adapter_folders

    synth = cfg.synth
    if not synth.out:
        raise ValueError("synth.out is not set (--out DIR)")
    adapters = adapter_folders(synth.adapters)
    subgroups = subgroup_cells(cfg)  # measured once: --balance may read every train image
    request = AugmentationRequest(
        job_id=Path(synth.out).name or "generate", class_targets=class_targets(cfg, subgroups),
        adapter=synth.adapter or next(iter(adapters), None), seed=synth.seed,
    )
    spec = bulk.job_spec(cfg, request, adapters)
    cells = subgroups[1]
    return dataclasses.replace(spec, cells=tuple(cells)) if cells else spec


def run(cfg: DermaFluxConfig) -> dict:
    from dermaflux.core.artifacts import save_effective_config
    from dermaflux.synth.ray_generate import run_generate_job

    spec = job_spec(cfg)
    out = Path(cfg.synth.out).resolve()
    resumed = bulk.prepare_job(out, spec)  # the job's own claim: a folder holds one job spec
    save_effective_config(cfg, out)
    status = run_generate_job(cfg, out, spec)
    return {**status, "resumed": resumed}
