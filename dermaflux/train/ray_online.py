"""Ray Data side of online encoding: the caption shards streamed into the Ray Train workers, each its own share.

The driver gives the TorchTrainer one dataset per rank (`train_<rank>`, read from the caption shards and kept
to that rank's rows: the train split's ids in sorted order, row i to rank i % workers) and asks Ray Train not
to split them (DataConfig datasets_to_split=[]), so which rows a worker sees does not depend on which worker
asked Ray Data first: rank r's stream is its share, epoch after epoch, in an order fixed by (seed, epoch, rank)
(blocks in order, Ray Data's local shuffle seeded). A worker's position in that stream is
micro_step x micro_batch, so a restarted worker skips (reads, does not decode) the rows its checkpoint had
already trained on in the current epoch and continues with the next: none twice, none skipped.
Each rank's id filter runs in the read stage, so a worker receives only its share's rows.
Read tasks ask for no CPU: the decoding and encoding happen in the Train workers, which hold the CPUs. A task
that asks for no CPU has no resource to bound how many run at once, so each operator is capped at STREAM_TASKS
per rank: uncapped, Ray Data split the demo's 6 shards into 90 blocks and started a worker process (0.35 GB)
for each, while training drew 8 rows a step; 67 of them were killed for memory on a 24 GB machine and the
first step waited 4 minutes.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import torch

from dermaflux.train.precompute import caption_shards

if TYPE_CHECKING:
    from dermaflux.config import DermaFluxConfig

STREAM_COLUMNS = ["id", "label", "caption", "image"]
STREAM_TASKS = 2  # concurrent tasks per operator and rank: reading Parquet keeps ahead of a training step


def _keep_share(batch: pa.Table, share: pa.Array, rank: int, world: int) -> pa.Table:
    """This rank's rows of a batch of caption rows, with their global row index (position in sorted id order)."""
    kept = batch.filter(pc.is_in(batch["id"], value_set=share)).select(STREAM_COLUMNS)
    local = pc.index_in(kept["id"], value_set=share).cast(pa.int64())
    return kept.append_column("row", pc.add(pc.multiply(local, world), rank))


def online_datasets(cfg: DermaFluxConfig, ids: list[str], world: int):
    """({"train_<rank>": Dataset}, DataConfig) for the TorchTrainer: rank r streams ids[r::world]."""
    import ray.data
    from ray.data import DataContext
    from ray.data.expressions import col
    from ray.train import DataConfig

    paths = [str(p) for p in caption_shards(cfg.train.captions)]
    datasets = {}
    context = DataContext.get_current()
    # Ray Data's V2 Parquet reader plans each read with a ListFiles task and a pool of footer-reading actors, one
    # CPU each: with one dataset per rank on a node whose CPUs the Train workers hold, they waited for CPUs (a CPU
    # test cluster hung). The V1 reader reads the footers here once and its read tasks ask for no CPU.
    use_v2, context.use_datasource_v2 = context.use_datasource_v2, False
    bounded = ray.data.TaskPoolStrategy(size=STREAM_TASKS)
    try:
        for rank in range(world):
            share = pa.array(ids[rank::world], pa.string())
            ds = ray.data.read_parquet(paths, columns=STREAM_COLUMNS, num_cpus=0, concurrency=STREAM_TASKS)
            # Filtered in the read stage (Ray Data may push it into the Parquet scan): other ranks' rows never reach it.
            ds = ds.filter(expr=col("id").is_in(share.to_pylist()), num_cpus=0, compute=bounded)
            datasets[f"train_{rank}"] = ds.map_batches(
                functools.partial(_keep_share, share=share, rank=rank, world=world), batch_format="pyarrow", num_cpus=0,
                compute=bounded)
    finally:
        context.use_datasource_v2 = use_v2
    options = DataConfig.default_ingest_options()
    options.preserve_order = True  # the same block order every epoch and after a restart: a resumable position
    return datasets, DataConfig(datasets_to_split=[], execution_options=options)


