"""Caption writers behind one interface, chosen by name (`caption.writer`) from one registry.

`template` (default): the deterministic template of template.py. `llm`: a chat model (transformers)
fed the measured attributes, or with `caption.vision` a vision-language model shown the image;
every generated caption is validated and falls back to the template (flagged) when it fails.
Writers hold no Ray code: the Ray Data actor (ray_pipeline.py) builds one and calls `write`.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from dermaflux.caption.config import CaptionConfig
from dermaflux.corpus.config import DEFAULT_MAX_PIXELS
from dermaflux.lesion.attributes import COLOUR_WORDS, LesionAttributes
from dermaflux.lesion.captions import caption_from_attributes, diagnosis_words
from dermaflux.caption.validate import caption_problems


@dataclass
class CaptionRequest:
    id: str
    attributes: LesionAttributes
    seed: int
    image: bytes | None = None


@dataclass
class WrittenCaption:
    caption: str
    writer: str  # the writer that produced the text: "llm", or "template" (incl. fallbacks)
    flags: list[str] = field(default_factory=list)


def caption_seed(image_id: str, run_seed: int) -> int:
    """A per-image seed stable across runs, workers and resumes."""
    return int(hashlib.sha256(f"{run_seed}:{image_id}".encode()).hexdigest()[:8], 16)


class CaptionWriter(ABC):
    name: ClassVar[str]

    def __init__(self, cfg: CaptionConfig, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.cfg = cfg
        self.max_pixels = max_pixels  # the largest image a vision writer decodes (curate.max_pixels)

    @abstractmethod
    def write(self, requests: list[CaptionRequest]) -> list[WrittenCaption]: ...


WRITERS: dict[str, type[CaptionWriter]] = {}


def register_writer(cls: type[CaptionWriter]) -> type[CaptionWriter]:
    WRITERS[cls.name] = cls
    return cls


def create_writer(cfg: CaptionConfig, max_pixels: int = DEFAULT_MAX_PIXELS) -> CaptionWriter:
    try:
        cls = WRITERS[cfg.writer]
    except KeyError:
        raise ValueError(f"caption.writer: unknown writer {cfg.writer!r}; known: {', '.join(sorted(WRITERS))}") from None
    return cls(cfg, max_pixels)


@register_writer
class TemplateWriter(CaptionWriter):
    name = "template"

    def write(self, requests: list[CaptionRequest]) -> list[WrittenCaption]:
        return [WrittenCaption(caption_from_attributes(r.attributes, r.seed), self.name) for r in requests]


def prompt_fields(attrs: LesionAttributes) -> dict[str, str]:
    """What prompt templates may use: {diagnosis}, {malignancy}, {attribute_list}."""
    facts = []
    if attrs.asymmetry_level is not None:
        facts.append(("symmetric", "asymmetric along one axis", "asymmetric along both axes")[attrs.asymmetry_level])
    if attrs.border_level is not None:
        facts.append(("regular border", "slightly irregular border", "irregular border")[attrs.border_level])
    if attrs.colours:
        facts.append("colours: " + ", ".join(COLOUR_WORDS[c] for c in attrs.colours))
    if attrs.diameter_mm:
        facts.append(f"diameter about {attrs.diameter_mm:.0f} mm")
    if attrs.site:
        facts.append(f"site: {attrs.site}")
    return {
        "diagnosis": diagnosis_words(attrs.diagnosis)[0],
        "malignancy": "malignant" if attrs.is_malignant else "benign",
        "attribute_list": "; ".join(facts) or "none measured",
    }


@register_writer
class LlmWriter(CaptionWriter):
    """Batched generation with transformers; a failed caption becomes the template caption + flags."""

    name = "llm"

    def __init__(self, cfg: CaptionConfig, max_pixels: int = DEFAULT_MAX_PIXELS):
        super().__init__(cfg, max_pixels)
        import torch

        from dermaflux.caption.tiny_llm import resolve_chat_model
        from dermaflux.model.loading import torch_dtype

        self.device = "cuda" if cfg.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        dtype = torch_dtype(cfg.dtype)
        if cfg.vision:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            source = resolve_chat_model(cfg.vision_model)
            self.processor = AutoProcessor.from_pretrained(source)
            self.tokenizer = self.processor.tokenizer
            self.model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            source = resolve_chat_model(cfg.model)
            self.processor = None
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            self.model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        # Decoder-only batches pad on the left so every row's generation starts right after its prompt.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.to(self.device).eval()

    def _messages(self, request: CaptionRequest) -> list[dict]:
        fields = prompt_fields(request.attributes)
        prompts = self.cfg.prompts
        if self.cfg.vision:
            user = [{"type": "image"}, {"type": "text", "text": prompts.vision_user.format(**fields)}]
        else:
            user = prompts.attributes_user.format(**fields)
        return [{"role": "system", "content": prompts.system}, {"role": "user", "content": user}]

    def generate(self, requests: list[CaptionRequest]) -> list[str]:
        """Raw captions (answer prefix + continuation), before validation."""
        import torch

        prefixes = [self.cfg.prompts.answer_prefix.format(**prompt_fields(r.attributes)) for r in requests]
        templater = self.processor or self.tokenizer
        texts = [
            templater.apply_chat_template(self._messages(r), tokenize=False, add_generation_prompt=True) + prefix
            for r, prefix in zip(requests, prefixes)
        ]
        if self.processor is not None:
            from dermaflux.caption.extract import decode_image
            from PIL import Image

            images = [Image.fromarray(decode_image(r.image, self.max_pixels)) for r in requests]
            inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True, add_special_tokens=False)
        else:
            inputs = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        inputs = inputs.to(self.device)
        sampling = self.cfg.temperature > 0
        if sampling:
            torch.manual_seed(requests[0].seed)
        with torch.inference_mode():
            output = self.model.generate(
                **inputs,
                max_new_tokens=self.cfg.max_new_tokens,
                do_sample=sampling,
                temperature=self.cfg.temperature if sampling else None,
                top_p=None,
                top_k=None,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        continuations = self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return [" ".join(f"{prefix} {text.strip()}".split()) for prefix, text in zip(prefixes, continuations)]

    def write(self, requests: list[CaptionRequest]) -> list[WrittenCaption]:
        results = []
        for request, text in zip(requests, self.generate(requests)):
            problems = caption_problems(text, request.attributes, self.cfg.max_caption_tokens)
            if problems:
                fallback = caption_from_attributes(request.attributes, request.seed)
                results.append(WrittenCaption(fallback, TemplateWriter.name, [f"llm_fallback:{p}" for p in problems]))
            else:
                results.append(WrittenCaption(text, self.name))
        return results
