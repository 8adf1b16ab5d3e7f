"""What a caller may ask for, and the checks that turn it into single-image sample requests.

The same pydantic models are the HTTP schema of the Serve app (so OpenAPI documents them) and
the input of the offline job; `expand_image_request` is the one place limits are enforced, so
the service and `dermaflux generate` refuse the same things with the same messages.
Pure python + pydantic: no torch, no Ray.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dermaflux.lesion.attributes import LesionAttributes
from dermaflux.lesion.captions import caption_from_attributes
from dermaflux.lesion import taxonomy

if TYPE_CHECKING:
    from dermaflux.config import DermaFluxConfig

SIZE_MULTIPLE = 16  # Flux: VAE downsamples 8x, then 2x2 latent patches are packed
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class RequestError(ValueError):
    """A request the caller must change: `field` is the JSON path, `message` what was expected."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status


class ServiceBusy(Exception):
    """More work than `synth.limits` lets the service hold at once: a 429 with `Retry-After`."""

    def __init__(self, field: str, message: str, retry_after_s: int):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.retry_after_s = field, message, retry_after_s


def printable(text: str) -> str:
    """`text` safe to encode in a response or a log: a lone surrogate becomes its escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _unencodable(value: Any, where: str = "") -> str | None:
    """Where in `value` a string is not encodable text (JSON's `\\ud800` decodes to a lone surrogate,
    which no file name, tokenizer or response can hold); None when every string is."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "the value"
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _unencodable(key, f"{where}{printable(str(key))} (its name)") or _unencodable(
                item, f"{where}{printable(str(key))}.")
            if found:
                return found
    elif isinstance(value, list):
        return next((found for i, item in enumerate(value) if (found := _unencodable(item, f"{where}{i}."))), None)
    return None


class _Body(BaseModel):
    # Strict: `"2"`, `1.0` and `true` are not counts (lax pydantic would coerce them).
    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _encodable(cls, value):
        where = _unencodable(value)
        if where is not None:
            raise ValueError(f"{where.rstrip('.')}: a lone UTF-16 surrogate is not text; send valid Unicode")
        return value


class ImageRequest(_Body):
    """POST /v1/images: a free-text `prompt` or structured `attributes` (captioned by the training template)."""

    prompt: str | None = Field(None, description="free text; give this or `attributes`")
    attributes: LesionAttributes | None = Field(None, description="structured lesion attributes; give this or `prompt`")
    count: int = Field(1, ge=1, description="images to return; image i uses seed + i")
    seed: int = Field(0, ge=0, lt=2**63, description="seed + count - 1 must stay below 2**63")
    num_inference_steps: int | None = Field(None, ge=1, description="default: the preset's")
    guidance_scale: float | None = Field(None, ge=0, allow_inf_nan=False, description="default: the preset's")
    width: int | None = Field(None, ge=SIZE_MULTIPLE, description="pixels, multiple of 16; default: the preset's")
    height: int | None = Field(None, ge=SIZE_MULTIPLE, description="pixels, multiple of 16; default: the preset's")
    adapter: str | None = Field(None, description="adapter name (GET /v1/adapters); null: the base model")

    @model_validator(mode="after")
    def _prompt_or_attributes(self):
        if (self.prompt is None) == (self.attributes is None):
            raise ValueError("give exactly one of `prompt` (free text) or `attributes` (structured)")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("`prompt` is empty")
        return self


class AugmentationRequest(_Body):
    """POST /v1/augmentations: a bulk job writing a synthetic set (SYNTHETIC_SCHEMA shards + manifest)."""

    job_id: str = Field(..., pattern=JOB_ID_PATTERN, description="repeat it to resume, never duplicates")
    class_targets: dict[str, int] | None = Field(None, description="explicit synthetic images per taxonomy code")
    bring_to: int | None = Field(None, ge=0, description="top every class of `corpus` (train split) up to N images")
    corpus: str | None = Field(None, description="corpus folder for `bring_to`")
    targets: str | None = Field(
        None, max_length=4096, description="targets over label x subgroup, as `generate --targets` takes them: "
        "'mel:skin_tone=brown:200,nv:300' (attributes skin_tone, sex, site)"
    )
    out: str | None = Field(
        None, description="output folder: a name or relative path inside the service's jobs root "
        "(synth.jobs_root); default: <job_id>. One job id writes to one folder for life"
    )
    adapter: str | None = None
    seed: int = Field(0, ge=0, lt=2**63)
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0, allow_inf_nan=False)
    width: int | None = Field(None, ge=SIZE_MULTIPLE)
    height: int | None = Field(None, ge=SIZE_MULTIPLE)

    @model_validator(mode="after")
    def _one_target_kind(self):
        if sum(kind is not None for kind in (self.class_targets, self.bring_to, self.targets)) != 1:
            raise ValueError("give exactly one of `class_targets` ({code: count}), `bring_to` (with `corpus`) or "
                             "`targets` ('mel:skin_tone=brown:200,...')")
        if self.bring_to is not None and not self.corpus:
            raise ValueError("`bring_to` needs `corpus` (a corpus folder whose train-split counts are topped up)")
        return self


@dataclass(frozen=True)
class Settings:
    """Everything besides prompt and seed that decides an image; equal settings batch together."""

    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    adapter: str | None


@dataclass(frozen=True)
class SampleRequest:
    """One image: a prompt, its seed and the settings."""

    prompt: str
    seed: int
    settings: Settings

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "seed": self.seed, "settings": asdict(self.settings)}

    @classmethod
    def from_dict(cls, data: dict) -> "SampleRequest":
        return cls(data["prompt"], int(data["seed"]), Settings(**data["settings"]))


