"""The synthetic-set assessment: a feature network trained on real data, then FID/KID, precision/
recall, the memorisation check against the real train split, and attribute adherence (the
network reads each image's diagnosis, the ABCD extractor its colours and shape) (pure
torch/numpy, no Ray)."""

from __future__ import annotations

import logging
import time

import numpy as np

from dermaflux.evaluate import adherence
from dermaflux.evaluate.classifier import TrainSettings, extract_features, predict_proba, train_classifier
from dermaflux.evaluate.config import EvaluateConfig
from dermaflux.evaluate.data import ImageTable, class_names, targets
from dermaflux.evaluate.quality import (
    frechet_distance,
    kernel_inception_distance,
    nearest_neighbours,
    precision_recall,
)

log = logging.getLogger(__name__)


def assess_synthetic(real: ImageTable, synthetic: ImageTable, cfg: EvaluateConfig,
                     synthetic_images: dict[str, bytes] | None = None) -> dict:
    """Quality, privacy and adherence of `synthetic` (an EvaluateConfig `cfg` gives model, sizes
    and thresholds); adherence needs the encoded images (`synthetic_images`, by id)."""
    start = time.perf_counter()
    train, val, test = (np.flatnonzero(real.split == name) for name in ("train", "val", "test"))
    model, settings, network = train_feature_network(real, train, val, cfg)
    feats_train, feats_val, feats_test, feats_syn = (
        extract_features(model, images, settings.image_size)
        for images in (real.images[train], real.images[val], real.images[test], synthetic.images)
    )
    network["feature_dim"] = int(feats_train.shape[1])
    syn_nn = nearest_train_images(synthetic, feats_syn, real, train, feats_train, cfg)
    # Control: real val images are other lesions, so any flag among them is a false alarm.
    val_nn = nearest_train_images(real.take(val), feats_val, real, train, feats_train, cfg)
    return {
        "feature_network": network,
        "reference": f"real test split ({len(test)} images)",
        "synthetic_images": int(len(synthetic)),
        **distribution_scores(feats_syn, feats_val, feats_test, cfg),
        "memorisation": memorisation_summary(syn_nn, val_nn, cfg),
        "nearest": syn_nn,
        **(measure_adherence(model, settings, network, synthetic, synthetic_images, cfg)
           if cfg.adherence and synthetic_images else {"adherence": None, "adherence_rows": []}),
        "seconds": time.perf_counter() - start,
    }


def measure_adherence(model, settings: TrainSettings, network: dict, synthetic: ImageTable,
                      synthetic_images: dict[str, bytes], cfg: EvaluateConfig) -> dict:
    """{"adherence": per-attribute agreement, "adherence_rows": per image} over the images in
    `synthetic_images` (the caller's sample of at most cfg.adherence_max_images)."""
    index = np.array([i for i, rid in enumerate(synthetic.ids) if rid in synthetic_images], dtype=np.int64)
    subset = synthetic.take(index)
    probs = predict_proba(model, subset.images, settings.image_size)
    rows = adherence.per_image_rows(subset.ids, subset.labels, subset.attributes, probs, network["classes"],
                                    synthetic_images)
    return {
        "adherence": {
            "images": len(rows), "of": int(len(synthetic)), "attributes": adherence.summarise_adherence(rows),
            "by_skin_tone": adherence.by_requested_skin_tone(rows),
            "classifier": f"{network['model']} {network['task']} network of this assessment ({network['trained_on']})",
            "extractor": "dermaflux.caption.extract (the captions' ABCD measurements)",
            "extractor_found_no_lesion": sum(r["extractor_note"] is not None for r in rows),
            "nominal_field_mm": adherence.NOMINAL_FIELD_MM,
        },
        "adherence_rows": rows,
    }


def train_feature_network(real: ImageTable, train: np.ndarray, val: np.ndarray, cfg: EvaluateConfig):
    """(model, its TrainSettings, a description for the report) of the network that defines the
    feature space: standard Inception weights are not available offline, so a classifier trained
    on the real train split (all of it, seed 0) stands in."""
    task = "multiclass" if len(class_names(real, "multiclass")) > 2 else "binary"
    classes = class_names(real, task)
    y = targets(real, task, classes)
    settings = TrainSettings.from_config(cfg, cfg.models[0])
    model, training = train_classifier(
        real.images[train], y[train], real.images[val], y[val], classes, settings, seed=0
    )
    network = {
        "model": settings.model, "task": task, "classes": list(classes), "image_size": settings.image_size,
        "trained_on": f"real train split ({len(train)} images), seed 0, {training['optimizer_steps']} steps, "
                      "best val AUROC kept",
        "pretrained_weights": training["pretrained"], "best_step": training["best_step"],
    }
    return model, settings, network


def distribution_scores(feats_syn: np.ndarray, feats_val: np.ndarray, feats_test: np.ndarray,
                        cfg: EvaluateConfig) -> dict:
    """FID, KID and precision/recall of the synthetic set against the real test split, with the
    real val split scored the same way as the reference a perfect generator would reach."""
    kid_mean, kid_std = kernel_inception_distance(feats_syn, feats_test, cfg.kid_subset_size)
    kid_ref_mean, _ = kernel_inception_distance(feats_val, feats_test, cfg.kid_subset_size)
    precision, recall = precision_recall(feats_test, feats_syn, cfg.quality_k)
    return {
        "fid": frechet_distance(feats_syn, feats_test),
        "fid_real_val_vs_test": frechet_distance(feats_val, feats_test),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "kid_real_val_vs_test": kid_ref_mean,
        "precision": precision,
        "recall": recall,
        "k": cfg.quality_k,
    }


def nearest_train_images(query: ImageTable, query_feats: np.ndarray, real: ImageTable, train: np.ndarray,
                         feats_train: np.ndarray, cfg: EvaluateConfig) -> list[dict]:
    """Each `query` image's nearest real train image by pHash, pixels and features (ids, not indices)."""
    found = nearest_neighbours(
        query.phash, query.grey, query_feats, real.phash[train], real.grey[train], feats_train,
        cfg.near_copy_phash_max, cfg.near_copy_pixel_corr_min,
    )
    train_ids = real.ids[train]
    for item, qid in zip(found, query.ids):
        item["query_id"] = str(qid)
        for key in ("phash_nearest", "pixel_nearest", "feature_nearest"):
            item[key.replace("_nearest", "_nearest_id")] = str(train_ids[item.pop(key)])
    return found


def memorisation_summary(syn_nn: list[dict], val_nn: list[dict], cfg: EvaluateConfig) -> dict:
    flagged = [n for n in syn_nn if n["near_copy"]]
    return {
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
    }
