"""The Ray Data layer of curation: per-image scanning and the Parquet write, spread over the cluster.

Two passes over the images so no stage holds every image in memory: `scan` (read, decode,
verify, hash; small rows come back to the driver for dedup and splits) and `write_shards`
(read again, check the bytes are the ones scanned, write CORPUS_SCHEMA shards).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pyarrow as pa
import ray
from ray.data.datasource import FilenameProvider

from dermaflux.core.progress import bar
from dermaflux.corpus.config import CurateConfig
from dermaflux.corpus.images import clean_scan, read_image_bytes, scan_image
from dermaflux.corpus.schema import CORPUS_SCHEMA

SCAN_COLUMNS = ["row", "error", "format", "width", "height", "phash", "sha256"]


def _scan_batch(batch: pd.DataFrame, hash_size: int, max_pixels: int, max_bytes: int) -> pd.DataFrame:
    out = []
    for row, locator in zip(batch["row"], batch["image_path"]):
        result = scan_image(locator, hash_size, max_pixels, max_bytes)
        out.append({"row": int(row), **{k: result.get(k) for k in SCAN_COLUMNS[1:]}})
    return pd.DataFrame(out, columns=SCAN_COLUMNS)


def _task_options(cfg: CurateConfig) -> dict:
    options: dict = {"num_cpus": cfg.cpus_per_worker}
    if cfg.num_workers is not None:
        options["compute"] = ray.data.TaskPoolStrategy(size=cfg.num_workers)
    return options


def _dataset(frame: pd.DataFrame, step: int) -> ray.data.Dataset:
    return ray.data.from_pandas([frame.iloc[i:i + step].reset_index(drop=True) for i in range(0, len(frame), step)])


MAX_SCAN_BATCH = 1024
TASKS_PER_SLOT = 16  # enough tasks that every slot stays busy to the end


def scan_batch_size(images: int, cfg: CurateConfig, cluster_cpus: float) -> int:
    """Images per scan task: `curate.scan_batch`, else the corpus spread over TASKS_PER_SLOT tasks per task slot
    (`num_workers`, or the cluster's CPUs over `cpus_per_worker`), at least `batch_size` and at most
    MAX_SCAN_BATCH (a scan task keeps only hashes, not the images)."""
    if cfg.scan_batch is not None:
        return cfg.scan_batch
    slots = cfg.num_workers or max(1, int(cluster_cpus / cfg.cpus_per_worker))
    return max(cfg.batch_size, min(MAX_SCAN_BATCH, images // (slots * TASKS_PER_SLOT)))


def scan(locators: list[str], cfg: CurateConfig) -> list[dict]:
    """Scan results in the order of `locators`: {error} or {format, width, height, phash, sha256}."""
    if not locators:
        return []
    items = pd.DataFrame({"row": range(len(locators)), "image_path": locators})
    batch = scan_batch_size(len(locators), cfg, ray.cluster_resources().get("CPU", 1.0))
    # One block per batch, so the per-image tasks spread over every worker from the start.
    ds = _dataset(items, batch)
    ds = ds.map_batches(_scan_batch, batch_size=batch, batch_format="pandas",
                        fn_kwargs={"hash_size": cfg.phash_size, "max_pixels": cfg.max_pixels,
                                   "max_bytes": cfg.max_image_bytes}, **_task_options(cfg))
    parts = []
    with bar("curate", "curate: scan", len(locators), "images", ray_data=True) as shown:
        for batch in ds.iter_batches(batch_format="pandas", batch_size=None):
            parts.append(batch)
            shown.update(len(batch))
    results = pd.concat(parts, ignore_index=True).sort_values("row")
    if len(results) != len(locators):
        raise RuntimeError(f"scan returned {len(results)} rows for {len(locators)} images")
    return [clean_scan(r) for r in results.drop(columns="row").to_dict("records")]


def _attach_images(batch: pd.DataFrame, max_bytes: int) -> pa.Table:
    images = []
    for locator, sha in zip(batch["image_path"], batch["sha256"]):
        data, _ = read_image_bytes(locator, max_bytes)
        if hashlib.sha256(data).hexdigest() != sha:
            raise RuntimeError(f"{locator} changed between the scan and the write; re-run to scan it again")
        images.append(data)
    frame = batch.drop(columns=["image_path", "sha256"]).assign(image=images)
    return pa.Table.from_pandas(frame[CORPUS_SCHEMA.names], schema=CORPUS_SCHEMA, preserve_index=False)


class _PartNames(FilenameProvider):
    def __init__(self):
        super().__init__(file_format="parquet")

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{task_index:05d}-{write_uuid}.parquet"


def write_shards(kept: pd.DataFrame, folder: Path, cfg: CurateConfig) -> None:
    """`kept` rows (plan columns) -> `folder/*.parquet` with CORPUS_SCHEMA."""
    # One block per shard: each write task reads its images and writes one whole file.
    ds = _dataset(kept, cfg.rows_per_shard)
    ds = ds.map_batches(_attach_images, batch_size=cfg.batch_size, batch_format="pandas",
                        fn_kwargs={"max_bytes": cfg.max_image_bytes}, **_task_options(cfg))
    ds.write_parquet(str(folder), filename_provider=_PartNames(), min_rows_per_file=cfg.rows_per_shard,
                     max_rows_per_file=cfg.rows_per_shard, schema=CORPUS_SCHEMA)
