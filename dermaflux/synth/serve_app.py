"""The Ray Serve application: a FastAPI ingress and a synthesis deployment holding the pipeline.

- `SynthesisModel`: one base FluxPipeline per replica (an `AdapterPool`); adapters are Serve
  multiplexed models (`@serve.multiplexed`: loaded on first use, at most
  `synth.max_adapters_per_replica`, LRU-evicted, requests routed to replicas holding their
  adapter via `multiplexed_model_id`); the base is never reloaded. `@serve.batch` gathers
  concurrent single-image calls (Serve splits a batch by adapter) and `sampling.generate_images`
  runs equal-settings requests in one pipeline call. Replicas, autoscaling and GPUs per replica
  come from `synth` in the config.
- `SynthesisAPI`: the versioned HTTP API (`/v1/...`, OpenAPI at `/docs`); it validates every
  request before any work starts, so bad input costs nothing and writes nothing.
- `BulkJobRunner`: a detached actor per bulk job that walks the job's shards through the
  synthesis deployment (retrying a shard when a replica dies) and writes them via `bulk`.
"""

# No `from __future__ import annotations`: FastAPI must resolve the route annotations of the
# Serve ingress class at import time (string annotations are left as unresolved forward refs).

import asyncio
import base64
import logging
import threading
from pathlib import Path

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from ray import serve

from dermaflux.core import artifacts
from dermaflux.synth import bulk
from dermaflux.synth.requests import (
    AugmentationRequest,
    ImageRequest,
    RequestError,
    SampleRequest,
    check_labels,
    expand_image_request,
    resolve_settings,
    to_jsonable,
)

log = logging.getLogger(__name__)

JOB_NAMESPACE = "dermaflux-jobs"
SYNTH_DEPLOYMENT = "SynthesisModel"
FAILED_FILE = "failed.json"


def _config(cfg_dict: dict):
    from dermaflux.config import DermaFluxConfig

    return DermaFluxConfig.model_validate(cfg_dict)


class _AdapterLease:
    """What `@serve.multiplexed` caches per adapter; Serve calls `__del__` when it evicts the adapter."""

    def __init__(self, pool, name: str):
        self.pool, self.name, self.released = pool, name, False

    def __del__(self):
        # Called by Serve on LRU eviction (in an executor thread), and again by the GC: once is enough.
        if not self.released:
            self.released = True
            self.pool.unload(self.name)


@serve.deployment(name=SYNTH_DEPLOYMENT)
class SynthesisModel:
    def __init__(self, cfg_dict: dict):
        from dermaflux.synth.adapter_pool import AdapterPool
        from dermaflux.synth.sampling import pipeline_device

        self.cfg = _config(cfg_dict)
        self.pool = AdapterPool.from_config(self.cfg, pipeline_device(self.cfg.synth.gpus_per_replica))
        # Serve model multiplexing: adapters load on first use, at most N per replica, LRU-evicted,
        # and Serve routes a request to a replica that already holds its adapter. Wired here
        # because N comes from the config (Ray detects init-time multiplexed attributes).
        async def lease(name: str) -> _AdapterLease:  # a plain function: Serve caches its state on it
            await asyncio.to_thread(self.pool.load, name)
            return _AdapterLease(self.pool, name)

        self.get_adapter = serve.multiplexed(max_num_models_per_replica=self.cfg.synth.max_adapters_per_replica)(lease)
        self.generate_batch.set_max_batch_size(self.cfg.synth.batch_size)
        self.generate_batch.set_batch_wait_timeout_s(self.cfg.synth.batch_wait_timeout_s)

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


def synth_call(handle, adapter: str | None):
    """The synthesis handle for a request: routed by adapter (Serve multiplexing) when it has one."""
    return handle.options(multiplexed_model_id=adapter) if adapter else handle


class ImageOut(BaseModel):
    png_base64: str
    width: int
    height: int
    seed: int


class ImagesResponse(BaseModel):
    prompt: str
    attributes: dict | None
    adapter: str | None
    num_inference_steps: int
    guidance_scale: float
    images: list[ImageOut]


class JobStatus(BaseModel):
    job_id: str
    out: str
    state: str  # running | done | failed
    total: int
    done: int
    shards_total: int
    shards_done: int
    targets: dict[str, int]
    done_by_class: dict[str, int]
    error: str | None = None


def _status(out: Path) -> dict:
    status = bulk.job_status(out)
    failed = out / FAILED_FILE
    if status["state"] != "done" and failed.exists():
        status.update(state="failed", error=artifacts.read_json(failed)["error"])
    return status


