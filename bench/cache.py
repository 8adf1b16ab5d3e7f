"""Training-cache memory: the memory-mapped reader vs loading the split into each worker.

    .venv/bin/python bench/cache.py [--rows N] [--workers W] [--steps S]

Writes a cache of N rows with FLUX.1-dev's shapes (latents 16x64x64, T5 embeddings 512x4096,
pooled 768, bf16: 4.1 MiB per row) and runs W worker processes at once, as on one training node,
each drawing S micro-batches of 1 from the sample stream ("no data": the same imports only,
the process's own baseline). "in-memory" is the previous reader
(every row decoded into tensors up front); "mapped" is `train.cache.load_cached_set`. Memory is
each worker's anonymous (private, unreclaimable) memory from /proc/self/smaps_rollup at the end,
plus its peak RSS. Writes bench/results/cache.json.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "cache.json"
SHAPES = {"latents": (16, 64, 64), "prompt_embeds": (512, 4096), "pooled_prompt_embeds": (768,)}


def write_cache(cache: Path, rows: int, per_shard: int = 16) -> None:
    import pyarrow as pa
    import torch

    from dermaflux.model.loading import dtype_name
    from dermaflux.train.cache import CACHE_SCHEMA, tensor_to_bytes, write_cache_shard

    (cache / "shards").mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for shard, start in enumerate(range(0, rows, per_shard)):
        records = []
        for i in range(start, min(rows, start + per_shard)):
            record = {"id": f"img{i:06d}", "split": "train", "label": "nv", "caption": "c",
                      "dtype": dtype_name(torch.bfloat16)}
            for name, shape in SHAPES.items():
                record[name] = tensor_to_bytes(torch.randn(shape, generator=generator).to(torch.bfloat16))
                record[name + "_shape"] = list(shape)
            records.append(record)
        write_cache_shard(pa.Table.from_pylist(records, schema=CACHE_SCHEMA), cache / "shards" / f"part-{shard:05d}.arrow")


def in_memory_reader(cache: Path):
    """The reader before this change: the whole split decoded into stacked tensors."""
    import pyarrow as pa
    import torch

    from dermaflux.train.cache import bytes_to_tensor, cache_shards, open_shard

    table = pa.concat_tables([open_shard(p) for p in cache_shards(cache)]).sort_by("id")
    rows = table.to_pylist()
    del table
    tensors = [torch.stack([bytes_to_tensor(r[c], r[c + "_shape"], r["dtype"]) for r in rows]) for c in SHAPES]
    del rows
    return len(tensors[0]), lambda idx: tuple(t[idx] for t in tensors)


def anonymous_mib() -> float:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(mode: str, cache: str, rank: int, world: int, steps: int, queue) -> None:
    import torch

    from dermaflux.train.cache import load_cached_set, micro_batch_indices

    torch.set_num_threads(1)
    started = time.perf_counter()
    if mode == "mapped":
        data = load_cached_set(cache, "train")
        n, rows = len(data), data.rows
    elif mode == "in-memory":
        n, rows = in_memory_reader(Path(cache))
    else:  # "no data": the same imports, for the process's own baseline
        import pyarrow  # noqa: F401

        queue.put({"mode": mode, "rank": rank, "ready_s": 0.0, "batch_ms": 0.0, "anonymous_mib": anonymous_mib(),
                   "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        return
    ready = time.perf_counter() - started
    started = time.perf_counter()
    for step in range(steps):
        idx = torch.from_numpy(micro_batch_indices(n, 0, step, rank, world, 1))
        latents, embeds, pooled = rows(idx)
        assert embeds.shape == (1, *SHAPES["prompt_embeds"])
    per_batch = (time.perf_counter() - started) / steps
    queue.put({"mode": mode, "rank": rank, "ready_s": ready, "batch_ms": per_batch * 1000,
               "anonymous_mib": anonymous_mib(), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def run_mode(mode: str, cache: Path, workers: int, steps: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(mode, str(cache), r, workers, steps, queue)) for r in range(workers)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"{mode} worker exited with {p.exitcode}")
    return {"mode": mode, "workers": results,
            "anonymous_mib_per_worker": max(r["anonymous_mib"] for r in results),
            "peak_rss_mib_per_worker": max(r["peak_rss_mib"] for r in results),
            "ready_s": max(r["ready_s"] for r in results),
            "batch_ms": sum(r["batch_ms"] for r in results) / len(results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256, help="cached images (4.1 MiB each)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=64, help="micro-batches per worker")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        write_cache(cache, args.rows)
        rows = [run_mode(mode, cache, args.workers, args.steps) for mode in ("no data", "in-memory", "mapped")]
    data_mib = args.rows * sum(2 * math.prod(shape) for shape in SHAPES.values()) / 2**20  # bf16
    print(f"\ncache of {args.rows} rows at FLUX.1-dev shapes ({data_mib:.0f} MiB), {args.workers} workers, "
          f"{args.steps} micro-batches each (shards mapped in place, no gathered copy)")
    print(f"{'reader':10} {'anon MiB/worker':>16} {'peak RSS MiB':>13} {'ready s':>8} {'ms/batch':>9}")
    for r in rows:
        print(f"{r['mode']:10} {r['anonymous_mib_per_worker']:16.0f} {r['peak_rss_mib_per_worker']:13.0f} "
              f"{r['ready_s']:8.2f} {r['batch_ms']:9.2f}")
    base, in_memory, mapped = (r["anonymous_mib_per_worker"] for r in rows)
    ratio = (in_memory - base) / max(mapped - base, 1.0)
    print(f"private memory the reader adds per worker: in-memory {in_memory - base:.0f} MiB, mapped "
          f"{mapped - base:.0f} MiB ({ratio:.0f}x)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows, "cache_rows": args.rows, "data_mib": data_mib,
                                   "added_private_mib": {"in_memory": in_memory - base, "mapped": mapped - base},
                                   "added_private_memory_ratio": ratio, "host": platform.node(), "cpus": os.cpu_count(),
                                   "argv": sys.argv[1:]}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