class ShareStream:
    """One rank's endless stream of (epoch, caption row), positioned by sample count (see the module doc)."""

    def __init__(self, iterator, share_rows: int, seed: int, rank: int, shuffle_rows: int):
        if share_rows < 1:
            raise ValueError(f"rank {rank}: no train rows in its share (fewer train rows than train.workers)")
        self.iterator, self.share_rows, self.seed, self.rank = iterator, share_rows, seed, rank
        self.shuffle_rows = min(shuffle_rows, share_rows)
        self._rows, self._position = None, None

    def _epoch(self, epoch: int):
        batches = self.iterator.iter_batches(
            batch_size=min(64, self.shuffle_rows), batch_format="pyarrow", local_shuffle_buffer_size=self.shuffle_rows,
            local_shuffle_seed=(self.seed * 1_000_003 + epoch * 1_009 + self.rank) % 2**32)
        for batch in batches:
            yield from batch.to_pylist()

    def _stream(self, start: int):
        epoch, offset = divmod(start, self.share_rows)
        while True:
            for seen, row in enumerate(self._epoch(epoch)):
                if seen >= offset:  # a resumed position: rows before it were trained on already
                    yield epoch, row
            epoch, offset = epoch + 1, 0

    def close(self) -> None:
        if self._rows is not None:
            self._rows.close()
        self._rows, self._position = None, None

    def take(self, start: int, count: int) -> tuple[dict, list[int]]:
        """Rows at stream positions [start, start + count) as columns, and the epoch each was drawn in."""
        if self._position != start:
            self.close()
            self._rows = self._stream(start)
        taken = [next(self._rows) for _ in range(count)]
        self._position = start + count
        columns = {k: [row[k] for _, row in taken] for k in ("id", "label", "caption", "image", "row")}
        return columns, [epoch for epoch, _ in taken]


class OnlineData:
    """A worker's training inputs encoded as they stream in (the cached path's `CachedSet` counterpart)."""

    online = True

    def __init__(self, cfg: DermaFluxConfig, plan: dict, rank: int, world: int, vae_dir: str | None, device):
        import ray.train

        from dermaflux.train.augment import VIEWS
        from dermaflux.train.precompute import load_text_and_vae

        tc = cfg.train
        self.cfg, self.rows_total, self.text_tokens = cfg, int(plan["rows"]), int(plan["text_tokens"])
        self.views = VIEWS[tc.augment]
        self.pipe = load_text_and_vae(cfg.model, vae_dir)
        if device.type == "cuda":  # bf16 encoders beside the transformer: measured before micro_batch auto
            self.pipe.to(device)
        share_rows = len(range(rank, self.rows_total, world))
        self.stream = ShareStream(ray.train.get_dataset_shard(f"train_{rank}"), share_rows, tc.seed, rank,
                                  tc.online_shuffle_rows)
        self._last: tuple | None = None  # (micro_step, tensors): a repeated request (the compile probe) re-reads none
        self.last_ids: list[str] = []

    def __len__(self) -> int:
        return self.rows_total

    def close(self) -> None:
        self.stream.close()

    def sample_shapes(self) -> tuple[tuple[int, ...], int]:
        """([C, h, w] of a latent, T5 tokens) of every sample."""
        vae = self.pipe.vae.config
        side = self.cfg.model.resolution // 2 ** (len(vae.block_out_channels) - 1)
        return (vae.latent_channels, side, side), self.text_tokens

    def micro_batch(self, micro_step: int, micro_batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents, prompt_embeds, pooled) of this rank's micro-batch `micro_step`, on the CPU."""
        from dermaflux.train.online import encode_samples

        if self._last is not None and self._last[0] == micro_step:
            return tuple(t.clone() for t in self._last[1])
        tc = self.cfg.train
        rows, epochs = self.stream.take(micro_step * micro_batch, micro_batch)
        encoded = tuple(t.cpu() for t in encode_samples(
            self.pipe, rows, epochs, self.cfg.model.resolution, self.text_tokens, tc.caption_style, self.views,
            tc.seed, tc.caption_dropout))
        self._last = (micro_step, encoded)
        self.last_ids = list(rows["id"])  # what a test hook reads: the rows this micro-batch trained on
        return tuple(t.clone() for t in encoded)


