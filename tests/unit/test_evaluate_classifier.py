"""timm classifiers by name train on uint8 arrays, with balancing and early stopping."""

import numpy as np
import pytest

from dermaflux.evaluate.classifier import (
    TrainSettings,
    create_classifier,
    extract_features,
    predict_proba,
    train_classifier,
    validation_steps,
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


@pytest.mark.parametrize("balancing, steps", [("sampler", 0), ("loss", 24)])
def test_a_small_resnet_learns_a_visible_difference(balancing, steps):
    rng = np.random.default_rng(0)
    train_x, train_y = _blobs(rng, 240)
    val_x, val_y = _blobs(rng, 60)
    test_x, test_y = _blobs(rng, 100)
    settings = TrainSettings(model="resnet18", epochs=3, patience=2, image_size=32, batch_size=32, lr=2e-3,
                             weight_decay=1e-4, balancing=balancing, pretrained=False, threads=1, steps=steps,
                             validations=3)
    model, info = train_classifier(train_x, train_y, val_x, val_y, ("benign", "malignant"), settings, seed=0)
    metrics = classification_metrics(test_y, predict_proba(model, test_x, 32), ("benign", "malignant"))
    assert metrics["macro_auroc"] > 0.95 and metrics["balanced_accuracy"] > 0.75, (metrics, info["history"])
    assert info["pretrained"] is False and info["best_step"] in [h["step"] for h in info["history"]]
    if steps:
        assert info["optimizer_steps"] == 24 and [h["step"] for h in info["history"]] == [8, 16, 24]
    else:
        assert info["optimizer_steps"] == 7 * len(info["history"]) and len(info["history"]) <= 3  # 240 // 32 per epoch


def test_steps_mode_takes_the_same_steps_whatever_the_training_set_size():
    """The fair comparison: a cell with 3x the images (1:2 added) trains exactly as many steps."""
    rng = np.random.default_rng(1)
    val_x, val_y = _blobs(rng, 40)
    settings = TrainSettings(model="resnet18", epochs=3, patience=2, image_size=32, batch_size=16, lr=1e-3,
                             weight_decay=1e-4, balancing="loss", pretrained=False, threads=1, steps=10, validations=2)
    seen = []
    for n in (40, 120):
        train_x, train_y = _blobs(rng, n)
        _, info = train_classifier(train_x, train_y, val_x, val_y, ("benign", "malignant"), settings, seed=0)
        seen.append((info["optimizer_steps"], info["train_images"], [h["step"] for h in info["history"]]))
    assert seen == [(10, 40, [5, 10]), (10, 120, [5, 10])]
    # With epochs instead (steps 0), the larger set takes 3x the steps: the confound the steps mode removes.
    by_epochs = [train_classifier(*_blobs(rng, n), val_x, val_y, ("benign", "malignant"),
                                  TrainSettings(**{**settings.__dict__, "steps": 0, "epochs": 1}), seed=0)[1]
                 for n in (40, 120)]
    assert [i["optimizer_steps"] for i in by_epochs] == [2, 7]
    assert validation_steps(10, 4) == [2, 5, 8, 10] and validation_steps(2, 4) == [1, 2]


def test_models_by_name_including_a_vit_at_small_size():
    model, used = create_classifier("vit_tiny_patch16_224", num_classes=7, image_size=32, pretrained=True)
    assert used is False  # nothing cached on this machine, and nothing is downloaded
    x = np.zeros((2, 32, 32, 3), np.uint8)
    assert predict_proba(model, x, 32).shape == (2, 7)
    assert extract_features(model, x, 32).shape == (2, 192)
    with pytest.raises(ValueError, match="not a timm model name"):
        create_classifier("resnet-18", 2, 32, False)
