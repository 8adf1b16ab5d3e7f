"""`dermaflux curate`: sources -> one de-duplicated, leakage-free corpus of Parquet shards.

Phases, each resumable in the same output folder: index the sources (driver, fails up front on
a CSV missing a column) -> scan every image (Ray Data) -> plan dedup and splits (driver) ->
write shards (Ray Data) -> manifest. A folder holding a different run is refused (--force replaces
a curate run, never a folder DermaFlux did not write or one the run reads from); a re-run scans
again only the images whose file changed; a run that keeps no row fails with the reasons.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat as stat_mod
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from dermaflux.core import artifacts
from dermaflux.corpus.config import CurateConfig
from dermaflux.corpus import manifest as manifest_mod
from dermaflux.corpus.images import clean_scan
from dermaflux.corpus.plan import BUCKETS, build_plan
from dermaflux.corpus.sources import SourceIndex, read_source
from dermaflux.corpus.sources.base import SourceSpec
from dermaflux.corpus.sources.dermamnist import NPZ_SEPARATOR

if TYPE_CHECKING:
    from dermaflux.config import DermaFluxConfig

log = logging.getLogger(__name__)
STAGE = "curate"
SCAN_FILE = "work/scan.parquet"
SHARD_DIR = "shards"
# Fields that change how a run is executed, not what it produces: not part of the fingerprint.
EXECUTION_FIELDS = {"out", "force", "batch_size", "scan_batch", "num_workers", "cpus_per_worker"}
# Fields added after runs existed: left out of the fingerprint at their default, so those runs still resume.
LATER_FIELDS = {"max_pixels", "test_overlap", "max_image_bytes"}
# Source options that name a file or folder the reader reads.
PATH_OPTIONS = ("images", "metadata", "gt")


def _file_stamp(path: str) -> list:
    """An index file (labels CSV, .npz) by its content: an edit that keeps the size and mtime
    (`touch -r`, a same-length label) is another run, never a resume onto stale shards."""
    try:
        with open(path.split("::")[0], "rb") as fh:
            if not stat_mod.S_ISREG(os.fstat(fh.fileno()).st_mode):
                return [path, None]
            return [path, hashlib.file_digest(fh, "sha256").hexdigest()]
    except OSError:
        return [path, None]


def index_sources(specs: list[str]) -> list[SourceIndex]:
    indexes = []
    for text in specs:
        spec = SourceSpec.parse(text)
        index = read_source(spec)
        undiagnosed = sum(r.label is None for r in index.records)
        log.info("source %s (%s): %d rows, %d indexed, %d rejected while indexing%s%s",
                 spec.name, spec.path, index.input_rows, len(index.records), len(index.rejects),
                 f"; every row to {spec.fixed_split} (split={spec.fixed_split})" if spec.fixed_split else "",
                 f"; {undiagnosed} without a diagnosis (binary label)" if undiagnosed else "")
        indexes.append(index)
    return indexes


def image_stamps(locators: list[str]) -> list[str | None]:
    """Size, mtime and ctime of each image's file (an .npz slot: its archive's), from stat alone.

    ctime too: a copy that keeps the old mtime (cp -p, shutil.copy2) still changes it.
    """
    by_file: dict[str, str | None] = {}
    for locator in locators:
        path = locator.split(NPZ_SEPARATOR)[0]
        if path not in by_file:
            try:
                stat = os.stat(path)
                by_file[path] = f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"
            except OSError:
                by_file[path] = None
    return [by_file[locator.split(NPZ_SEPARATOR)[0]] for locator in locators]


def _earlier_scan(out: Path) -> dict[str, tuple[str, dict]]:
    """image path -> (file stamp, scan result) of the last finished scan; {} when none can be reused."""
    path = out / SCAN_FILE
    if not artifacts.is_done(out, "scan") or not path.exists():
        return {}
    frame = pd.read_parquet(path)
    if "stamp" not in frame:  # written before scans recorded file stamps: nothing to compare with
        return {}
    earlier = {}
    for row in frame.to_dict("records"):
        locator, stamp = row.pop("image_path"), row.pop("stamp")
        earlier[locator] = (stamp if isinstance(stamp, str) else None, clean_scan(row))
    return earlier


def _scan(indexes: list[SourceIndex], out: Path, cfg: DermaFluxConfig) -> list[dict]:
    """Scan results in index order; on a re-run only images whose file changed (or is new) are read."""
    locators = [r.image_path for index in indexes for r in index.records]
    stamps = image_stamps(locators)
    earlier = _earlier_scan(out)
    results = [earlier[loc][1] if loc in earlier and earlier[loc][0] == stamp else None
               for loc, stamp in zip(locators, stamps)]
    todo = [i for i, result in enumerate(results) if result is None]
    if earlier and not todo and set(earlier) == set(locators):
        log.info("scan: resuming from %s (no image changed)", out / SCAN_FILE)
        return results
    if earlier:
        log.info("scan: %d of %d images are new or changed since %s; scanning those", len(todo), len(locators),
                 out / SCAN_FILE)
    # The shards hold the old scan's images: forget them before the new scan is recorded.
    artifacts.clear_done(out, "shards")
    from dermaflux.corpus import ray_pipeline

    started = time.time()
    for i, result in zip(todo, ray_pipeline.scan([locators[i] for i in todo], cfg.curate)):
        results[i] = result
    log.info("scan: %d images in %.1fs", len(todo), time.time() - started)
    frame = pd.DataFrame([{"image_path": loc, "stamp": stamp, **result}
                          for loc, stamp, result in zip(locators, stamps, results)])
    for column in ("error", "format", "phash", "sha256"):
        if column not in frame:
            frame[column] = None
    with artifacts.atomic_path(out / SCAN_FILE) as tmp:
        frame.to_parquet(tmp, index=False)
    artifacts.mark_done(out, "scan", {"images": len(locators)})
    return results


def input_paths(indexes: list[SourceIndex]) -> list[str]:
    """What the run reads: each source's path and path options, its index files, its image folders."""
    paths: dict[str, None] = {}
    for index in indexes:
        options = [index.spec.options[key] for key in PATH_OPTIONS if key in index.spec.options]
        paths.update(dict.fromkeys([index.spec.path, *options, *index.files]))
        paths.update(dict.fromkeys(str(Path(r.image_path).parent) for r in index.records
                                   if NPZ_SEPARATOR not in r.image_path))
    return list(paths)


