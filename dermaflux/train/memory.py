"""Micro-batch and gradient checkpointing from the GPU memory a worker finds free (pure).

Peak memory of one LoRA rank-16 training step of the FLUX.1-dev transformer (bf16, 1,024 image tokens
= 512 px), measured on an H200 (issue 11, 2026-11-30):

    batch 4, checkpointing,    512 text tokens: 30 GiB    batch 4, no checkpointing, 512 tokens: 52 GiB
    batch 4, no checkpointing, 128 text tokens: 45 GiB    batch 8, no checkpointing, 128 tokens: 67 GiB

These fit peak = weights + batch * (image + text tokens) * per-token activations with 23 GiB of weights
(bf16 transformer, LoRA and its AdamW state), 4.75 MiB per token and sample without checkpointing
(batch 4 -> 8 at 1,152 tokens: +22 GiB; at 1,536 tokens the same 4.7 MiB) and 1.2 MiB with it. The
fastest step was the largest batch without checkpointing (batch 8 at 128 tokens: 10.5 samples/s
against 9.6 at batch 4 and 5.1 with checkpointing), so `pick_micro_batch` takes the largest batch up
to 8 that fits without checkpointing, else with checkpointing, keeping a margin free.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SizeClass:
    """A transformer size's memory model (GiB, MiB per token per sample)."""

    weights_gib: float
    mib_per_token: float  # activations kept for backward, without gradient checkpointing
    mib_per_token_checkpointed: float


SIZE_CLASSES = {"flux-dev": SizeClass(weights_gib=23.0, mib_per_token=4.75, mib_per_token_checkpointed=1.2)}
MAX_MICRO_BATCH = 8  # the largest measured; beyond it the gain per sample was small (10.5 vs 9.6 samples/s)
MARGIN_GIB = 6.0  # allocator fragmentation, the validation render, NCCL buffers


def size_class(transformer_config) -> str | None:
    """"flux-dev" for FLUX.1-dev's transformer shape (19 + 38 blocks, 24 heads of 128), else None."""
    shape = (transformer_config.num_layers, transformer_config.num_single_layers,
             transformer_config.num_attention_heads, transformer_config.attention_head_dim)
    return "flux-dev" if shape == (19, 38, 24, 128) else None


def estimate_peak_gib(size: SizeClass, micro_batch: int, tokens: int, checkpointing: bool, shards: int = 1) -> float:
    per_token = size.mib_per_token_checkpointed if checkpointing else size.mib_per_token
    return size.weights_gib / shards + micro_batch * tokens * per_token / 1024


def pick_micro_batch(free_gib: float | None, size: str | None, tokens: int, shards: int = 1
                     ) -> tuple[int, bool] | None:
    """(micro_batch, gradient_checkpointing) for `tokens` (image + text) per sample with `free_gib` free, or
    None when there is nothing to go by (no GPU, or a transformer size never measured).

    `shards`: ZeRO-3 workers the bf16 weights are split over. Prefers no checkpointing (faster), then the
    largest batch; when even batch 1 does not fit with checkpointing it returns (1, True) and the run
    finds out.
    """
    if free_gib is None or size not in SIZE_CLASSES:
        return None
    model = SIZE_CLASSES[size]
    usable = free_gib - MARGIN_GIB
    for checkpointing in (False, True):
        for micro_batch in range(MAX_MICRO_BATCH, 0, -1):
            if estimate_peak_gib(model, micro_batch, tokens, checkpointing, shards) <= usable:
                return micro_batch, checkpointing
    return 1, True
