"""Evaluate-grid throughput: grid cells per hour with 1 and 2 cells running at once (Ray tasks).

    .venv/bin/python bench/evaluate.py [--quick] [--data DIR]

Builds a corpus from real HAM10000 images (split grouped by lesion, stratified by diagnosis) and
a stand-in synthetic set (perturbed real train images, NOT Flux output: the bench measures the
grid machinery, not image value), decodes them once, then times the same grid of cells through
`dermaflux.evaluate.ray_grid.run_grid` with parallel_cells = 1 and 2 (cpus_per_cell = 1) on one
local Ray instance, after a warm-up that starts the Ray workers. Writes bench/results/evaluate.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from dermaflux.config import load_config  # noqa: E402
from dermaflux.core.runtime import RayConfig  # noqa: E402
from dermaflux.evaluate.data import read_corpus, read_synthetic  # noqa: E402
from dermaflux.evaluate.grid import build_cells  # noqa: E402
from dermaflux.evaluate.ray_grid import run_grid  # noqa: E402
from dermaflux.core.runtime import init_ray  # noqa: E402
from dermaflux.testing.ham10000 import build_split_corpus, build_stand_in_synthetic  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller corpus (20 lesions per class)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ham10000-224"))
    parser.add_argument("--workers", default="1,2", help="parallel cells to compare")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    per_class = 20 if args.quick else 80
    workers = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        corpus = build_split_corpus(Path(args.data), Path(tmp) / "corpus", per_class=per_class)
        synthetic_dir = build_stand_in_synthetic(corpus, Path(tmp) / "synthetic", per_image=1.0)
        cfg = load_config("tiny").evaluate.model_copy(update={"fractions": [0.5, 1.0], "ratios": [0.0, 1.0], "seeds": 2})
        real = read_corpus(corpus, cfg.image_size)
        synthetic = read_synthetic(synthetic_dir, cfg.image_size)
        n_train = int((real.split == "train").sum())
        cells = build_cells(cfg, n_train, has_synthetic=True)
        init_ray(RayConfig(num_cpus=max(workers)))
        # Warm-up (not timed): start max(workers) Ray workers and import torch/timm in each, so both
        # rows time the cells, not process start-up.
        warm = cfg.model_copy(update={"parallel_cells": max(workers), "steps": 2, "validations": 1})
        run_grid(cells[: max(workers)], real, synthetic, warm, lambda c, r: None)
        rows = []
        for parallel in workers:
            run_cfg = cfg.model_copy(update={"parallel_cells": parallel, "cpus_per_cell": 1.0})
            seconds_per_cell: list[float] = []
            started = time.perf_counter()
            failed = run_grid(cells, real, synthetic, run_cfg, lambda c, r: seconds_per_cell.append(r["seconds"]))
            wall = time.perf_counter() - started
            rows.append({
                "parallel_cells": parallel, "cells": len(cells), "failed": len(failed), "wall_seconds": round(wall, 1),
                "cells_per_hour": round(len(cells) / wall * 3600, 1),
                "mean_cell_seconds": round(sum(seconds_per_cell) / max(1, len(seconds_per_cell)), 2),
            })
    base = rows[0]["cells_per_hour"]
    for row in rows:
        row["speedup_vs_first"] = round(row["cells_per_hour"] / base, 2)
    result = {
        "bench": "evaluate", "quick": args.quick, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "corpus": {"train": n_train, "val": int((real.split == "val").sum()), "test": int((real.split == "test").sum()),
                   "synthetic_stand_in": len(synthetic)},
        "grid": {"model": cfg.models[0], "task": cfg.tasks, "fractions": cfg.fractions, "ratios": cfg.ratios,
                 "seeds": cfg.seeds, "steps": cfg.steps, "image_size": cfg.image_size},
        "rows": rows,
    }
    print(f"{'parallel':>8} {'cells':>5} {'wall s':>8} {'cells/h':>8} {'s/cell':>7} {'speedup':>7}")
    for r in rows:
        print(f"{r['parallel_cells']:>8} {r['cells']:>5} {r['wall_seconds']:>8} {r['cells_per_hour']:>8} "
              f"{r['mean_cell_seconds']:>7} {r['speedup_vs_first']:>7}")
    out = ROOT / "bench" / "results" / "evaluate.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
