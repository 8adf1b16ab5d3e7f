"""Captioning throughput: a plain single-process loop vs Ray Data with 1 and 2 workers, for the
template writer and the tiny-LLM writer, on the same HAM10000 images.

    .venv/bin/python bench/caption.py [--quick] [--data DIR]

Every row does the same per-image work: decode, measure the ABCD attributes, write a caption
(and for `llm`, generate with builtin:tiny-llama and validate). "workers" = writer actors and
concurrent extraction tasks. Ray rows time the whole `caption` stage (shards in, shards +
manifest out) with Ray already started, so actor start-up and model loading are included.
Writes bench/results/caption.json.
"""

from __future__ import annotations

import argparse
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

from dermaflux.caption import stage  # noqa: E402
from dermaflux.caption.batch import extract_batch, write_batch  # noqa: E402
from dermaflux.caption.writers import create_writer  # noqa: E402
from dermaflux.config import load_config  # noqa: E402
from dermaflux.core.runtime import RayConfig  # noqa: E402
from dermaflux.testing.ham10000 import corpus_rows, write_corpus  # noqa: E402


def plain_loop(cfg, corpus: Path) -> dict:
    """Same work in one process, no Ray: read each shard, extract, write captions."""
    import pyarrow.parquet as pq

    section = cfg.caption
    started = time.perf_counter()
    writer = create_writer(section)
    captions = 0
    for shard in sorted((corpus / "shards").glob("*.parquet")):
        frame = pq.read_table(shard).to_pandas()
        for start in range(0, len(frame), section.batch_size):
            done = write_batch(writer, extract_batch(frame.iloc[start : start + section.batch_size]), section.seed)
            captions += int((done["caption"] != "").sum())
    return {"captions": captions, "seconds": time.perf_counter() - started}


def ray_run(cfg, workers: int, out: Path) -> dict:
    # Half a CPU each for the writer actors and the extraction tasks: with 2 workers on 2 CPUs the
    # actors must not hold every CPU (see ray_pipeline._check_cpus).
    section = cfg.caption.model_copy(update={
        "out": str(out), "concurrency": workers, "extract_concurrency": workers,
        "cpus_per_actor": 0.5, "extract_cpus": 0.5})
    started = time.perf_counter()
    summary = stage.run(cfg.model_copy(update={"caption": section}))
    return {"captions": summary["captioned"], "seconds": time.perf_counter() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="48 images instead of 240")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ham10000-224"))
    parser.add_argument("--max-new-tokens", type=int, default=24, help="llm writer: generated tokens per caption")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray

    from dermaflux.core.runtime import init_ray

    work = Path(tempfile.mkdtemp(prefix="bench-caption-"))
    per_label = 7 if args.quick else 35  # 7 HAM labels
    try:
        rows = corpus_rows(Path(args.data), per_label=per_label)
        corpus = write_corpus(rows, work / "corpus", shards=8)
        init_ray(RayConfig(num_cpus=2), log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        results = []
        for writer in ("template", "llm"):
            cfg = load_config("tiny", extra={"caption": {
                "corpus": str(corpus), "writer": writer, "batch_size": 8, "max_new_tokens": args.max_new_tokens}})
            print(f"{writer}: plain loop ...", flush=True)
            results.append({"writer": writer, "mode": "plain loop (1 process)", **plain_loop(cfg, corpus)})
            for workers in (1, 2):
                print(f"{writer}: ray data, {workers} worker(s) ...", flush=True)
                run = ray_run(cfg, workers, work / f"{writer}-{workers}")
                results.append({"writer": writer, "mode": f"ray data, {workers} worker(s)", **run})
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    for r in results:
        r["captions_per_s"] = round(r["captions"] / r["seconds"], 2)
        r["seconds"] = round(r["seconds"], 2)
    for writer in ("template", "llm"):
        base = next(r for r in results if r["writer"] == writer and r["mode"].startswith("plain"))
        for r in results:
            if r["writer"] == writer:
                r["vs_plain"] = round(r["captions_per_s"] / base["captions_per_s"], 2)
    print(f"\n{'writer':<9} {'mode':<24} {'captions':>8} {'seconds':>8} {'captions/s':>10} {'vs plain':>8}")
    for r in results:
        print(f"{r['writer']:<9} {r['mode']:<24} {r['captions']:>8} {r['seconds']:>8} {r['captions_per_s']:>10} {r['vs_plain']:>8}")
    out = ROOT / "bench" / "results" / "caption.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "images": len(rows), "quick": args.quick, "llm_max_new_tokens": args.max_new_tokens,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "ray_num_cpus": 2,
        "results": results,
    }, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
