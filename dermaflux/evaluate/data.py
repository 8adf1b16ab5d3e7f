"""Reading the real corpus and a synthetic set into arrays, and assembling each cell's splits.

The one rule this module exists to enforce: synthetic images only ever join a training set.
Validation and test images come from corpus rows whose split is "val" / "test"; every row
of a synthetic set must say split="synthetic" (anything else is refused when reading), and
`assemble_cell` re-checks that no synthetic id reached val or test before returning.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image


log = logging.getLogger(__name__)

# Display order of the taxonomy codes (the table itself lives with the corpus); unknown codes go last.
LABEL_ORDER = ("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc", "scc")
BINARY_CLASSES = ("benign", "malignant")
PIXEL_SIDE = 32  # grey thumbnails for the pixel-space memorisation check
# 256-bit pHash (imagehash hash_size 16), as the curate stage uses: 64 bits are too coarse for
# dermoscopy (distinct HAM10000 lesions come within 2 bits of each other).
PHASH_SIZE = 16
PHASH_WORDS = PHASH_SIZE * PHASH_SIZE // 64


@dataclass
class ImageTable:
    """Decoded images (N, H, W, 3) uint8 at the classifier size, with what the report needs."""

    ids: np.ndarray
    images: np.ndarray
    labels: np.ndarray
    malignant: np.ndarray
    split: np.ndarray
    phash: np.ndarray  # (N, PHASH_WORDS) uint64: 256-bit perceptual hash of the full image
    grey: np.ndarray  # (N, PIXEL_SIDE**2) float32 grey thumbnails
    captions: list[str] = field(default_factory=list)  # prompt (synthetic) or a metadata line (real)

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index: np.ndarray) -> "ImageTable":
        return ImageTable(
            self.ids[index], self.images[index], self.labels[index], self.malignant[index], self.split[index],
            self.phash[index], self.grey[index], [self.captions[i] for i in index],
        )


def _shards(folder: Path, what: str) -> list[Path]:
    shards = sorted((folder / "shards").glob("*.parquet"))
    if not shards:
        raise FileNotFoundError(f"{what} {folder}: no shards/*.parquet found (expected the {what} layout)")
    return shards


def _check_columns(path: Path, names: list[str], required: list[str], what: str) -> None:
    missing = [c for c in required if c not in names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; a {what} shard needs {required}")


def phash_words(img: Image.Image) -> np.ndarray:
    """The image's 256-bit pHash as PHASH_WORDS uint64 words (computed here for real and synthetic
    images alike, so both sides of a comparison come from the same function)."""
    import imagehash

    bits = imagehash.phash(img, hash_size=PHASH_SIZE).hash.reshape(-1).astype(np.uint8)
    return np.packbits(bits).view(">u8").astype(np.uint64)


def decode_image(data: bytes, size: int, where: str) -> tuple[np.ndarray, np.ndarray, Image.Image]:
    try:
        img = Image.open(io.BytesIO(data)).convert("RGB")
    except Exception as err:  # PIL raises several types for broken bytes
        raise ValueError(f"{where}: image bytes cannot be decoded ({err})") from err
    small = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0), dtype=np.uint8)
    grey = np.asarray(img.convert("L").resize((PIXEL_SIDE, PIXEL_SIDE), Image.Resampling.BILINEAR), dtype=np.float32)
    return small, grey.reshape(-1) / 255.0, img


def _real_caption(row: dict) -> str:
    parts = [row["label"]]
    if row.get("site"):
        parts.append(str(row["site"]))
    if row.get("age") is not None and not np.isnan(row["age"]):
        parts.append(f"age {int(row['age'])}")
    if row.get("sex"):
        parts.append(str(row["sex"]))
    return ", ".join(parts)


def _read_rows(folder: Path, what: str, required: list[str], image_size: int, row_check) -> ImageTable:
    ids, images, labels, malignant, split, phash, grey, captions = [], [], [], [], [], [], [], []
    for path in _shards(folder, what):
        table = pq.read_table(path)
        _check_columns(path, table.column_names, required, what)
        for i, row in enumerate(table.to_pylist()):
            where = f"{path} row {i} (id {row.get('id')!r})"
            row_check(row, where)
            small, grey_row, full = decode_image(row["image"], image_size, where)
            ids.append(row["id"])
            images.append(small)
            labels.append(row["label"])
            malignant.append(bool(row["malignant"]))
            split.append(row["split"])
            phash.append(phash_words(full))
            grey.append(grey_row)
            captions.append(row["prompt"] if "prompt" in row else _real_caption(row))
    if len(set(ids)) != len(ids):
        raise ValueError(f"{what} {folder}: ids are not unique")
    return ImageTable(
        np.array(ids, dtype=object), np.stack(images), np.array(labels, dtype=object), np.array(malignant),
        np.array(split, dtype=object), np.stack(phash), np.stack(grey), captions,
    )


def read_corpus(folder: str | Path, image_size: int) -> ImageTable:
    folder = Path(folder)

    def check(row: dict, where: str) -> None:
        if row["split"] not in ("train", "val", "test"):
            raise ValueError(f"{where}: split {row['split']!r}, expected train, val or test")

    required = ["id", "image", "label", "malignant", "split"]  # of CORPUS_SCHEMA
    table = _read_rows(folder, "corpus", required, image_size, check)
    for name in ("train", "val", "test"):
        if not (table.split == name).any():
            raise ValueError(f"corpus {folder}: no {name!r} rows; evaluate needs train, val and test splits")
    return table


def read_synthetic(folder: str | Path, image_size: int) -> ImageTable:
    folder = Path(folder)

    def check(row: dict, where: str) -> None:
        if row["split"] != "synthetic":
            raise ValueError(
                f"{where}: split {row['split']!r}; every synthetic row must say 'synthetic' "
                "(synthetic images may only join training sets)"
            )

    required = ["id", "image", "label", "malignant", "split", "prompt"]  # of SYNTHETIC_SCHEMA
    return _read_rows(folder, "synthetic set", required, image_size, check)


def class_names(real: ImageTable, task: str) -> tuple[str, ...]:
    if task == "binary":
        return BINARY_CLASSES
    present = set(real.labels.tolist())
    return tuple(c for c in LABEL_ORDER if c in present) + tuple(sorted(present - set(LABEL_ORDER)))


def targets(table: ImageTable, task: str, classes: tuple[str, ...]) -> np.ndarray:
    if task == "binary":
        return table.malignant.astype(np.int64)
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index.get(label, -1) for label in table.labels], dtype=np.int64)


@dataclass
class CellData:
    """One cell's arrays: real (+ synthetic) train, real val, real test; plus the ids for audit."""

    train_x: np.ndarray
    train_y: np.ndarray
    train_is_synthetic: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    train_ids: list[str]
    val_ids: list[str]
    test_ids: list[str]
    classes: tuple[str, ...]
    synthetic_shortfall: int = 0


