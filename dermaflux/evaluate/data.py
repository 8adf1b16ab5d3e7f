"""Reading the real corpus and a synthetic set into arrays, and assembling each cell's splits.

The one rule this module exists to enforce: synthetic images only ever join a training set.
Validation and test images come from corpus rows whose split is "val" / "test"; every row
of a synthetic set must say split="synthetic" (anything else is refused when reading), and
`assemble_cell` re-checks that no synthetic id reached val or test before returning.

Test sets: the "internal" test set is the test rows of the sources that also have train rows;
every other source with test rows is an external test set named by its `source` value. Each is
scored separately. Rows without a diagnosis (`label` null: a source that only says melanoma or
not) are test rows only; a task scores the rows whose target it knows and counts the rest.
"""

from __future__ import annotations

import copy
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from dermaflux.lesion import taxonomy

log = logging.getLogger(__name__)

# Display order of the taxonomy codes (the table itself lives with the corpus); unknown codes go last.
LABEL_ORDER = ("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc", "scc")
BINARY_CLASSES = ("benign", "malignant")
MELANOMA_CLASSES = ("other", "melanoma")
TASK_NAMES = {"binary": "malignant vs benign", "melanoma": "melanoma vs rest", "multiclass": "diagnosis"}
INTERNAL = "internal"  # the test set drawn from the training sources
PIXEL_SIDE = 32  # grey thumbnails for the pixel-space memorisation check
# 256-bit pHash (imagehash hash_size 16), as the curate stage uses: 64 bits are too coarse for
# dermoscopy (distinct HAM10000 lesions come within 2 bits of each other).
PHASH_SIZE = 16
PHASH_WORDS = PHASH_SIZE * PHASH_SIZE // 64


