"""Attribute adherence is right where the answer is known: real HAM10000 images passed in as
"synthetic" with their TRUE attributes agree far above chance; the same images with the attributes
shuffled between them agree at chance."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from dermaflux.caption.extract import attributes_from, decode_image, measure_lesion
from dermaflux.config import load_config
from dermaflux.evaluate import adherence
from dermaflux.evaluate.assess import measure_adherence, train_feature_network
from dermaflux.evaluate.data import read_corpus
from dermaflux.testing.ham10000 import build_split_corpus

IMAGES = 60


@pytest.fixture(scope="module")
def real_as_synthetic(ham10000_dir, tmp_path_factory):
    """The corpus, a network trained on its train split, and IMAGES train images with the attributes the
    captions would give them (the extractor's measurements + the row's diagnosis) as their request."""
    root = tmp_path_factory.mktemp("adherence")
    corpus = build_split_corpus(ham10000_dir, root / "corpus", per_class=14, seed=3)
    real = read_corpus(corpus, 32, hashes=False)
    cfg = load_config("tiny").evaluate.model_copy(update={"models": ["resnet18"], "steps": 60, "validations": 2})
    train, val = np.flatnonzero(real.split == "train"), np.flatnonzero(real.split == "val")
    model, settings, network = train_feature_network(real, train, val, cfg)
    rows = {r["id"]: r for r in pq.read_table(sorted((corpus / "shards").glob("*.parquet"))).to_pylist()}
    pick = np.random.default_rng(0).choice(train, size=IMAGES, replace=False)
    table = real.take(pick)
    blobs = {rid: rows[rid]["image"] for rid in table.ids}
    table.attributes = [attributes_from(measure_lesion(decode_image(blobs[rid])), rows[rid]).to_json()
                        for rid in table.ids]
    return model, settings, network, table, blobs, cfg


def _adherence(real_as_synthetic, table):
    model, settings, network, _, blobs, cfg = real_as_synthetic
    return measure_adherence(model, settings, network, table, blobs, cfg)


@pytest.mark.slow  # the fixture trains a network and measures 60 images: 1-5 minutes on 2 shared cores
def test_true_attributes_agree_far_above_chance(real_as_synthetic):
    table = real_as_synthetic[3]
    result = _adherence(real_as_synthetic, table)
    attrs = result["adherence"]["attributes"]
    assert result["adherence"]["images"] == IMAGES and len(result["adherence_rows"]) == IMAGES
    # The extractor measures what the captions were written from: the same function, the same pixels.
    for name in ("colours", "asymmetry", "border", "diameter_class", "skin_tone"):
        assert attrs[name]["n"] >= 0.8 * IMAGES * (6 if name == "colours" else 1), (name, attrs[name])
        assert attrs[name]["kappa"] > 0.9 and attrs[name]["kappa_ci"][0] > 0.7, (name, attrs[name])
    # The real-trained network saw these train images: it reads their diagnosis well above chance.
    diagnosis = attrs["diagnosis"]
    assert diagnosis["agreement"] > diagnosis["chance"] + 0.25 and diagnosis["kappa_ci"][0] > 0.2, diagnosis
    assert attrs["malignancy"]["kappa"] > 0.2, attrs["malignancy"]
    by_tone = result["adherence"]["by_skin_tone"]
    assert sum(t["images"] for t in by_tone.values()) >= attrs["skin_tone"]["n"]
    assert all(0 <= t["malignancy_agreement"] <= 1 for t in by_tone.values())


@pytest.mark.slow
def test_shuffled_attributes_agree_at_chance(real_as_synthetic):
    table = real_as_synthetic[3]
    order = np.random.default_rng(1).permutation(len(table))
    shuffled = table.take(np.arange(len(table)))
    shuffled.attributes = [table.attributes[i] for i in order]
    shuffled.labels = np.array([json.loads(a)["diagnosis"] for a in shuffled.attributes], dtype=object)
    attrs = _adherence(real_as_synthetic, shuffled)["adherence"]["attributes"]
    assert all(attrs[name]["n"] for name in adherence.ATTRIBUTES)
    for name in adherence.ATTRIBUTES:
        assert abs(attrs[name]["kappa"]) < 0.2, (name, attrs[name])


def test_requests_are_read_on_the_extractors_scales():
    asked = adherence.requested("mel", json.dumps({"diagnosis": "mel", "colours": ["black", "red"],
                                                   "asymmetry_axes": 2, "border_irregularity": 0.5,
                                                   "diameter_mm": 15.0}), 512, "row 0")
    assert asked == {"diagnosis": "mel", "malignancy": "malignant", "colours": ["red", "black"], "asymmetry": 2,
                     "border": 2, "diameter_class": "large", "skin_tone": None}  # 15 mm of a nominal 20 mm field: 0.75 of the side
    assert adherence.requested("nv", None, 64, "row 1") == {
        "diagnosis": "nv", "malignancy": "benign", "colours": None, "asymmetry": None, "border": None,
        "diameter_class": None, "skin_tone": None}
    assert adherence.requested("nv", json.dumps({"diagnosis": "nv", "diameter_px": 40.0}), 64, "r")[
        "diameter_class"] == "medium"
    with pytest.raises(ValueError, match="row 2: attributes_json is not a valid LesionAttributes"):
        adherence.requested("nv", json.dumps({"diagnosis": "nv", "asymmetry_axes": 7}), 64, "row 2")


def test_colours_are_compared_per_image_and_colour_with_each_colours_own_chance():
    def rows(pairs):
        out = []
        for asked, seen in pairs:
            row = {f"{side}_{name}": None for side in ("requested", "measured") for name in adherence.ATTRIBUTES}
            out.append({**row, "requested_colours": asked, "measured_colours": seen})
        return out

    two = adherence.summarise_adherence(rows([(["red"], ["red", "black"]), (["white"], ["white"])]), n_boot=50)
    assert two["colours"]["n"] == 12 and two["colours"]["agreement"] == pytest.approx(11 / 12)
    assert two["diagnosis"]["n"] == 0 and two["diagnosis"]["kappa"] is None
    # Light brown in every image, asked and seen; nothing else ever agrees beyond chance: kappa ~ 0,
    # although 5 of 6 decisions per image agree (pooling the colours would call that kappa > 0.5).
    rng = np.random.default_rng(0)
    pairs = [(["light_brown"] + (["black"] if rng.random() < 0.3 else []),
              ["light_brown"] + (["black"] if rng.random() < 0.3 else [])) for _ in range(400)]
    independent = adherence.colour_agreement(rows(pairs), n_boot=200)
    assert independent["agreement"] > 0.85 and abs(independent["kappa"]) < 0.1
    assert independent["kappa_ci"][0] < 0 < independent["kappa_ci"][1]
    perfect = adherence.colour_agreement(rows([(a, a) for a, _ in pairs]), n_boot=50)
    assert perfect["kappa"] == pytest.approx(1.0)
