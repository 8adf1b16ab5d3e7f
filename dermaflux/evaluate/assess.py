"""The synthetic-set assessment: a feature network trained on real data, then FID/KID, precision/
recall and the memorisation check against the real train split (pure torch/numpy, no Ray)."""

from __future__ import annotations

import logging
import time

import numpy as np

from dermaflux.evaluate.classifier import TrainSettings, extract_features, train_classifier
from dermaflux.evaluate.data import ImageTable, class_names, targets
from dermaflux.evaluate.quality import (
    frechet_distance,
    kernel_inception_distance,
    nearest_neighbours,
    precision_recall,
)

log = logging.getLogger(__name__)


def assess_synthetic(real: ImageTable, synthetic: ImageTable, cfg) -> dict:
    """Quality and privacy of `synthetic` (an EvaluateConfig `cfg` gives model, sizes and thresholds)."""
    start = time.perf_counter()
    task = "multiclass" if len(class_names(real, "multiclass")) > 2 else "binary"
    classes = class_names(real, task)
    y = targets(real, task, classes)
    train = np.flatnonzero(real.split == "train")
    val = np.flatnonzero(real.split == "val")
    test = np.flatnonzero(real.split == "test")
    settings = TrainSettings.from_config(cfg, cfg.models[0])
    # The feature network: standard Inception weights are not available offline, so a classifier
    # trained on the real train split (all of it, seed 0) defines the feature space.
    model, training = train_classifier(
        real.images[train], y[train], real.images[val], y[val], classes, settings, seed=0
    )
    feats_train = extract_features(model, real.images[train], settings.image_size)
    feats_val = extract_features(model, real.images[val], settings.image_size)
    feats_test = extract_features(model, real.images[test], settings.image_size)
    feats_syn = extract_features(model, synthetic.images, settings.image_size)

    kid_mean, kid_std = kernel_inception_distance(feats_syn, feats_test, cfg.kid_subset_size)
    kid_ref_mean, _ = kernel_inception_distance(feats_val, feats_test, cfg.kid_subset_size)
    precision, recall = precision_recall(feats_test, feats_syn, cfg.quality_k)

    def neighbours(query: ImageTable, query_feats: np.ndarray) -> list[dict]:
        found = nearest_neighbours(
            query.phash, query.grey, query_feats, real.phash[train], real.grey[train], feats_train,
            cfg.near_copy_phash_max, cfg.near_copy_pixel_corr_min,
        )
        for item, qid in zip(found, query.ids):
            item["query_id"] = str(qid)
            for key in ("phash_nearest", "pixel_nearest", "feature_nearest"):
                item[key.replace("_nearest", "_nearest_id")] = str(real.ids[train][item.pop(key)])
        return found

    syn_nn = neighbours(synthetic, feats_syn)
    # Control: real val images are other lesions, so any flag among them is a false alarm.
    val_nn = neighbours(real.take(val), feats_val)
    flagged = [n for n in syn_nn if n["near_copy"]]
    return {
        "feature_network": {
            "model": settings.model, "task": task, "classes": list(classes), "image_size": settings.image_size,
            "trained_on": f"real train split ({len(train)} images), seed 0, best epoch by val",
            "pretrained_weights": training["pretrained"], "best_epoch": training["best_epoch"],
            "feature_dim": int(feats_train.shape[1]),
        },
        "reference": f"real test split ({len(test)} images)",
        "synthetic_images": int(len(synthetic)),
        "fid": frechet_distance(feats_syn, feats_test),
        "fid_real_val_vs_test": frechet_distance(feats_val, feats_test),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "kid_real_val_vs_test": kid_ref_mean,
        "precision": precision,
        "recall": recall,
        "k": cfg.quality_k,
        "memorisation": {
            "criteria": {"phash_max_bits": cfg.near_copy_phash_max, "pixel_corr_min": cfg.near_copy_pixel_corr_min},
            "checked": len(syn_nn),
            "flagged_count": len(flagged),
            "flagged": sorted(flagged, key=lambda n: (n["phash_distance"], -n["pixel_correlation"])),
            "median_phash_distance": float(np.median([n["phash_distance"] for n in syn_nn])),
            "median_feature_cosine_distance": float(np.median([n["feature_cosine_distance"] for n in syn_nn])),
            "control_real_val_checked": len(val_nn),
            "control_real_val_flagged": sum(n["near_copy"] for n in val_nn),
            "control_median_phash_distance": float(np.median([n["phash_distance"] for n in val_nn])),
            "control_median_feature_cosine_distance": float(np.median([n["feature_cosine_distance"] for n in val_nn])),
        },
        "nearest": syn_nn,
        "seconds": time.perf_counter() - start,
    }