def run_fingerprint_of(section: CurateConfig, indexes: list[SourceIndex]) -> str:
    identity = {k: v for k, v in section.model_dump(mode="json").items() if k not in EXECUTION_FIELDS
                and not (k in LATER_FIELDS and v == type(section).model_fields[k].default)}
    return artifacts.fingerprint(identity, [_file_stamp(f) for index in indexes for f in index.files])


def nothing_kept(plan, out: Path) -> artifacts.NothingKept:
    """Why no row survived: counts by reason and the first few rows, pointing at quarantine.csv."""
    kinds = Counter(manifest_mod.reason_kind(r.reason) for r in plan.quarantine)
    counts = ", ".join(f"{kind} {n}" for kind, n in kinds.most_common()) or "none"
    examples = "; ".join(f"{r.file} row {r.row}: {r.reason}" for r in plan.quarantine[:3])
    overlap = plan.summary["test_overlap"]
    return artifacts.NothingKept(
        f"curate kept no row: {sum(plan.input_rows.values())} input rows, {len(plan.duplicates)} duplicates, "
        + (f"{overlap} test rows repeating a training source (test_overlap.csv), " if overlap else "")
        + f"{len(plan.quarantine)} quarantined ({counts})" + (f"; e.g. {examples}" if examples else "")
        + f"; every quarantined row is listed in {out / manifest_mod.QUARANTINE_FILE}")