@dataclass
class ImageTable:
    """Decoded images (N, H, W, 3) uint8 at the classifier size, with what the report needs.

    labels, malignant and melanoma are object arrays whose entries may be None (unknown)."""

    ids: np.ndarray
    images: np.ndarray
    labels: np.ndarray
    malignant: np.ndarray
    split: np.ndarray
    phash: np.ndarray | None  # (N, PHASH_WORDS) uint64 256-bit pHash of the full image; None: not computed
    grey: np.ndarray  # (N, PIXEL_SIDE**2) float32 grey thumbnails
    captions: list[str] = field(default_factory=list)  # prompt (synthetic) or a metadata line (real)
    melanoma: np.ndarray | None = None  # None: derived from labels
    source: np.ndarray | None = None  # the corpus `source` of each row (synthetic sets: "synthetic")
    attributes: list[str | None] = field(default_factory=list)  # synthetic: the requested attributes_json
    origin: np.ndarray | None = None  # control sets: the corpus id each row was made from

    def __post_init__(self):
        n = len(self.ids)
        if self.melanoma is None:
            self.melanoma = np.array([None if lab is None else lab == "mel" for lab in self.labels], dtype=object)
        if self.source is None:
            self.source = np.full(n, "synthetic", dtype=object)
        if not self.attributes:
            self.attributes = [None] * n

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index: np.ndarray) -> "ImageTable":
        return ImageTable(
            self.ids[index], self.images[index], self.labels[index], self.malignant[index], self.split[index],
            self.phash[index] if self.phash is not None else None, self.grey[index],
            [self.captions[i] for i in index], self.melanoma[index], self.source[index],
            [self.attributes[i] for i in index],
            self.origin[index] if self.origin is not None else None,
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
    parts = [row["label"] or f"no diagnosis (melanoma: {row.get('melanoma')})"]
    if row.get("site"):
        parts.append(str(row["site"]))
    if row.get("age") is not None and not np.isnan(row["age"]):
        parts.append(f"age {int(row['age'])}")
    if row.get("sex"):
        parts.append(str(row["sex"]))
    return ", ".join(parts)


def _known_flags(row: dict) -> tuple[bool | None, bool | None]:
    """(malignant, melanoma) of a row: as stored when known, else from the diagnosis, else None.
    Corpora written before the `melanoma` column existed get it from the label."""
    label = row["label"]
    malignant = row.get("malignant")
    if malignant is None and label in taxonomy.LABELS:
        malignant = taxonomy.is_malignant(label)
    melanoma = row.get("melanoma")
    if melanoma is None and label is not None and label != taxonomy.malignancy_code(True):
        melanoma = label == "mel"  # a bare "malignant" may or may not be a melanoma: unknown
    return (None if malignant is None else bool(malignant)), (None if melanoma is None else bool(melanoma))


def _read_rows(folder: Path, what: str, required: list[str], image_size: int, row_check, hashes: bool) -> ImageTable:
    cols: dict[str, list] = {k: [] for k in ("ids", "images", "labels", "malignant", "melanoma", "split", "source",
                                             "phash", "grey", "captions", "attributes")}
    for path in _shards(folder, what):
        table = pq.read_table(path)
        _check_columns(path, table.column_names, required, what)
        for i, row in enumerate(table.to_pylist()):
            where = f"{path} row {i} (id {row.get('id')!r})"
            row_check(row, where)
            small, grey_row, full = decode_image(row["image"], image_size, where)
            malignant, melanoma = _known_flags(row)
            for key, value in (("ids", row["id"]), ("images", small), ("labels", row["label"]),
                               ("malignant", malignant), ("melanoma", melanoma), ("split", row["split"]),
                               ("source", row.get("source") or "synthetic"),
                               ("phash", phash_words(full) if hashes else None),
                               ("grey", grey_row), ("attributes", row.get("attributes_json")),
                               ("captions", row["prompt"] if "prompt" in row else _real_caption(row))):
                cols[key].append(value)
    if len(set(cols["ids"])) != len(cols["ids"]):
        raise ValueError(f"{what} {folder}: ids are not unique")
    obj = {k: np.array(cols[k], dtype=object) for k in ("ids", "labels", "malignant", "melanoma", "split", "source")}
    return ImageTable(
        obj["ids"], np.stack(cols["images"]), obj["labels"], obj["malignant"], obj["split"],
        np.stack(cols["phash"]) if hashes else None,
        np.stack(cols["grey"]), cols["captions"], obj["melanoma"], obj["source"], cols["attributes"],
    )


def read_corpus(folder: str | Path, image_size: int, hashes: bool = True) -> ImageTable:
    """The corpus at the classifier size; `hashes` False skips the pHash (3/4 of the reading time),
    which only the synthetic-set assessment uses."""
    folder = Path(folder)

    def check(row: dict, where: str) -> None:
        if row["split"] not in ("train", "val", "test"):
            raise ValueError(f"{where}: split {row['split']!r}, expected train, val or test")
        if row["split"] != "test" and (row["label"] is None or row["malignant"] is None):
            raise ValueError(f"{where}: a {row['split']} row needs a label and malignant (only test rows may "
                             "lack a diagnosis)")
        if row["label"] is None and row["malignant"] is None and row.get("melanoma") is None:
            raise ValueError(f"{where}: no label, malignant or melanoma: nothing to score it on")

    required = ["id", "image", "label", "malignant", "split"]  # of CORPUS_SCHEMA
    table = _read_rows(folder, "corpus", required, image_size, check, hashes)
    for name in ("train", "val", "test"):
        if not (table.split == name).any():
            raise ValueError(f"corpus {folder}: no {name!r} rows; evaluate needs train, val and test splits")
    return table


def read_synthetic(folder: str | Path, image_size: int, hashes: bool = True) -> ImageTable:
    folder = Path(folder)

    def check(row: dict, where: str) -> None:
        if row["split"] != "synthetic":
            raise ValueError(
                f"{where}: split {row['split']!r}; every synthetic row must say 'synthetic' "
                "(synthetic images may only join training sets)"
            )

    required = ["id", "image", "label", "malignant", "split", "prompt"]  # of SYNTHETIC_SCHEMA
    return _read_rows(folder, "synthetic set", required, image_size, check, hashes)


def find_test_sets(real: ImageTable) -> dict[str, np.ndarray]:
    """{test set name: row indices}: "internal" (test rows of the sources that have train rows)
    first, then one external set per other source with test rows, by name."""
    test = real.split == "test"
    training_sources = set(real.source[real.split == "train"].tolist())
    sets = {INTERNAL: np.flatnonzero(test & np.isin(real.source, list(training_sources)))}
    for name in sorted(set(real.source[test].tolist()) - training_sources):
        if name == INTERNAL:
            raise ValueError(f"corpus source {INTERNAL!r} has no train rows: the name is reserved for the internal "
                             "test set; rename the source")
        sets[name] = np.flatnonzero(test & (real.source == name))
    return {name: idx for name, idx in sets.items() if len(idx)}


def class_names(real: ImageTable, task: str) -> tuple[str, ...]:
    """The classes a task's classifier predicts; multiclass: the diagnoses of the train split."""
    if task == "binary":
        return BINARY_CLASSES
    if task == "melanoma":
        return MELANOMA_CLASSES
    # Rows labelled only benign/malignant have no diagnosis to predict: the multiclass task leaves them out.
    present = {lab for lab in real.labels[real.split == "train"].tolist()
               if lab is not None and (lab not in taxonomy.LABELS or taxonomy.is_diagnosis(lab))}
    return tuple(c for c in LABEL_ORDER if c in present) + tuple(sorted(present - set(LABEL_ORDER)))


def targets(table: ImageTable, task: str, classes: tuple[str, ...]) -> np.ndarray:
    """Integer targets; -1 where the row's target is unknown for this task (left out of it)."""
    if task in ("binary", "melanoma"):
        flags = table.malignant if task == "binary" else table.melanoma
        return np.array([-1 if f is None else int(f) for f in flags], dtype=np.int64)
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index.get(label, -1) for label in table.labels], dtype=np.int64)


