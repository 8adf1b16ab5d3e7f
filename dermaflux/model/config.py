"""The `model` section: which Flux pipeline, at what size and precision; the tiny preset's component sizes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, get_args

from pydantic import Field

from dermaflux.core.config import ConfigModel

# The weight precisions a config may name (model.dtype, caption.dtype); model.loading maps them to torch.
DtypeName = Literal["float32", "bfloat16", "float16"]
DTYPE_NAMES: tuple[str, ...] = get_args(DtypeName)


class TinyFluxSpec(ConfigModel):
    """Component sizes of the tiny pipeline (seconds on a CPU, same classes as FLUX.1-dev)."""

    seed: int = 0
    resolution: int = Field(64, description="native image side in pixels")
    clip_vocab_size: int = 600
    clip_hidden: int = 32
    clip_layers: int = 2
    clip_heads: int = 2
    clip_max_tokens: int = Field(77, description="CLIP's pooled-prompt budget, as in Flux")
    t5_vocab_size: int = 400
    t5_hidden: int = 32
    t5_layers: int = 2
    t5_heads: int = 2
    t5_max_tokens: int = Field(512, description="T5 budget; Flux-dev takes up to 512")
    vae_channels: list[int] = Field(default_factory=lambda: [32, 64, 64], description="3 levels: 4x downsampling")
    vae_layers_per_block: int = 1
    vae_norm_groups: int = 16
    latent_channels: int = 4
    double_blocks: int = 2
    single_blocks: int = 2
    heads: int = 4
    axes_dims_rope: list[int] = Field(default_factory=lambda: [4, 6, 6], description="sums to the head dim")


class ModelConfig(ConfigModel):
    pretrained: str = Field(
        "builtin:tiny",
        description="hub id (black-forest-labs/FLUX.1-dev), a local diffusers folder, or builtin:tiny",
    )
    revision: str | None = None
    dtype: DtypeName = "float32"
    resolution: int = Field(64, description="training and default generation side, multiple of 16")
    tiny: TinyFluxSpec = Field(default_factory=TinyFluxSpec, description="sizes when pretrained is builtin:tiny")
    cache_dir: str | None = Field(None, description="where builtin models are built; default $DERMAFLUX_CACHE")
    train_guidance: float = Field(1.0, description="guidance embedding value while training (FLUX.1-dev LoRAs: 1.0)")
    guidance_scale: float = Field(3.5, description="inference guidance")
    num_inference_steps: int = Field(8, ge=1, description="sampling steps (flux-dev: 20)")
    max_sequence_length: int = Field(128, ge=1, description="T5 tokens (flux-dev: 512)")


def cache_dir(model_cfg: ModelConfig | None = None) -> Path:
    """Where builtin models (and default bulk-job folders) live: model.cache_dir, else $DERMAFLUX_CACHE."""
    if model_cfg is not None and model_cfg.cache_dir:
        return Path(model_cfg.cache_dir).expanduser()
    return Path(os.environ.get("DERMAFLUX_CACHE", Path.home() / ".cache" / "dermaflux")).expanduser()
