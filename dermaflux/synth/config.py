"""The `synth` config section: what `dermaflux generate` and `dermaflux serve` read.

Generation settings (size, steps, guidance) default to the model section (`model.resolution`,
`model.num_inference_steps`, `model.guidance_scale`), so a preset states them once.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Literal

from pydantic import Field, model_validator

from dermaflux.core.config import ConfigModel


def adapter_entry(entry: str) -> tuple[str, str]:
    """A `synth.adapters` entry -> (name, folder): `NAME=DIR`, or a folder or URI served under its last
    part. A NAME holds no `/` or `:`, so a path or URI containing `=` is a folder, not NAME=DIR."""
    name, sep, folder = entry.partition("=")
    if sep and "/" not in name and ":" not in name:
        return name, folder
    return PurePosixPath(entry.rstrip("/")).name, entry


class LimitsConfig(ConfigModel):
    """What one request may ask for, and how much work the service holds at once: larger requests
    get a 4xx; work beyond the bounds gets a 429 with `Retry-After`, never a growing queue."""

    max_images_per_request: int = Field(8, ge=1, description="`count` of POST /v1/images")
    max_images_per_job: int = Field(100_000, ge=1, description="sum of per-class targets of one bulk job")
    max_side: int = Field(1024, ge=16, description="largest width/height in pixels")
    max_steps: int = Field(100, ge=1)
    max_guidance: float = Field(30.0, gt=0)
    max_body_bytes: int = Field(
        65_536, ge=1024, description="request body size; larger bodies get a 413 before a byte is parsed"
    )
    max_prompt_chars: int = Field(
        4096, ge=1, description="`prompt` length in characters, checked before the prompt is tokenised"
    )
    max_queued_images: int = Field(
        16, ge=1, description="images of POST /v1/images accepted and not yet answered, per ingress replica; "
        "beyond it: 429 (size it to what the synthesis replicas finish within the latency you accept)"
    )
    max_running_jobs: int = Field(2, ge=1, description="bulk jobs running at once; another start gets a 429")
    max_open_requests: int = Field(
        256, ge=1, description="`/v1/...` requests the ingress holds at once, counted from their headers (a slow "
        "body holds one); more get a 429. Health and readiness are not counted: Serve lets the ingress hold twice "
        "this, so they answer while work requests fill it"
    )
    max_header_bytes: int = Field(
        32_768, ge=1024, description="request headers, names and values together; larger gets a 431 before the "
        "token is checked"
    )
    body_timeout_s: float = Field(
        10.0, gt=0, description="seconds a client has to send its whole request body; slower gets a 408"
    )
    max_request_pixel_steps: int = Field(
        2**28, ge=1, description="compute of one POST /v1/images: count x num_inference_steps x width x height "
        "(2**28: 8 images of 1024 x 1024 at 32 steps)"
    )
    max_job_pixel_steps: int = Field(
        2**40, ge=1, description="compute of one bulk job: images x num_inference_steps x width x height "
        "(2**40: 100,000 images of 512 x 512 at 41 steps)"
    )
    retry_after_s: int = Field(2, ge=1, description="the `Retry-After` of a 429")


class AuthConfig(ConfigModel):
    """Bearer-token authentication of the HTTP API: every `/v1/...` route needs
    `Authorization: Bearer <token>`; `/healthz`, `/readyz` and the OpenAPI pages stay open. The
    token itself never appears in a config (configs are saved beside outputs as config.yaml)."""

    required: bool | None = Field(
        None, description="None: required when the service binds beyond loopback (synth.host) and always in the "
        "RayService builder; true: always; false: not required (a token that is set is still enforced)"
    )
    token_env: str = Field("DERMAFLUX_API_TOKEN", description="environment variable holding the token")
    token_file: str | None = Field(
        None, description="file holding the token (e.g. a mounted Kubernetes secret); wins over token_env"
    )


class AutoscalingSettings(ConfigModel):
    """Ray Serve autoscaling of the synthesis deployment (min == max: a fixed number of replicas)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(4.0, gt=0, description="per replica, before Serve adds one")

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class SynthConfig(ConfigModel):
    adapters: list[str] = Field(
        default_factory=list,
        description="adapter folders (dermaflux.model.adapters); served under their folder name, or NAME=DIR",
    )
    out: str | None = Field(None, description="output folder of `generate` (a synthetic set)")
    per_class: int | None = Field(
        None, ge=0, description="`generate`: images for every class of `corpus` (every taxonomy class without one)"
    )
    class_targets: dict[str, int] = Field(
        default_factory=dict, description="`generate`: explicit images per class (overrides per_class for those)"
    )
    bring_to: int | None = Field(None, ge=0, description="`generate`: top every class up to N real+synthetic")
    targets: str | None = Field(
        None, description="`generate`: targets over label x subgroup, e.g. 'mel:skin_tone=brown:200,nv:300' (added to "
        "the class targets; attributes: skin_tone, sex, site)")
    balance: Literal["skin_tone", "sex", "site"] | None = Field(
        None, description="`generate`: per class of synth.corpus' train split, top every subgroup of this attribute "
        "its real images show up to the best-represented one (skin tone: measured ITA category)")
    corpus: str | None = Field(
        None, description="corpus folder: its train split's classes are the ones generated (another is an error) and "
        "the counts `bring_to` tops up"
    )
    adapter: str | None = Field(None, description="`generate`: adapter name to sample with (default: first, else base)")
    seed: int = Field(
        0, ge=0, lt=2**63, description="base seed: image i of class c gets a seed derived from (seed, c, i)"
    )
    width: int | None = Field(None, description="default: model.resolution")
    height: int | None = Field(None, description="default: model.resolution")
    num_inference_steps: int | None = Field(None, description="default: model.num_inference_steps")
    guidance_scale: float | None = Field(None, description="default: model.guidance_scale")
    shard_size: int = Field(16, ge=1, description="images per Parquet shard (the unit of resume)")
    batch_size: int = Field(4, ge=1, description="images per pipeline call (offline job and @serve.batch)")
    batch_wait_timeout_s: float = Field(0.05, ge=0, description="@serve.batch: wait this long to fill a batch")
    generate_actors: int = Field(1, ge=1, description="`generate`: Ray Data actor pool size (pipeline copies)")
    fuse_lora: bool = Field(
        False, description="merge the sampled LoRA into the base weights (faster; images equal the unfused ones "
        "within rounding, not bit for bit): `generate`, and `serve` with exactly one adapter, which then samples "
        "only that adapter"
    )
    compile: bool = Field(
        False, description="torch.compile the transformer's repeated blocks where the pipeline never switches "
        "adapters (fused to one, or the base alone); eager, with one warning, if compiling fails"
    )
    cpus_per_replica: float = Field(1.0, gt=0)
    gpus_per_replica: float = Field(0.0, ge=0)
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings)
    max_ongoing_requests: int = Field(32, ge=1, description="per synthesis replica")
    max_adapters_per_replica: int = Field(
        4, ge=1, description="`serve`: adapters a replica keeps loaded (Serve multiplexing, least recently used out)"
    )
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    jobs_root: str | None = Field(
        None, description="`serve`: the one folder bulk jobs write under, fixed when the service starts; a job's "
        "`out` is a name or relative path inside it (default: <cache>/synth-jobs)"
    )
    corpus_root: str | None = Field(
        None, description="`serve`: the folder a bulk job's `corpus` must lie in (a name or path inside it); "
        "unset: requests may not name a corpus"
    )
    auth: AuthConfig = Field(default_factory=AuthConfig)
    job_max_retries: int = Field(5, ge=0, description="attempts per shard when a replica dies mid-job")
    host: str = Field("127.0.0.1", description="`serve`: bind address (loopback unless you mean it)")
    port: int = Field(8000, ge=0, le=65535)
    app_name: str = "dermaflux"
    route_prefix: str = "/"
