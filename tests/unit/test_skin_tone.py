"""Skin tone (ITA) measured on synthetic skin of known CIELAB colour, at every category boundary."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage import color

from dermaflux.caption.extract import attributes_from, measure_lesion, skin_tone_ita
from dermaflux.lesion.attributes import LesionAttributes
from dermaflux.lesion.captions import caption_from_attributes
from dermaflux.lesion.skin_tone import ITA_CATEGORIES, ITA_LOWER_BOUNDS, ita_category, ita_from_lab

SIDE = 224
RADIUS = np.hypot(*(np.mgrid[0:SIDE, 0:SIDE] - SIDE / 2))
B_STAR = 20.0  # a skin-like yellowness; L* follows from the wanted angle


def lab_for(ita_degrees: float) -> tuple[float, float, float]:
    return (50.0 + B_STAR * math.tan(math.radians(ita_degrees)), 12.0, B_STAR)


def skin_patch(ita_degrees: float, dtype=np.uint8) -> np.ndarray:
    """A flat skin image of the wanted ITA, from lab2rgb (as a camera would store it when uint8)."""
    rgb = color.lab2rgb(np.broadcast_to(np.array(lab_for(ita_degrees)), (SIDE, SIDE, 3)))
    return np.round(rgb * 255).astype(np.uint8) if dtype == np.uint8 else rgb


def test_the_category_function_puts_each_boundary_in_the_darker_category():
    order = list(ITA_CATEGORIES)
    for name, bound in ITA_LOWER_BOUNDS.items():
        assert ita_category(bound + 1e-6) == name
        assert ita_category(bound) == order[order.index(name) + 1]
    assert ita_category(89.0) == "very_light" and ita_category(-89.0) == "dark"
    with pytest.raises(ValueError, match="finite"):
        ita_category(float("nan"))
    assert ita_from_lab(60.0, -3.0) == pytest.approx(90.0, abs=1e-3)  # no negative-b* flip to -90


@pytest.mark.parametrize("bound", list(ITA_LOWER_BOUNDS.values()))
@pytest.mark.parametrize("side", [-1.0, 1.0])
def test_skin_of_known_lab_either_side_of_every_boundary(bound, side):
    target = bound + side * 1.0  # one degree in: within the 8-bit rounding of L* and b*
    expected = ita_category(target)
    everywhere = np.ones((SIDE, SIDE), dtype=bool)
    exact, _ = skin_tone_ita(skin_patch(target, dtype=float), everywhere)
    stored, fraction = skin_tone_ita(skin_patch(target), everywhere)
    assert exact == pytest.approx(target, abs=0.01)
    assert stored == pytest.approx(target, abs=0.6) and fraction == 1.0
    assert ita_category(stored) == expected


@pytest.mark.parametrize("target", [60.0, 35.0, 0.0, -40.0])
def test_the_lesion_and_white_balance_do_not_move_the_measured_tone(target):
    """A dark lesion on skin of a known ITA: the ITA comes from the skin around it, as taken."""
    image = skin_patch(target)
    image[RADIUS < 45] = (70, 40, 30)  # dark brown lesion in the centre
    measured = measure_lesion(image)
    assert measured.mask_found, measured.reason
    assert measured.ita == pytest.approx(target, abs=0.6)
    assert 0.7 < measured.skin_fraction < 0.9  # the image minus the lesion and its margin
    attrs = attributes_from(measured, {"label": "nv", "skin_type": "II"})
    assert attrs.skin_tone == ita_category(target) and attrs.skin_type == "II"  # both, neither overwritten


def test_too_little_skin_reports_no_tone():
    image = skin_patch(30.0)
    ita, fraction = skin_tone_ita(image, RADIUS > 158)  # only the corners: 1.5 % of the image
    assert ita is None and fraction < 0.05


def test_caption_says_the_measured_tone_beside_the_fitzpatrick_type():
    attrs = LesionAttributes(diagnosis="mel", skin_tone="brown", skin_type="V", ita=-12.0, age=40, sex="female")
    text = caption_from_attributes(attrs, seed=1)
    assert "brown skin" in text and "Fitzpatrick skin type V" in text and "-12" not in text
    with pytest.raises(ValueError, match="skin_tone"):
        LesionAttributes(diagnosis="mel", skin_tone="olive")


def test_manifest_summary_counts_categories_and_fitzpatrick_agreement():
    import json

    import pandas as pd

    from dermaflux.caption.tone_summary import skin_tone_summary

    def row(source, ita, fitz=None):
        attrs = {"diagnosis": "nv", "ita": ita, "skin_tone": ita_category(ita), "skin_fraction": 0.8}
        return {"label": "nv", "source": source, "attributes_json": json.dumps({**attrs, **({"skin_type": fitz}
                                                                                          if fitz else {})})}

    rows = [row("ham10000", 70.0), row("ham10000", 90.0), row("ham10000", 45.0),
            row("pad", 60.0, "I"), row("pad", 35.0, "III"), row("pad", 5.0, "V"), row("pad", -40.0, "VI")]
    rows.append({"label": "mel", "source": "ham10000", "attributes_json": json.dumps({"diagnosis": "mel"})})
    summary = skin_tone_summary(pd.DataFrame(rows))
    assert summary["images"] == 8 and summary["measured"] == 7
    assert summary["categories"] == {"very_light": 3, "light": 1, "intermediate": 1, "brown": 1, "dark": 1}
    assert summary["per_source"]["ham10000"] == {"very_light": 2, "light": 1}
    assert summary["saturated_share"] == pytest.approx(1 / 7, abs=1e-4)
    assert list(summary["fitzpatrick_agreement"]) == ["pad"]  # only the source labelling both
    pad = summary["fitzpatrick_agreement"]["pad"]
    assert pad["images"] == 4 and pad["spearman_rho"] == pytest.approx(-1.0)
    assert pad["by_fitzpatrick"]["VI"] == {"dark": 1}