@dataclass
class TestSet:
    """One test set of a cell: the images whose target the task knows, and how many it left out."""

    ids: list[str]
    x: np.ndarray
    y: np.ndarray
    left_out: int  # test rows of this set without a target for the task (e.g. no diagnosis: multiclass)


@dataclass
class CellData:
    """One cell's arrays: real (+ synthetic) train, real val, the real test sets; plus ids for audit."""

    train_x: np.ndarray
    train_y: np.ndarray
    train_is_synthetic: np.ndarray
    train_labels: np.ndarray  # diagnosis codes of the train images (the class mix in the report)
    val_x: np.ndarray
    val_y: np.ndarray
    train_ids: list[str]
    val_ids: list[str]
    tests: dict[str, TestSet]
    classes: tuple[str, ...]
    synthetic_wanted: int = 0
    synthetic_shortfall: int = 0
    synthetic_duplicated: int = 0  # matched control: added images that repeat one (its class's pool ran out)

    @property
    def test_ids(self) -> list[str]:
        return [i for t in self.tests.values() for i in t.ids]


def stratified_subsample(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly `count` indices (all of them when count >= len) keeping the label proportions by
    largest remainders; every label keeps at least one image when count allows."""
    n = len(labels)
    if count >= n:
        return rng.permutation(n)
    keys = np.array([str(v) for v in labels])
    uniq, sizes = np.unique(keys, return_counts=True)
    take = np.zeros(len(uniq), dtype=np.int64)
    # Labels whose share rounds below one image keep one; the rest is shared in proportion.
    small = (count * sizes / n < 1) if count >= len(uniq) else np.zeros(len(uniq), bool)
    take[small] = 1
    quota = (count - small.sum()) * sizes / sizes[~small].sum()
    take[~small] = np.floor(quota[~small])
    while take.sum() < count:  # the largest remainders get one more
        take[np.argmax(np.where(~small & (take < sizes), quota - take, -np.inf))] += 1
    chosen = [rng.choice(np.flatnonzero(keys == key), size=k, replace=False) for key, k in zip(uniq, take) if k]
    return rng.permutation(np.concatenate(chosen))


def sample_synthetic(real_labels: np.ndarray, syn_labels: np.ndarray, count: int,
                     rng: np.random.Generator) -> np.ndarray:
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
    mix_of: ImageTable | None = None,
) -> CellData:
    """Train = a seeded stratified subsample of exactly `real_count` real train images (+ synthetic
    at 1:ratio); val and the test sets = real only. The real subset depends on the seed and size
    alone, so the cells of one seed and size (real-only, synthetic, controls) share it.

    `mix_of` (the matched control): the added images are drawn from `synthetic` (a control pool) to
    the class counts the synthetic set `mix_of` gives the synthetic cell of the same seed, size and
    ratio (recomputed here with the same random stream), duplicating where a class runs out."""
    rng = np.random.default_rng(seed)
    classes = class_names(real, task)
    real_y = targets(real, task, classes)
    train_pool = np.flatnonzero((real.split == "train") & (real_y >= 0))
    unknown = int(np.sum(real.split == "train")) - len(train_pool)
    if unknown:  # e.g. benign/malignant-only rows in the multiclass task, a bare "malignant" in the melanoma task
        log.info("%s task: %d train rows without a target for it left out of the pool", task, unknown)
    # Stratified by diagnosis code (finer than benign/malignant), the same subsample for every task.
    real_sel = train_pool[stratified_subsample(real.labels[train_pool], real_count, rng)]
    duplicated = 0
    if mix_of is not None:
        mix_sel, _ = _synthetic_selection(real, real_sel, mix_of, task, classes, ratio, False, copy.deepcopy(rng))
        syn_sel, duplicated = _matched_selection(real, real_sel, synthetic, mix_of, mix_sel, task, classes, rng)
        wanted = len(mix_sel)
    else:
        syn_sel, wanted = _synthetic_selection(real, real_sel, synthetic, task, classes, ratio, synthetic_only, rng)
    if synthetic_only:
        real_sel = real_sel[:0]
    syn_y = targets(synthetic, task, classes)[syn_sel] if len(syn_sel) else np.zeros(0, np.int64)
    val_idx = np.flatnonzero((real.split == "val") & (real_y >= 0))
    data = CellData(
        train_x=np.concatenate([real.images[real_sel]] + ([synthetic.images[syn_sel]] if len(syn_sel) else [])),
        train_y=np.concatenate([real_y[real_sel], syn_y]),
        train_is_synthetic=np.r_[np.zeros(len(real_sel), bool), np.ones(len(syn_sel), bool)],
        train_labels=np.concatenate([real.labels[real_sel], synthetic.labels[syn_sel] if len(syn_sel) else []]),
        val_x=real.images[val_idx], val_y=real_y[val_idx],
        train_ids=real.ids[real_sel].tolist() + (synthetic.ids[syn_sel].tolist() if len(syn_sel) else []),
        val_ids=real.ids[val_idx].tolist(),
        tests=_test_sets(real, real_y, max_test_images),
        classes=classes, synthetic_wanted=wanted, synthetic_shortfall=wanted - len(syn_sel),
        synthetic_duplicated=duplicated,
    )
    check_no_synthetic_in_eval(data, synthetic)
    return data


def _test_sets(real: ImageTable, real_y: np.ndarray, max_test_images: int | None) -> dict[str, TestSet]:
    """Every test set's rows with a known target (capped at `max_test_images` each, the same
    rows for every cell) and the count of rows left out for want of a target."""
    sets = {}
    for name, idx in find_test_sets(real).items():
        known = idx[real_y[idx] >= 0]
        left_out = int(len(idx) - len(known))
        if max_test_images is not None and len(known) > max_test_images:
            keys = np.array([f"{a}|{b}|{c}" for a, b, c in zip(real.labels[known], real.malignant[known],
                                                               real.melanoma[known])])
            known = np.sort(known[stratified_subsample(keys, max_test_images, np.random.default_rng(0))])
        if len(known):
            sets[name] = TestSet(real.ids[known].tolist(), real.images[known], real_y[known], left_out)
    return sets


def _synthetic_selection(real: ImageTable, real_sel: np.ndarray, synthetic: ImageTable | None, task: str,
                         classes: tuple[str, ...], ratio: float, synthetic_only: bool,
                         rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """(synthetic indices for the train set, how many were wanted): 1:ratio of the real subset, or
    as many as it when synthetic_only, matching its label mix. A control set (rows made from
    corpus images) never offers an image of this cell's real subset."""
    if not (ratio > 0 or synthetic_only):
        return np.zeros(0, dtype=np.int64), 0
    if synthetic is None:
        raise ValueError(f"cell with synthetic ratio {ratio} (synthetic_only={synthetic_only}) but no synthetic set")
    usable = _usable(real, real_sel, synthetic, task, classes)
    want = len(real_sel) if synthetic_only else int(round(ratio * len(real_sel)))
    syn_sel = usable[sample_synthetic(real.labels[real_sel], synthetic.labels[usable], want, rng)]
    if want > len(syn_sel):
        log.warning("synthetic pool short by %d of %d images for %s ratio %s", want - len(syn_sel), want, task, ratio)
    return syn_sel, want


