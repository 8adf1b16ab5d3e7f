"""The memorisation check flags copies of training images planted among synthetic ones, and only those."""

import numpy as np
import pytest

from dermaflux.evaluate.config import EvaluateConfig
from dermaflux.evaluate.data import read_corpus, read_synthetic
from dermaflux.evaluate.quality import nearest_neighbours
from dermaflux.testing.ham10000 import build_split_corpus, build_stand_in_synthetic


@pytest.fixture(scope="module")
def planted(ham10000_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate-memorisation")
    corpus = build_split_corpus(ham10000_dir, root / "corpus", per_class=15, seed=1)
    real = read_corpus(corpus, 32)
    train_ids = real.ids[real.split == "train"].tolist()
    copies = {train_ids[0]: "exact", train_ids[7]: "resized_jpeg", train_ids[-1]: "resized_jpeg"}
    synthetic = read_synthetic(build_stand_in_synthetic(corpus, root / "synthetic", planted=copies), 32)
    return real, synthetic, copies


def test_planted_copies_are_flagged_with_their_source(planted):
    real, synthetic, copies = planted
    cfg = EvaluateConfig()
    train = real.split == "train"
    found = nearest_neighbours(
        synthetic.phash, synthetic.grey, None, real.phash[train], real.grey[train], None,
        cfg.near_copy_phash_max, cfg.near_copy_pixel_corr_min,
    )
    train_ids = real.ids[train]
    flagged = {sid: train_ids[n["pixel_nearest"]] for sid, n in zip(synthetic.ids, found) if n["near_copy"]}
    planted_ids = {sid for sid in synthetic.ids if sid.startswith("synthetic:planted:")}
    assert set(flagged) == planted_ids  # every planted copy, and none of the heavily perturbed images
    assert sorted(flagged.values()) == sorted(copies)
    exact = next(n for sid, n in zip(synthetic.ids, found) if sid in planted_ids and n["phash_distance"] == 0
                 and n["pixel_correlation"] > 0.9999)
    assert exact["near_copy"]


def test_distinct_real_lesions_are_not_flagged(planted):
    real, _, _ = planted
    cfg = EvaluateConfig()
    train, val = real.split == "train", real.split == "val"
    found = nearest_neighbours(
        real.phash[val], real.grey[val], None, real.phash[train], real.grey[train], None,
        cfg.near_copy_phash_max, cfg.near_copy_pixel_corr_min,
    )
    assert not any(n["near_copy"] for n in found)
    assert np.median([n["phash_distance"] for n in found]) > cfg.near_copy_phash_max
