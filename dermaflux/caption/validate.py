"""Checks a generated caption must pass before it is used; a failure falls back to the template.

Each problem is a short code that ends up in the row's flags as `llm_fallback:<code>`.
"""

from __future__ import annotations

import re

from dermaflux.lesion.attributes import LesionAttributes
from dermaflux.lesion.captions import diagnosis_words, fits_budget

_SYMMETRIC = re.compile(r"(?<![a-z])symmetric(al)?\b")  # not "asymmetric"
_ASYMMETRIC = re.compile(r"\basymmetric(al)?|\basymmetry\b")
_REGULAR_BORDER = re.compile(r"(?<![a-z])(regular|smooth|well-defined)[ ,]+(\w+[ ,]+)?(border|edge|outline)")
_IRREGULAR_BORDER = re.compile(r"\b(irregular|notched|jagged|ill-defined)[ ,]+(\w+[ ,]+)?(border|edge|outline)")
# Colour words whose mention is a claim (brown is too generic to hold a model to light vs dark).
_COLOUR_CLAIMS = {"white": r"\bwhite\b", "red": r"\bred\b", "blue_grey": r"\bblue|\bgr[ae]y\b", "black": r"\bblack\b"}


def caption_problems(caption: str, attrs: LesionAttributes, t5_budget: int = 512) -> list[str]:
    """Why `caption` cannot stand for `attrs` (empty list: it can)."""
    text = " ".join(caption.split()).lower()
    if not text:
        return ["empty"]
    problems = []
    if not fits_budget(caption, t5_budget=t5_budget):
        problems.append("too_long")
    if not any(name in text for name in diagnosis_words(attrs.diagnosis)):
        problems.append("missing_diagnosis")
    if attrs.is_malignant and re.search(r"\bbenign\b", text) or not attrs.is_malignant and re.search(r"\bmalignant\b", text):
        problems.append("contradicts_malignancy")
    level = attrs.asymmetry_level
    if level is not None and (level > 0 and _SYMMETRIC.search(text) or level == 0 and _ASYMMETRIC.search(text)):
        problems.append("contradicts_asymmetry")
    border = attrs.border_level
    if border is not None and (border == 2 and _REGULAR_BORDER.search(text) or border == 0 and _IRREGULAR_BORDER.search(text)):
        problems.append("contradicts_border")
    if attrs.colours is not None:
        absent = [c for c, pattern in _COLOUR_CLAIMS.items() if c not in attrs.colours and re.search(pattern, text)]
        if absent:
            problems.append("contradicts_colours")
    if "<|" in text or "\ufffd" in text:
        problems.append("markup_in_text")
    return problems

