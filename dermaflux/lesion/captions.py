"""The template caption: the one way prompts are built from lesion attributes.

Training captions (the `template` writer, and the fallback of the `llm` writer) and the Serve
endpoint's prompts both come from `caption_from_attributes`, so a model is asked at inference for
exactly the wording it was trained on. Light import on purpose (pydantic only).

Caption layout: the essentials first (diagnosis, benign/malignant, asymmetry, border, colours)
so they fall within CLIP's 77-token pooled prompt; size, site and patient follow for T5 (512).
"""

from __future__ import annotations

import hashlib
import math
import random
import re

from dermaflux.lesion.attributes import COLOUR_WORDS, DIAGNOSIS_NAMES, LesionAttributes
from dermaflux.lesion.skin_tone import SKIN_TONE_WORDS

# --- wording ------------------------------------------------------------------------------------

# Each opener in its wordings, fullest first: `opening` takes the first whose own words repeat no word
# of the diagnosis name (nor each other), so "benign keratosis" never reads "benign benign keratosis"
# and "vascular lesion" never "skin lesion, vascular lesion".
OPENERS = (
    ("A dermoscopic image of {article} {dx}, {malignancy}", "A dermoscopic image of {article} {dx}"),
    ("Dermoscopy photo of {article} {malignancy} {dx}", "Dermoscopy photo of {article} {dx}"),
    ("{Article} {malignancy} skin lesion, {dx}, seen under dermoscopy", "{Article} {malignancy} {dx}, seen under dermoscopy",
     "{Article} {dx}, seen under dermoscopy"),
    ("Close-up dermoscopic image showing {article} {dx}, a {malignancy} lesion",
     "Close-up dermoscopic image showing {article} {malignancy} {dx}", "Close-up dermoscopic image showing {article} {dx}"),
)
FUNCTION_WORDS = frozenset({"a", "an", "of"})
_WORDS = re.compile(r"[a-z]+")
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


def content_words(text: str) -> list[str]:
    return [w for w in _WORDS.findall(text.lower()) if w not in FUNCTION_WORDS]


def opening(forms: tuple[str, ...], dx: str, malignancy: str) -> str:
    """The opener's first wording whose own words (all but the diagnosis) repeat neither a word of the
    diagnosis name nor each other; the last wording says the diagnosis alone."""
    taken = set(content_words(dx))
    for form in forms:
        own = content_words(form.format(dx="", malignancy=malignancy, article="", Article=""))
        if not taken & set(own) and len(own) == len(set(own)):
            break
    first = form.find("{malignancy}")
    article = _article(malignancy if 0 <= first < form.index("{dx}") else dx)
    return form.format(dx=dx, malignancy=malignancy, article=article, Article=article.capitalize())


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
    first = opening(rng.choice(OPENERS), dx, malignancy)

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
    # Both when both are known: the measured ITA category and the source's Fitzpatrick type.
    if attrs.skin_tone:
        patient = (patient + ", " if patient else "") + f"{SKIN_TONE_WORDS[attrs.skin_tone]} skin"
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
