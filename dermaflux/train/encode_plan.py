"""Cached or online encoding (`train.encode`), decided from the run's plan before anything is written (pure).

A cached row costs one encoding pass and its bytes on disk (8 latent views + T5 embeddings: about 2 MiB per
FLUX.1-dev image at 512 px and 128 tokens, so a terabyte at 500,000 images) and saves an encoding every time
it is read again. With fewer than two planned epochs it is read about once: the cache then only costs. Online
encoding spends the frozen encoders' forward on the training GPU instead (T5-XXL at 128 tokens is about 2 % of a
FLUX.1-dev LoRA sample's FLOPs), every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_CACHED_EPOCHS = 2.0


@dataclass(frozen=True)
class RowShapes:
    """What one cached row holds: `views` latents [channels, side, side] and the caption's embeddings."""

    latent_channels: int
    latent_side: int
    views: int
    text_tokens: int
    text_dim: int
    pooled_dim: int
    dtype_bytes: int

    def bytes_per_row(self) -> int:
        latents = self.views * self.latent_channels * self.latent_side ** 2
        return (latents + self.text_tokens * self.text_dim + self.pooled_dim) * self.dtype_bytes


def planned_epochs(steps: int, micro_batch: int | str, grad_accum: int, workers: int, rows: int) -> float:
    """Passes over `rows` the run's samples make; micro_batch "auto" counts as 1 (it picks at least 1), so the
    figure is a lower bound then."""
    per_step = (micro_batch if isinstance(micro_batch, int) else 1) * grad_accum * workers
    return steps * per_step / max(rows, 1)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def choose_encode(setting: str, epochs: float, cache_bytes: int, max_bytes: int) -> tuple[str, str]:
    """(mode, reason) for `train.encode` `setting` (auto|cached|online)."""
    size = f"cache {human_bytes(cache_bytes)}"
    if setting != "auto":
        return setting, f"train.encode: {setting} ({epochs:.2f} planned epochs, {size})"
    if epochs < MIN_CACHED_EPOCHS:
        return "online", (f"auto: {epochs:.2f} planned epochs < {MIN_CACHED_EPOCHS:g}: each cached row would be read "
                          f"about once ({size} not written)")
    if cache_bytes > max_bytes:
        return "online", (f"auto: {size} > train.cache_max_bytes {human_bytes(max_bytes)} "
                          f"({epochs:.2f} planned epochs)")
    return "cached", f"auto: {epochs:.2f} planned epochs >= {MIN_CACHED_EPOCHS:g} and {size} <= train.cache_max_bytes"


def encode_plan(setting: str, shapes: RowShapes, rows: int, epochs: float, max_bytes: int) -> dict:
    """The record `summary.json` keeps under "encode"."""
    per_row = shapes.bytes_per_row()
    mode, reason = choose_encode(setting, epochs, per_row * rows, max_bytes)
    return {"mode": mode, "reason": reason, "setting": setting, "rows": rows, "planned_epochs": round(epochs, 3),
            "cache_bytes_per_row": per_row, "cache_bytes": per_row * rows, "cache_max_bytes": max_bytes,
            "text_tokens": shapes.text_tokens, "views": shapes.views}


def row_shapes(model_cfg, vae_dir: str | None, views: int, text_tokens: int) -> RowShapes:
    """A cached row's shapes from the model's configs (no weights loaded): the VAE's latent channels and
    downsampling, the transformer's T5 and pooled CLIP widths, model.dtype's bytes."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from dermaflux.model.loading import resolve_pretrained, torch_dtype

    base = resolve_pretrained(model_cfg)
    vae = AutoencoderKL.load_config(vae_dir) if vae_dir else AutoencoderKL.load_config(base, subfolder="vae")
    transformer = FluxTransformer2DModel.load_config(base, subfolder="transformer")
    side = model_cfg.resolution // 2 ** (len(vae["block_out_channels"]) - 1)
    return RowShapes(vae["latent_channels"], side, views, text_tokens, transformer["joint_attention_dim"],
                     transformer["pooled_projection_dim"], torch_dtype(model_cfg.dtype).itemsize)
