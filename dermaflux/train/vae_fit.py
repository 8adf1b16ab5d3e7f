"""Fitting the tiny preset's random VAE to lesion images: reconstruction + KL (pure torch).

FLUX.1-dev ships a trained VAE; the tiny preset's is random and cannot decode, so generated
latents would never look like lesions. After the fit, the scaling/shift factors are set from the
fitted latents' statistics, as Flux's 0.3611 / 0.1159 were: normalised latents have mean 0, std 1.
"""

from __future__ import annotations

import math

import torch


def vae_loss(vae, images: torch.Tensor, kl_weight: float, generator: torch.Generator | None = None):
    """(loss, reconstruction MSE) for a batch in [-1, 1]."""
    posterior = vae.encode(images).latent_dist
    z = posterior.sample(generator=generator)
    recon = vae.decode(z).sample
    mse = torch.nn.functional.mse_loss(recon.float(), images.float())
    kl = posterior.kl().mean() / images[0].numel()  # per pixel, so kl_weight is resolution-independent
    return mse + kl_weight * kl, mse


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor) -> torch.Tensor:
    posterior = vae.encode(images).latent_dist
    return vae.decode(posterior.mean).sample.clamp(-1, 1)


@torch.no_grad()
def psnr(vae, images: torch.Tensor, batch_size: int = 32) -> float:
    """Mean PSNR (dB) of reconstructions of images in [-1, 1], measured on [0, 1] pixels."""
    values = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        recon = reconstruct(vae, chunk)
        mse = (((recon + 1) / 2 - (chunk + 1) / 2) ** 2).reshape(len(chunk), -1).mean(dim=1)
        values.extend((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).tolist())
    return float(sum(values) / len(values))


@torch.no_grad()
def set_latent_factors(vae, images: torch.Tensor, batch_size: int = 32) -> tuple[float, float]:
    """Set vae.config shift_factor/scaling_factor from the latents' mean and std; returns them."""
    means = []
    for start in range(0, len(images), batch_size):
        means.append(vae.encode(images[start : start + batch_size]).latent_dist.mean.float())
    latents = torch.cat(means)
    shift = float(latents.mean())
    std = float(latents.std())
    scale = 1.0 / std if std > 0 and math.isfinite(std) else 1.0
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return shift, scale


def fit_vae(vae, images: torch.Tensor, steps: int, batch_size: int, lr: float, kl_weight: float, seed: int = 0,
            on_step=None) -> list[float]:
    """A single-process fit loop (the Ray Train job runs the same step under DDP); returns MSE per step."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history = []
    vae.train()
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        loss, mse = vae_loss(vae, images[idx], kl_weight, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(float(mse.detach()))
        if on_step is not None:
            on_step(step, float(mse))
    vae.eval()
    return history
