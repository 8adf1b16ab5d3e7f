"""Encoding training inputs once: images with the VAE, captions with CLIP (pooled) and T5 (pure torch)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def decode_image(blob: bytes, resolution: int) -> torch.Tensor:
    """Encoded image bytes -> [3, R, R] float tensor in [-1, 1] (the VAE's input range)."""
    with Image.open(io.BytesIO(blob)) as img:
        img = img.convert("RGB")
        if img.size != (resolution, resolution):
            # Dermoscopy crops are centred on the lesion: resize the whole frame, no random crop.
            img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
        arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def decode_images(blobs, resolution: int) -> torch.Tensor:
    return torch.stack([decode_image(b, resolution) for b in blobs])


def vae_factors(vae) -> tuple[float, float]:
    """(shift, scale) as FluxPipeline reads them: latents = (z - shift) * scale."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return float(shift), float(vae.config.scaling_factor)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """Normalised latents of the posterior mean (deterministic, so the cache is reproducible)."""
    shift, scale = vae_factors(vae)
    param = next(vae.parameters())
    posterior = vae.encode(images.to(param.device, param.dtype)).latent_dist
    return (posterior.mean - shift) * scale


@torch.no_grad()
def encode_captions(pipe, captions: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [B, L, D], pooled_prompt_embeds [B, Dp]) exactly as FluxPipeline builds them."""
    prompt_embeds, pooled, _ = pipe.encode_prompt(
        prompt=list(captions), prompt_2=None, device=torch.device("cpu") if pipe.device.type == "cpu" else pipe.device,
        max_sequence_length=max_sequence_length,
    )
    return prompt_embeds, pooled
