"""Fine-tuned weights on disk, in forms plain diffusers loads, and the pipeline components they replace.

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
    A LoRA's peft config (rank, alpha, targets) goes into the safetensors header as diffusers'
    own Flux trainer writes it (`transformer_lora_adapter_metadata`): without it a loader assumes
    alpha = rank, and a LoRA trained with another alpha reloads scaled wrongly.
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
            FluxPipeline.save_lora_weights(staging, transformer_lora_layers=state,
                                           transformer_lora_adapter_metadata=_lora_metadata(transformer))
        else:
            transformer.save_pretrained(staging / "transformer")
        if vae is not None:
            vae.save_pretrained(staging / "vae")
        atomic_write_json(
            staging / ADAPTER_FILE, {"kind": kind, "base": base, "has_vae": vae is not None, "meta": meta or {}}
        )
    return Path(out_dir)


def _lora_metadata(transformer) -> dict | None:
    """The peft LoraConfig of the transformer's LoRA as a dict (None: no adapter on it, alpha = rank)."""
    configs = getattr(transformer, "peft_config", None) or {}
    if not configs:
        return None
    if len(configs) > 1 and "default" not in configs:
        raise ValueError(f"the transformer holds several LoRA adapters {sorted(configs)}: save one at a time")
    config = configs.get("default") or next(iter(configs.values()))
    return config.to_dict()


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
