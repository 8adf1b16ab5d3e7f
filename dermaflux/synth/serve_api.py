"""The versioned HTTP API of the synthesis service: the FastAPI ingress and its response schemas.

`SynthesisAPI` (`/v1/...`, OpenAPI at `/docs`) stands behind `guard.RequestGuard` (bearer token,
body cap). It validates every request before any work starts (tokenising in a thread, so
/healthz never waits), so bad input costs nothing and writes nothing, and it refuses work beyond
`synth.limits` with a 429 and `Retry-After` instead of queueing it. Images come from the
synthesis deployment (`serve_model`); bulk jobs are `serve_jobs.BulkJobs`'.
"""

# No `from __future__ import annotations`: FastAPI must resolve the route annotations of the
# Serve ingress class at import time (string annotations are left as unresolved forward refs).

import asyncio
import base64
import contextlib
import threading

from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from ray import serve

from dermaflux.synth.guard import Guard, RequestGuard, read_token
from dermaflux.synth.requests import (
    JOB_ID_PATTERN,
    AugmentationRequest,
    ImageRequest,
    RequestError,
    ServiceBusy,
    expand_image_request,
    printable,
    to_jsonable,
)
from dermaflux.synth.serve_jobs import BulkJobs
from dermaflux.synth.serve_model import config_from_dict, synth_call


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


def _printable(value):
    """A response body that encodes whatever a caller sent: lone surrogates in names and messages escaped."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_printable(v) for v in value]
    return value


@api.exception_handler(RequestError)
async def _request_error(_: Request, err: RequestError):
    detail = [{"loc": err.field.split("."), "msg": err.message}]
    return JSONResponse(status_code=err.status, content={"detail": _printable(detail)})


@api.exception_handler(RequestValidationError)
async def _invalid(_: Request, err: RequestValidationError):
    # FastAPI's default echoes each bad `input`: a NaN cannot be encoded (500), a huge one is sent back.
    errors = [{k: v for k, v in error.items() if k != "input"} for error in err.errors()]
    return JSONResponse(status_code=422, content={"detail": _printable(jsonable_encoder(errors))})


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

        self.cfg = config_from_dict(cfg_dict)
        synth = self.cfg.synth
        self.synth = synth_handle
        # T5's tokenizer decides the token budget; loading it here keeps bad prompts off the replicas.
        self.tokenizer = _SerialTokenizer(AutoTokenizer.from_pretrained(
            resolve_pretrained(self.cfg.model), subfolder="tokenizer_2", revision=self.cfg.model.revision
        ))
        self.adapter_paths = adapter_folders(synth.adapters)
        self.jobs = BulkJobs(self.cfg, self.adapter_paths)
        limits = synth.limits
        self.guard = Guard(read_token(synth.auth, bool(synth.auth.required)), limits.max_body_bytes,
                           max_header_bytes=limits.max_header_bytes, max_open_requests=limits.max_open_requests,
                           body_timeout_s=limits.body_timeout_s, retry_after_s=limits.retry_after_s)
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

    @api.post("/v1/augmentations", response_model=JobStatus, status_code=202,
              summary="start (or resume) a bulk job; the same job_id never duplicates images")
    def start_job(self, body: AugmentationRequest):
        return self.jobs.start(body)

    @api.get("/v1/augmentations/{job_id}", response_model=JobStatus, summary="progress of a bulk job")
    def job(self, job_id: str = PathParam(pattern=JOB_ID_PATTERN)):
        return self.jobs.status(job_id)

    @api.delete("/v1/augmentations/{job_id}", response_model=JobStatus, status_code=202,
                summary="cancel a bulk job: its runner stops after the current shard (state `cancelled`)")
    def cancel_job(self, job_id: str = PathParam(pattern=JOB_ID_PATTERN)):
        return self.jobs.cancel(job_id)
