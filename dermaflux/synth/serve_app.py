"""The Ray Serve application: a FastAPI ingress and a synthesis deployment holding the pipeline.

- `SynthesisModel`: one base FluxPipeline per replica (an `AdapterPool`); adapters are Serve
  multiplexed models (`@serve.multiplexed`: loaded on first use, at most
  `synth.max_adapters_per_replica`, LRU-evicted, requests routed to replicas holding their
  adapter via `multiplexed_model_id`); the base is never reloaded. `@serve.batch` gathers
  concurrent single-image calls (Serve splits a batch by adapter) and `sampling.generate_images`
  runs equal-settings requests in one pipeline call. Replicas, autoscaling and GPUs per replica
  come from `synth` in the config.
- `SynthesisAPI`: the versioned HTTP API (`/v1/...`, OpenAPI at `/docs`) behind `guard.RequestGuard`
  (bearer token, body cap). It validates every request before any work starts (tokenising in a
  thread, so /healthz never waits), so bad input costs nothing and writes nothing, and it refuses
  work beyond `synth.limits` with a 429 and `Retry-After` instead of queueing it.
- Bulk jobs write under one root (`jobs.JobStore`, `synth.jobs_root`). `BulkJobRunner`: a detached
  actor per running job that walks the job's shards through the synthesis deployment (retrying a
  shard when a replica dies), writes them via `bulk` and stops between shards when cancelled.
  Job states: running, done, failed, cancelled (the job's progress record) and interrupted (the
  record says running but no runner lives: Ray or the service restarted). A re-POST of the same
  request resumes an interrupted, failed or cancelled job; nothing resumes by itself at start-up.
"""

# No `from __future__ import annotations`: FastAPI must resolve the route annotations of the
# Serve ingress class at import time (string annotations are left as unresolved forward refs).

import asyncio
import base64
import contextlib
import logging
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import ray
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from ray import serve

from dermaflux.core import artifacts
from dermaflux.core.config import ConfigError
from dermaflux.synth import bulk, jobs
from dermaflux.synth.guard import Guard, RequestGuard, auth_required, is_loopback, read_token
from dermaflux.synth.requests import (
    AugmentationRequest,
    ImageRequest,
    RequestError,
    SampleRequest,
    expand_image_request,
    to_jsonable,
)

if TYPE_CHECKING:
    from dermaflux.config import DermaFluxConfig

log = logging.getLogger(__name__)

JOB_NAMESPACE = "dermaflux-jobs"
SYNTH_DEPLOYMENT = "SynthesisModel"
RUNNER_EXIT_WAIT_S = 30.0


class ServiceBusy(Exception):
    """More work than `synth.limits` lets the service hold at once: a 429 with `Retry-After`."""

    def __init__(self, field: str, message: str, retry_after_s: int):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.retry_after_s = field, message, retry_after_s


def _config(cfg_dict: dict):
    from dermaflux.config import DermaFluxConfig

    return DermaFluxConfig.model_validate(cfg_dict)


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

        self.cfg = _config(cfg_dict)
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
    out: str  # relative to the service's jobs root
    state: str  # running | done | failed | cancelled | interrupted
    total: int
    done: int
    shards_total: int
    shards_done: int
    targets: dict[str, int]
    done_by_class: dict[str, int]
    error: str | None = None
    cancel_requested: bool = False  # asked for; the runner stops after its current shard


def runner_namespace(root: Path) -> str:
    """Runners of one jobs root: services with different roots never share job names."""
    return f"{JOB_NAMESPACE}-{artifacts.fingerprint(str(root))}"


@ray.remote(num_cpus=0, max_restarts=-1)
class BulkJobRunner:
    """Runs one job to its end, its cancel or its failure; restarted by Ray if its process dies,
    resuming from the done markers."""

    def __init__(self, root: str, out: str, app_name: str, max_retries: int):
        self.store, self.out = jobs.JobStore(root), Path(out)
        self.thread = threading.Thread(target=self._run, args=(app_name, max_retries), daemon=True)
        self.thread.start()

    def _run(self, app_name: str, max_retries: int) -> None:
        spec = bulk.read_spec(self.out)
        handle = serve.get_deployment_handle(SYNTH_DEPLOYMENT, app_name)

        def generate(samples: list[SampleRequest]) -> list[bytes]:
            responses = [synth_call(handle, s.settings.adapter).generate.remote(s.to_dict()) for s in samples]
            return [r.result(timeout_s=600)["png"] for r in responses]

        # A restart by Ray after the job ended or was cancelled has nothing to do.
        if bulk.job_status(self.out)["state"] == "running":
            try:
                bulk.run_job(self.out, spec, generate, max_retries=max_retries, should_stop=self._cancelled)
            except Exception:  # run_job recorded it in the progress record
                log.exception("bulk job %s failed", spec.job_id)
        # A detached actor outlives its caller, so it ends itself (a re-POST starts a new one).
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def _cancelled(self) -> bool:
        # Decided under the jobs lock: a re-POST that withdraws the cancel never crosses it.
        with self.store.lock():
            if not jobs.cancel_requested(self.out):
                return False
            bulk.set_state(self.out, "cancelled")
            jobs.clear_cancel(self.out)
            return True


