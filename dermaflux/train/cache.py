"""Pre-computed training inputs on disk: VAE latents and CLIP/T5 embeddings, one row per image.

`<out>/cache/shards/part-*.arrow` (CACHE_SCHEMA, one uncompressed Arrow IPC file per pre-compute batch; with
dihedral augmentation a row's latents hold its 8 views, [8, C, h, w], and its caption embeddings once) +
`<out>/cache/validation.pt` (the validation prompts' embeddings) + `<out>/cache/vae_factors.json`. Workers
memory-map every shard in place and index the split's rows across them (`CachedSet`): no copy of the split
is ever gathered (at 500,000 FLUX.1-dev images the cache is about a terabyte, issue 21). Tensors are stored
as raw bytes with their shape and dtype, so bf16 embeddings round-trip exactly. Latents are stored already
shifted and scaled by the VAE's factors: the transformer never sees the VAE.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from dermaflux.core.artifacts import atomic_path
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

SHARD_GLOB = "part-*.arrow"


def tensor_to_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def bytes_to_tensor(blob: bytes, shape, dtype_name: str) -> torch.Tensor:
    raw = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return raw.view(torch_dtype(dtype_name)).reshape(list(shape)).clone()


def cache_shards(cache_dir: str | Path) -> list[Path]:
    return sorted((Path(cache_dir) / "shards").glob(SHARD_GLOB))


def write_cache_shard(rows: pa.Table | dict, path: str | Path) -> int:
    """One shard, atomically: an uncompressed Arrow IPC file (memory-mappable in place); returns its rows."""
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pydict(
        {k: list(rows[k]) for k in CACHE_SCHEMA.names}, schema=CACHE_SCHEMA)
    table = table.cast(CACHE_SCHEMA)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(path)) as tmp, pa.OSFile(str(tmp), "wb") as sink:
        with pa.ipc.new_file(sink, CACHE_SCHEMA) as writer:
            writer.write_table(table)
    return table.num_rows


def open_shard(path: str | Path) -> pa.Table:
    """A shard's rows as zero-copy views of its memory map."""
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def check_no_legacy_shards(cache_dir: Path) -> None:
    if not cache_shards(cache_dir) and any((cache_dir / "shards").glob("part-*.parquet")):
        raise ValueError(f"{cache_dir}/shards: Parquet shards of an older DermaFlux (the cache is now one Arrow IPC "
                         "file per shard, mapped in place): remove the cache folder to re-encode")


class CachedSet:
    """One split's cached rows, memory-mapped shard by shard: a batch reads only its own rows.

    FLUX.1-dev's T5 embeddings take 4 MiB per image (512 x 4096 bf16), so 10,000 images would be
    40 GiB in every worker if loaded; mapped, the workers of a node share one copy in the page
    cache and each holds only its batch. Logical row i is the i-th id of the split in sorted order (a global
    row index over all shards), so the sample stream (and a resumed run's position) does not depend on the
    shard layout.
    """

    def __init__(self, shards: list[Path], split: str = "train", max_rows: int | None = None):
        self.shards = [open_shard(p) for p in shards]
        keys = []
        for number, table in enumerate(self.shards):
            ids, splits = table["id"].to_pylist(), table["split"].to_pylist()
            keys += [(row_id, number, row) for row, (row_id, s) in enumerate(zip(ids, splits)) if s == split]
        keys = sorted(keys)[:max_rows]
        self.ids = [k[0] for k in keys]
        self.where = np.asarray([k[1:] for k in keys], dtype=np.int64).reshape(-1, 2)  # (shard, row) per logical row

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def views(self) -> int:
        """Latent views cached per row: 8 with dihedral augmentation, else 1."""
        shape = self._value("latents_shape", 0)
        return shape[0] if len(shape) == 4 else 1

    def sample_shapes(self) -> tuple[tuple[int, ...], int]:
        """([C, h, w] of a latent, T5 tokens) of every sample."""
        latents, prompt_embeds, _ = self.rows([0])
        return tuple(latents.shape[1:]), int(prompt_embeds.shape[1])

    def _value(self, column: str, logical: int):
        shard, row = self.where[logical]
        return self.shards[shard].column(column)[int(row)].as_py()

    def column(self, name: str) -> list:
        """A plain column (id, label, caption, ...) in logical order."""
        return [self._value(name, i) for i in range(len(self))]

    def rows(self, indices, views=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents, prompt_embeds, pooled_prompt_embeds) of logical rows `indices`, stacked; `views` picks each
        row's latent view (None: view 0, the image as it is). The embeddings are the row's own in every view."""
        logical = [int(i) for i in np.asarray(indices, dtype=np.int64)]
        views = [0] * len(logical) if views is None else [int(v) for v in views]

        def tensor(col, i):
            return bytes_to_tensor(self._value(col, i), self._value(col + "_shape", i), self._value("dtype", i))

        def latent(i, view):
            cached = tensor("latents", i)
            return cached[view] if cached.dim() == 4 else cached  # [C, h, w]: a cache of one view

        latents = torch.stack([latent(i, view) for i, view in zip(logical, views)])
        return (latents, torch.stack([tensor("prompt_embeds", i) for i in logical]),
                torch.stack([tensor("pooled_prompt_embeds", i) for i in logical]))


def load_cached_set(cache_dir: str | Path, split: str = "train", max_rows: int | None = None) -> CachedSet:
    cache_dir = Path(cache_dir)
    check_no_legacy_shards(cache_dir)
    shards = cache_shards(cache_dir)
    if not shards:
        raise FileNotFoundError(f"{cache_dir}/shards: no pre-computed shards (run the pre-compute step first)")
    data = CachedSet(shards, split, max_rows)
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
