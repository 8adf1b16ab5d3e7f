"""Sampling: an adapter pool and a list of single-image requests in, PIL images out (same order).

Requests with equal settings (size, steps, guidance, adapter) go through one pipeline call,
each with its own CPU `torch.Generator` seeded from the request, so an image depends only on
(prompt, seed, adapter, settings), not on what it was batched with. Prompts are styled and guidance is
applied as the adapter was trained (`train.caption_style`, `train.sampling_guidance`, both recorded in
the adapter). T5 encodes each prompt at the length its adapter was trained at (`text_tokens`, recorded
in the adapter; the base model: model.max_sequence_length), or, for a prompt longer than that, at the
smallest length that holds it: never cut, and the length depends on the prompt and adapter alone. The
`AdapterPool` (synth/adapter_pool.py) gives the pipeline for each adapter; the base is never reloaded.
Pure torch + diffusers: no Ray.
"""

from __future__ import annotations

import io
import logging

from dermaflux.synth.requests import SampleRequest, Settings
from dermaflux.train.prompts import guidance_arguments, sampling_prompt
from dermaflux.train.text_length import bucket_for, token_counts

log = logging.getLogger(__name__)


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
    """PIL images for `requests`, in order, from an `adapter_pool.AdapterPool`.

    `max_sequence_length` (model.max_sequence_length) is the longest T5 encoding allowed; each prompt is
    encoded at `text_length` of its adapter, which sets the transformer's text tokens and so the cost
    (512 vs 128 is 4x at the tiny size). An adapter the pool has not loaded is loaded for the call; with
    `keep_loaded=False` (the Serve replica, whose multiplexer owns what stays loaded) it is unloaded again.
    """
    images: list = [None] * len(requests)
    with pool.lock:
        before = set(pool.loaded())
        try:
            for batch in group_by_settings(requests, max_batch_size):
                settings = requests[batch[0]].settings
                pipe = pool.pipeline_for(settings.adapter)
                trained = trained_for(pool.meta(settings.adapter))
                prompts = [sampling_prompt(requests[i].prompt, trained["caption_style"]) for i in batch]
                lengths = text_lengths(pipe.tokenizer_2, prompts, trained["text_tokens"], max_sequence_length)
                for length in sorted(set(lengths)):
                    part = [k for k, n in enumerate(lengths) if n == length]
                    out = _sample(pipe, [prompts[k] for k in part], [requests[batch[k]].seed for k in part],
                                  settings, trained, length)
                    for k, image in zip(part, out):
                        images[batch[k]] = image
        finally:
            if not keep_loaded:
                for name in set(pool.loaded()) - before:
                    pool.unload(name)
    return images


def _sample(pipe, prompts: list[str], seeds: list[int], settings: Settings, trained: dict, length: int) -> list:
    import torch

    # CPU generators: the same latents on any device, so a seed means one image everywhere.
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    with torch.inference_mode():
        return pipe(
            prompt=prompts, width=settings.width, height=settings.height,
            num_inference_steps=settings.num_inference_steps,
            **guidance_arguments(trained, settings.guidance_scale, len(prompts)),
            generator=generators, max_sequence_length=length, output_type="pil",
        ).images


def text_lengths(tokenizer, prompts: list[str], trained_tokens: int | None, limit: int) -> list[int]:
    """The T5 length each prompt is encoded at: the adapter's training length (`limit` for the base) when the
    prompt fits, else the training buckets' length that holds it (`text_length.bucket_for`). A prompt over
    `limit` is left to the request checks (synth/requests.check_token_budget), which refuse it before sampling."""
    usual = min(trained_tokens or limit, limit)
    if usual == limit:  # the base, or an adapter trained at the limit: no prompt needs counting
        return [limit] * len(prompts)
    return [usual if n <= usual else bucket_for(n, limit) for n in token_counts(tokenizer, prompts)]


def compile_for(pool, settings: Settings, *, batch_size: int, max_sequence_length: int, **options) -> bool:
    """`synth.compile`: compile the transformer that samples `settings.adapter`, probed by one batch at these
    settings. Only where the pipeline never switches adapters (the pool fused to one, or the base alone):
    each LoRA switch changes the modules and would recompile. False (eager) when skipped or failed."""
    from dermaflux.model.compile import compile_blocks

    if pool.fused is None and pool.folders:
        log.warning("synth.compile: skipped, this pipeline switches between adapters (each switch would "
                    "recompile); set synth.fuse_lora to sample one adapter compiled")
        return False
    with pool.lock:
        transformer = pool.pipeline_for(settings.adapter).transformer
    probe = [SampleRequest("a dermoscopic image", 0, settings)] * batch_size
    return compile_blocks(
        transformer, lambda: generate_images(pool, probe, max_sequence_length=max_sequence_length,
                                             max_batch_size=batch_size),
        setting="synth.compile", work="sampling", **options)


def trained_for(meta: dict) -> dict:
    """How an adapter was trained, from the meta its adapter file records: `caption_style` (train/prompts.py),
    `sampling_guidance` (embedding or true_cfg), `train_guidance` and `text_tokens` (its T5 length); the base
    model (meta {}): captions, embedding, no length of its own."""
    tokens = meta.get("text_tokens")
    return {"caption_style": meta.get("caption_style", "caption"),
            "sampling_guidance": meta.get("sampling_guidance", "embedding"),
            "train_guidance": float(meta.get("train_guidance", 1.0)),
            "text_tokens": int(tokens) if tokens else None}


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