def _conflict(job_id: str, relative: str, out: Path) -> RequestError:
    """Why `out` cannot take this job, in the API's terms (the API has no --force)."""
    spec_file = out / bulk.SPEC_FILE
    owner = artifacts.read_json(spec_file).get("job_id") if spec_file.exists() else None
    if owner is None:
        return RequestError("out", f"{relative!r} is not empty and was not written by a DermaFlux job; "
                            "choose another out", status=409)
    if owner != job_id:
        return RequestError("out", f"{relative!r} holds job {owner!r}; choose another out", status=409)
    return RequestError("job_id", f"job {job_id!r} was started with other targets or settings; repeat the original "
                        "request to resume it, or use a new job_id", status=409)


class _SerialTokenizer:
    """One call at a time: the Rust tokenizer refuses concurrent use ("Already borrowed")."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lock = tokenizer, threading.Lock()

    def __call__(self, text: str):
        with self.lock:
            return self.tokenizer(text)


api = FastAPI(
    title="DermaFlux synthesis",
    version="1",
    description="Synthetic dermoscopy images from text or structured lesion attributes (Flux.1 + LoRA). "
    "`/v1/...` routes need `Authorization: Bearer <token>` when the service has a token.",
)


@api.exception_handler(RequestError)
async def _request_error(_: Request, err: RequestError):
    return JSONResponse(status_code=err.status, content={"detail": [{"loc": err.field.split("."), "msg": err.message}]})


@api.exception_handler(RequestValidationError)
async def _invalid(_: Request, err: RequestValidationError):
    # FastAPI's default echoes each bad `input`: a NaN cannot be encoded (500), a huge one is sent back.
    errors = [{k: v for k, v in error.items() if k != "input"} for error in err.errors()]
    return JSONResponse(status_code=422, content={"detail": jsonable_encoder(errors)})


@api.exception_handler(ServiceBusy)
async def _busy(_: Request, err: ServiceBusy):
    return JSONResponse(status_code=429, content={"detail": [{"loc": [err.field], "msg": err.message}]},
                        headers={"Retry-After": str(err.retry_after_s)})


def _replica_guard() -> Guard:
    return serve.get_replica_context().servable_object.guard


# Outermost: the token and the body cap are checked before FastAPI parses anything.
api.add_middleware(RequestGuard, guard=_replica_guard)


@serve.deployment
@serve.ingress(api)
class SynthesisAPI:
    def __init__(self, synth_handle, cfg_dict: dict):
        from transformers import AutoTokenizer

        from dermaflux.model.loading import resolve_pretrained
        from dermaflux.synth.adapter_pool import adapter_folders

        self.cfg = _config(cfg_dict)
        synth = self.cfg.synth
        self.synth = synth_handle
        # T5's tokenizer decides the token budget; loading it here keeps bad prompts off the replicas.
        self.tokenizer = _SerialTokenizer(AutoTokenizer.from_pretrained(
            resolve_pretrained(self.cfg.model), subfolder="tokenizer_2", revision=self.cfg.model.revision
        ))
        self.adapter_paths = adapter_folders(synth.adapters)
        self.jobs = jobs.JobStore(synth.jobs_root)
        self.runners = runner_namespace(self.jobs.root)
        self.guard = Guard(read_token(synth.auth, bool(synth.auth.required)), synth.limits.max_body_bytes)
        self.images_in_flight = 0

    @api.get("/healthz", summary="the ingress process is up (no token needed)")
    def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz", summary="a synthesis replica answers (no token needed)")
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
        # Admitted first, so a refusal costs no tokenising; that runs in a thread, so it never holds
        # up the event loop that answers everyone else.
        with self._admit(body.count):
            samples = await asyncio.to_thread(
                expand_image_request, body, self.cfg, sorted(self.adapter_paths), self.tokenizer
            )
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

    @contextlib.contextmanager
    def _admit(self, count: int):
        """Hold `count` images of the ingress' budget (synth.limits.max_queued_images) or refuse now."""
        limits = self.cfg.synth.limits
        if count > min(limits.max_queued_images, limits.max_images_per_request):
            limit = min(limits.max_queued_images, limits.max_images_per_request)
            raise RequestError("count", f"{count} exceeds the limit of {limit} images per request")
        if self.images_in_flight + count > limits.max_queued_images:
            raise ServiceBusy("count", f"{self.images_in_flight} images in progress and {count} more would exceed "
                              f"synth.limits.max_queued_images ({limits.max_queued_images}); retry later",
                              limits.retry_after_s)
        self.images_in_flight += count
        try:
            yield
        finally:
            self.images_in_flight -= count

    def _runner(self, job_id: str):
        try:
            return ray.get_actor(job_id, namespace=self.runners)
        except ValueError:
            return None

    def _await_exit(self, job_id: str) -> None:
        """A runner that recorded its end (done, failed, cancelled) is leaving: wait until it has."""
        deadline = time.monotonic() + RUNNER_EXIT_WAIT_S
        while self._runner(job_id) is not None:
            if time.monotonic() > deadline:
                raise ServiceBusy("job_id", f"job {job_id!r} is still stopping", self.cfg.synth.limits.retry_after_s)
            time.sleep(0.1)

    def _running_jobs(self) -> int:
        return sum(a["namespace"] == self.runners for a in ray.util.list_named_actors(all_namespaces=True))

    def _known(self, job_id: str) -> str:
        relative = self.jobs.out_of(job_id)
        if relative is None:
            raise RequestError("job_id", f"no job {job_id!r}", status=404)
        return relative

    def _status(self, job_id: str, relative: str) -> dict:
        out = self.jobs.folder(relative)
        status = bulk.job_status(out)
        if status["state"] == "running" and self._runner(job_id) is None:
            with self.jobs.lock():  # a start in progress holds the lock until its runner exists
                status = bulk.job_status(out)
                if status["state"] == "running" and self._runner(job_id) is None:
                    status["state"] = "interrupted"  # no runner: Ray or the service restarted
        return {**status, "out": relative, "cancel_requested": jobs.cancel_requested(out)}

    def _start(self, job_id: str, relative: str, out: Path, spec: bulk.JobSpec) -> None:
        """Under the jobs lock: claim `out` for the job, then leave it running (or done)."""
        known = self.jobs.out_of(job_id)
        if known is not None and known != relative:
            raise RequestError("out", f"job {job_id!r} writes to {known!r}: a job id names one output for life; "
                               f"use a new job_id for {relative!r}", status=409)
        try:
            bulk.prepare_job(out, spec)
        except artifacts.OutputConflict:
            raise _conflict(job_id, relative, out) from None
        if self._runner(job_id) is not None and bulk.job_status(out)["state"] != "running":
            self._await_exit(job_id)
        if self._runner(job_id) is not None:
            jobs.clear_cancel(out)  # a re-POST withdraws a cancel the runner has not acted on
        elif bulk.job_status(out)["state"] != "done":
            limit = self.cfg.synth.limits.max_running_jobs
            if self._running_jobs() >= limit:
                raise ServiceBusy("job_id", f"{limit} bulk jobs are running (synth.limits.max_running_jobs); "
                                  "retry when one ends", self.cfg.synth.limits.retry_after_s)
            jobs.clear_cancel(out)
            bulk.set_state(out, "running")
            BulkJobRunner.options(name=job_id, namespace=self.runners, lifetime="detached", get_if_exists=True).remote(
                str(self.jobs.root), str(out), self.cfg.synth.app_name, self.cfg.synth.job_max_retries
            )
        if known is None:
            self.jobs.record(job_id, relative)

    @api.post("/v1/augmentations", response_model=JobStatus, status_code=202,
              summary="start (or resume) a bulk job; the same job_id never duplicates images")
    def start_job(self, body: AugmentationRequest):
        spec = bulk.job_spec(self.cfg, body, self.adapter_paths)
        relative, out = self.jobs.resolve_out(body.out, body.job_id)
        with self.jobs.lock():
            self._start(body.job_id, relative, out, spec)
        return self._status(body.job_id, relative)

    @api.get("/v1/augmentations/{job_id}", response_model=JobStatus, summary="progress of a bulk job")
    def job(self, job_id: str):
        return self._status(job_id, self._known(job_id))

    @api.delete("/v1/augmentations/{job_id}", response_model=JobStatus, status_code=202,
                summary="cancel a bulk job: its runner stops after the current shard (state `cancelled`)")
    def cancel_job(self, job_id: str):
        relative = self._known(job_id)
        out = self.jobs.folder(relative)
        with self.jobs.lock():
            state = bulk.job_status(out)["state"]
            if state == "done":
                raise RequestError("job_id", f"job {job_id!r} is done; there is nothing to cancel", status=409)
            if state == "running" and self._runner(job_id) is not None:
                jobs.request_cancel(out)
            elif state != "cancelled":
                bulk.set_state(out, "cancelled")
        return self._status(job_id, relative)


