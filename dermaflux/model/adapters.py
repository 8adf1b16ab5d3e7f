"""Fine-tuned weights on disk, in forms plain diffusers loads, and loading them into a pipeline.

An adapter folder holds `dermaflux_adapter.json` and either
- kind "lora": `pytorch_lora_weights.safetensors` (what `FluxPipeline.load_lora_weights` reads), or
- kind "full": `transformer/` (a FluxTransformer2DModel folder, for the tiny preset whose base never trained);
plus optionally `vae/` when the VAE was fitted (tiny preset: its random VAE cannot decode).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from dermaflux.core.artifacts import atomic_dir, atomic_write_json

ADAPTER_FILE = "dermaflux_adapter.json"
LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclass
class AdapterInfo:
    path: Path
    kind: str  # lora | full
    base: str  # the model.pretrained it was trained on
    has_vae: bool
    meta: dict = field(default_factory=dict)


def save_adapter(
    out_dir: str | os.PathLike,
    transformer,
    *,
    kind: str,
    base: str,
    vae=None,
    lora_state_dict: dict | None = None,
    meta: dict | None = None,
) -> Path:
    """Write an adapter folder atomically.

    For LoRA under ZeRO-3 the caller must pass `lora_state_dict` gathered from all ranks: the
    module's own parameters are empty shards there (a known trap of Flux LoRA trainers).
    """
    if kind not in ("lora", "full"):
        raise ValueError(f"adapter kind must be 'lora' or 'full', got {kind!r}")
    with atomic_dir(out_dir) as staging:
        if kind == "lora":
            from diffusers import FluxPipeline
            from peft.utils import get_peft_model_state_dict

            state = lora_state_dict if lora_state_dict is not None else get_peft_model_state_dict(transformer)
            if not state or any(t.numel() == 0 for t in state.values()):
                raise ValueError("LoRA state dict is empty or holds empty tensors (gather ZeRO-3 shards before saving)")
            FluxPipeline.save_lora_weights(staging, transformer_lora_layers=state)
        else:
            transformer.save_pretrained(staging / "transformer")
        if vae is not None:
            vae.save_pretrained(staging / "vae")
        atomic_write_json(
            staging / ADAPTER_FILE, {"kind": kind, "base": base, "has_vae": vae is not None, "meta": meta or {}}
        )
    return Path(out_dir)


def read_adapter(path: str | os.PathLike) -> AdapterInfo:
    path = Path(path)
    info_path = path / ADAPTER_FILE
    if not info_path.exists():
        if (path / LORA_FILE).exists():  # a LoRA from another trainer: plain diffusers format
            return AdapterInfo(path, "lora", base="", has_vae=False)
        raise FileNotFoundError(f"{path}: not an adapter folder (no {ADAPTER_FILE} or {LORA_FILE})")
    info = json.loads(info_path.read_text())
    return AdapterInfo(path, info["kind"], info["base"], bool(info.get("has_vae")), info.get("meta", {}))


def adapter_components(info: AdapterInfo, dtype, *, transformer: bool = True, vae: bool = True) -> dict:
    """The pipeline components an adapter folder replaces: `transformer` (kind "full") and `vae`."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    components = {}
    if transformer and info.kind == "full":
        components["transformer"] = FluxTransformer2DModel.from_pretrained(info.path / "transformer", dtype=dtype)
    if vae and info.has_vae:
        components["vae"] = AutoencoderKL.from_pretrained(info.path / "vae", dtype=dtype)
    return components


def load_pipeline_with_adapters(model_cfg, adapters: dict[str, str | os.PathLike] | None = None):
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


def random_lora_adapter(model_cfg, out: str | os.PathLike, seed: int, rank: int = 4, scale: float = 0.3,
                        transformer=None) -> Path:
    """A LoRA adapter folder with random non-zero weights, for tests and benchmarks.

    An untrained LoRA's B matrix is zero (no effect), so both matrices are drawn from N(0, scale).
    `transformer` defaults to the base of `model_cfg`; pass one to skip loading it (full-size bench).
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
                        meta={"random_seed": seed})
