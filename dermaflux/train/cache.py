"""Pre-computed training inputs on disk: VAE latents and CLIP/T5 embeddings, one row per image.

`<out>/cache/shards/part-*.parquet` (CACHE_SCHEMA) + `<out>/cache/validation.pt` (the validation
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

    def rows(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents, prompt_embeds, pooled_prompt_embeds) of logical rows `indices`, stacked."""
        # Row by row, not Table.take: take() concatenates a chunked column first, i.e. copies the split.
        physical = [int(i) for i in self.order[np.asarray(indices, dtype=np.int64)]]

        def stack(col):
            values, shapes, dtypes = (self.table.column(c) for c in (col, col + "_shape", "dtype"))
            return torch.stack([bytes_to_tensor(values[i].as_py(), shapes[i].as_py(), dtypes[i].as_py()) for i in physical])

        return stack("latents"), stack("prompt_embeds"), stack("pooled_prompt_embeds")


def load_cached_set(cache_dir: str | Path, split: str = "train", max_rows: int | None = None) -> CachedSet:
    data = CachedSet(ensure_split_file(cache_dir, split), max_rows)
    if len(data) == 0:
        raise ValueError(f"{cache_dir}: no cached rows of split {split!r}")
    return data


def sample_indices(num_rows: int, seed: int, start: int, count: int) -> np.ndarray:
    """Positions [start, start+count) of an endless stream of per-epoch permutations (deterministic, resumable)."""
    out = np.empty(count, dtype=np.int64)
    filled = 0
    pos = start
    while filled < count:
        epoch, offset = divmod(pos, num_rows)
        perm = np.random.default_rng([seed, epoch]).permutation(num_rows)
        take = min(count - filled, num_rows - offset)
        out[filled : filled + take] = perm[offset : offset + take]
        filled += take
        pos += take
    return out


def micro_batch_indices(num_rows: int, seed: int, micro_step: int, rank: int, world: int, micro_batch: int) -> np.ndarray:
    """Rows for one worker's micro-batch: the global batch of micro-step k is split across ranks."""
    start = (micro_step * world + rank) * micro_batch
    return sample_indices(num_rows, seed, start, micro_batch)
