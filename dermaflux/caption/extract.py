"""Dermatological attributes measured from a dermoscopy image (pure numpy / scikit-image, no Ray).

The ABCD rule as an image program: a lesion mask (Otsu on the darkness of the hair-cleaned image,
inside the dermatoscope's field of view, then morphology and the most central large component),
and from it Asymmetry about the principal axes, Border irregularity (compactness, notches), the
Colours present (nearest ABCD prototype in CIELAB, skin excluded), and the Diameter. Beside them,
the skin tone of the skin around the lesion as the Individual Typology Angle (lesion/skin_tone.py),
measured on the image as taken, before the white balance the colour step applies.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage as ndi
from skimage import color, filters, measure, morphology

from dermaflux.corpus.config import DEFAULT_MAX_PIXELS
from dermaflux.lesion.attributes import ABCD_COLOURS, ASYMMETRY_AXIS_THRESHOLD, LesionAttributes
from dermaflux.lesion.skin_tone import ita_category, ita_from_lab

# ABCD colour prototypes in CIELAB (L*, a*, b*), applied after white-balancing the image so the
# skin around the lesion looks like REFERENCE_SKIN_RGB: HAM10000 photos range from neutral to
# strongly red-cast, and a nevus must read "light brown" in both. Placed after the dermoscopy
# colour literature (Seidenari et al.; Stoecker et al.) and checked on HAM10000 nevi/melanomas.
COLOUR_PROTOTYPES_LAB = {
    "white": (85.0, 0.0, 5.0),
    "red": (45.0, 60.0, 12.0),
    "light_brown": (55.0, 25.0, 32.0),
    "dark_brown": (32.0, 18.0, 20.0),
    "blue_grey": (50.0, 0.0, -12.0),
    "black": (15.0, 2.0, 2.0),
}
REFERENCE_SKIN_RGB = (225.0, 180.0, 160.0)
COLOUR_MIN_FRACTION = 0.05  # of the lesion's pixels: below this a colour is speckle, not present
MIN_AREA_FRACTION = 0.005  # smaller masks are noise (a 224 px image: ~250 px)
MAX_AREA_FRACTION = 0.92  # larger: the threshold split the skin, not a lesion
MIN_CONFIDENCE = 0.25
# Skin for the ITA: the field of view outside the lesion, its penumbra (a ring of SKIN_MARGIN_PX at
# 224 px, scaled) and hair; glare and vignette-dark pixels (L* outside SKIN_LIGHTNESS_RANGE) are not skin.
SKIN_MARGIN_PX = 6
SKIN_LIGHTNESS_RANGE = (5.0, 97.0)
MIN_SKIN_FRACTION = 0.05  # of the image: with less skin than this the ITA is not reported


@dataclass
class LesionMeasurement:
    """What the extractor saw; `mask_found` False carries the reason and no shape figures."""

    mask_found: bool
    confidence: float
    reason: str | None = None
    area_fraction: float | None = None
    asymmetry: float | None = None
    asymmetry_by_axis: tuple[float, float] | None = None
    asymmetry_axes: int | None = None
    border_irregularity: float | None = None
    border_notches: int | None = None
    colours: list[str] = field(default_factory=list)
    colour_fractions: dict[str, float] = field(default_factory=dict)
    diameter_px: float | None = None
    diameter_mm: float | None = None
    ita: float | None = None  # degrees, over the skin around the lesion (None: too little skin seen)
    skin_fraction: float | None = None  # of the image's pixels the ITA came from

    def to_dict(self) -> dict:
        return asdict(self)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded bytes (JPEG/PNG) -> HxWx3 uint8 RGB; more than `max_pixels` raises ImageRefused
    from the header alone, before decoding (curate's guard: see corpus.images.open_bounded)."""
    from dermaflux.corpus.images import open_bounded

    with open_bounded(data, max_pixels) as img:
        return np.asarray(img.convert("RGB"))


def field_of_view(rgb: np.ndarray) -> np.ndarray:
    """Pixels inside the dermatoscope's circle: very dark regions touching the image edge are the vignette."""
    dark = rgb.astype(np.float32).mean(axis=2) < 35
    labels, _ = ndi.label(dark)
    edge_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    vignette = np.isin(labels, edge_labels[edge_labels > 0])
    return ~vignette


