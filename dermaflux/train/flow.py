"""The rectified-flow objective of Flux, on pre-computed latents and text embeddings (pure torch).

x_t = (1 - t) * x0 + t * noise, the transformer predicts the velocity noise - x0 (as in the SD3
paper and diffusers' train_dreambooth_lora_flux.py). Latents are packed into 2x2 patches and
given position ids exactly as FluxPipeline does, by calling its own static methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FluxPipeline
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from dermaflux.model.config import ModelConfig
from dermaflux.train.config import TrainConfig


@dataclass
class FlowBatch:
    """One micro-batch of cached inputs: latents already shifted and scaled like the VAE's factors say."""

    latents: torch.Tensor  # [B, C, h, w]
    prompt_embeds: torch.Tensor  # [B, L, D] (T5)
    pooled_prompt_embeds: torch.Tensor  # [B, Dp] (CLIP pooled)

    def to(self, device=None, dtype=None) -> "FlowBatch":
        return FlowBatch(*(t.to(device=device, dtype=dtype) for t in (self.latents, self.prompt_embeds, self.pooled_prompt_embeds)))


def pack_latents(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C, h, w] -> packed tokens [B, h/2*w/2, 4C] and their image position ids [h/2*w/2, 3]."""
    batch, channels, height, width = latents.shape
    packed = FluxPipeline._pack_latents(latents, batch, channels, height, width)
    image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device, latents.dtype)
    return packed, image_ids


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of pack_latents for a latent grid of height x width (vae_scale_factor 1: sizes are latent sizes)."""
    return FluxPipeline._unpack_latents(packed, height, width, vae_scale_factor=1)


def text_ids_for(prompt_embeds: torch.Tensor) -> torch.Tensor:
    # FluxPipeline.encode_prompt: text tokens all sit at position 0.
    return torch.zeros(prompt_embeds.shape[1], 3, device=prompt_embeds.device, dtype=prompt_embeds.dtype)


def sample_sigmas(train_cfg: TrainConfig, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Timesteps t in (0, 1) from the density named in the config (logit-normal, mode, uniform)."""
    return compute_density_for_timestep_sampling(
        weighting_scheme=train_cfg.timestep_sampling,
        batch_size=batch_size,
        logit_mean=train_cfg.logit_mean,
        logit_std=train_cfg.logit_std,
        mode_scale=train_cfg.mode_scale,
        generator=generator,
    )


def flow_matching_loss(
    transformer,
    batch: FlowBatch,
    train_cfg: TrainConfig,
    guidance: float | None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One forward pass of the objective; returns the scalar loss (the caller does backward/step).

    `guidance`: the guidance-embedding value for models that have one (see `train_guidance_for`), else None.
    """
    x0 = batch.latents
    bsz, _, height, width = x0.shape
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    sigmas = sample_sigmas(train_cfg, bsz, generator).to(x0.device, torch.float32)
    sig = sigmas.view(-1, 1, 1, 1).to(x0.dtype)
    noisy = (1.0 - sig) * x0 + sig * noise
    packed, image_ids = pack_latents(noisy)
    guidance_vec = None
    if guidance is not None:
        guidance_vec = torch.full((bsz,), float(guidance), device=x0.device, dtype=x0.dtype)
    pred_packed = transformer(
        hidden_states=packed,
        timestep=sigmas.to(x0.dtype),  # the pipeline passes t/1000 with t in [0, 1000]
        guidance=guidance_vec,
        pooled_projections=batch.pooled_prompt_embeds,
        encoder_hidden_states=batch.prompt_embeds,
        txt_ids=text_ids_for(batch.prompt_embeds),
        img_ids=image_ids,
        return_dict=False,
    )[0]
    pred = unpack_latents(pred_packed, height, width)
    target = noise - x0
    weighting = compute_loss_weighting_for_sd3(train_cfg.weighting_scheme, sigmas=sigmas).view(-1, 1, 1, 1)
    per_sample = (weighting * (pred.float() - target.float()) ** 2).reshape(bsz, -1).mean(dim=1)
    return per_sample.mean()


def train_guidance_for(transformer_config, model_cfg: ModelConfig) -> float | None:
    """FLUX.1-dev is guidance-distilled: its LoRAs train with guidance 1.0 (3.5 is for inference)."""
    return float(model_cfg.train_guidance) if transformer_config.guidance_embeds else None
