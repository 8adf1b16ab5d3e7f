"""The `caption` config section: input/output, which writer, its model and prompts, the actor pool."""

from __future__ import annotations

import string

from pydantic import Field, field_validator

from dermaflux.core.config import ConfigModel
from dermaflux.model.config import DtypeName

PROMPT_FIELDS = ("diagnosis", "malignancy", "attribute_list")


class CaptionPrompts(ConfigModel):
    """Prompts are data: {placeholders} are filled from the lesion's attributes (see writers.prompt_fields)."""

    system: str = Field(
        "You are a dermatologist describing dermoscopy images for a training set. Be factual and brief.",
        description="system message of the chat model",
    )
    attributes_user: str = Field(
        "A dermoscopy image shows a {malignancy} lesion, diagnosed as {diagnosis}. Measured attributes: "
        "{attribute_list}. Describe the mole's asymmetry, border and colours in 3 to 6 sentences, "
        "consistent with these measurements.",
        description="text-only writer: the user message, fed the measured attributes",
    )
    vision_user: str = Field(
        "This is a {malignancy} skin lesion ({diagnosis}). Describe the mole's asymmetry, border "
        "irregularity and colour variation in 3 to 6 sentences.",
        description="vision-language writer: the user message sent with the image",
    )
    answer_prefix: str = Field(
        "This photo depicts a {malignancy} lesion ({diagnosis}). Here's a description of the mole:",
        description="the caption's fixed start (the reference work's style); the model continues it",
    )

    @field_validator("system", "attributes_user", "vision_user", "answer_prefix")
    @classmethod
    def _known_placeholders(cls, text: str) -> str:
        # Fail at config time, not in a writer actor halfway through a corpus.
        names = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
        unknown = names - set(PROMPT_FIELDS)
        if unknown:
            raise ValueError(f"unknown placeholder(s) {sorted(unknown)}; available: {', '.join(PROMPT_FIELDS)}")
        return text


class CaptionConfig(ConfigModel):
    corpus: str | None = Field(None, description="curated corpus folder (shards/*.parquet + manifest.json)")
    out: str | None = Field(None, description="captions folder")
    force: bool = Field(False, description="replace an output folder that holds a different run")
    writer: str = Field("template", description="caption writer by name: template | llm")
    model: str = Field(
        "builtin:tiny-llama",
        description="llm writer: chat model (hub id, local folder, or builtin:tiny-llama for tests)",
    )
    vision: bool = Field(False, description="llm writer: show the image to a vision-language model")
    vision_model: str = Field("meta-llama/Llama-3.2-11B-Vision-Instruct", description="model when vision is on")
    dtype: DtypeName = Field("float32", description="llm weights")
    prompts: CaptionPrompts = Field(default_factory=CaptionPrompts)
    max_new_tokens: int = Field(48, ge=1, description="generated tokens per caption (the prefix is extra)")
    temperature: float = Field(0.0, ge=0.0, description="0: greedy (reproducible)")
    max_caption_tokens: int = Field(512, description="T5 budget a caption must fit (estimated)")
    seed: int = Field(0, description="varies template wording and sampling; per-image seeds derive from it")
    batch_size: int = Field(32, ge=1, description="images per map_batches call")
    concurrency: int = Field(1, ge=1, description="writer actors in the pool")
    cpus_per_actor: float = Field(1.0, ge=0)
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per writer actor (0 on CPU clusters)")
    extract_cpus: float = Field(1.0, gt=0, description="CPUs per attribute-extraction task")
    extract_concurrency: int | None = Field(None, ge=1, description="concurrent extraction tasks (None: as many as fit)")
