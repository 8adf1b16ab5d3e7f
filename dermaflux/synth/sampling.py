"""Sampling: a FluxPipeline and a list of single-image requests in, PIL images out (same order).

Requests with equal settings (size, steps, guidance, adapter) go through one pipeline call,
each with its own CPU `torch.Generator` seeded from the request, so an image depends only on
(prompt, seed, adapter, settings), not on what it was batched with. Adapters are switched with
diffusers' `set_adapters` / `disable_lora`: the base weights are loaded once and never reloaded.
Pure torch + diffusers: no Ray.
"""

from __future__ import annotations

import io
import itertools
import threading
import weakref

from dermaflux.synth.requests import SampleRequest, Settings

# One pipeline call at a time per pipeline: the active adapter is pipeline state.
_PIPELINE_LOCKS: "weakref.WeakKeyDictionary[object, threading.Lock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _lock_for(pipe) -> threading.Lock:
    with _LOCKS_GUARD:
        return _PIPELINE_LOCKS.setdefault(pipe, threading.Lock())


def loaded_loras(pipe) -> list[str]:
    """Names of the LoRA adapters loaded into the pipeline's transformer."""
    try:
        listed = pipe.get_list_adapters()
    except (AttributeError, ValueError):
        return []
    return sorted(set(itertools.chain.from_iterable(listed.values())))


def loaded_adapters(pipe) -> list[str]:
    """Every adapter name requests may use: the LoRAs plus a full fine-tune baked into the pipeline."""
    return sorted(set(loaded_loras(pipe)) | set(getattr(pipe, "dermaflux_full_adapters", ())))


def activate_adapter(pipe, adapter: str | None) -> None:
    """Make `adapter` the only active LoRA (None or a full fine-tune: every LoRA off)."""
    names = loaded_loras(pipe)
    if adapter is None or adapter in getattr(pipe, "dermaflux_full_adapters", ()):
        if names:
            pipe.disable_lora()
        return
    if adapter not in names:
        known = ", ".join(loaded_adapters(pipe)) or "none"
        raise KeyError(f"adapter {adapter!r} is not loaded; loaded: {known}")
    pipe.enable_lora()
    pipe.set_adapters([adapter], adapter_weights=[1.0])


def group_by_settings(requests: list[SampleRequest], max_batch_size: int) -> list[list[int]]:
    """Indices of `requests` in batches of equal settings, each at most `max_batch_size` long."""
    groups: dict[Settings, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(request.settings, []).append(index)
    batches = []
    for indices in groups.values():
        batches.extend(indices[i : i + max_batch_size] for i in range(0, len(indices), max_batch_size))
    return batches


def generate_images(pipe, requests: list[SampleRequest], *, max_sequence_length: int, max_batch_size: int = 4):
    """PIL images for `requests`, in order.

    `max_sequence_length` (model.max_sequence_length) is required: T5 pads every prompt to it, so it
    sets the transformer's text tokens and thereby the cost (512 vs 128 is 4x at the tiny size).
    """
    import torch

    images: list = [None] * len(requests)
    with _lock_for(pipe):
        for batch in group_by_settings(requests, max_batch_size):
            settings = requests[batch[0]].settings
            activate_adapter(pipe, settings.adapter)
            # CPU generators: the same latents on any device, so a seed means one image everywhere.
            generators = [torch.Generator("cpu").manual_seed(requests[i].seed) for i in batch]
            with torch.inference_mode():
                result = pipe(
                    prompt=[requests[i].prompt for i in batch],
                    width=settings.width,
                    height=settings.height,
                    num_inference_steps=settings.num_inference_steps,
                    guidance_scale=settings.guidance_scale,
                    generator=generators,
                    max_sequence_length=max_sequence_length,
                    output_type="pil",
                )
            for i, image in zip(batch, result.images):
                images[i] = image
    return images


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
