"""Skin tone as the Individual Typology Angle (ITA) and its six categories: the vocabulary.

ITA° = arctan((L* - 50) / b*) · 180/π over skin pixels in CIELAB (Chardon, Cretois & Hourseau 1991;
used for ISIC images by Kinyanjui et al. 2020, "Fairness of classifiers across skin tones in
dermatology", MICCAI). The measurement itself lives in caption/extract.py; this module holds only
the categories and their caption words, so the Serve schema can import it (no numpy).

ITA is a colorimetric proxy, not a Fitzpatrick type: Fitzpatrick (I-VI) is a phototype from how
skin burns and tans, reported by a clinician; a source's Fitzpatrick label is kept beside the
measured ITA category and never replaced by it.
"""

from __future__ import annotations

import math
from typing import Literal

# Lower bounds (exclusive) of each category, lightest first; "dark" is everything at or below -30°.
ITA_CATEGORIES = ("very_light", "light", "intermediate", "tan", "brown", "dark")
SkinTone = Literal["very_light", "light", "intermediate", "tan", "brown", "dark"]
ITA_LOWER_BOUNDS = {"very_light": 55.0, "light": 41.0, "intermediate": 28.0, "tan": 10.0, "brown": -30.0}
SKIN_TONE_WORDS = {c: c.replace("_", " ") for c in ITA_CATEGORIES}


def ita_category(ita_degrees: float) -> str:
    """The ITA category of an angle: very light > 55 ≥ light > 41 ≥ intermediate > 28 ≥ tan > 10
    ≥ brown > -30 ≥ dark (a boundary value belongs to the darker category)."""
    if not math.isfinite(ita_degrees):
        raise ValueError(f"ITA must be a finite angle in degrees, got {ita_degrees!r}")
    for name, lower in ITA_LOWER_BOUNDS.items():
        if ita_degrees > lower:
            return name
    return "dark"


def ita_from_lab(lightness: float, b_star: float) -> float:
    """ITA in degrees from L* and b*. b* ≤ 0 (a blue or grey cast, which no skin has) is taken as a
    vanishing positive b*, so the angle tends to ±90° by the sign of L* - 50 instead of flipping."""
    return math.degrees(math.atan((lightness - 50.0) / max(b_star, 1e-6)))