def _write_lists(plan, out: Path) -> None:
    artifacts.atomic_write_text(out / manifest_mod.QUARANTINE_FILE, manifest_mod.csv_text(
        manifest_mod.quarantine_rows(plan.quarantine), manifest_mod.QUARANTINE_COLUMNS))
    artifacts.atomic_write_text(out / manifest_mod.DUPLICATES_FILE, manifest_mod.csv_text(
        plan.duplicates, manifest_mod.DUPLICATE_COLUMNS))
    artifacts.atomic_write_text(out / manifest_mod.OVERLAP_FILE, manifest_mod.csv_text(
        plan.test_overlap, manifest_mod.OVERLAP_COLUMNS))
    artifacts.atomic_write_text(out / manifest_mod.CAPPED_FILE, manifest_mod.csv_text(
        plan.capped, manifest_mod.CAPPED_COLUMNS))
    for source, caps in plan.caps.items():
        log.info("source %s: caps %s left out %d rows (%s)", source, caps,
                 sum(c["source"] == source for c in plan.capped), out / manifest_mod.CAPPED_FILE)
    if plan.test_overlap:
        dropped = plan.summary["test_overlap"]
        log.warning("test overlap: %d pairs between test-only sources (%s) and the training sources; %s (%s)",
                    len(plan.test_overlap), ", ".join(plan.test_only),
                    f"{dropped} test rows dropped" if dropped else "kept in the test set (curate.test_overlap=keep)",
                    out / manifest_mod.OVERLAP_FILE)
    for source, ignored in plan.placeholder_ids.items():
        log.warning("source %s: %d lesion/patient ids are placeholders (e.g. %s), not used to group rows",
                    source, ignored["ids"], ", ".join(ignored["values"]))
    for reject in plan.quarantine[:20]:
        log.warning("quarantined %s %s row %s (%s): %s", reject.source, reject.file, reject.row,
                    reject.original_id, reject.reason)
    if len(plan.quarantine) > 20:
        log.warning("... %d more quarantined rows in %s", len(plan.quarantine) - 20, out / manifest_mod.QUARANTINE_FILE)


def run(cfg: DermaFluxConfig) -> dict:
    section = cfg.curate
    started = time.time()
    out = Path(section.out)
    indexes = index_sources(section.sources)
    seconds = {"index": time.time() - started}
    run_fingerprint = run_fingerprint_of(section, indexes)
    resumed = artifacts.claim_run(cfg, out, STAGE, run_fingerprint, force=section.force, inputs=input_paths(indexes))
    if resumed:
        log.info("%s: resuming the run already there (fingerprint %s)", out, run_fingerprint)

    step = time.time()
    scans = _scan(indexes, out, cfg)
    seconds["scan"], step = time.time() - step, time.time()
    plan = build_plan(indexes, scans, section)
    seconds.update(plan.seconds)
    step = time.time()
    _write_lists(plan, out)
    if not len(plan.kept):
        raise nothing_kept(plan, out)

    shard_dir = out / SHARD_DIR
    if not artifacts.is_done(out, "shards"):
        from dermaflux.corpus import ray_pipeline

        with artifacts.atomic_dir(shard_dir) as staging:
            ray_pipeline.write_shards(plan.kept, staging, section)
        artifacts.mark_done(out, "shards", {"rows": len(plan.kept)})
    else:
        log.info("shards: already written in %s", shard_dir)

    seconds["write"] = time.time() - step
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
    # index, scan (decode + hash, Ray Data), dedup (within plan), plan (dedup + caps + splits), write (Ray Data)
    manifest["seconds_by_step"] = {k: round(v, 2) for k, v in seconds.items()}
    artifacts.atomic_write_json(out / "manifest.json", manifest)
    artifacts.mark_done(out, "manifest")
    counts = manifest["reconciliation"]
    return {"out": str(out), "resumed": resumed, **{k: counts[k] for k in BUCKETS},
            "by_split": manifest["by_split"], "no_diagnosis": manifest["no_diagnosis"]["rows"],
            "seconds": manifest["seconds"]}