@ray.remote(num_cpus=0, max_restarts=-1)
class BulkJobRunner:
    """Runs one job to the end; restarted by Ray if its process dies, resuming from the done markers."""

    def __init__(self, out: str, app_name: str, max_retries: int):
        self.out = Path(out)
        self.thread = threading.Thread(target=self._run, args=(app_name, max_retries), daemon=True)
        self.thread.start()

    def _run(self, app_name: str, max_retries: int) -> None:
        spec = bulk.read_spec(self.out)
        handle = serve.get_deployment_handle(SYNTH_DEPLOYMENT, app_name)

        def generate(samples: list[SampleRequest]) -> list[bytes]:
            responses = [synth_call(handle, s.settings.adapter).generate.remote(s.to_dict()) for s in samples]
            return [r.result(timeout_s=600)["png"] for r in responses]

        try:
            bulk.run_job(self.out, spec, generate, max_retries=max_retries)
        except Exception as err:
            log.exception("bulk job %s failed", spec.job_id)
            artifacts.atomic_write_json(self.out / FAILED_FILE, {"error": f"{type(err).__name__}: {err}"})
        # Done or failed: a detached actor outlives its caller, so it ends itself (a re-POST starts a new one).
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def status(self) -> dict:
        return _status(self.out)


api = FastAPI(
    title="DermaFlux synthesis",
    version="1",
    description="Synthetic dermoscopy images from text or structured lesion attributes (Flux.1 + LoRA).",
)


@api.exception_handler(RequestError)
async def _request_error(_: Request, err: RequestError):
    return JSONResponse(status_code=err.status, content={"detail": [{"loc": err.field.split("."), "msg": err.message}]})


@serve.deployment
@serve.ingress(api)
class SynthesisAPI:
    def __init__(self, synth_handle, cfg_dict: dict):
        from transformers import AutoTokenizer

        from dermaflux.model.loading import resolve_pretrained

        self.cfg = _config(cfg_dict)
        self.synth = synth_handle
        # T5's tokenizer decides the token budget; loading it here keeps bad prompts off the replicas.
        self.tokenizer = AutoTokenizer.from_pretrained(
            resolve_pretrained(self.cfg.model), subfolder="tokenizer_2", revision=self.cfg.model.revision
        )
        from dermaflux.synth.adapter_pool import adapter_folders

        self.adapter_paths = adapter_folders(self.cfg.synth.adapters)
        self.jobs_dir = Path(self.cfg.synth.jobs_dir or Path(self.cfg.model.cache_dir or ".") / "synth-jobs")

    @api.get("/healthz", summary="the ingress process is up")
    def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz", summary="a synthesis replica answers")
    async def readyz(self):
        try:
            replica = await asyncio.wait_for(self.synth.adapters.remote(), timeout=10)
        except Exception as err:  # no replica yet, or it is starting
            return JSONResponse(status_code=503, content={"status": "not ready", "reason": str(err)})
        return {"status": "ready", "adapters": replica["served"]}

    @api.get("/v1/adapters", summary="adapter names that requests may name; one replica's loaded set")
    async def adapters(self) -> dict:
        # `replica` is whichever replica answered: with several, each holds its own LRU set.
        replica = await self.synth.adapters.remote()
        return {"adapters": sorted(self.adapter_paths), "base": self.cfg.model.pretrained, "replica": replica}

    @api.post("/v1/images", response_model=ImagesResponse, summary="generate images (PNG, base64) now")
    async def images(self, body: ImageRequest) -> ImagesResponse:
        samples = expand_image_request(body, self.cfg, sorted(self.adapter_paths), self.tokenizer)
        results = await asyncio.gather(
            *(synth_call(self.synth, s.settings.adapter).generate.remote(s.to_dict()) for s in samples)
        )
        settings = samples[0].settings
        return ImagesResponse(
            prompt=samples[0].prompt, attributes=to_jsonable(body.attributes), adapter=settings.adapter,
            num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
            images=[
                ImageOut(png_base64=base64.b64encode(r["png"]).decode(), width=r["width"], height=r["height"], seed=s.seed)
                for s, r in zip(samples, results)
            ],
        )

    def _job_spec(self, body: AugmentationRequest) -> bulk.JobSpec:
        settings = resolve_settings(body, self.cfg, sorted(self.adapter_paths))
        if body.class_targets is not None:
            targets = check_labels(body.class_targets)
        else:
            try:
                targets = bulk.bring_to_targets(body.corpus, body.bring_to)
            except FileNotFoundError as err:
                raise RequestError("corpus", str(err)) from None
        total = sum(targets.values())
        limit = self.cfg.synth.limits.max_images_per_job
        if total > limit:
            raise RequestError("class_targets", f"{total} images exceeds the limit of {limit} per job")
        return bulk.JobSpec(
            job_id=body.job_id, targets=targets, settings=settings, seed=body.seed, shard_size=self.cfg.synth.shard_size,
            model=self.cfg.model.pretrained, adapter_path=self.adapter_paths.get(settings.adapter),
        )

    def _job_index(self, job_id: str) -> Path:
        return self.jobs_dir / "index" / f"{job_id}.json"

    @api.post("/v1/augmentations", response_model=JobStatus, status_code=202,
              summary="start (or resume) a bulk job; the same job_id never duplicates images")
    def start_job(self, body: AugmentationRequest):
        spec = self._job_spec(body)
        out = Path(body.out or self.jobs_dir / body.job_id).resolve()
        index = self._job_index(body.job_id)
        if index.exists() and artifacts.read_json(index)["out"] != str(out):
            raise RequestError("job_id", f"job {body.job_id!r} already writes to {artifacts.read_json(index)['out']}",
                               status=409)
        try:
            bulk.prepare_job(out, spec)
        except artifacts.OutputConflict as err:
            raise RequestError("job_id", str(err), status=409) from None
        artifacts.atomic_write_json(index, {"out": str(out)})
        status = bulk.job_status(out)
        if status["state"] != "done":
            (out / FAILED_FILE).unlink(missing_ok=True)
            BulkJobRunner.options(
                name=body.job_id, namespace=JOB_NAMESPACE, lifetime="detached", get_if_exists=True
            ).remote(str(out), self.cfg.synth.app_name, self.cfg.synth.job_max_retries)
        return _status(out)

    @api.get("/v1/augmentations/{job_id}", response_model=JobStatus, summary="progress of a bulk job")
    def job(self, job_id: str):
        index = self._job_index(job_id)
        if not index.exists():
            raise RequestError("job_id", f"no job {job_id!r}", status=404)
        return _status(Path(artifacts.read_json(index)["out"]))


