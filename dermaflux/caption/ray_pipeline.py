"""The caption stage on Ray Data: read corpus shards, extract attributes on CPU tasks, write
captions on an actor pool, and hand finished shards back to the driver one input shard at a time.

The driver counts rows per input shard (Parquet footers) and writes an output shard the moment all
its rows have arrived, with its done-marker: a crash loses at most the shards in flight.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Callable

import pandas as pd
import pyarrow.parquet as pq

from dermaflux.caption.batch import extract_batch, write_batch
from dermaflux.caption.config import CaptionConfig
from dermaflux.caption.writers import create_writer
from dermaflux.corpus.config import DEFAULT_MAX_PIXELS
from dermaflux.core.progress import bar

log = logging.getLogger(__name__)

# What travels back to the driver: the corpus columns are re-read from the shard itself.
RESULT_COLUMNS = ["id", "path", "attributes_json", "caption", "caption_writer", "caption_flags", "uncaptioned_reason"]


class CaptionActor:
    """One writer (one model load) per actor; Ray Data feeds it batches."""

    def __init__(self, caption_cfg: dict, max_pixels: int):
        self.cfg = CaptionConfig.model_validate(caption_cfg)
        self.writer = create_writer(self.cfg, max_pixels)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        # Only the results leave the actor (no image bytes), and no further operator follows it:
        # a separate projection task was starved of CPUs by the budget and held every block back.
        return write_batch(self.writer, batch, self.cfg.seed)[RESULT_COLUMNS]


def _check_cpus(cfg: CaptionConfig, cluster_cpus: float) -> None:
    """Writer actors hold their CPUs for the whole run: leave room for one extraction task or it hangs."""
    needed = cfg.concurrency * cfg.cpus_per_actor + cfg.extract_cpus
    if needed > cluster_cpus:
        raise ValueError(
            f"caption.concurrency ({cfg.concurrency}) x caption.cpus_per_actor ({cfg.cpus_per_actor}) + "
            f"caption.extract_cpus ({cfg.extract_cpus}) = {needed} CPUs, but the cluster has {cluster_cpus}: the "
            "writer actors would hold every CPU and attribute extraction could never run. Lower "
            "caption.cpus_per_actor (e.g. 0.5 for the template writer) or caption.concurrency."
        )


def caption_shards(
    cfg: CaptionConfig, shards: list[Path], on_shard_done: Callable[[Path, pd.DataFrame], None],
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> None:
    """Caption `shards`; call `on_shard_done(shard, results)` once per shard as soon as it is complete.
    No worker decodes an image above `max_pixels` (curate.max_pixels): such a row is uncaptioned."""
    import ray.data

    expected = {shard.name: pq.ParquetFile(shard).metadata.num_rows for shard in shards}
    by_name = {shard.name: shard for shard in shards}
    for name in [n for n, rows in expected.items() if rows == 0]:
        on_shard_done(by_name.pop(name), pd.DataFrame(columns=RESULT_COLUMNS))
    if not by_name:
        return
    _check_cpus(cfg, ray.cluster_resources().get("CPU", 0.0))
    ds = ray.data.read_parquet([str(by_name[n]) for n in sorted(by_name)], include_paths=True)
    # Small files are read as one block, which would leave every worker but one idle: re-block
    # (streaming, no barrier) to one batch per block.
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
    # Extraction stays on its own CPU tasks (as many as the cluster has CPUs) instead of being fused
    # into the few writer actors: Ray Data fuses a task operator into an actor pool only when their
    # remote options are identical (ray-project/ray#54433), and `max_calls=0` (Ray's default for CPU
    # tasks, stated) is an option the actors do not have. It replaces `ray_remote_args_fn`, which kept
    # them apart the same way and is deprecated in Ray 2.60.
    ds = ds.map_batches(
        extract_batch,
        fn_kwargs={"max_pixels": max_pixels},
        batch_format="pandas",
        batch_size=cfg.batch_size,
        compute=ray.data.TaskPoolStrategy(size=cfg.extract_concurrency),
        num_cpus=cfg.extract_cpus,
        max_calls=0,
    )
    ds = ds.map_batches(
        CaptionActor,
        fn_constructor_kwargs={"caption_cfg": cfg.model_dump(), "max_pixels": max_pixels},
        batch_format="pandas",
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor or None,
    )
    parts: dict[str, list[pd.DataFrame]] = defaultdict(list)
    arrived: dict[str, int] = defaultdict(int)
    with bar("caption", "caption", sum(expected[n] for n in by_name), "images", ray_data=True) as shown:
        for batch in ds.iter_batches(batch_format="pandas", batch_size=None):
            shown.update(len(batch))
            for path, part in batch.groupby("path", sort=False):
                name = Path(path).name
                parts[name].append(part)
                arrived[name] += len(part)
                if arrived[name] == expected[name]:
                    on_shard_done(by_name.pop(name), pd.concat(parts.pop(name), ignore_index=True))
    if by_name:
        raise RuntimeError(f"rows missing from shards {sorted(by_name)}: expected {[expected[n] for n in by_name]}, "
                           f"got {[arrived[n] for n in by_name]}")
