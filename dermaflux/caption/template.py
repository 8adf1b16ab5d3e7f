"""Lesion attributes and the template caption: the one way prompts are built from attributes.

Training captions (the `template` writer, and the fallback of the `llm` writer) and the Serve
endpoint's prompts both come from `caption_from_attributes`, so a model is asked at inference for
exactly the wording it was trained on. Light import on purpose (pydantic only): the Serve
replicas and the HTTP schema import it.

Caption layout: the essentials first (diagnosis, benign/malignant, asymmetry, border, colours)
so they fall within CLIP's 77-token pooled prompt; size, site and patient follow for T5 (512).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from dermaflux.configbase import ConfigModel
from dermaflux.corpus.taxonomy import CODES, MALIGNANT_CODES

# Caption wording per taxonomy code: codes and malignancy come from the corpus taxonomy table;
# the words (several per code, for varied captions) are the caption's own.
DIAGNOSIS_NAMES: dict[str, tuple[str, ...]] = {
    "mel": ("melanoma",),
    "nv": ("melanocytic nevus", "nevus"),
    "bcc": ("basal cell carcinoma",),
    "akiec": ("actinic keratosis", "actinic keratosis (intraepithelial carcinoma)"),
    "bkl": ("benign keratosis", "seborrheic keratosis-like benign keratosis"),
    "df": ("dermatofibroma",),
    "vasc": ("vascular lesion", "vascular lesion (angioma)"),
    "scc": ("squamous cell carcinoma",),
}
if set(DIAGNOSIS_NAMES) != set(CODES):
    raise RuntimeError(f"caption wording covers {sorted(DIAGNOSIS_NAMES)} but the taxonomy has {sorted(CODES)}")

# The six ABCD-rule colours, in the order captions list them (light to dark, then the rest).
ABCD_COLOURS = ("white", "red", "light_brown", "dark_brown", "blue_grey", "black")
Colour = Literal["white", "red", "light_brown", "dark_brown", "blue_grey", "black"]
COLOUR_WORDS = {c: c.replace("_", " ").replace("blue grey", "blue-grey") for c in ABCD_COLOURS}

# Asymmetry score (0..1, see extract.py) above which an axis counts as asymmetric; border
# irregularity (0..1) cut-offs. Set from the HAM10000 distribution (nevi mostly below, melanomas above).
ASYMMETRY_AXIS_THRESHOLD = 0.12
BORDER_THRESHOLDS = (0.25, 0.45)  # regular < 0.25 <= slightly irregular < 0.45 <= irregular

FITZPATRICK = ("I", "II", "III", "IV", "V", "VI")


class LesionAttributes(ConfigModel):
    """What a caption says about one lesion; everything but the diagnosis is optional."""

    diagnosis: str = Field(..., description="taxonomy code: mel, nv, bcc, akiec, bkl, df, vasc, scc")
    malignant: bool | None = Field(None, description="None: implied by the diagnosis")
    asymmetry: float | None = Field(None, ge=0.0, le=1.0, description="mean mirror mismatch about the principal axes")
    asymmetry_axes: int | None = Field(None, ge=0, le=2, description="ABCD rule: axes of asymmetry (0, 1, 2)")
    border_irregularity: float | None = Field(None, ge=0.0, le=1.0, description="0 smooth circle .. 1 very ragged")
    border_notches: int | None = Field(None, ge=0)
    colours: list[Colour] | None = Field(None, description="ABCD colours present")
    diameter_px: float | None = Field(None, gt=0)
    diameter_mm: float | None = Field(None, gt=0)
    site: str | None = Field(None, description="body site in words, e.g. 'lower extremity'")
    skin_type: str | None = Field(None, description="Fitzpatrick I-VI")
    age: float | None = Field(None, ge=0, le=120)
    sex: Literal["male", "female"] | None = None
    mask_confidence: float | None = Field(
        None, ge=0.0, le=1.0, description="measurement only (how sure the lesion mask is); not in captions"
    )

    @field_validator("diagnosis")
    @classmethod
    def _known_diagnosis(cls, value: str) -> str:
        code = value.strip().lower()
        if code not in DIAGNOSIS_NAMES:
            raise ValueError(f"unknown diagnosis {value!r}; expected one of {', '.join(DIAGNOSIS_NAMES)}")
        return code

    @field_validator("colours")
    @classmethod
    def _canonical_colours(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        return [c for c in ABCD_COLOURS if c in set(value)]

    @field_validator("skin_type")
    @classmethod
    def _fitzpatrick(cls, value: str | None) -> str | None:
        if value is None:
            return None
        roman = value.strip().upper().removeprefix("FITZPATRICK").removeprefix("TYPE").strip()
        if roman not in FITZPATRICK:
            raise ValueError(f"skin_type {value!r}: expected a Fitzpatrick type I-VI")
        return roman

    @field_validator("sex", mode="before")
    @classmethod
    def _sex_words(cls, value):
        if isinstance(value, str):
            value = value.strip().lower()
            if value in ("", "unknown"):
                return None
        return value

    @model_validator(mode="after")
    def _malignancy_matches(self):
        if self.malignant is not None and self.malignant != self.is_malignant_by_diagnosis:
            # Stated explicitly against the taxonomy (e.g. a request for a "benign melanoma"): refuse.
            raise ValueError(
                f"malignant={self.malignant} contradicts diagnosis {self.diagnosis!r} "
                f"({'malignant' if self.is_malignant_by_diagnosis else 'benign'} in the taxonomy)"
            )
        return self

    @property
    def is_malignant_by_diagnosis(self) -> bool:
        return self.diagnosis in MALIGNANT_CODES

    @property
    def is_malignant(self) -> bool:
        return self.malignant if self.malignant is not None else self.is_malignant_by_diagnosis

    @property
    def asymmetry_level(self) -> int | None:
        """Axes of asymmetry (0, 1, 2): stated, else from the score."""
        if self.asymmetry_axes is not None:
            return self.asymmetry_axes
        if self.asymmetry is None:
            return None
        # A single score stands for the mean of the two axes; 2x the threshold implies both.
        return 0 if self.asymmetry < ASYMMETRY_AXIS_THRESHOLD else 1 if self.asymmetry < 2 * ASYMMETRY_AXIS_THRESHOLD else 2

    @property
    def border_level(self) -> int | None:
        """0 regular, 1 slightly irregular, 2 irregular."""
        if self.border_irregularity is None:
            return None
        low, high = BORDER_THRESHOLDS
        return 0 if self.border_irregularity < low else 1 if self.border_irregularity < high else 2

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), sort_keys=True)


# --- wording ------------------------------------------------------------------------------------

_OPENERS = (
    "A dermoscopic image of {article} {dx}, {malignancy}",
    "Dermoscopy photo of {article} {malignancy} {dx}",
    "{Article} {malignancy} skin lesion, {dx}, seen under dermoscopy",
    "Close-up dermoscopic image showing {article} {dx}, a {malignancy} lesion",
)
_ASYMMETRY = {
    0: ("symmetric in shape", "symmetrical along both axes", "with a symmetric outline"),
    1: ("asymmetric along one axis", "mildly asymmetric", "asymmetric about one axis"),
    2: ("asymmetric along both axes", "markedly asymmetric", "highly asymmetric in shape"),
}
_BORDER = {
    0: ("a regular, smooth border", "a sharp, well-defined border", "a smooth, regular edge"),
    1: ("a slightly irregular border", "a mildly irregular edge", "a somewhat uneven border"),
    2: ("an irregular, notched border", "a jagged, irregular border", "an ill-defined, irregular edge"),
}
_COLOUR_LEADS = ("{n} colours ({list})", "{list} pigmentation", "variegated {list} colouring", "{n} colours: {list}")
_SINGLE_COLOUR = ("uniform {list} colour", "a single colour ({list})", "even {list} pigmentation")
_NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six")


def _stable_seed(attrs: LesionAttributes) -> int:
    return int(hashlib.sha256(attrs.to_json().encode()).hexdigest()[:8], 16)


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def diagnosis_words(code: str) -> tuple[str, ...]:
    """Every wording a caption may use for a diagnosis (validators accept any of them)."""
    return DIAGNOSIS_NAMES[code]


def caption_from_attributes(attrs: LesionAttributes | dict, seed: int | None = None) -> str:
    """The template caption: varied wording, deterministic for (attributes, seed), always names the diagnosis.

    seed=None derives the wording from the attributes themselves, so the same request gives the
    same prompt on every replica.
    """
    if isinstance(attrs, dict):
        attrs = LesionAttributes.model_validate(attrs)
    rng = random.Random(_stable_seed(attrs) if seed is None else seed)
    dx = rng.choice(DIAGNOSIS_NAMES[attrs.diagnosis])
    malignancy = "malignant" if attrs.is_malignant else "benign"
    opener = rng.choice(_OPENERS)
    article = _article(malignancy if opener.index("{malignancy}") < opener.index("{dx}") else dx)
    first = opener.format(dx=dx, malignancy=malignancy, article=article, Article=article.capitalize())

    shape = rng.choice(_ASYMMETRY[attrs.asymmetry_level]) if attrs.asymmetry_level is not None else None
    traits: list[str] = []
    if attrs.border_level is not None:
        traits.append(rng.choice(_BORDER[attrs.border_level]))
    if attrs.colours:
        words = [COLOUR_WORDS[c] for c in attrs.colours]
        leads = _SINGLE_COLOUR if len(words) == 1 else _COLOUR_LEADS
        traits.append(rng.choice(leads).format(n=_NUMBER_WORDS[len(words)], list=_join(words)))
    features = [shape] if shape else []
    if traits:
        features.append("with " + " and ".join(traits))
    sentences = [", ".join([first, *features]) + "."]

    details: list[str] = []
    if attrs.diameter_mm is not None:
        details.append(rng.choice(("About {d:.0f} mm across", "Diameter about {d:.0f} mm")).format(d=attrs.diameter_mm))
    elif attrs.diameter_px is not None:
        details.append(rng.choice(("About {d:.0f} pixels across", "Spans about {d:.0f} pixels")).format(d=attrs.diameter_px))
    if attrs.site:
        details.append(rng.choice(("on the {s}", "located on the {s}", "site: {s}")).format(s=attrs.site))
    patient = " ".join(
        ([f"{int(round(attrs.age))}-year-old"] if attrs.age is not None else []) + ([attrs.sex] if attrs.sex else [])
    )
    if attrs.skin_type:
        patient = (patient + ", " if patient else "") + f"Fitzpatrick skin type {attrs.skin_type}"
    if patient:
        details.append("patient: " + patient)
    if details:
        text = ", ".join(details)
        sentences.append(text[0].upper() + text[1:] + ".")
    return " ".join(sentences)


# --- token budgets -------------------------------------------------------------------------------

CLIP_TOKEN_BUDGET = 77  # includes the start and end tokens
T5_TOKEN_BUDGET = 512
_PIECES = re.compile(r"[A-Za-z]+|\d|[^\sA-Za-z\d]")


def estimate_tokens(text: str) -> int:
    """A conservative count for CLIP/T5 BPE when the real tokenizer is not at hand.

    Digits and punctuation are one token each (as CLIP splits them); a word costs one token per
    started 6 letters, which over-counts the common English words and under-counts nothing we write.
    """
    return sum(max(1, math.ceil(len(p) / 6)) if p[0].isalpha() else 1 for p in _PIECES.findall(text))


def essentials_end(caption: str) -> int:
    """Character index where the essentials (first sentence) end."""
    cut = caption.find(". ")
    return len(caption) if cut < 0 else cut + 1


def fits_budget(caption: str, clip_budget: int = CLIP_TOKEN_BUDGET, t5_budget: int = T5_TOKEN_BUDGET) -> bool:
    """Essentials within CLIP's pooled prompt (2 slots for start/end tokens), whole text within T5's."""
    return (
        estimate_tokens(caption[: essentials_end(caption)]) + 2 <= clip_budget
        and estimate_tokens(caption) + 1 <= t5_budget
    )
