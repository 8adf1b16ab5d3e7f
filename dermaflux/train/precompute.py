"""Turning captioned rows into cache rows (pure torch; the Ray Data job in ray_precompute.py maps it)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from dermaflux.core.artifacts import parquet_shards
from dermaflux.model.config import ModelConfig
from dermaflux.model.loading import dtype_name
from dermaflux.train.augment import VIEWS, dihedral
from dermaflux.train.cache import tensor_to_bytes
from dermaflux.train.encode import decode_images, encode_captions, encode_images
from dermaflux.train.prompts import training_prompt

if TYPE_CHECKING:
    from dermaflux.config import DermaFluxConfig

CAPTION_COLUMNS = ["id", "split", "label", "caption", "image"]


def caption_shards(captions_dir: str | Path) -> list[Path]:
    return parquet_shards(captions_dir, CAPTION_COLUMNS, "caption", "dermaflux caption")


def train_rows(cfg: DermaFluxConfig) -> pa.Table:
    """The train split's rows without their image bytes (id, split, label, caption), sorted by id, the first
    train.max_images: what training samples from, in both modes."""
    shards = caption_shards(cfg.train.captions)
    columns = [c for c in CAPTION_COLUMNS if c != "image"]
    table = pa.concat_tables([pq.read_table(p, columns=columns) for p in shards], promote_options="default")
    table = table.filter(pc.equal(table["split"], "train")).sort_by("id")
    return table.slice(0, cfg.train.max_images) if cfg.train.max_images is not None else table


def load_text_and_vae(model_cfg: ModelConfig, vae_dir: str | None):
    """The pipeline without its transformer (not needed to encode), with the fitted VAE when there is one."""
    from diffusers import AutoencoderKL

    from dermaflux.model.loading import load_pipeline, torch_dtype

    components = {"transformer": None}
    if vae_dir:
        components["vae"] = AutoencoderKL.from_pretrained(vae_dir, dtype=torch_dtype(model_cfg.dtype))
    pipe = load_pipeline(model_cfg, **components)
    return pipe


def encode_views(vae, images: torch.Tensor, views: int) -> torch.Tensor:
    """Latents of each image's `views` dihedral views: [B, C, h, w] for one view, else [B, views, C, h, w]."""
    if views == 1:
        return encode_images(vae, images)
    # One VAE pass per view (not all views in one batch): the peak memory of the plain pre-compute.
    return torch.stack([encode_images(vae, dihedral(images, view)) for view in range(views)], dim=1)


def styled_captions(batch: dict, caption_style: str) -> list[str]:
    """The prompts a columnar batch of caption rows trains on (train.caption_style); an empty caption is an error."""
    prompts = []
    for row_id, caption, label in zip(batch["id"], batch["caption"], batch["label"]):
        if not str(caption).strip():
            raise ValueError(f"caption row {row_id}: empty caption")
        try:
            prompts.append(training_prompt(str(caption), label, caption_style))
        except ValueError as err:
            raise ValueError(f"caption row {row_id}: {err}") from None
    return prompts


def encode_rows(pipe, batch: dict, resolution: int, max_sequence_length: int, augment: str = "none",
                caption_style: str = "caption") -> dict:
    """A columnar batch of caption rows -> a columnar batch of CACHE_SCHEMA rows (`augment`: train.augment);
    the `caption` column holds the prompt as encoded (train.caption_style)."""
    captions = styled_captions(batch, caption_style)
    images = decode_images(list(batch["image"]), resolution)
    latents = encode_views(pipe.vae, images, VIEWS[augment])
    prompt_embeds, pooled = encode_captions(pipe, captions, max_sequence_length)
    dtype = dtype_name(prompt_embeds.dtype)
    latents = latents.to(prompt_embeds.dtype)
    return {
        "id": list(batch["id"]),
        "split": list(batch["split"]),
        "label": list(batch["label"]),
        "caption": captions,
        "dtype": [dtype] * len(captions),
        "latents": [tensor_to_bytes(t) for t in latents],
        "latents_shape": [list(latents.shape[1:])] * len(captions),
        "prompt_embeds": [tensor_to_bytes(t) for t in prompt_embeds],
        "prompt_embeds_shape": [list(prompt_embeds.shape[1:])] * len(captions),
        "pooled_prompt_embeds": [tensor_to_bytes(t) for t in pooled],
        "pooled_prompt_embeds_shape": [list(pooled.shape[1:])] * len(captions),
    }
