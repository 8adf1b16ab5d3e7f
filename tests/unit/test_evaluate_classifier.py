"""timm classifiers by name train on uint8 arrays, with balancing and early stopping."""

import numpy as np
import pytest

from dermaflux.evaluate.classifier import (
    TrainSettings,
    create_classifier,
    extract_features,
    predict_proba,
    train_classifier,
)
from dermaflux.evaluate.metrics import classification_metrics


def _blobs(rng, n, size=32):
    """Class 1: a dark disc on light skin; class 0: no disc; imbalanced 4:1 like benign:malignant."""
    y = (rng.random(n) < 0.2).astype(np.int64)
    x = np.full((n, size, size, 3), 200, np.uint8) + rng.integers(0, 30, size=(n, size, size, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for i in np.flatnonzero(y):
        cy, cx, r = rng.integers(10, 22), rng.integers(10, 22), rng.integers(5, 9)
        x[i][(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = (90, 60, 40)
    return x, y


@pytest.mark.parametrize("balancing", ["sampler", "loss"])
def test_a_small_resnet_learns_a_visible_difference(balancing):
    rng = np.random.default_rng(0)
    train_x, train_y = _blobs(rng, 240)
    val_x, val_y = _blobs(rng, 60)
    test_x, test_y = _blobs(rng, 100)
    settings = TrainSettings(model="resnet18", epochs=3, patience=2, image_size=32, batch_size=32, lr=2e-3,
                             weight_decay=1e-4, balancing=balancing, pretrained=False, threads=1)
    model, info = train_classifier(train_x, train_y, val_x, val_y, ("benign", "malignant"), settings, seed=0)
    metrics = classification_metrics(test_y, predict_proba(model, test_x, 32), ("benign", "malignant"))
    assert metrics["macro_auroc"] > 0.95 and metrics["balanced_accuracy"] > 0.75, (metrics, info["history"])
    assert info["pretrained"] is False and 0 <= info["best_epoch"] < info["epochs_run"] <= 3


def test_models_by_name_including_a_vit_at_small_size():
    model, used = create_classifier("vit_tiny_patch16_224", num_classes=7, image_size=32, pretrained=True)
    assert used is False  # nothing cached on this machine, and nothing is downloaded
    x = np.zeros((2, 32, 32, 3), np.uint8)
    assert predict_proba(model, x, 32).shape == (2, 7)
    assert extract_features(model, x, 32).shape == (2, 192)
    with pytest.raises(ValueError, match="not a timm model name"):
        create_classifier("resnet-18", 2, 32, False)
