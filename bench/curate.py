"""Curation throughput: a plain single-process loop vs Ray Data with 1 and 2 workers, same images.

    .venv/bin/python bench/curate.py [--quick] [--data DIR]
    .venv/bin/python bench/curate.py --scale 20000     (the reference-scale mode: bench/curate_scale.py)

Per-image work is the same in every row: read, verify, fully decode, perceptual-hash (scan) and
read again for the Parquet write. "scan img/s" times the per-image pass alone; "end-to-end img/s"
times the whole `curate` stage (index, scan, plan, write, manifest) with Ray already started.
Writes bench/results/curate.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from dermaflux.config import load_config  # noqa: E402
from dermaflux.core.runtime import RayConfig  # noqa: E402
from dermaflux.corpus import stage  # noqa: E402
from dermaflux.corpus.images import scan_image  # noqa: E402
from dermaflux.corpus.plan import build_plan  # noqa: E402
from dermaflux.corpus.schema import CORPUS_SCHEMA  # noqa: E402


def subset_source(data: Path, limit: int | None, work: Path) -> str:
    if limit is None:
        return f"ham10000={data}"
    with open(data / "HAM10000_metadata.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = [row for _, row in zip(range(limit), reader)]
        columns = reader.fieldnames
    path = work / "HAM10000_metadata.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return f"ham10000={data},metadata={path}"


def plain_loop(cfg, out: Path) -> dict:
    """The same curation in one process: no Ray, pyarrow writes the shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dermaflux.corpus.images import read_image_bytes

    started = time.perf_counter()
    indexes = stage.index_sources(cfg.curate.sources)
    records = [r for index in indexes for r in index.records]
    scan_started = time.perf_counter()
    scans = [scan_image(r.image_path, cfg.curate.phash_size) for r in records]
    scan_seconds = time.perf_counter() - scan_started
    plan = build_plan(indexes, scans, cfg.curate)
    (out / "shards").mkdir(parents=True)
    kept = plan.kept
    for k, start in enumerate(range(0, len(kept), cfg.curate.rows_per_shard)):
        part = kept.iloc[start:start + cfg.curate.rows_per_shard]
        images = [read_image_bytes(p)[0] for p in part["image_path"]]
        frame = part.drop(columns=["image_path", "sha256"]).assign(image=images)[CORPUS_SCHEMA.names]
        pq.write_table(pa.Table.from_pandas(frame, schema=CORPUS_SCHEMA, preserve_index=False),
                       out / "shards" / f"part-{k:05d}.parquet")
    return {"images": len(records), "scan_seconds": scan_seconds, "seconds": time.perf_counter() - started}


def ray_run(cfg, workers: int) -> dict:
    from dermaflux.corpus import ray_pipeline

    section = cfg.curate.model_copy(update={"num_workers": workers})
    indexes = stage.index_sources(section.sources)
    locators = [r.image_path for index in indexes for r in index.records]
    # Warm up: worker processes start and import PIL/imagehash once, outside the timing.
    ray_pipeline.scan(locators[: section.batch_size * workers], section)
    scan_started = time.perf_counter()
    ray_pipeline.scan(locators, section)
    scan_seconds = time.perf_counter() - scan_started
    started = time.perf_counter()
    stage.run(cfg.model_copy(update={"curate": section}))
    return {"images": len(locators), "scan_seconds": scan_seconds, "seconds": time.perf_counter() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="600 images instead of all 5,984")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ham10000-224"))
    parser.add_argument("--batch-size", type=int, default=None, help="images per Ray Data task batch (--scale: per scan task, curate.scan_batch)")
    parser.add_argument("--scale", type=int, default=None, metavar="N",
                        help="write an N-image multi-source corpus of small JPEGs and curate it (bench/curate_scale.py)")
    parser.add_argument("--workers", type=int, default=None, help="--scale: concurrent per-image Ray tasks")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.scale:
        from bench.curate_scale import run as run_at_scale

        return run_at_scale(args.scale, args.workers, ROOT, args.batch_size)
    import ray

    from dermaflux.core.runtime import init_ray

    work = Path(tempfile.mkdtemp(prefix="bench-curate-"))
    try:
        source = subset_source(Path(args.data), 600 if args.quick else None, work)
        cfg = load_config("tiny", extra={"curate": {"sources": [source]}})
        if args.batch_size:
            cfg = load_config("tiny", extra={"curate": {"sources": [source], "batch_size": args.batch_size}})
        results = []
        print("plain loop ...", flush=True)
        results.append({"mode": "plain loop (1 process)", **plain_loop(cfg, work / "plain")})
        ray_started = time.perf_counter()
        init_ray(RayConfig(num_cpus=2), log_to_driver=False)
        ray_start_seconds = time.perf_counter() - ray_started
        ray.data.DataContext.get_current().enable_progress_bars = False
        for workers in (1, 2):
            print(f"ray data, {workers} worker(s) ...", flush=True)
            run_cfg = cfg.model_copy(update={"curate": cfg.curate.model_copy(update={"out": str(work / f"ray{workers}")})})
            results.append({"mode": f"ray data, {workers} worker(s)", **ray_run(run_cfg, workers)})
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = results[0]
    for r in results:
        r["scan_images_per_s"] = r["images"] / r["scan_seconds"]
        r["images_per_s"] = r["images"] / r["seconds"]
        r["speed_vs_plain"] = r["images_per_s"] / (base["images"] / base["seconds"])
    header = f"{'mode':<24} {'images':>7} {'scan img/s':>11} {'end-to-end s':>13} {'end-to-end img/s':>17} {'vs plain':>9}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['mode']:<24} {r['images']:>7} {r['scan_images_per_s']:>11.0f} {r['seconds']:>13.1f} "
              f"{r['images_per_s']:>17.0f} {r['speed_vs_plain']:>8.2f}x")
    print(f"(ray start, not counted above: {ray_start_seconds:.1f}s)")
    report = {"benchmark": "curate", "quick": args.quick, "batch_size": cfg.curate.batch_size,
              "cpus": os.cpu_count(), "machine": platform.machine(), "ray_start_seconds": ray_start_seconds,
              "results": results, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = ROOT / "bench" / "results" / "curate.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
