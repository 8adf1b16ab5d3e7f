"""Adapters for tests and benchmarks: random LoRA folders, and a pipeline with adapters loaded.

Not used by the product (the Serve replica loads adapters through `synth.adapter_pool`); kept here
so the product ships no test support.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import os
from pathlib import Path

from dermaflux.model.adapters import LORA_FILE, adapter_components, read_adapter, save_adapter

if TYPE_CHECKING:
    from dermaflux.model.config import ModelConfig


def load_pipeline_with_adapters(model_cfg: ModelConfig, adapters: dict[str, str | os.PathLike] | None = None):
    """The base pipeline with LoRA adapters loaded under their names (switch with `set_adapters`).

    A "full" adapter replaces the transformer (only one allowed); a fitted `vae/` replaces the VAE.
    """
    from dermaflux.model.loading import load_pipeline, torch_dtype

    infos = {name: read_adapter(p) for name, p in (adapters or {}).items()}
    full = [i for i in infos.values() if i.kind == "full"]
    if len(full) > 1:
        raise ValueError(f"at most one full fine-tune can be served per pipeline, got {[str(i.path) for i in full]}")
    dtype = torch_dtype(model_cfg.dtype)
    components = adapter_components(full[0], dtype, vae=False) if full else {}
    vae_from = next((i for i in full + list(infos.values()) if i.has_vae), None)
    if vae_from is not None:
        components.update(adapter_components(vae_from, dtype, transformer=False))
    pipe = load_pipeline(model_cfg, **components)
    for name, info in infos.items():
        if info.kind == "lora":
            pipe.load_lora_weights(str(info.path), weight_name=LORA_FILE, adapter_name=name)
    return pipe


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out"]


def random_lora_adapter(model_cfg: ModelConfig, out: str | os.PathLike, seed: int, rank: int = 4, scale: float = 0.3,
                        transformer=None, meta: dict | None = None) -> Path:
    """A LoRA adapter folder with random non-zero weights, for tests and benchmarks.

    An untrained LoRA's B matrix is zero (no effect), so both matrices are drawn from N(0, scale).
    `transformer` defaults to the base of `model_cfg`; pass one to skip loading it (full-size bench).
    `meta` adds training facts as a trained adapter records them (e.g. `text_tokens`).
    """
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    if transformer is None:
        from diffusers import FluxTransformer2DModel

        from dermaflux.model.loading import resolve_pretrained

        transformer = FluxTransformer2DModel.from_pretrained(resolve_pretrained(model_cfg), subfolder="transformer")
    name = f"random_{seed}"
    transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS), adapter_name=name
    )
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in get_peft_model_state_dict(transformer, adapter_name=name).items():
        noise = torch.randn(value.shape, generator=generator) * scale
        state[key] = noise.to(value.dtype).to(value.device)
    transformer.delete_adapters(name)
    return save_adapter(out, transformer, kind="lora", base=model_cfg.pretrained, lora_state_dict=state,
                        meta={"random_seed": seed, **(meta or {})})