def resolve_settings(body: ImageRequest | AugmentationRequest, cfg: DermaFluxConfig, adapters: list[str]) -> Settings:
    """Fill defaults from the preset and check them against `synth.limits` and the served adapters."""
    limits = cfg.synth.limits
    width = body.width or cfg.synth.width or cfg.model.resolution
    height = body.height or cfg.synth.height or cfg.model.resolution
    for name, side in (("width", width), ("height", height)):
        if side % SIZE_MULTIPLE:
            raise RequestError(name, f"{side} is not a multiple of {SIZE_MULTIPLE} (Flux packs 2x2 patches of 8x latents)")
        if side > limits.max_side:
            raise RequestError(name, f"{side} exceeds the limit of {limits.max_side} pixels")
    steps = body.num_inference_steps or cfg.synth.num_inference_steps or cfg.model.num_inference_steps
    if steps > limits.max_steps:
        raise RequestError("num_inference_steps", f"{steps} exceeds the limit of {limits.max_steps}")
    guidance = body.guidance_scale
    if guidance is None:
        guidance = cfg.synth.guidance_scale if cfg.synth.guidance_scale is not None else cfg.model.guidance_scale
    if not math.isfinite(guidance):
        raise RequestError("guidance_scale", f"expected a finite number, got {guidance}")
    if guidance > limits.max_guidance:
        raise RequestError("guidance_scale", f"{guidance} exceeds the limit of {limits.max_guidance}")
    if body.adapter is not None and body.adapter not in adapters:
        known = ", ".join(adapters) or "none (only the base model is served)"
        raise RequestError("adapter", f"unknown adapter {body.adapter!r}; served: {known}", status=404)
    if body.adapter is None and adapters and cfg.synth.fuse_lora:  # the base weights now hold the adapter
        raise RequestError("adapter", f"this service samples only adapter {adapters[0]!r}, fused into the base "
                           "(synth.fuse_lora); name it")
    return Settings(width, height, int(steps), float(guidance), body.adapter)


def check_token_budget(prompt: str, tokenizer, budget: int, field: str = "prompt") -> None:
    """Refuse prompts the T5 encoder would truncate (Flux cuts at max_sequence_length silently)."""
    if tokenizer is None:
        return
    n_tokens = len(tokenizer(prompt).input_ids)
    if n_tokens > budget:
        raise RequestError(field, f"{n_tokens} tokens exceeds the budget of {budget} (model.max_sequence_length)")


def expand_image_request(body: ImageRequest, cfg: DermaFluxConfig, adapters: list[str], tokenizer=None) -> list[SampleRequest]:
    """One SampleRequest per image, or RequestError before any work starts."""
    limits = cfg.synth.limits
    limit = limits.max_images_per_request
    if body.count > limit:
        raise RequestError("count", f"{body.count} exceeds the limit of {limit} images per request")
    if body.seed + body.count > 2**63:  # image i uses seed + i; torch seeds are int64
        raise RequestError("seed", f"seed + count - 1 = {body.seed + body.count - 1} exceeds 2**63 - 1")
    if body.prompt is not None and len(body.prompt) > limits.max_prompt_chars:  # before the tokenizer sees it
        raise RequestError("prompt", f"{len(body.prompt)} characters exceeds the limit of {limits.max_prompt_chars}")
    settings = resolve_settings(body, cfg, adapters)
    check_compute(body.count, settings, limits.max_request_pixel_steps, "count", "max_request_pixel_steps")
    prompt = body.prompt if body.prompt is not None else caption_from_attributes(body.attributes, body.seed)
    check_token_budget(prompt, tokenizer, cfg.model.max_sequence_length, "prompt" if body.prompt else "attributes")
    return [SampleRequest(prompt, body.seed + i, settings) for i in range(body.count)]


def check_compute(images: int, settings: Settings, budget: int, field: str, limit_name: str) -> None:
    """Refuse work beyond a compute budget: images x steps x pixels (a sampler's cost grows with each)."""
    cost = images * settings.num_inference_steps * settings.width * settings.height
    if cost > budget:
        raise RequestError(field, f"{images} images x {settings.num_inference_steps} steps x {settings.width} x "
                           f"{settings.height} pixels = {cost:,} pixel-steps exceeds the budget of {budget:,} "
                           f"(synth.limits.{limit_name}); ask for fewer, smaller or fewer-step images")


def check_labels(targets: dict[str, int], field: str = "class_targets") -> dict[str, int]:
    """Taxonomy codes only, non-negative counts; sorted so a job's plan never depends on dict order."""
    for code, count in targets.items():
        if code not in taxonomy.LABELS:
            raise RequestError(f"{field}.{code}", f"unknown class {code!r}; known: {', '.join(taxonomy.CODES)}")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise RequestError(f"{field}.{code}", f"expected a non-negative integer count, got {count!r}")
    return {code: targets[code] for code in sorted(targets)}


def derive_seed(base_seed: int, label: str, index: int) -> int:
    """Seed of image `index` of class `label`: stable across runs, replicas and Python versions."""
    digest = hashlib.sha256(f"{base_seed}:{label}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # < 2**63, a valid torch seed


def to_jsonable(obj: Any) -> Any:
    return obj.model_dump(mode="json", exclude_none=True) if isinstance(obj, BaseModel) else obj
