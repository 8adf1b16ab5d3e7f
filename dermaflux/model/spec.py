"""Sizes of the tiny Flux preset: one source of truth for the builder, tests and cluster configs."""

from __future__ import annotations

from pydantic import Field

from dermaflux.configbase import ConfigModel


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
