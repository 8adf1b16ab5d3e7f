"""Which adapters a synthesis process serves, under which names, and the pool that holds them.

`synth.adapters` entries are `DIR` (served under the folder's name) or `NAME=DIR`. An
`AdapterPool` loads the base pipeline once and adapters on demand next to it:
- a LoRA goes into the shared base transformer (`load_lora_weights` under its name) and is made
  the only active one per call with `set_adapters`; unloading it is `delete_adapters`;
- a "full" fine-tune (the tiny preset's) is its own transformer in a pipeline view that shares
  the base text encoders, tokenizers and scheduler;
- an adapter's fitted `vae/` likewise lives only in that adapter's view.
The base weights are never reloaded or changed: `adapter=None` is always the base model. The
Serve replica drives `load`/`unload` from `@serve.multiplexed` (LRU per replica); the offline
job and benchmarks load what they use up front. Pure torch + diffusers: no Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import threading
from dataclasses import dataclass
from pathlib import Path

from dermaflux.model.adapters import LORA_FILE, adapter_components, read_adapter
from dermaflux.synth.config import adapter_entry

if TYPE_CHECKING:
    from dermaflux.config import DermaFluxConfig


def adapter_folders(entries: list[str]) -> dict[str, str]:
    """{name: folder}; names must be unique, folders must be adapter folders (errors name the entry)."""
    table: dict[str, str] = {}
    for number, entry in enumerate(entries):
        name, folder = adapter_entry(entry)
        if not name:
            raise ValueError(f"synth.adapters[{number}] {entry!r}: empty adapter name")
        if name in table:
            raise ValueError(f"synth.adapters[{number}] {entry!r}: name {name!r} is already used by {table[name]}")
        try:
            read_adapter(folder)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"synth.adapters[{number}]: {err}") from None
        table[name] = str(Path(folder).resolve())
    return table


@dataclass
class _Loaded:
    kind: str  # lora | full
    pipe: object  # the pipeline that samples this adapter (the base, or a view sharing its modules)
    meta: dict  # how it was trained (the adapter file's meta), read once when loaded


class AdapterPool:
    """The base FluxPipeline plus the adapters loaded next to it, by name.

    Every method takes `lock`: the active LoRA is state of the shared transformer, so one
    pipeline call (or load/unload) runs at a time. Counters say what was loaded how often.
    """

    def __init__(self, base, folders: dict[str, str], *, dtype=None, device: str = "cpu"):
        self.base = base
        self.folders = dict(folders)
        self.dtype = dtype
        self.device = device
        self.lock = threading.RLock()
        self._loaded: dict[str, _Loaded] = {}
        self.loads: dict[str, int] = {}
        self.unloads: dict[str, int] = {}
        self.fused: str | None = None  # set by `fuse`: the pool then samples that adapter only
        base.set_progress_bar_config(disable=True)

    @classmethod
    def from_config(cls, cfg: DermaFluxConfig, device: str = "cpu", preload: list[str] | None = None) -> "AdapterPool":
        """The base of `cfg.model` on `device` with `synth.adapters` known; `preload` loaded now."""
        from dermaflux.model.loading import load_pipeline, torch_dtype

        folders = adapter_folders(cfg.synth.adapters)
        pool = cls(load_pipeline(cfg.model).to(device), folders, dtype=torch_dtype(cfg.model.dtype), device=device)
        for name in preload or []:
            pool.load(name)
        return pool

    @property
    def names(self) -> list[str]:
        """Adapters requests may name (loaded or not)."""
        return sorted(self.folders)

    def loaded(self) -> list[str]:
        with self.lock:
            return sorted(self._loaded)

    def _check(self, name: str) -> str:
        if name not in self.folders:
            raise KeyError(f"adapter {name!r} is not served; served: {', '.join(self.names) or 'none'}")
        return self.folders[name]

    def load(self, name: str) -> None:
        """Load `name` next to the base (no-op when loaded); the base itself is untouched."""
        from diffusers import FluxPipeline

        folder = self._check(name)
        with self.lock:
            if name in self._loaded:
                return
            info = read_adapter(folder)
            own = {k: m.to(self.device) for k, m in adapter_components(info, self.dtype).items()}
            if info.kind == "lora":
                # peft puts the LoRA weights on the device of the layers they wrap.
                self.base.load_lora_weights(folder, weight_name=LORA_FILE, adapter_name=name)
            pipe = self.base
            if own:
                pipe = FluxPipeline(**{**self.base.components, **own})
                pipe.set_progress_bar_config(disable=True)
            self._loaded[name] = _Loaded(info.kind, pipe, info.meta)
            self.loads[name] = self.loads.get(name, 0) + 1

    def unload(self, name: str) -> None:
        """Free `name` (no-op when not loaded); LoRA weights leave the base transformer."""
        with self.lock:
            if name == self.fused:
                raise ValueError(f"adapter {name!r} is fused into the base weights and cannot be unloaded")
            loaded = self._loaded.pop(name, None)
            if loaded is None:
                return
            if loaded.kind == "lora":
                self.base.delete_adapters(name)
            self.unloads[name] = self.unloads.get(name, 0) + 1
        del loaded
        _release_device_memory(self.device)

    def fuse(self, name: str) -> None:
        """Merge LoRA `name` into the base weights: no per-layer LoRA matmuls (images 1.33x faster with a
        rank-16 LoRA on the full-size transformer on an H200, bench/serve.py), for a job that samples one adapter.

        The base is changed for good, so the pool then refuses every other adapter and the base;
        images match the unfused ones within rounding, not bit for bit.
        """
        with self.lock:
            if self.fused == name:
                return
            if self.fused is not None:
                raise ValueError(f"this pool is fused to adapter {self.fused!r}; cannot fuse {name!r} too")
            self.load(name)
            for other in [n for n in self._loaded if n != name]:
                self.unload(other)
            if self._loaded[name].kind == "lora":
                self.base.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=[name])
                self.base.unload_lora_weights()  # drops the LoRA layers, keeps the merged weights
            self.fused = name

    def pipeline_for(self, adapter: str | None):
        """The pipeline that samples `adapter` with exactly that adapter active; call under `lock`.

        An adapter that is not loaded (the multiplexer evicted it between routing and this call)
        is loaded; `sampling.generate_images(keep_loaded=False)` unloads it after the call.
        """
        if self.fused is not None:
            if adapter != self.fused:
                raise ValueError(f"this pool is fused to adapter {self.fused!r}; it cannot sample {adapter or 'the base'!r}")
            return self._loaded[adapter].pipe
        if adapter is None:
            if self._lora_names():
                self.base.disable_lora()
            return self.base
        self.load(adapter)
        loaded = self._loaded[adapter]
        if loaded.kind == "lora":
            self.base.enable_lora()
            self.base.set_adapters([adapter], adapter_weights=[1.0])
        elif self._lora_names():
            self.base.disable_lora()
        return loaded.pipe

    def meta(self, adapter: str | None) -> dict:
        """The recorded training meta of loaded `adapter` ({} for the base); call after `pipeline_for`."""
        return {} if adapter is None else self._loaded[adapter].meta

    def _lora_names(self) -> list[str]:
        return [n for n, item in self._loaded.items() if item.kind == "lora"]


def _release_device_memory(device: str) -> None:
    """Hand freed GPU memory back to the driver; on CPU reference counting already freed it."""
    import gc

    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
