"""Pre-computed training inputs on disk: VAE latents and CLIP/T5 embeddings, one row per image.

`<out>/cache/shards/part-*.parquet` (CACHE_SCHEMA; with dihedral augmentation a row's latents hold its
8 views, [8, C, h, w], and its caption embeddings once) + `<out>/cache/validation.pt` (the validation
prompts' embeddings) + `<out>/cache/vae_factors.json`; training reads `<out>/cache/train.arrow`,
the train rows gathered into one memory-mapped Arrow file. Tensors are stored as raw bytes with their
shape and dtype, so bf16 embeddings round-trip exactly. Latents are stored already shifted and
scaled by the VAE's factors: the transformer never sees the VAE.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dermaflux.core.artifacts import atomic_path, atomic_write_json
from dermaflux.model.loading import torch_dtype

CACHE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("dtype", pa.string(), nullable=False),  # torch dtype name of the three tensors
        pa.field("latents", pa.binary(), nullable=False),
        pa.field("latents_shape", pa.list_(pa.int32()), nullable=False),
        pa.field("prompt_embeds", pa.binary(), nullable=False),
        pa.field("prompt_embeds_shape", pa.list_(pa.int32()), nullable=False),
        pa.field("pooled_prompt_embeds", pa.binary(), nullable=False),
        pa.field("pooled_prompt_embeds_shape", pa.list_(pa.int32()), nullable=False),
    ]
)

def tensor_to_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def bytes_to_tensor(blob: bytes, shape, dtype_name: str) -> torch.Tensor:
    raw = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return raw.view(torch_dtype(dtype_name)).reshape(list(shape)).clone()


def cache_shards(cache_dir: str | Path) -> list[Path]:
    return sorted((Path(cache_dir) / "shards").glob("part-*.parquet"))


SPLIT_FILE = "{split}.arrow"  # beside shards/: one split's rows as an uncompressed Arrow IPC file


def _shard_listing(cache_dir: Path) -> list[list]:
    return [[p.name, p.stat().st_size] for p in cache_shards(cache_dir)]


def ensure_split_file(cache_dir: str | Path, split: str = "train") -> Path:
    """`<cache>/<split>.arrow`: the split's rows gathered from the shards, rebuilt when the shards change.

    Written one record batch at a time (bounded memory) and atomically, so concurrent builders
    (workers of one node) only waste time. Parquet shards stay the resumable format; this file
    exists to be memory-mapped.
    """
    cache_dir = Path(cache_dir)
    shards = cache_shards(cache_dir)
    if not shards:
        raise FileNotFoundError(f"{cache_dir}/shards: no pre-computed shards (run the pre-compute step first)")
    path = cache_dir / SPLIT_FILE.format(split=split)
    stamp = path.with_name(path.name + ".json")
    listing = _shard_listing(cache_dir)
    if path.exists() and stamp.exists() and json.loads(stamp.read_text()).get("shards") == listing:
        return path
    rows = 0
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink:
        with pa.ipc.new_file(sink, CACHE_SCHEMA) as writer:
            for shard in shards:
                for batch in pq.ParquetFile(shard).iter_batches(batch_size=64):
                    batch = pa.Table.from_batches([batch]).cast(CACHE_SCHEMA)
                    batch = batch.filter(pa.compute.equal(batch["split"], split))
                    if batch.num_rows:
                        writer.write_table(batch)
                        rows += batch.num_rows
    atomic_write_json(stamp, {"shards": listing, "rows": rows})
    return path


class CachedSet:
    """One split's cached rows, memory-mapped: a batch reads only its own rows.

    FLUX.1-dev's T5 embeddings take 4 MiB per image (512 x 4096 bf16), so 10,000 images would be
    40 GiB in every worker if loaded; mapped, the workers of a node share one copy in the page
    cache and each holds only its batch. Logical row i is the i-th id in sorted order, so the
    sample stream (and a resumed run's position) does not depend on the shard layout.
    """

    def __init__(self, path: str | Path, max_rows: int | None = None):
        self.path = Path(path)
        self.table = pa.ipc.open_file(pa.memory_map(str(self.path))).read_all()  # zero-copy views of the map
        ids = self.table["id"].to_pylist()
        order = sorted(range(len(ids)), key=ids.__getitem__)[:max_rows]
        self.order = np.asarray(order, dtype=np.int64)
        self.ids = [ids[i] for i in order]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def views(self) -> int:
        """Latent views cached per row: 8 with dihedral augmentation, else 1."""
        shape = self.table.column("latents_shape")[0].as_py()
        return shape[0] if len(shape) == 4 else 1

    def rows(self, indices, views=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents, prompt_embeds, pooled_prompt_embeds) of logical rows `indices`, stacked; `views` picks each
        row's latent view (None: view 0, the image as it is). The embeddings are the row's own in every view."""
        # Row by row, not Table.take: take() concatenates a chunked column first, i.e. copies the split.
        physical = [int(i) for i in self.order[np.asarray(indices, dtype=np.int64)]]
        views = [0] * len(physical) if views is None else [int(v) for v in views]

        def tensor(col, i):
            values, shapes, dtypes = (self.table.column(c) for c in (col, col + "_shape", "dtype"))
            return bytes_to_tensor(values[i].as_py(), shapes[i].as_py(), dtypes[i].as_py())

        def latent(i, view):
            cached = tensor("latents", i)
            return cached[view] if cached.dim() == 4 else cached  # [C, h, w]: a cache of one view

        latents = torch.stack([latent(i, view) for i, view in zip(physical, views)])
        return (latents, torch.stack([tensor("prompt_embeds", i) for i in physical]),
                torch.stack([tensor("pooled_prompt_embeds", i) for i in physical]))


def load_cached_set(cache_dir: str | Path, split: str = "train", max_rows: int | None = None) -> CachedSet:
    data = CachedSet(ensure_split_file(cache_dir, split), max_rows)
    if len(data) == 0:
        raise ValueError(f"{cache_dir}: no cached rows of split {split!r}")
    return data


def _epoch_stream(num_rows: int, start: int, count: int, epoch_values) -> np.ndarray:
    """Positions [start, start+count) of an endless stream made of `epoch_values(epoch)` (num_rows each)."""
    out = np.empty(count, dtype=np.int64)
    filled = 0
    pos = start
    while filled < count:
        epoch, offset = divmod(pos, num_rows)
        values = epoch_values(epoch)
        take = min(count - filled, num_rows - offset)
        out[filled : filled + take] = values[offset : offset + take]
        filled += take
        pos += take
    return out


def sample_indices(num_rows: int, seed: int, start: int, count: int) -> np.ndarray:
    """Positions [start, start+count) of an endless stream of per-epoch permutations (deterministic, resumable)."""
    return _epoch_stream(num_rows, start, count, lambda epoch: np.random.default_rng([seed, epoch]).permutation(num_rows))


def sample_views(num_rows: int, seed: int, start: int, count: int, views: int) -> np.ndarray:
    """The latent view (0..views-1) each position of the sample stream uses: a function of the position alone,
    so a resumed run sees the same augmented stream; each epoch draws every sample's view anew."""
    if views == 1:
        return np.zeros(count, dtype=np.int64)
    # A third seed word keeps the views independent of the epoch's permutation.
    return _epoch_stream(num_rows, start, count,
                         lambda epoch: np.random.default_rng([seed, epoch, views]).integers(0, views, num_rows))


def sample_dropped(num_rows: int, seed: int, start: int, count: int, rate: float) -> np.ndarray:
    """Whether each position of the sample stream trains with the empty prompt (`train.caption_dropout`):
    a function of the position alone, like the views, so a resumed run drops the same samples."""
    if rate <= 0:
        return np.zeros(count, dtype=bool)
    # Its own seed word: independent of the permutation and of the views.
    return _epoch_stream(num_rows, start, count,
                         lambda epoch: np.random.default_rng([seed, epoch, 0xD0]).random(num_rows) < rate).astype(bool)


def _micro_batch_start(micro_step: int, rank: int, world: int, micro_batch: int) -> int:
    return (micro_step * world + rank) * micro_batch


def micro_batch_indices(num_rows: int, seed: int, micro_step: int, rank: int, world: int, micro_batch: int) -> np.ndarray:
    """Rows for one worker's micro-batch: the global batch of micro-step k is split across ranks."""
    return sample_indices(num_rows, seed, _micro_batch_start(micro_step, rank, world, micro_batch), micro_batch)


def micro_batch_views(num_rows: int, seed: int, micro_step: int, rank: int, world: int, micro_batch: int,
                      views: int) -> np.ndarray:
    """The views of `micro_batch_indices`' rows."""
    return sample_views(num_rows, seed, _micro_batch_start(micro_step, rank, world, micro_batch), micro_batch, views)


def micro_batch_dropped(num_rows: int, seed: int, micro_step: int, rank: int, world: int, micro_batch: int,
                        rate: float) -> np.ndarray:
    """Which samples of `micro_batch_indices`' rows train with the empty prompt."""
    return sample_dropped(num_rows, seed, _micro_batch_start(micro_step, rank, world, micro_batch), micro_batch, rate)
