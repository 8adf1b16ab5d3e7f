"""Sampling: an adapter pool and a list of single-image requests in, PIL images out (same order).

Requests with equal settings (size, steps, guidance, adapter) go through one pipeline call,
each with its own CPU `torch.Generator` seeded from the request, so an image depends only on
(prompt, seed, adapter, settings), not on what it was batched with. Prompts are styled and guidance is
applied as the adapter was trained (`train.caption_style`, `train.sampling_guidance`, both recorded in
the adapter). The `AdapterPool` (synth/adapters.py) gives the pipeline for each adapter; the base is
never reloaded.
Pure torch + diffusers: no Ray.
"""

from __future__ import annotations

import io

from dermaflux.synth.requests import SampleRequest, Settings
from dermaflux.train.prompts import sampling_prompt


def group_by_settings(requests: list[SampleRequest], max_batch_size: int) -> list[list[int]]:
    """Indices of `requests` in batches of equal settings, each at most `max_batch_size` long."""
    groups: dict[Settings, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(request.settings, []).append(index)
    batches = []
    for indices in groups.values():
        batches.extend(indices[i : i + max_batch_size] for i in range(0, len(indices), max_batch_size))
    return batches


def generate_images(
    pool, requests: list[SampleRequest], *, max_sequence_length: int, max_batch_size: int = 4, keep_loaded: bool = True
):
    """PIL images for `requests`, in order, from an `adapters.AdapterPool`.

    `max_sequence_length` (model.max_sequence_length) is required: T5 pads every prompt to it, so it
    sets the transformer's text tokens and thereby the cost (512 vs 128 is 4x at the tiny size).
    An adapter the pool has not loaded is loaded for the call; with `keep_loaded=False` (the
    Serve replica, whose multiplexer owns what stays loaded) it is unloaded again afterwards.
    """
    import torch

    images: list = [None] * len(requests)
    with pool.lock:
        before = set(pool.loaded())
        try:
            for batch in group_by_settings(requests, max_batch_size):
                settings = requests[batch[0]].settings
                pipe = pool.pipeline_for(settings.adapter)
                trained = trained_for(pool.meta(settings.adapter))
                # CPU generators: the same latents on any device, so a seed means one image everywhere.
                generators = [torch.Generator("cpu").manual_seed(requests[i].seed) for i in batch]
                with torch.inference_mode():
                    result = pipe(
                        prompt=[sampling_prompt(requests[i].prompt, trained["caption_style"]) for i in batch],
                        width=settings.width,
                        height=settings.height,
                        num_inference_steps=settings.num_inference_steps,
                        **guidance_arguments(trained, settings.guidance_scale, len(batch)),
                        generator=generators,
                        max_sequence_length=max_sequence_length,
                        output_type="pil",
                    )
                for i, image in zip(batch, result.images):
                    images[i] = image
        finally:
            if not keep_loaded:
                for name in set(pool.loaded()) - before:
                    pool.unload(name)
    return images


def trained_for(meta: dict) -> dict:
    """How an adapter was trained, from the meta its adapter file records: `caption_style` (train/prompts.py),
    `sampling_guidance` (embedding or true_cfg) and `train_guidance`; the base model (meta {}): captions, embedding."""
    return {"caption_style": meta.get("caption_style", "caption"),
            "sampling_guidance": meta.get("sampling_guidance", "embedding"),
            "train_guidance": float(meta.get("train_guidance", 1.0))}


def guidance_arguments(trained: dict, guidance_scale: float, count: int) -> dict:
    """FluxPipeline arguments applying `guidance_scale` as the model was trained for (see `trained_for`):
    into the guidance embedding, or as classifier-free guidance against the empty prompt (the negative prompt
    FluxPipeline's true CFG contrasts with), the embedding then held at the training value."""
    if trained["sampling_guidance"] == "true_cfg":
        return {"guidance_scale": trained["train_guidance"], "true_cfg_scale": guidance_scale,
                "negative_prompt": [""] * count}
    return {"guidance_scale": guidance_scale}


def encode_png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def pipeline_device(gpus: float) -> str:
    import torch

    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"