def build_app(cfg):
    """The Serve application for `cfg` (replicas, autoscaling and resources from `cfg.synth`)."""
    synth = cfg.synth
    scaling = synth.autoscaling
    options: dict = {
        "ray_actor_options": {"num_cpus": synth.cpus_per_replica, "num_gpus": synth.gpus_per_replica},
        "max_ongoing_requests": synth.max_ongoing_requests,
    }
    if scaling.min_replicas == scaling.max_replicas:
        options["num_replicas"] = scaling.max_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
        }
    cfg_dict = cfg.model_dump(mode="json")
    model = SynthesisModel.options(**options).bind(cfg_dict)
    return SynthesisAPI.options(ray_actor_options={"num_cpus": 0}).bind(model, cfg_dict)


def service_config(cfg):
    """A copy with the model resolved and the cache folder fixed, so every replica on every node
    finds the same ones; a wrong adapter folder or model fails here, with its name."""
    from dermaflux.model.config import cache_dir
    from dermaflux.model.loading import resolve_pretrained
    from dermaflux.synth.adapter_pool import adapter_folders

    cfg = cfg.model_copy(deep=True)
    cfg.model.cache_dir = str(cache_dir(cfg.model))
    adapter_folders(cfg.synth.adapters)
    resolve_pretrained(cfg.model)
    return cfg


def start_service(cfg, *, blocking: bool = False, access_log: bool = True):
    """Start (or update) the app on `cfg.synth.host:port`; returns the ingress handle."""
    from dermaflux.core.runtime import init_ray

    cfg = service_config(cfg)
    init_ray(cfg.ray)
    serve.start(http_options={"host": cfg.synth.host, "port": cfg.synth.port})
    return serve.run(build_app(cfg), name=cfg.synth.app_name, route_prefix=cfg.synth.route_prefix, blocking=blocking,
                     logging_config={"enable_access_log": access_log})


def serve_forever(cfg) -> dict:
    """The `serve` stage: run the service until Ctrl-C."""
    print(f"serving on http://{cfg.synth.host}:{cfg.synth.port} (OpenAPI: /docs); Ctrl-C stops", flush=True)
    try:
        start_service(cfg, blocking=True)
    except KeyboardInterrupt:
        print("stopping the service", flush=True)
        serve.shutdown()
    return {"stopped": True}


def app(args: dict):
    """The application builder a RayService's `serveConfigV2` (or `serve run`) imports:

        import_path: dermaflux.synth.serve_app:app
        args: {preset: flux-dev, config: /path/run.yaml, set: ["synth.adapters=[s3://...]"]}
    """
    return build_app(service_config(config_from_args(args)))


def config_from_args(args: dict):
    """Serve's `args` ({preset, config, set}) -> the config, with the model cache folder fixed once."""
    from dermaflux.config import load_config
    from dermaflux.model.config import cache_dir

    overrides = args.get("set") or []
    if isinstance(overrides, str):
        overrides = [overrides]
    cfg = load_config(args.get("preset"), args.get("config"), list(overrides))
    cfg.model.cache_dir = str(cache_dir(cfg.model))
    return cfg
