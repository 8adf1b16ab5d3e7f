"""Validation renders and the loss curve (pure torch/matplotlib; rank 0 calls them)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from dermaflux.core.artifacts import atomic_write_bytes

if TYPE_CHECKING:
    from dermaflux.model.config import ModelConfig
    from dermaflux.train.config import TrainConfig


class ValidationRenderer:
    """`validation-<step>.png` in a checkpoint folder: one row per validation prompt, one column per seed (rank 0),
    sampled as `synth` samples this run's adapter. Independent of how training is distributed: it renders
    whatever plain transformer it is given."""

    def __init__(self, train_cfg: TrainConfig, model_cfg: ModelConfig, base_dir: str, vae, validation: dict):
        self.tc, self.model_cfg, self.base_dir = train_cfg, model_cfg, base_dir
        self.vae, self.validation = vae, validation

    def render(self, ckpt_dir: Path, model, step: int) -> Path:
        from diffusers import FlowMatchEulerDiscreteScheduler

        from dermaflux.model.compile import eager
        from dermaflux.train.prompts import guidance_arguments

        tc, model_cfg = self.tc, self.model_cfg
        sched = FlowMatchEulerDiscreteScheduler.from_pretrained(self.base_dir, subfolder="scheduler")
        # As sampling applies guidance to this run's adapter (the negative prompt: the cached empty one).
        guidance = guidance_arguments({"sampling_guidance": tc.sampling_guidance,
                                       "train_guidance": model_cfg.train_guidance}, model_cfg.guidance_scale, 1)
        with eager():  # other shapes than training's: no recompilation of compiled blocks
            images = render_validation(model, self.vae, sched, self.validation, tc.validation_seeds,
                                       model_cfg.resolution, tc.validation_steps or model_cfg.num_inference_steps,
                                       guidance["guidance_scale"], guidance.get("true_cfg_scale"))
        grid = image_grid(images, cols=len(tc.validation_seeds))
        return save_png(grid, Path(ckpt_dir) / f"validation-{step:06d}.png")


@torch.no_grad()
def render_validation(transformer, vae, scheduler, validation: dict, seeds: list[int], resolution: int,
                      steps: int, guidance_scale: float, true_cfg_scale: float | None = None) -> list[Image.Image]:
    """One image per (prompt, seed), row-major by prompt, through FluxPipeline with cached embeddings.

    `true_cfg_scale`: classifier-free guidance against the cached empty prompt (train.sampling_guidance
    true_cfg), `guidance_scale` then being the guidance embedding's value."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    param = next(transformer.parameters())
    was_training = transformer.training
    transformer.eval()
    cfg = {}
    if true_cfg_scale is not None:
        cfg = {"true_cfg_scale": true_cfg_scale,
               "negative_prompt_embeds": validation["empty_prompt_embeds"][None].to(param.device, param.dtype),
               "negative_pooled_prompt_embeds": validation["empty_pooled_prompt_embeds"][None].to(param.device,
                                                                                                  param.dtype)}
    images = []
    try:
        for i in range(len(validation["prompts"])):
            for seed in seeds:
                out = pipe(
                    prompt_embeds=validation["prompt_embeds"][i : i + 1].to(param.device, param.dtype),
                    pooled_prompt_embeds=validation["pooled_prompt_embeds"][i : i + 1].to(param.device, param.dtype),
                    height=resolution, width=resolution, num_inference_steps=steps, guidance_scale=guidance_scale,
                    **cfg,
                    generator=torch.Generator("cpu").manual_seed(seed), output_type="pil",
                )
                images.append(out.images[0])
    finally:
        transformer.train(was_training)
    return images


def image_grid(images: list[Image.Image], cols: int) -> Image.Image:
    width, height = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * width, rows * height))
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * width, (i // cols) * height))
    return grid


def save_png(image: Image.Image, path: str | Path) -> Path:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def write_loss_curve(history: list[dict], out_dir: str | Path) -> tuple[Path, Path]:
    """`loss.csv` (step, loss, lr, samples_per_s, peak_mem_mb, rank_state_mb) and `loss.png` (raw and smoothed loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["step", "loss", "lr", "samples_per_s", "peak_mem_mb", "rank_state_mb"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    csv_path = atomic_write_bytes(out_dir / "loss.csv", buf.getvalue().encode())
    steps = np.array([h["step"] for h in history])
    losses = np.array([h["loss"] for h in history])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, alpha=0.35, label="loss")
    if len(losses) >= 5:
        k = max(len(losses) // 20, 2)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("rectified-flow loss")
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    png_path = atomic_write_bytes(out_dir / "loss.png", png.getvalue())
    return csv_path, png_path