def remove_hair(rgb: np.ndarray, size: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Thin dark strands (hair) found by a black-hat and filled from their surroundings (DullRazor-like)."""
    gray = rgb.astype(np.float32).mean(axis=2)
    footprint = morphology.disk(size)
    closed = morphology.closing(gray, footprint)
    hair = (closed - gray) > 25
    hair = ndi.binary_dilation(hair, structure=morphology.disk(1))
    if hair.mean() > 0.3:  # a dark lesion with texture, not hair: leave it
        return rgb, np.zeros_like(hair)
    cleaned = rgb.copy()
    for c in range(3):
        closed_c = morphology.closing(rgb[..., c], footprint)
        cleaned[..., c] = np.where(hair, closed_c, rgb[..., c])
    return cleaned, hair


def lesion_mask(rgb: np.ndarray) -> tuple[np.ndarray | None, float, str | None]:
    """The lesion as a boolean mask, a confidence in [0, 1], and the reason when none is found."""
    fov = field_of_view(rgb)
    if fov.mean() < 0.2:
        return None, 0.0, "image is mostly dark vignette"
    # Darkness on the blue-weighted channel: pigment absorbs blue most (melanin), skin reflects it.
    darkness = 255.0 - (0.3 * rgb[..., 0] + 0.3 * rgb[..., 1] + 0.4 * rgb[..., 2]).astype(np.float32)
    darkness = filters.gaussian(darkness, sigma=2, preserve_range=True)
    values = darkness[fov]
    if values.std() < 4.0:
        return None, 0.0, "no contrast inside the field of view (flat image)"
    threshold = filters.threshold_otsu(values)
    # Otsu's separability (between-class / total variance): 1 for two clean classes, ~0 for noise.
    above = values > threshold
    w1 = above.mean()
    separability = w1 * (1 - w1) * (values[above].mean() - values[~above].mean()) ** 2 / values.var()
    raw = (darkness > threshold) & fov
    radius = max(1, round(min(rgb.shape[:2]) / 112))
    raw = ndi.binary_opening(raw, structure=morphology.disk(2 * radius))
    raw = ndi.binary_closing(raw, structure=morphology.disk(2 * radius))
    raw = ndi.binary_fill_holes(raw)
    labels, count = ndi.label(raw)
    if count == 0:
        return None, float(separability), "no dark region after thresholding"
    h, w = raw.shape
    yy, xx = np.mgrid[0:h, 0:w]
    centre_dist = np.hypot((yy - h / 2) / h, (xx - w / 2) / w)
    best, best_score = 0, -1.0
    for region in measure.regionprops(labels):
        # Dermoscopy centres the lesion: prefer large regions near the centre over dark corners.
        mean_dist = centre_dist[labels == region.label].mean()
        score = region.area * (1.0 - min(mean_dist / 0.7, 0.95))
        if score > best_score:
            best, best_score = region.label, score
    mask = labels == best
    area_fraction = mask.sum() / fov.sum()
    if area_fraction < MIN_AREA_FRACTION:
        return None, float(separability), f"largest dark region covers only {area_fraction:.1%} of the image"
    if area_fraction > MAX_AREA_FRACTION:
        return None, float(separability), f"dark region covers {area_fraction:.0%} of the image (no skin around it)"
    inside, outside = darkness[mask].mean(), darkness[fov & ~mask].mean()
    contrast = min(1.0, (inside - outside) / 60.0)
    confidence = float(np.clip(0.5 * separability + 0.5 * contrast, 0.0, 1.0))
    if confidence < MIN_CONFIDENCE:
        return None, confidence, f"weak lesion/skin contrast (confidence {confidence:.2f})"
    return mask, confidence, None


def asymmetry_about_principal_axes(mask: np.ndarray) -> tuple[float, float]:
    """Per principal axis: the fraction of lesion pixels whose mirror image falls outside the lesion."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    coords = np.stack([ys - cy, xs - cx], axis=1).astype(np.float64)
    _, vectors = np.linalg.eigh(np.cov(coords, rowvar=False))
    scores = []
    for axis in (vectors[:, 1], vectors[:, 0]):  # major axis first
        # Reflect across the line through the centroid along `axis`: p' = 2 (p.a) a - p.
        reflected = 2 * (coords @ axis)[:, None] * axis[None, :] - coords
        ry = np.rint(reflected[:, 0] + cy).astype(int)
        rx = np.rint(reflected[:, 1] + cx).astype(int)
        inside = (ry >= 0) & (ry < mask.shape[0]) & (rx >= 0) & (rx < mask.shape[1])
        hit = np.zeros(len(ry), dtype=bool)
        hit[inside] = mask[ry[inside], rx[inside]]
        scores.append(float(1.0 - hit.mean()))
    return scores[0], scores[1]


def border_measures(mask: np.ndarray) -> tuple[float, int]:
    """Irregularity in [0, 1] (1 - isoperimetric compactness, blended with 1 - solidity) and the notch count."""
    region = measure.regionprops(mask.astype(np.uint8))[0]
    # Sub-pixel contour of the slightly smoothed mask: pixel-step perimeters overestimate a circle by ~10%.
    smooth = filters.gaussian(np.pad(mask.astype(np.float64), 2), sigma=1.0)
    perimeter = sum(np.hypot(*np.diff(c, axis=0).T).sum() for c in measure.find_contours(smooth, 0.5))
    compactness = min(1.0, 4 * math.pi * region.area / max(perimeter, 1.0) ** 2)
    irregularity = float(np.clip(0.5 * (1 - compactness) + 0.5 * min(1.0, 3 * (1 - region.solidity)), 0.0, 1.0))
    # Notches: concavities (convex hull minus lesion) larger than 1% of the lesion area.
    minr, minc, _, _ = region.bbox
    hull = np.zeros_like(mask)
    hull[minr : minr + region.image_convex.shape[0], minc : minc + region.image_convex.shape[1]] = region.image_convex
    concavities, count = ndi.label(hull & ~mask)
    sizes = ndi.sum(np.ones_like(mask), concavities, index=range(1, count + 1)) if count else []
    notches = int(sum(1 for s in sizes if s > 0.01 * region.area))
    return irregularity, notches


def colours_present(rgb: np.ndarray, mask: np.ndarray, exclude: np.ndarray | None = None) -> dict[str, float]:
    """Fraction of lesion pixels nearest each ABCD colour in CIELAB; pixels nearest the skin around it count as none."""
    usable = mask & ~exclude if exclude is not None else mask
    if usable.sum() == 0:
        return {}
    surround = ndi.binary_dilation(mask, structure=morphology.disk(6)) & ~mask
    if exclude is not None:
        surround &= ~exclude
    balanced = rgb.astype(np.float64)
    if surround.sum() > 20:
        # Colour constancy: per-channel gains that make the surrounding skin the reference skin tone.
        gains = np.clip(np.array(REFERENCE_SKIN_RGB) / np.maximum(np.median(balanced[surround], axis=0), 1.0), 0.7, 1.6)
        balanced = balanced * gains
    lab = color.rgb2lab(np.clip(balanced, 0, 255) / 255.0)
    names = list(COLOUR_PROTOTYPES_LAB)
    centres = np.array([COLOUR_PROTOTYPES_LAB[n] for n in names])
    if surround.sum() > 20:
        names.append("skin")
        centres = np.vstack([centres, np.median(lab[surround], axis=0)])
    pixels = lab[usable]
    # Lightness counts half: dermoscopy exposure varies more than hue between images.
    weights = np.array([0.5, 1.0, 1.0])
    dist = (((pixels[:, None, :] - centres[None, :, :]) * weights) ** 2).sum(axis=2)
    counts = np.bincount(np.argmin(dist, axis=1), minlength=len(names)) / len(pixels)
    return {name: float(counts[i]) for i, name in enumerate(names) if name in ABCD_COLOURS}


def skin_tone_ita(rgb: np.ndarray, skin: np.ndarray) -> tuple[float | None, float]:
    """(ITA in degrees or None, fraction of the image it came from) over the `skin` pixels of an
    RGB image (uint8, or float in [0, 1]): ITA of the median L* and median b*, which a few hair or
    glare pixels left in the mask cannot move, unlike a mean of per-pixel angles (b* near 0 makes
    single-pixel angles jump between +90 and -90)."""
    scale = 255.0 if rgb.dtype == np.uint8 else 1.0
    lab = color.rgb2lab(np.clip(rgb.astype(np.float64) / scale, 0.0, 1.0))
    low, high = SKIN_LIGHTNESS_RANGE
    usable = skin & (lab[..., 0] > low) & (lab[..., 0] < high)
    fraction = round(float(usable.mean()), 4)
    if fraction < MIN_SKIN_FRACTION:
        return None, fraction
    lightness, b_star = np.median(lab[usable][:, [0, 2]], axis=0)
    return round(ita_from_lab(float(lightness), float(b_star)), 2), fraction


def skin_around(rgb: np.ndarray, mask: np.ndarray | None, hair: np.ndarray) -> np.ndarray:
    """The skin pixels: inside the field of view, outside the lesion and its penumbra, not hair.
    Without a lesion mask the lighter half of the field of view stands in (lesions are darker)."""
    fov = field_of_view(rgb)
    if mask is None:
        grey = rgb.astype(np.float32).mean(axis=2)
        lesion = grey < np.median(grey[fov]) if fov.any() else np.zeros_like(fov)
    else:
        margin = max(1, round(SKIN_MARGIN_PX * min(rgb.shape[:2]) / 224))
        lesion = ndi.binary_dilation(mask, structure=morphology.disk(margin))
    return fov & ~lesion & ~hair


def measure_lesion(rgb: np.ndarray, mm_per_pixel: float | None = None) -> LesionMeasurement:
    """All ABCD figures of one image; a clear `mask_found=False` (with reason) when no lesion is seen."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {rgb.shape}")
    cleaned, hair = remove_hair(rgb)
    mask, confidence, reason = lesion_mask(cleaned)
    # Skin tone from the image as taken (before any white balance), hair excluded rather than filled.
    ita, skin_fraction = skin_tone_ita(rgb, skin_around(rgb, mask, hair))
    if mask is None:
        return LesionMeasurement(mask_found=False, confidence=confidence, reason=reason, ita=ita,
                                 skin_fraction=skin_fraction)
    axis_scores = asymmetry_about_principal_axes(mask)
    irregularity, notches = border_measures(mask)
    fractions = colours_present(cleaned, mask, exclude=hair)
    region = measure.regionprops(mask.astype(np.uint8))[0]
    diameter_px = float(region.feret_diameter_max)
    return LesionMeasurement(
        mask_found=True,
        confidence=confidence,
        area_fraction=float(mask.mean()),
        asymmetry=float(np.mean(axis_scores)),
        asymmetry_by_axis=axis_scores,
        asymmetry_axes=int(sum(s >= ASYMMETRY_AXIS_THRESHOLD for s in axis_scores)),
        border_irregularity=irregularity,
        border_notches=notches,
        colours=[c for c in ABCD_COLOURS if fractions.get(c, 0.0) >= COLOUR_MIN_FRACTION],
        colour_fractions={c: round(v, 4) for c, v in fractions.items()},
        diameter_px=diameter_px,
        diameter_mm=diameter_px * mm_per_pixel if mm_per_pixel else None,
        ita=ita,
        skin_fraction=skin_fraction,
    )


def _known(value):
    """None for the ways a table says "unknown": None, NaN, "", "unknown"."""
    if value is None or isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str) and value.strip().lower() in ("", "unknown", "nan"):
        return None
    return value


def attributes_from(measurement: LesionMeasurement, row: dict) -> LesionAttributes:
    """Merge what the image shows with what the corpus row knows (diagnosis, patient, site)."""
    shape = (
        dict(
            asymmetry=round(measurement.asymmetry, 4),
            asymmetry_axes=measurement.asymmetry_axes,
            border_irregularity=round(measurement.border_irregularity, 4),
            border_notches=measurement.border_notches,
            colours=measurement.colours or None,
            diameter_px=round(measurement.diameter_px, 1),
            diameter_mm=round(measurement.diameter_mm, 2) if measurement.diameter_mm else None,
        )
        if measurement.mask_found
        else {}
    )
    tone = {} if measurement.ita is None else dict(
        skin_tone=ita_category(measurement.ita), ita=measurement.ita, skin_fraction=measurement.skin_fraction)
    age, malignant = _known(row.get("age")), _known(row.get("malignant"))
    return LesionAttributes(
        diagnosis=row["label"],
        malignant=None if malignant is None else bool(malignant),
        site=_known(row.get("site")),
        skin_type=_known(row.get("skin_type")),
        age=None if age is None else float(age),
        sex=_known(row.get("sex")),
        mask_confidence=round(measurement.confidence, 4),
        **shape,
        **tone,
    )