def _usable(real: ImageTable, real_sel: np.ndarray, synthetic: ImageTable, task: str,
            classes: tuple[str, ...]) -> np.ndarray:
    """Rows of `synthetic` a cell may add: a known target, and not made from the cell's own real images."""
    usable = targets(synthetic, task, classes) >= 0
    if synthetic.origin is not None:
        usable &= ~np.isin(synthetic.origin, real.ids[real_sel])
    return np.flatnonzero(usable)


def _matched_selection(real: ImageTable, real_sel: np.ndarray, pool: ImageTable, mix_of: ImageTable,
                       mix_sel: np.ndarray, task: str, classes: tuple[str, ...],
                       rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """(rows of `pool`, how many repeat an earlier one): as many images of each diagnosis (or, for
    a synthetic row without one, of each task target) as `mix_of[mix_sel]` holds. Distinct images
    first; where a class's pool runs out its images are used again, as evenly as possible (the
    "duplicated real" control: the synthetic set's class mix without new images of that class)."""
    usable = _usable(real, real_sel, pool, task, classes)
    pool_targets = targets(pool, task, classes)
    mix_targets = targets(mix_of, task, classes)
    wanted = Counter((mix_of.labels[i], int(mix_targets[i]) if mix_of.labels[i] is None else None) for i in mix_sel)
    chosen, duplicated = [], 0
    for (label, target), count in sorted(wanted.items(), key=str):
        members = usable[pool.labels[usable] == label] if label is not None else usable[pool_targets[usable] == target]
        if not len(members):
            log.warning("matched control: no real image of %s for %d added images", label or f"target {target}", count)
            continue
        chosen.append(np.resize(rng.permutation(members), count))
        duplicated += max(0, count - len(members))
    if not chosen:
        return np.zeros(0, dtype=np.int64), 0
    return rng.permutation(np.concatenate(chosen)), duplicated


def check_no_synthetic_in_eval(data: CellData, synthetic: ImageTable | None) -> None:
    synthetic_ids = set(synthetic.ids.tolist()) if synthetic is not None else set()
    evaluated = set(data.val_ids) | set(data.test_ids)
    leaked = evaluated & synthetic_ids
    if leaked:
        raise AssertionError(f"synthetic images in a val/test split: {sorted(leaked)[:5]}")
    overlap = set(data.train_ids) & evaluated
    if overlap:
        raise AssertionError(f"train images also in val/test: {sorted(overlap)[:5]}")
    if synthetic is not None and synthetic.origin is not None:
        origin = dict(zip(synthetic.ids.tolist(), synthetic.origin.tolist()))
        made_from = {origin[i] for i in data.train_ids if i in origin}
        twice = made_from & set(data.train_ids)
        if twice or made_from & evaluated:
            raise AssertionError(f"control images made from this cell's real or eval images: {sorted(twice)[:5]}")


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
