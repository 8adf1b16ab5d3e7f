"""Pre-computed training inputs on disk: VAE latents and CLIP/T5 embeddings, one row per image.

`<out>/cache/shards/part-*.parquet` (CACHE_SCHEMA) + `<out>/cache/validation.pt` (the validation
prompts' embeddings) + `<out>/cache/vae_factors.json`. Tensors are stored as raw bytes with their
shape and dtype, so bf16 embeddings round-trip exactly. Latents are stored already shifted and
scaled by the VAE's factors: the transformer never sees the VAE.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

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

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tensor_to_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def bytes_to_tensor(blob: bytes, shape, dtype_name: str) -> torch.Tensor:
    raw = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return raw.view(_DTYPES[dtype_name]).reshape(list(shape)).clone()


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


def cache_shards(cache_dir: str | Path) -> list[Path]:
    return sorted((Path(cache_dir) / "shards").glob("part-*.parquet"))


@dataclass
class CachedSet:
    """All cached rows of one split in memory (the tiny preset holds thousands; flux-dev streams would be next)."""

    ids: list[str]
    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)


def load_cached_set(cache_dir: str | Path, split: str = "train", max_rows: int | None = None) -> CachedSet:
    shards = cache_shards(cache_dir)
    if not shards:
        raise FileNotFoundError(f"{cache_dir}/shards: no pre-computed shards (run the pre-compute step first)")
    table = pa.concat_tables([pq.read_table(p, schema=CACHE_SCHEMA) for p in shards])
    table = table.filter(pa.compute.equal(table["split"], split))
    # Sorted by id: the sample order (and so a resumed run's data position) does not depend on shard layout.
    table = table.sort_by("id")
    if max_rows is not None:
        table = table.slice(0, max_rows)
    if table.num_rows == 0:
        raise ValueError(f"{cache_dir}: no cached rows of split {split!r}")
    rows = table.to_pylist()

    def stack(col):
        return torch.stack([bytes_to_tensor(r[col], r[col + "_shape"], r["dtype"]) for r in rows])

    return CachedSet([r["id"] for r in rows], stack("latents"), stack("prompt_embeds"), stack("pooled_prompt_embeds"))


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
