"""Attribute adherence: does each synthetic image show what it was asked to show?

For every synthetic image, the attributes it was requested with (its `attributes_json`, else
just its label) against what is measured on the generated image:
- diagnosis and malignancy by a classifier trained on real images (the assessment's network);
- colours, asymmetry, border and diameter class by the project's own ABCD extractor
  (`dermaflux.caption.extract`, the function that wrote the training captions);
- skin tone (the ITA category of the skin around the lesion) by the same extractor. Body site is
  not measurable from a close-up image and is not compared.
Per requested skin tone, the diagnosis and malignancy agreement are reported apart (`by_skin_tone`):
a generator may follow the diagnosis on light skin and lose it on dark.
Per attribute: the observed agreement, the agreement expected by chance from the two marginals,
and Cohen's kappa (0: chance, 1: perfect) with a bootstrap CI over images; colours are six
present/absent decisions per image, with each colour's chance from its own prevalence. A generator
that ignores its prompt scores kappa ~ 0 however good its images look.

Diameter class compares sizes relative to the image side (the generator knows no physical
scale): small < 1/3, medium < 2/3, large. A request in millimetres is placed on that scale at a
nominal field of view of NOMINAL_FIELD_MM (an assumption, stated in the report).
"""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from dermaflux.evaluate.stats import agreement, kappa_interval
from dermaflux.lesion import taxonomy
from dermaflux.lesion.attributes import ABCD_COLOURS, BORDER_THRESHOLDS, LesionAttributes
from dermaflux.lesion.skin_tone import ITA_CATEGORIES, ita_category

ATTRIBUTES = ("diagnosis", "malignancy", "colours", "asymmetry", "border", "diameter_class", "skin_tone")
NOMINAL_FIELD_MM = 20.0  # mm across a dermoscopy image side, for requests that give diameter_mm only
DIAMETER_CLASSES = ((1 / 3, "small"), (2 / 3, "medium"), (float("inf"), "large"))
EXTRACT_SIDE = 224  # the extractor's thresholds were set on 224 px HAM10000 images
MEASURED_BY = {"diagnosis": "classifier", "malignancy": "classifier", "colours": "extractor",
               "asymmetry": "extractor", "border": "extractor", "diameter_class": "extractor",
               "skin_tone": "extractor (ITA)"}


def diameter_class(relative: float | None) -> str | None:
    if relative is None:
        return None
    return next(name for limit, name in DIAMETER_CLASSES if relative < limit)


def border_class(irregularity: float | None) -> int | None:
    if irregularity is None:
        return None
    low, high = BORDER_THRESHOLDS
    return 0 if irregularity < low else 1 if irregularity < high else 2


def requested(label: str, attributes_json: str | None, width: int, where: str) -> dict:
    """The attributes an image was asked for, on the scales the extractor measures."""
    try:
        raw = json.loads(attributes_json) if attributes_json else {}
        attrs = LesionAttributes.model_validate({**raw, "diagnosis": raw.get("diagnosis", label)})
    except ValueError as err:
        raise ValueError(f"{where}: attributes_json is not a valid LesionAttributes ({err})") from err
    if attrs.diameter_px is not None:
        relative = attrs.diameter_px / width
    elif attrs.diameter_mm is not None:
        relative = attrs.diameter_mm / NOMINAL_FIELD_MM
    else:
        relative = None
    return {
        "diagnosis": attrs.diagnosis, "malignancy": "malignant" if attrs.is_malignant else "benign",
        "colours": attrs.colours, "asymmetry": attrs.asymmetry_level, "border": attrs.border_level,
        "diameter_class": diameter_class(relative), "skin_tone": attrs.skin_tone,
    }


def measured_by_extractor(image: bytes) -> dict:
    """What the ABCD extractor sees on an image (None where it finds no lesion)."""
    from dermaflux.caption.extract import measure_lesion

    with Image.open(io.BytesIO(image)) as img:
        rgb = img.convert("RGB")
        if max(rgb.size) > EXTRACT_SIDE:
            rgb = rgb.resize((EXTRACT_SIDE, EXTRACT_SIDE), Image.Resampling.BILINEAR)
        side = rgb.size[0]
        found = measure_lesion(np.asarray(rgb))
    tone = None if found.ita is None else ita_category(found.ita)  # measured with or without a lesion mask
    if not found.mask_found:
        return {"colours": None, "asymmetry": None, "border": None, "diameter_class": None, "skin_tone": tone,
                "extractor_note": found.reason}
    return {"colours": found.colours, "asymmetry": found.asymmetry_axes, "skin_tone": tone,
            "border": border_class(found.border_irregularity),
            "diameter_class": diameter_class(found.diameter_px / side), "extractor_note": None}


