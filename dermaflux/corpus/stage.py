"""`dermaflux curate`: sources -> one de-duplicated, leakage-free corpus of Parquet shards.

Phases, each resumable in the same output folder: index the sources (driver, fails up front on
a CSV missing a column) -> scan every image (Ray Data) -> plan dedup and splits (driver) ->
write shards (Ray Data) -> manifest. A folder holding a different run is refused (or --force).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from dermaflux.core import artifacts
from dermaflux.corpus import manifest as manifest_mod
from dermaflux.corpus.images import clean_scan
from dermaflux.corpus.plan import build_plan
from dermaflux.corpus.sources import SourceIndex, read_source
from dermaflux.corpus.sources.base import SourceSpec

if TYPE_CHECKING:
    from dermaflux.config import DermaFluxConfig

log = logging.getLogger(__name__)
STAGE = "curate"
SCAN_FILE = "work/scan.parquet"
SHARD_DIR = "shards"
# Fields that change how a run is executed, not what it produces: not part of the fingerprint.
EXECUTION_FIELDS = {"out", "force", "batch_size", "num_workers", "cpus_per_worker"}


def _file_stamp(path: str) -> list:
    try:
        stat = os.stat(path.split("::")[0])
        return [path, stat.st_size, int(stat.st_mtime)]
    except OSError:
        return [path, None, None]


def index_sources(specs: list[str]) -> list[SourceIndex]:
    indexes = []
    for text in specs:
        spec = SourceSpec.parse(text)
        index = read_source(spec)
        log.info("source %s (%s): %d rows, %d indexed, %d rejected while indexing",
                 spec.name, spec.path, index.input_rows, len(index.records), len(index.rejects))
        indexes.append(index)
    return indexes


def _scan(indexes: list[SourceIndex], out: Path, cfg) -> list[dict]:
    path = out / SCAN_FILE
    locators = [r.image_path for index in indexes for r in index.records]
    if artifacts.is_done(out, "scan"):
        frame = pd.read_parquet(path)
        if list(frame["image_path"]) == locators:
            log.info("scan: resuming from %s", path)
            return [clean_scan(r) for r in frame.drop(columns="image_path").to_dict("records")]
        log.info("scan: %s is for other inputs, scanning again", path)
    from dermaflux.corpus import ray_pipeline

    started = time.time()
    results = ray_pipeline.scan(locators, cfg.curate)
    log.info("scan: %d images in %.1fs", len(locators), time.time() - started)
    frame = pd.DataFrame([{"image_path": loc, **res} for loc, res in zip(locators, results)])
    for column in ("error", "format", "phash", "sha256"):
        if column not in frame:
            frame[column] = None
    with artifacts.atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    artifacts.mark_done(out, "scan", {"images": len(locators)})
    return results


def run(cfg: DermaFluxConfig) -> dict:
    section = cfg.curate
    started = time.time()
    out = Path(section.out)
    indexes = index_sources(section.sources)
    identity = {k: v for k, v in section.model_dump(mode="json").items() if k not in EXECUTION_FIELDS}
    run_fingerprint = artifacts.fingerprint(identity, [_file_stamp(f) for index in indexes for f in index.files])
    resumed = artifacts.claim_run(cfg, out, STAGE, run_fingerprint, force=section.force)
    if resumed:
        log.info("%s: resuming the run already there (fingerprint %s)", out, run_fingerprint)

    scans = _scan(indexes, out, cfg)
    plan = build_plan(indexes, scans, section)
    artifacts.atomic_write_text(out / manifest_mod.QUARANTINE_FILE, manifest_mod.csv_text(
        manifest_mod.quarantine_rows(plan.quarantine), manifest_mod.QUARANTINE_COLUMNS))
    artifacts.atomic_write_text(out / manifest_mod.DUPLICATES_FILE, manifest_mod.csv_text(
        plan.duplicates, manifest_mod.DUPLICATE_COLUMNS))
    for reject in plan.quarantine[:20]:
        log.warning("quarantined %s %s row %s (%s): %s", reject.source, reject.file, reject.row,
                    reject.original_id, reject.reason)
    if len(plan.quarantine) > 20:
        log.warning("... %d more quarantined rows in %s", len(plan.quarantine) - 20, out / manifest_mod.QUARANTINE_FILE)

    shard_dir = out / SHARD_DIR
    if not artifacts.is_done(out, "shards"):
        from dermaflux.corpus import ray_pipeline

        with artifacts.atomic_dir(shard_dir) as staging:
            if len(plan.kept):
                ray_pipeline.write_shards(plan.kept, staging, section)
        artifacts.mark_done(out, "shards", {"rows": len(plan.kept)})
    else:
        log.info("shards: already written in %s", shard_dir)

    sources = [{"name": i.spec.name, "reader": i.spec.reader, "path": i.spec.path, "options": i.spec.options,
                "files": i.files} for i in indexes]
    manifest = manifest_mod.build_manifest(plan, manifest_mod.shard_counts(shard_dir), sources,
                                           section.model_dump(mode="json"), run_fingerprint)
    audit = plan.audit_final
    if audit["groups_across_splits"] or audit["near_duplicate_pairs_across_splits"]:
        log.warning("written splits still leak: %d groups and %d near-duplicate pairs across splits (published "
                    "splits kept as given; set curate.official_splits=resplit to re-split)",
                    audit["groups_across_splits"], audit["near_duplicate_pairs_across_splits"])
    manifest["seconds"] = round(time.time() - started, 2)
    artifacts.atomic_write_json(out / "manifest.json", manifest)
    artifacts.mark_done(out, "manifest")
    counts = manifest["reconciliation"]
    return {"out": str(out), "resumed": resumed, **{k: counts[k] for k in ("input_rows", "kept", "duplicates", "quarantined")},
            "by_split": manifest["by_split"], "seconds": manifest["seconds"]}
