"""The attribute extractor on drawn shapes with known geometry and colours, and on real HAM10000 images."""

from __future__ import annotations


import numpy as np
import pytest
from skimage import color

from dermaflux.caption.extract import (
    COLOUR_PROTOTYPES_LAB,
    REFERENCE_SKIN_RGB,
    attributes_from,
    decode_image,
    measure_lesion,
)

SIDE = 224
YY, XX = np.mgrid[0:SIDE, 0:SIDE]
RADIUS = np.hypot(YY - 112, XX - 112)
ANGLE = np.arctan2(YY - 112, XX - 112)


def prototype_rgb(name: str) -> np.ndarray:
    return np.round(color.lab2rgb(np.array(COLOUR_PROTOTYPES_LAB[name])[None, None])[0, 0] * 255)


def canvas() -> np.ndarray:
    return np.broadcast_to(np.array(REFERENCE_SKIN_RGB, dtype=np.uint8), (SIDE, SIDE, 3)).copy()


def paint(mask: np.ndarray, name: str = "dark_brown", image: np.ndarray | None = None) -> np.ndarray:
    image = canvas() if image is None else image
    image[mask] = prototype_rgb(name)
    return image


CIRCLE = RADIUS < 50
# A lobed blob plus an off-centre bulge: asymmetric about both principal axes, with notches.
BLOB = (RADIUS < 45 + 20 * np.sin(3 * ANGLE) + 12 * np.cos(5 * ANGLE + 1)) | (
    (YY - 80) ** 2 / 400 + (XX - 150) ** 2 / 900 < 1
)


def test_circle_is_symmetric_with_a_regular_border():
    m = measure_lesion(paint(CIRCLE), mm_per_pixel=0.1)
    assert m.mask_found and m.confidence > 0.5
    assert max(m.asymmetry_by_axis) < 0.03 and m.asymmetry_axes == 0
    assert m.border_irregularity < 0.1 and m.border_notches == 0
    assert m.colours == ["dark_brown"]
    assert m.diameter_px == pytest.approx(100, abs=4) and m.diameter_mm == pytest.approx(10, abs=0.4)


def test_irregular_blob_is_asymmetric_on_both_axes_with_notches():
    circle, blob = measure_lesion(paint(CIRCLE)), measure_lesion(paint(BLOB))
    assert blob.mask_found
    assert min(blob.asymmetry_by_axis) > 0.2 and blob.asymmetry_axes == 2
    assert blob.border_irregularity > circle.border_irregularity + 0.3
    assert blob.border_notches >= 2


@pytest.mark.parametrize(
    "painted",
    [("light_brown", "blue_grey", "black"), ("dark_brown", "red", "white"), ("light_brown",)],
)
def test_painted_colour_patches_are_found_and_nothing_else(painted):
    image = paint(CIRCLE, painted[0])
    quadrants = [XX < 100, YY < 95]
    for name, region in zip(painted[1:], quadrants):
        # White (regression) sits inside the pigment, as in real lesions: paler than skin, it would
        # otherwise fall outside the lesion mask.
        image = paint(RADIUS < 18 if name == "white" else CIRCLE & region, name, image)
    m = measure_lesion(image)
    assert m.mask_found
    assert set(m.colours) == set(painted), m.colour_fractions


def test_no_lesion_is_an_explicit_outcome():
    flat = measure_lesion(canvas())
    assert not flat.mask_found and "contrast" in flat.reason
    noise = np.clip(canvas() + np.random.default_rng(0).normal(0, 3, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
    assert not measure_lesion(noise).mask_found
    attrs = attributes_from(flat, {"label": "nv", "age": float("nan"), "sex": "female", "site": "back"})
    assert attrs.asymmetry is None and attrs.colours is None and attrs.diagnosis == "nv" and attrs.age is None


def test_dark_vignette_corners_are_not_the_lesion():
    image = paint(RADIUS < 30)
    image[RADIUS > 118] = (5, 5, 5)  # the dermatoscope's black surround
    m = measure_lesion(image)
    assert m.mask_found and m.diameter_px == pytest.approx(60, abs=4)


def test_real_images_melanoma_vs_nevus(ham10000_dir):
    import csv

    with open(ham10000_dir / "HAM10000_metadata.csv", newline="") as fh:
        meta = sorted(csv.DictReader(fh), key=lambda r: r["image_id"])
    found, asymmetry, colours = {}, {}, {}
    for dx in ("mel", "nv"):
        rows = [r for r in meta if r["dx"] == dx][:20]
        ms = [measure_lesion(decode_image((ham10000_dir / "images" / f"{r['image_id']}.jpg").read_bytes())) for r in rows]
        found[dx] = np.mean([m.mask_found for m in ms])
        asymmetry[dx] = np.mean([m.asymmetry for m in ms if m.mask_found])
        colours[dx] = np.mean([len(m.colours) for m in ms if m.mask_found])
        attrs = attributes_from(ms[0], {"label": dx, "age": float(rows[0]["age"]), "sex": rows[0]["sex"]})
        assert attrs.diagnosis == dx and attrs.mask_confidence is not None
    assert found["mel"] >= 0.9 and found["nv"] >= 0.9
    # What the ABCD rule expects: melanomas more asymmetric and more colourful than nevi.
    assert asymmetry["mel"] > asymmetry["nv"]
    assert colours["mel"] > colours["nv"]


def test_metadata_unknowns_in_any_spelling_become_none():
    flat = measure_lesion(canvas())
    row = {"label": "mel", "malignant": True, "age": None, "sex": "unknown", "site": float("nan"), "skin_type": ""}
    attrs = attributes_from(flat, row)
    assert (attrs.age, attrs.sex, attrs.site, attrs.skin_type) == (None, None, None, None) and attrs.is_malignant
