"""How good and how safe a synthetic set is: FID, KID, precision/recall, and the memorisation check.

All distribution metrics are computed in a feature space given by the caller (here: the
penultimate layer of a classifier trained on the real train split — standard Inception weights
are not available offline, so the numbers compare runs of this project, not published FIDs).
"""

from __future__ import annotations

import numpy as np


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between Gaussian fits of two feature sets (Heusel et al. 2017)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr(sqrtm(A B)) is the sum of the square roots of the eigenvalues of A B (real and >= 0 for
    # covariance matrices up to rounding); this stays stable when few samples make A B singular.
    eigenvalues = np.linalg.eigvals(cov_a @ cov_b).real
    trace_covmean = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_covmean)


def kernel_inception_distance(a: np.ndarray, b: np.ndarray, subset_size: int = 100, subsets: int = 50,
                              seed: int = 0) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel, mean and std over subsets."""
    rng = np.random.default_rng(seed)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        return float("nan"), float("nan")  # the unbiased estimate needs two samples per side
    d = a.shape[1]
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        mmd = (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
        values.append(mmd)
    return float(np.mean(values)), float(np.std(values))


def _pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0))


def _knn_radii(x: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Distance from each sample to its k-th nearest other sample (chunked: n x n would not fit)."""
    kth = min(k, len(x) - 1)  # position 0 is the point itself (distance 0)
    radii = np.empty(len(x))
    for start in range(0, len(x), chunk):
        dist = _pairwise_distances(x[start : start + chunk], x)
        radii[start : start + chunk] = np.partition(dist, kth, axis=1)[:, kth]
    return radii


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision/recall (Kynkaanniemi et al. 2019): k-NN balls around each set's samples."""
    real_radii, fake_radii = _knn_radii(real, k), _knn_radii(fake, k)
    d = _pairwise_distances(fake, real)  # (fake, real)
    precision = float(np.mean((d <= real_radii[None, :]).any(axis=1)))
    recall = float(np.mean((d.T <= fake_radii[None, :]).any(axis=1)))
    return precision, recall


def hamming_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit differences between hashes stored as uint64 words, (len(a), len(b)); a and b are (n, words)
    (or (n,) for 64-bit hashes)."""
    a = np.asarray(a, dtype=np.uint64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.uint64).reshape(len(b), -1)
    total = np.zeros((len(a), len(b)), dtype=np.int64)
    for word in range(a.shape[1]):
        total += np.bitwise_count(a[:, None, word] ^ b[None, :, word])
    return total


def _standardise(rows: np.ndarray) -> np.ndarray:
    centred = rows - rows.mean(1, keepdims=True)
    norm = np.linalg.norm(centred, axis=1, keepdims=True)
    return centred / np.maximum(norm, 1e-8)


def nearest_neighbours(
    query_phash: np.ndarray, query_grey: np.ndarray, query_features: np.ndarray | None,
    ref_phash: np.ndarray, ref_grey: np.ndarray, ref_features: np.ndarray | None,
    phash_max: int, pixel_corr_min: float, chunk: int = 512,
) -> list[dict]:
    """For each query image: its nearest reference image by pHash, by grey-pixel correlation and by
    feature cosine distance, and whether it is a near-copy: pHash within `phash_max` bits or grey
    pixels correlating at least `pixel_corr_min` (either is enough: privacy prefers a false alarm,
    which the report lists for a person to look at, over a missed copy). Indices refer to the
    reference arrays."""
    ref_std = _standardise(ref_grey)
    ref_unit = None
    if ref_features is not None:
        ref_unit = ref_features / np.maximum(np.linalg.norm(ref_features, axis=1, keepdims=True), 1e-12)
    results = []
    for start in range(0, len(query_phash), chunk):
        stop = start + chunk
        ham = hamming_matrix(query_phash[start:stop], ref_phash)
        corr = _standardise(query_grey[start:stop]) @ ref_std.T
        cos = None
        if ref_unit is not None and query_features is not None:
            q = query_features[start:stop]
            cos = 1.0 - (q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)) @ ref_unit.T
        for row in range(ham.shape[0]):
            entry = {
                "phash_nearest": int(ham[row].argmin()), "phash_distance": int(ham[row].min()),
                "pixel_nearest": int(corr[row].argmax()), "pixel_correlation": float(corr[row].max()),
            }
            if cos is not None:
                entry["feature_nearest"] = int(cos[row].argmin())
                entry["feature_cosine_distance"] = float(cos[row].min())
            entry["near_copy"] = bool(entry["phash_distance"] <= phash_max or entry["pixel_correlation"] >= pixel_corr_min)
            results.append(entry)
    return results