def build_app(cfg: "DermaFluxConfig"):
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
    # Requests reach the ingress at once (Serve's default would queue all but 5 at the proxy, where
    # no limit sees them); the ingress refuses what it cannot hold, Serve what exceeds even that.
    limits = synth.limits
    ingress = {
        "ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": limits.max_open_requests,
        "max_queued_requests": limits.max_open_requests,
        "backpressure_config": {"status_code": 429, "retry_after_s": limits.retry_after_s},
    }
    return SynthesisAPI.options(**ingress).bind(model, cfg_dict)


def service_config(cfg: "DermaFluxConfig", bind_host: str | None):
    """A copy with the model resolved and the cache folder, jobs root and token rule fixed, so every
    replica on every node finds the same ones; a wrong adapter folder, model or a missing token
    fails here, with its name. `bind_host` None: the cluster binds (RayService), so a token is needed."""
    from dermaflux.model.config import cache_dir
    from dermaflux.model.loading import resolve_pretrained
    from dermaflux.synth.adapter_pool import adapter_folders

    cfg = cfg.model_copy(deep=True)
    cfg.model.cache_dir = str(cache_dir(cfg.model))
    synth = cfg.synth
    synth.jobs_root = str(Path(synth.jobs_root or Path(cfg.model.cache_dir) / "synth-jobs").expanduser().resolve())
    synth.auth.required = auth_required(synth.auth, bind_host)
    read_token(synth.auth, synth.auth.required)  # here, so a missing token stops the start with one line
    if not synth.auth.required and bind_host is not None and not is_loopback(bind_host):
        log.warning("synth.auth.required is false and the service binds to %s: anyone who reaches it may use it",
                    bind_host)
    folders = adapter_folders(synth.adapters)
    if synth.fuse_lora and len(folders) != 1:
        raise ConfigError(f"synth.fuse_lora: a service fuses exactly one adapter, synth.adapters names {len(folders)}")
    resolve_pretrained(cfg.model)
    return cfg


