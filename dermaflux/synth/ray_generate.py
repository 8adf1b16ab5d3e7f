"""`dermaflux generate` on Ray Data: request rows -> an actor pool holding the pipeline -> shards.

Each actor loads the pipeline (and its adapter) once; `map_batches` feeds it request rows and it
runs the same `sampling.generate_images` the service uses. The driver collects images per
planned shard and writes a shard as soon as it is complete (atomic + done marker), so an
interrupted run resumes with only the unfinished shards as input.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dermaflux.core.progress import bar
from dermaflux.synth import bulk
from dermaflux.synth.requests import SampleRequest, Settings

if TYPE_CHECKING:
    from dermaflux.config import DermaFluxConfig

log = logging.getLogger(__name__)


class PipelineActor:
    """The map_batches callable: one pipeline per actor, reused for every batch."""

    def __init__(self, cfg_dict: dict):
        from dermaflux.config import DermaFluxConfig
        from dermaflux.synth.adapter_pool import AdapterPool
        from dermaflux.synth.sampling import pipeline_device

        self.cfg = DermaFluxConfig.model_validate(cfg_dict)
        # Adapters load on first use and stay: one job samples one adapter.
        self.pool = AdapterPool.from_config(self.cfg, pipeline_device(self.cfg.synth.gpus_per_replica))
        self.compiled: bool | None = None  # synth.compile: tried once, at the first batch's settings

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from dermaflux.synth.sampling import compile_for, encode_png, generate_images

        settings = Settings(**self.settings_of(batch))
        if self.cfg.synth.fuse_lora and settings.adapter:
            self.pool.fuse(settings.adapter)  # once per actor: the job samples one adapter
        if self.cfg.synth.compile and self.compiled is None:
            self.compiled = compile_for(self.pool, settings, batch_size=self.cfg.synth.batch_size,
                                        max_sequence_length=self.cfg.model.max_sequence_length)
        samples = [SampleRequest(str(p), int(s), settings) for p, s in zip(batch["prompt"], batch["seed"])]
        images = generate_images(
            self.pool, samples, max_batch_size=self.cfg.synth.batch_size,
            max_sequence_length=self.cfg.model.max_sequence_length,
        )
        return {"shard": batch["shard"], "position": batch["position"],
                "png": np.array([encode_png(image) for image in images], dtype=object)}

    @staticmethod
    def settings_of(batch) -> dict:
        adapter = str(batch["adapter"][0])
        return {"width": int(batch["width"][0]), "height": int(batch["height"][0]),
                "num_inference_steps": int(batch["num_inference_steps"][0]),
                "guidance_scale": float(batch["guidance_scale"][0]), "adapter": adapter or None}


def request_rows(spec: bulk.JobSpec, pending: list[tuple[int, list[bulk.WorkItem]]]) -> list[dict]:
    s = spec.settings
    return [
        {"shard": index, "position": position, "prompt": item.prompt, "seed": item.seed, "width": s.width,
         "height": s.height, "num_inference_steps": s.num_inference_steps, "guidance_scale": s.guidance_scale,
         "adapter": s.adapter or ""}
        for index, items in pending
        for position, item in enumerate(items)
    ]


def _collect(out: Path, spec: bulk.JobSpec, by_shard: dict, collected: dict[int, dict[int, bytes]], batch) -> None:
    """Add a batch of images; write each planned shard the moment all its images are in."""
    size = (spec.settings.width, spec.settings.height)
    for shard, position, png in zip(batch["shard"], batch["position"], batch["png"]):
        collected.setdefault(int(shard), {})[int(position)] = png
        items = by_shard[int(shard)]
        if len(collected[int(shard)]) == len(items):
            by_position = collected.pop(int(shard))
            pngs = [by_position[i] for i in range(len(items))]
            bulk.write_shard(out, int(shard), spec, items, pngs, [size] * len(items))
            log.debug("generate %s: shard %d written", out, int(shard))


def run_generate_job(cfg: DermaFluxConfig, out: Path, spec: bulk.JobSpec) -> dict:
    """Generate every pending shard of `spec` into `out` on the current Ray cluster."""
    import ray

    pending = bulk.pending_shards(out, spec)
    if pending:
        by_shard = dict(pending)
        log.info("generate %s: %d shards (%d images) to do", out, len(pending), sum(len(v) for v in by_shard.values()))
        ds = ray.data.from_items(request_rows(spec, pending)).map_batches(
            PipelineActor,
            fn_constructor_kwargs={"cfg_dict": cfg.model_dump(mode="json")},
            batch_size=cfg.synth.batch_size,
            compute=ray.data.ActorPoolStrategy(size=cfg.synth.generate_actors),
            num_cpus=cfg.synth.cpus_per_replica,
            num_gpus=cfg.synth.gpus_per_replica,
        )
        collected: dict[int, dict[int, bytes]] = {}
        with bar("generate", "generate", sum(len(v) for v in by_shard.values()), "images", ray_data=True) as shown:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                shown.update(len(batch["png"]))
                _collect(out, spec, by_shard, collected, batch)
    if not (out / bulk.MANIFEST_FILE).exists():
        bulk.write_manifest(out, spec, {"written_by": "dermaflux generate", "fuse_lora": cfg.synth.fuse_lora,
                                         "compile_requested": cfg.synth.compile})  # per actor: see its log
    return bulk.job_status(out)
