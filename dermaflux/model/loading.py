"""Resolve a model reference (hub id, folder, builtin:tiny) and load the Flux pipeline."""

from __future__ import annotations

import logging
from pathlib import Path

from dermaflux.model.config import DTYPE_NAMES, ModelConfig, cache_dir
from dermaflux.core.artifacts import fingerprint

BUILTIN_TINY = "builtin:tiny"


def resolve_pretrained(model_cfg: ModelConfig) -> str:
    """A local folder or hub id that `FluxPipeline.from_pretrained` accepts; builds builtin:tiny on first use."""
    if model_cfg.pretrained == BUILTIN_TINY:
        from dermaflux.model.tiny import BUILD_VERSION, ensure_tiny_pipeline

        spec = model_cfg.tiny
        folder = cache_dir(model_cfg) / f"tiny-flux-{fingerprint(BUILD_VERSION, spec.model_dump())}"
        return str(ensure_tiny_pipeline(folder, spec))
    if model_cfg.pretrained.startswith("builtin:"):
        raise ValueError(f"model.pretrained: unknown builtin {model_cfg.pretrained!r}; known: {BUILTIN_TINY}")
    return model_cfg.pretrained


# The dtype names configs (`model.dtype`, `caption.dtype`) and the training cache's `dtype` column hold.


def torch_dtype(name: str):
    """torch.bfloat16 for "bfloat16" (one of DTYPE_NAMES)."""
    import torch

    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype {name!r}: expected one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def dtype_name(dtype) -> str:
    """"bfloat16" for torch.bfloat16: the inverse of torch_dtype."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype {dtype}: expected one of {', '.join(DTYPE_NAMES)}")
    return name


_PIPELINE_LOADS = 0


def pipeline_loads() -> int:
    """How many pipelines this process has loaded from disk (a replica that swaps adapters keeps 1)."""
    return _PIPELINE_LOADS


class _ClipTruncationNotice(logging.Filter):
    """Drops the notices that a prompt was cut to CLIP's 77 tokens. Flux reads the whole caption through
    T5 (model.max_sequence_length) and only its pooled summary through CLIP, whose cut is by design: the
    notices (one per long prompt, dozens per run) say nothing a user can act on. Other records pass."""

    NOTICES = ("The following part of your input was truncated because CLIP can only handle sequences up to",
               "Token indices sequence length is longer than the specified maximum sequence length")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOTICES)


def _hide_clip_truncation_notices() -> None:
    # diffusers' FluxPipeline._get_clip_prompt_embeds logs the first; the CLIP tokenizer's untruncated
    # call in it the second.
    for name in ("diffusers.pipelines.flux.pipeline_flux", "transformers.tokenization_utils_base"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ClipTruncationNotice) for f in logger.filters):
            logger.addFilter(_ClipTruncationNotice())


def load_pipeline(model_cfg: ModelConfig, **components):
    """FluxPipeline for `model_cfg`; pass components (e.g. a fitted `vae=`) to replace the stored ones."""
    from diffusers import FluxPipeline

    _hide_clip_truncation_notices()
    global _PIPELINE_LOADS
    _PIPELINE_LOADS += 1
    source = resolve_pretrained(model_cfg)
    return FluxPipeline.from_pretrained(
        source, revision=model_cfg.revision, dtype=torch_dtype(model_cfg.dtype), **components
    )


def is_local_folder(ref: str) -> bool:
    return Path(ref).expanduser().is_dir()