def start_service(cfg: "DermaFluxConfig", *, blocking: bool = False, access_log: bool = True):
    """Start (or update) the app on `cfg.synth.host:port`; returns the ingress handle."""
    from dermaflux.core.runtime import init_ray

    cfg = service_config(cfg, cfg.synth.host)
    init_ray(cfg.ray)
    serve.start(http_options={"host": cfg.synth.host, "port": cfg.synth.port})
    return serve.run(build_app(cfg), name=cfg.synth.app_name, route_prefix=cfg.synth.route_prefix, blocking=blocking,
                     logging_config={"enable_access_log": access_log})


def check_port_free(host: str, port: int) -> None:
    """ConfigError naming synth.port when `host:port` cannot be bound (as Serve's proxy would)."""
    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no conflict
            probe.bind(address)
    except OSError as err:
        raise ConfigError(f"synth.port: cannot listen on {host}:{port} ({err.strerror or err}); stop what holds it "
                          "or choose another --port") from None


def serve_forever(cfg: "DermaFluxConfig") -> dict:
    """The `serve` stage: run the service until Ctrl-C."""
    service_config(cfg, cfg.synth.host)  # token, model, adapters: refused before anything is announced
    check_port_free(cfg.synth.host, cfg.synth.port)
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

    The cluster decides the bind address, so the token is required unless `synth.auth.required: false`.
    """
    return build_app(service_config(config_from_args(args), None))


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
