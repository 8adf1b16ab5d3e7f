"""The prompt a model is trained on and sampled with, from a caption: `train.caption_style` (pure python).

- `caption`: the caption as the caption stage wrote it (FLUX.1-dev, whose text encoders understand it).
- `diagnosis`: only the diagnosis the caption names, in its first wording ("melanoma"). For the tiny
  preset: its CLIP and T5 have random weights, and the pooled CLIP vector of a 100-token caption is
  an average over all of it, in which the diagnosis is 2 of the tokens; short diagnosis prompts give
  class-distinct pooled vectors, the global conditioning every Flux block is modulated by
  (bench/conditioning.py measures both).

`guidance_arguments` is how sampling, and the trainer's validation renders, apply guidance to what a run
trained (`train.sampling_guidance`).

Training styles a caption row (its text and its label); sampling styles a request's prompt with the
same table, reading the diagnosis from the text, so a model is sampled with prompts in the style it was
trained on whatever wording the request uses. A prompt that names no diagnosis becomes the empty
prompt (unconditional, what caption dropout trains).
"""

from __future__ import annotations

import re
from typing import Literal

from dermaflux.lesion.attributes import DIAGNOSIS_NAMES

CaptionStyle = Literal["caption", "diagnosis"]
CAPTION_STYLES: tuple[str, ...] = ("caption", "diagnosis")


def diagnosis_in(text: str) -> str | None:
    """The taxonomy code of the diagnosis `text` names first (the longest wording at the same place), or None."""
    lowered = text.lower()
    found: list[tuple[int, int, str]] = []
    for code, wordings in DIAGNOSIS_NAMES.items():
        for wording in wordings:
            match = re.search(r"(?<![a-z])" + re.escape(wording) + r"(?![a-z])", lowered)
            if match:
                found.append((match.start(), -len(wording), code))
    return min(found)[2] if found else None


def diagnosis_prompt(code: str | None) -> str:
    """The `diagnosis` style prompt of a taxonomy code: its first caption wording; "" for None."""
    if code is None:
        return ""
    if code not in DIAGNOSIS_NAMES:
        raise ValueError(f"unknown diagnosis {code!r}; expected one of {', '.join(DIAGNOSIS_NAMES)}")
    return DIAGNOSIS_NAMES[code][0]


def training_prompt(caption: str, label: str | None, style: str) -> str:
    """The prompt a caption row trains on: the caption, or (`diagnosis`) the row's label as a prompt."""
    if style == "caption":
        return caption
    if style == "diagnosis":
        code = label or diagnosis_in(caption)
        if code is None:
            raise ValueError("caption_style diagnosis: the row has no label and its caption names no diagnosis")
        return diagnosis_prompt(code)
    raise ValueError(f"train.caption_style {style!r}: expected one of {', '.join(CAPTION_STYLES)}")


def sampling_prompt(prompt: str, style: str) -> str:
    """A request's prompt in the style its model was trained on (the diagnosis read from the text)."""
    if style == "caption":
        return prompt
    if style == "diagnosis":
        return diagnosis_prompt(diagnosis_in(prompt))
    raise ValueError(f"caption style {style!r}: expected one of {', '.join(CAPTION_STYLES)}")


def guidance_arguments(trained: dict, guidance_scale: float, count: int) -> dict:
    """FluxPipeline arguments applying `guidance_scale` as the model was trained for (`trained`: its
    `sampling_guidance` and `train_guidance`, see synth/sampling.trained_for): into the guidance embedding, or
    as classifier-free guidance against the empty prompt (the negative prompt FluxPipeline's true CFG contrasts
    with), the embedding then held at the training value."""
    if trained["sampling_guidance"] == "true_cfg":
        return {"guidance_scale": trained["train_guidance"], "true_cfg_scale": guidance_scale,
                "negative_prompt": [""] * count}
    return {"guidance_scale": guidance_scale}
