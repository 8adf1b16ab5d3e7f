"""Lesion attributes: what a caption (and a request) says about one lesion, and the ABCD vocabulary.

Light import on purpose (pydantic only): the Serve replicas and the HTTP schema import it.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field, field_validator, model_validator

from dermaflux.core.config import ConfigModel
from dermaflux.lesion.skin_tone import SkinTone
from dermaflux.lesion.taxonomy import CODES, MALIGNANT_CODES

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
    # Malignancy-only labels: the reference work's captions ("This photo depicts a benign lesion").
    "benign": ("benign lesion",),
    "malignant": ("malignant lesion",),
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

    diagnosis: str = Field(..., description="taxonomy code: mel, nv, bcc, akiec, bkl, df, vasc, scc; benign or malignant where only that is known")
    malignant: bool | None = Field(None, description="None: implied by the diagnosis")
    asymmetry: float | None = Field(None, ge=0.0, le=1.0, description="mean mirror mismatch about the principal axes")
    asymmetry_axes: int | None = Field(None, ge=0, le=2, description="ABCD rule: axes of asymmetry (0, 1, 2)")
    border_irregularity: float | None = Field(None, ge=0.0, le=1.0, description="0 smooth circle .. 1 very ragged")
    border_notches: int | None = Field(None, ge=0)
    colours: list[Colour] | None = Field(None, description="ABCD colours present")
    diameter_px: float | None = Field(None, gt=0)
    diameter_mm: float | None = Field(None, gt=0)
    site: str | None = Field(None, description="body site in words, e.g. 'lower extremity'")
    skin_type: str | None = Field(None, description="Fitzpatrick I-VI, as the source labelled it")
    skin_tone: SkinTone | None = Field(
        None, description="ITA category (very_light, light, intermediate, tan, brown, dark): measured from the skin "
        "around the lesion, or requested; kept beside skin_type, never derived from it")
    ita: float | None = Field(None, ge=-90.0, le=90.0, description="measurement only: the ITA angle in degrees")
    skin_fraction: float | None = Field(None, ge=0.0, le=1.0, description="measurement only: share of the image's "
                                        "pixels the ITA came from")
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