def stratified_subsample(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` indices keeping the label proportions (every present label keeps at least one image)."""
    n = len(labels)
    if count >= n:
        return rng.permutation(n)
    chosen = []
    uniq = sorted(set(labels.tolist()))
    for label in uniq:
        where = np.flatnonzero(labels == label)
        take = max(1, int(round(count * len(where) / n)))
        chosen.append(rng.choice(where, size=min(take, len(where)), replace=False))
    picked = np.concatenate(chosen)
    return rng.permutation(picked)


def sample_synthetic(real_labels: np.ndarray, syn_labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` synthetic indices, matching the real subset's label mix where the pool allows."""
    if count <= 0 or len(syn_labels) == 0:
        return np.zeros(0, dtype=np.int64)
    chosen: list[int] = []
    for label in sorted(set(real_labels.tolist())):
        want = int(round(count * np.mean(real_labels == label)))
        pool = np.flatnonzero(syn_labels == label)
        chosen.extend(rng.choice(pool, size=min(want, len(pool)), replace=False).tolist())
    rest = np.setdiff1d(np.arange(len(syn_labels)), np.array(chosen, dtype=np.int64))
    short = count - len(chosen)
    if short > 0 and len(rest):
        chosen.extend(rng.choice(rest, size=min(short, len(rest)), replace=False).tolist())
    return rng.permutation(np.array(chosen[:count], dtype=np.int64))


def assemble_cell(
    real: ImageTable,
    synthetic: ImageTable | None,
    task: str,
    real_count: int,
    ratio: float,
    seed: int,
    synthetic_only: bool = False,
    max_test_images: int | None = None,
) -> CellData:
    """Train = a seeded stratified subsample of real train (+ synthetic at 1:ratio); val/test = real only."""
    rng = np.random.default_rng(seed)
    classes = class_names(real, task)
    real_y = targets(real, task, classes)
    val_idx, test_idx = _eval_indices(real, max_test_images)
    train_pool = np.flatnonzero(real.split == "train")
    # Stratified by diagnosis code (finer than benign/malignant), the same subsample for both tasks.
    real_sel = train_pool[stratified_subsample(real.labels[train_pool], real_count, rng)]
    syn_sel, shortfall = _synthetic_selection(real, real_sel, synthetic, task, classes, ratio, synthetic_only, rng)
    if synthetic_only:
        real_sel = real_sel[:0]

    parts_x = [real.images[real_sel]]
    parts_y = [real_y[real_sel]]
    train_ids = real.ids[real_sel].tolist()
    if len(syn_sel):
        parts_x.append(synthetic.images[syn_sel])
        parts_y.append(targets(synthetic, task, classes)[syn_sel])
        train_ids += synthetic.ids[syn_sel].tolist()
    data = CellData(
        train_x=np.concatenate(parts_x),
        train_y=np.concatenate(parts_y),
        train_is_synthetic=np.r_[np.zeros(len(real_sel), bool), np.ones(len(syn_sel), bool)],
        val_x=real.images[val_idx],
        val_y=real_y[val_idx],
        test_x=real.images[test_idx],
        test_y=real_y[test_idx],
        train_ids=train_ids,
        val_ids=real.ids[val_idx].tolist(),
        test_ids=real.ids[test_idx].tolist(),
        classes=classes,
        synthetic_shortfall=int(shortfall),
    )
    check_no_synthetic_in_eval(data, synthetic)
    return data


def _eval_indices(real: ImageTable, max_test_images: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The real val rows and the real test rows (capped at `max_test_images`)."""
    val_idx = np.flatnonzero(real.split == "val")
    test_idx = np.flatnonzero(real.split == "test")
    if max_test_images is not None and len(test_idx) > max_test_images:
        # Fixed across cells (seed 0), so every cell is scored on the same test images.
        test_idx = np.sort(test_idx[stratified_subsample(real.labels[test_idx], max_test_images, np.random.default_rng(0))])
    return val_idx, test_idx


def _synthetic_selection(real: ImageTable, real_sel: np.ndarray, synthetic: ImageTable | None, task: str,
                         classes: tuple[str, ...], ratio: float, synthetic_only: bool,
                         rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """(synthetic indices for the train set, how many the pool fell short): 1:ratio of the real
    subset, or as many as it when synthetic_only, matching its label mix."""
    if not (ratio > 0 or synthetic_only):
        return np.zeros(0, dtype=np.int64), 0
    if synthetic is None:
        raise ValueError(f"cell with synthetic ratio {ratio} (synthetic_only={synthetic_only}) but no synthetic set")
    usable = np.flatnonzero(targets(synthetic, task, classes) >= 0)
    want = len(real_sel) if synthetic_only else int(round(ratio * len(real_sel)))
    syn_sel = usable[sample_synthetic(real.labels[real_sel], synthetic.labels[usable], want, rng)]
    shortfall = want - len(syn_sel)
    if shortfall:
        log.warning("synthetic pool short by %d images for %s ratio %s", shortfall, task, ratio)
    return syn_sel, shortfall


def check_no_synthetic_in_eval(data: CellData, synthetic: ImageTable | None) -> None:
    synthetic_ids = set(synthetic.ids.tolist()) if synthetic is not None else set()
    leaked = (set(data.val_ids) | set(data.test_ids)) & synthetic_ids
    if leaked:
        raise AssertionError(f"synthetic images in a val/test split: {sorted(leaked)[:5]}")
    overlap = set(data.train_ids) & (set(data.val_ids) | set(data.test_ids))
    if overlap:
        raise AssertionError(f"train images also in val/test: {sorted(overlap)[:5]}")


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


def read_image_bytes(folder: str | Path, ids: set[str]) -> dict[str, bytes]:
    """The original encoded bytes of rows `ids` (for the report's full-size thumbnails)."""
    found: dict[str, bytes] = {}
    for path in sorted((Path(folder) / "shards").glob("*.parquet")):
        table = pq.read_table(path, columns=["id", "image"])
        for rid, data in zip(table.column("id").to_pylist(), table.column("image").to_pylist()):
            if rid in ids:
                found[rid] = data
    return found
