"""The template caption: deterministic, varied, names the diagnosis, within the text-encoder budgets."""

from __future__ import annotations


import pytest
from pydantic import ValidationError

import re

from dermaflux.lesion import taxonomy
from dermaflux.lesion.attributes import DIAGNOSIS_NAMES, LesionAttributes
from dermaflux.lesion.captions import (
    OPENERS, caption_from_attributes, content_words, estimate_tokens, essentials_end, fits_budget, opening,
)

FULL = dict(
    diagnosis="mel", asymmetry=0.4, border_irregularity=0.6, colours=["black", "light_brown", "blue_grey", "white"],
    diameter_mm=11.3, site="lower extremity", age=71, sex="male", skin_type="II",
)


def test_deterministic_for_a_seed_and_varied_across_seeds():
    attrs = LesionAttributes(**FULL)
    assert caption_from_attributes(attrs, seed=3) == caption_from_attributes(attrs, seed=3)
    assert caption_from_attributes(attrs) == caption_from_attributes(FULL)  # seed None: from the attributes
    assert len({caption_from_attributes(attrs, seed=s) for s in range(20)}) >= 5


@pytest.mark.parametrize("code", sorted(DIAGNOSIS_NAMES))
def test_every_diagnosis_is_named_with_its_malignancy(code):
    for seed in range(10):
        text = caption_from_attributes({"diagnosis": code, "colours": ["dark_brown"]}, seed=seed).lower()
        assert any(name in text for name in DIAGNOSIS_NAMES[code]), text
        malignant = code in {"mel", "bcc", "akiec", "scc", "malignant"}
        assert ("malignant" in text) == malignant and ("benign" in text) == (not malignant), text


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


@pytest.mark.parametrize("code", sorted(DIAGNOSIS_NAMES))
def test_no_opener_repeats_a_word_of_the_diagnosis(code):
    """Every diagnosis wording x every opener: no word twice in a row ("benign benign keratosis"), benign
    or malignant at most once, and none of the diagnosis name's words said again by the opener."""
    malignancy = "malignant" if taxonomy.is_malignant(code) else "benign"
    for dx in DIAGNOSIS_NAMES[code]:
        for forms in OPENERS:
            text = opening(forms, dx, malignancy)
            words = _words(text)
            assert all(a != b for a, b in zip(words, words[1:])), text
            assert words.count("benign") + words.count("malignant") == 1, text  # said once, never twice
            assert dx in text, text
            frame = content_words(text.replace(dx, " "))
            assert not set(frame) & set(content_words(dx)) and len(frame) == len(set(frame)), text


def test_whole_captions_never_stutter():
    for code in sorted(DIAGNOSIS_NAMES):
        for seed in range(40):
            attrs = {**FULL, "diagnosis": code, "colours": ["dark_brown"] if seed % 2 else FULL["colours"]}
            words = _words(caption_from_attributes(attrs, seed=seed))
            assert all(a != b for a, b in zip(words, words[1:])), words
            assert words.count("benign") + words.count("malignant") == 1, words


def test_attributes_are_worded_without_contradiction():
    symmetric = caption_from_attributes({"diagnosis": "nv", "asymmetry": 0.02, "border_irregularity": 0.05}, seed=1)
    assert "asymmetric" not in symmetric and "irregular" not in symmetric
    ragged = caption_from_attributes({"diagnosis": "mel", "asymmetry": 0.5, "border_irregularity": 0.8}, seed=1)
    assert "asymmetric" in ragged and ("irregular" in ragged or "jagged" in ragged)
    text = caption_from_attributes(FULL, seed=0)
    for word in ("black", "light brown", "blue-grey", "white", "11 mm", "71-year-old", "lower extremity", "II"):
        assert word in text, (word, text)
    assert "four colours" in text or "pigmentation" in text or "colouring" in text


def test_essentials_fit_clip_and_all_fits_t5():
    for seed in range(30):
        text = caption_from_attributes(FULL, seed=seed)
        essentials = text[: essentials_end(text)]
        assert "melanoma" in essentials and "black" in essentials
        assert estimate_tokens(essentials) + 2 <= 77, essentials
        assert fits_budget(text)
    assert not fits_budget("melanoma " * 80)


def test_invalid_attributes_name_the_field():
    with pytest.raises(ValidationError, match="unknown diagnosis"):
        LesionAttributes(diagnosis="wart")
    with pytest.raises(ValidationError, match="colours"):
        LesionAttributes(diagnosis="nv", colours=["green"])
    with pytest.raises(ValidationError, match="contradicts"):
        LesionAttributes(diagnosis="mel", malignant=False)
    with pytest.raises(ValidationError, match="skin_type"):
        LesionAttributes(diagnosis="nv", skin_type="VII")
    with pytest.raises(ValidationError, match="extra"):
        LesionAttributes(diagnosis="nv", colour=["red"])
    assert LesionAttributes(diagnosis="NV", sex="unknown", skin_type="type iv").skin_type == "IV"