def measured_by_classifier(probs: np.ndarray, classes: list[str]) -> list[dict]:
    """Diagnosis (argmax; only when the network predicts diagnoses) and malignancy (the summed
    probability of the malignant classes >= 0.5) of each image."""
    if list(classes) == ["benign", "malignant"]:
        return [{"diagnosis": None, "malignancy": classes[int(p.argmax())]} for p in probs]
    malignant = np.array([c in taxonomy.MALIGNANT_CODES for c in classes])
    return [{"diagnosis": classes[int(p.argmax())],
             "malignancy": "malignant" if p[malignant].sum() >= 0.5 else "benign"} for p in probs]


def sample(n: int, max_images: int, seed: int = 0) -> np.ndarray:
    """The synthetic rows measured: all, or a seeded sample of `max_images` (sorted)."""
    if n <= max_images:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_images, replace=False))


def per_image_rows(ids, labels, attributes, probs, classes, images: dict[str, bytes]) -> list[dict]:
    """One row per image: requested and measured value of every attribute."""
    rows = []
    for i, (rid, label, attrs_json) in enumerate(zip(ids, labels, attributes)):
        with Image.open(io.BytesIO(images[rid])) as img:
            width = img.size[0]
        asked = requested(label, attrs_json, width, f"synthetic image {rid}")
        seen = {**measured_by_classifier(probs[i : i + 1], classes)[0], **measured_by_extractor(images[rid])}
        row = {"id": str(rid), "extractor_note": seen["extractor_note"]}
        for name in ATTRIBUTES:
            row[f"requested_{name}"], row[f"measured_{name}"] = asked[name], seen[name]
        rows.append(row)
    return rows


def summarise_adherence(rows: list[dict], n_boot: int = 1000) -> dict:
    """Per attribute: n (images where both sides are known), agreement, chance, kappa [CI]."""
    out = {}
    for name in ATTRIBUTES:
        both = [r for r in rows if r[f"requested_{name}"] is not None and r[f"measured_{name}"] is not None]
        not_measured = sum(r[f"requested_{name}"] is not None and r[f"measured_{name}"] is None for r in rows)
        if name == "colours":
            result = colour_agreement(both, n_boot)
        else:
            asked = [str(r[f"requested_{name}"]) for r in both]
            seen = [str(r[f"measured_{name}"]) for r in both]
            result = agreement(asked, seen)
            result["kappa_ci"] = kappa_interval(asked, seen, n_boot=n_boot) if result["n"] else None
        out[name] = {**result, "images": len(both), "not_measured": int(not_measured),
                     "measured_by": MEASURED_BY[name]}
    return out


def colour_agreement(rows: list[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """Colours as six present/absent decisions per image. Agreement and chance are averaged over the
    six colours, each colour's chance from its own marginals: pooling the decisions would count the
    colours' different prevalences (light brown in most lesions, blue-grey in few) as agreement."""
    if not rows:
        return {"n": 0, "agreement": None, "chance": None, "kappa": None, "kappa_ci": None,
                "unit": "image x ABCD colour (present/absent)"}
    asked = np.array([[c in r["requested_colours"] for c in ABCD_COLOURS] for r in rows])
    seen = np.array([[c in r["measured_colours"] for c in ABCD_COLOURS] for r in rows])

    def kappa_of(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
        observed = float(np.mean(a == b))
        chance = float(np.mean(a.mean(0) * b.mean(0) + (1 - a.mean(0)) * (1 - b.mean(0))))
        return observed, chance, (observed - chance) / (1 - chance) if chance < 1 else float("nan")

    observed, chance, kappa = kappa_of(asked, seen)
    rng = np.random.default_rng(seed)
    draws = [kappa_of(asked[pick], seen[pick])[2] for pick in (rng.integers(0, len(rows), len(rows))
                                                               for _ in range(n_boot))]
    draws = np.array(draws)[np.isfinite(draws)]
    ci = [float(v) for v in np.quantile(draws, [0.025, 0.975])] if len(draws) else [float("nan")] * 2
    return {"n": int(asked.size), "agreement": observed, "chance": chance, "kappa": kappa, "kappa_ci": ci,
            "unit": "image x ABCD colour (present/absent); chance per colour"}


def by_requested_skin_tone(rows: list[dict]) -> dict[str, dict]:
    """Per requested skin tone: images, and the diagnosis / malignancy agreement among them (None
    where the classifier does not give that attribute)."""
    out = {}
    for tone in ITA_CATEGORIES:
        mine = [r for r in rows if r["requested_skin_tone"] == tone]
        if not mine:
            continue
        out[tone] = {"images": len(mine)}
        for name in ("diagnosis", "malignancy"):
            both = [r for r in mine if r[f"requested_{name}"] is not None and r[f"measured_{name}"] is not None]
            out[tone][f"{name}_agreement"] = (float(np.mean([r[f"requested_{name}"] == r[f"measured_{name}"]
                                                              for r in both])) if both else None)
    return out
