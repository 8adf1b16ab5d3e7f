"""The synthesis deployment: one base FluxPipeline per Serve replica, adapters multiplexed on it.

`SynthesisModel` holds an `AdapterPool`; adapters are Serve multiplexed models
(`@serve.multiplexed`: loaded on first use, at most `synth.max_adapters_per_replica`,
LRU-evicted, requests routed to replicas holding their adapter via `multiplexed_model_id`); the
base is never reloaded. `@serve.batch` gathers concurrent single-image calls (Serve splits a
batch by adapter) and `sampling.generate_images` runs equal-settings requests in one pipeline
call. Replicas, autoscaling and GPUs per replica come from `synth` in the config (`serve_app`).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ray import serve

from dermaflux.synth.requests import SampleRequest

if TYPE_CHECKING:
    from dermaflux.config import DermaFluxConfig

SYNTH_DEPLOYMENT = "SynthesisModel"


def config_from_dict(cfg_dict: dict) -> DermaFluxConfig:
    """The service's config as the app builder bound it (a dict: deployments' init args travel as JSON)."""
    from dermaflux.config import DermaFluxConfig

    return DermaFluxConfig.model_validate(cfg_dict)


def synth_call(handle, adapter: str | None):
    """The synthesis handle for a request: routed by adapter (Serve multiplexing) when it has one."""
    return handle.options(multiplexed_model_id=adapter) if adapter else handle


class _AdapterLease:
    """What `@serve.multiplexed` caches per adapter; Serve calls `__del__` when it evicts the adapter."""

    def __init__(self, pool, name: str):
        self.pool, self.name, self.released = pool, name, False

    def __del__(self):
        # Called by Serve on LRU eviction (in an executor thread), and again by the GC: once is enough. A fused
        # adapter is the replica's weights now (synth.fuse_lora): it stays.
        if not self.released and self.name != self.pool.fused:
            self.released = True
            self.pool.unload(self.name)


@serve.deployment(name=SYNTH_DEPLOYMENT)
class SynthesisModel:
    def __init__(self, cfg_dict: dict):
        from dermaflux.synth.adapter_pool import AdapterPool
        from dermaflux.synth.sampling import pipeline_device

        self.cfg = config_from_dict(cfg_dict)
        self.pool = AdapterPool.from_config(self.cfg, pipeline_device(self.cfg.synth.gpus_per_replica))
        self._fuse_and_compile()
        # Serve model multiplexing: adapters load on first use, at most N per replica, LRU-evicted,
        # and Serve routes a request to a replica that already holds its adapter. Wired here
        # because N comes from the config (Ray detects init-time multiplexed attributes).
        async def lease(name: str) -> _AdapterLease:  # a plain function: Serve caches its state on it
            await asyncio.to_thread(self.pool.load, name)
            return _AdapterLease(self.pool, name)

        self.get_adapter = serve.multiplexed(max_num_models_per_replica=self.cfg.synth.max_adapters_per_replica)(lease)
        self.generate_batch.set_max_batch_size(self.cfg.synth.batch_size)
        self.generate_batch.set_batch_wait_timeout_s(self.cfg.synth.batch_wait_timeout_s)

    def _fuse_and_compile(self) -> None:
        """synth.fuse_lora: the one adapter merged into the base (service_config checked there is one); then
        synth.compile, probed at the preset's default settings and batch size."""
        from dermaflux.synth.requests import ImageRequest, resolve_settings
        from dermaflux.synth.sampling import compile_for

        synth = self.cfg.synth
        if synth.fuse_lora:
            self.pool.fuse(self.pool.names[0])
        if synth.compile:
            body = ImageRequest(prompt="probe", adapter=self.pool.fused)
            settings = resolve_settings(body, self.cfg, self.pool.names)
            compile_for(self.pool, settings, batch_size=synth.batch_size,
                        max_sequence_length=self.cfg.model.max_sequence_length)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def generate_batch(self, requests: list[dict]) -> list[dict]:
        from dermaflux.synth.sampling import encode_png, generate_images

        samples = [SampleRequest.from_dict(r) for r in requests]
        # Serve splits batches by multiplexed model id; the request's own adapter field decides,
        # so a caller that did not set the id still gets its adapter (loaded for that call only).
        for adapter in sorted({s.settings.adapter for s in samples if s.settings.adapter}):
            await self.get_adapter(adapter)
        # In a thread: the replica keeps answering health checks and queueing the next batch.
        images = await asyncio.to_thread(
            generate_images, self.pool, samples, max_batch_size=self.cfg.synth.batch_size,
            max_sequence_length=self.cfg.model.max_sequence_length, keep_loaded=False,
        )
        return [{"png": encode_png(image), "width": image.width, "height": image.height} for image in images]

    async def generate(self, request: dict) -> dict:
        """One image: {prompt, seed, settings} -> {png, width, height}."""
        return await self.generate_batch(request)

    def adapters(self) -> dict:
        """This replica's view: adapters it may serve, those loaded now, and load/unload counts."""
        from dermaflux.model.loading import pipeline_loads

        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "served": self.pool.names, "loaded": self.pool.loaded(), "base_loads": pipeline_loads(),
            "loads": dict(self.pool.loads), "unloads": dict(self.pool.unloads),
            "max_loaded": self.cfg.synth.max_adapters_per_replica,
        }
