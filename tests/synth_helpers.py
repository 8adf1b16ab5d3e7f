"""Builders for the synth tests: LoRA adapters made here (real peft LoRA on the tiny transformer)."""

from __future__ import annotations

from pathlib import Path


def make_lora_adapter(model_cfg, out: Path, seed: int, rank: int = 4, scale: float = 0.3) -> Path:
    """A LoRA adapter folder with random non-zero weights (an untrained LoRA's B is zero: no effect)."""
    import torch
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    from dermaflux.model.adapters import save_adapter
    from dermaflux.model.loading import resolve_pretrained

    transformer = FluxTransformer2DModel.from_pretrained(resolve_pretrained(model_cfg), subfolder="transformer")
    transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                   target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out"])
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return save_adapter(out, transformer, kind="lora", base=model_cfg.pretrained, meta={"test_seed": seed})
