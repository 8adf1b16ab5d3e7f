"""Small data sets built from the real HAM10000 images (`../shared/data/ham10000-224`).

One row builder, `corpus_row` (a metadata line as the curate stage writes it, malignant flag from
the taxonomy), and one builder per shape the tests and benchmarks need:
- `corpus_rows` + `write_corpus`: a corpus dealt over N shards (caption);
- `build_split_corpus`: a corpus split by lesion, stratified by diagnosis (evaluate);
- `build_class_corpus`: so many train (+ test) rows of each listed diagnosis (synth targets);
- `build_captioned_set`: a CAPTION_SCHEMA set standing in for `dermaflux caption` output (train);
- `build_stand_in_synthetic`: a SYNTHETIC_SCHEMA set that is NOT Flux output (evaluate);
- `build_ham_folder`: a HAM10000-layout folder with a few images per diagnosis (jobs, pipeline).
Every builder writes under the folder it is given (a tmp folder, never the repo).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageFilter

from dermaflux.caption.schema import CAPTION_SCHEMA
from dermaflux.corpus.schema import CORPUS_SCHEMA
from dermaflux.corpus.sources.base import number, sex_word, site_words, text
from dermaflux.lesion import taxonomy
from dermaflux.lesion.attributes import DIAGNOSIS_NAMES
from dermaflux.synth.schema import SYNTHETIC_SCHEMA

METADATA = "HAM10000_metadata.csv"


def read_metadata(ham_dir: Path, by_image_id: bool = False) -> list[dict[str, str]]:
    """The metadata rows in file order, or sorted by image id."""
    with open(Path(ham_dir) / METADATA, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return sorted(rows, key=lambda r: r["image_id"]) if by_image_id else rows


def pick(ham_dir: Path, per_label: int | Mapping[str, int] | None, skip: int = 0,
         by_image_id: bool = False) -> list[dict[str, str]]:
    """Metadata rows: `per_label` of each diagnosis (a number, a count per diagnosis with 0 for the
    others, or None for all) after skipping the first `skip` of each; deterministic."""
    rows, taken = [], {}
    for row in read_metadata(ham_dir, by_image_id):
        dx = row["dx"]
        limit = per_label.get(dx, 0) if isinstance(per_label, Mapping) else per_label
        n = taken.get(dx, 0)
        if skip <= n and (limit is None or n < skip + limit):
            rows.append(row)
        taken[dx] = n + 1
    return rows


def image_path(ham_dir: Path, meta: dict[str, str]) -> Path:
    return Path(ham_dir) / "images" / f"{meta['image_id']}.jpg"


def corpus_row(ham_dir: Path, meta: dict[str, str], split: str = "train") -> dict:
    """A CORPUS_SCHEMA row for one metadata line, with the values the curate stage's reader gives."""
    dx = meta["dx"]
    return {
        "id": f"ham10000:{meta['image_id']}", "source": "ham10000", "original_id": meta["image_id"],
        "image": image_path(ham_dir, meta).read_bytes(), "image_format": "JPEG", "width": 224, "height": 224,
        "label": dx, "source_label": dx, "malignant": taxonomy.is_malignant(dx), "lesion_id": meta["lesion_id"],
        "patient_id": None, "split": split, "split_origin": "dermaflux", "phash": None,
        "age": number(meta["age"]), "sex": sex_word(meta["sex"]), "site": site_words(meta["localization"]),
        "skin_type": None, "diagnosis_method": text(meta["dx_type"]), "mm_per_pixel": None,
        "metadata_json": json.dumps({"dataset": meta["dataset"]}),
    }


def write_shards(parts: list[list[dict]], schema: pa.Schema, folder: Path) -> Path:
    """`folder/shards/part-00000.parquet`, ... one file per part."""
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    for k, part in enumerate(parts):
        pq.write_table(pa.Table.from_pylist(part, schema=schema), folder / "shards" / f"part-{k:05d}.parquet")
    return folder


def chunks(rows: list[dict], size: int) -> list[list[dict]]:
    return [rows[i : i + size] for i in range(0, max(1, len(rows)), size)]


def corpus_rows(ham_dir: Path, per_label: int | None = None) -> list[dict]:
    """Train rows, `per_label` of each diagnosis (None: all), by image id."""
    return [corpus_row(ham_dir, meta) for meta in pick(ham_dir, per_label, by_image_id=True)]


def write_corpus(rows: list[dict], out: Path, shards: int = 2) -> Path:
    """A corpus folder with `rows` dealt round-robin over `shards` files, and its manifest."""
    write_shards([rows[k::shards] for k in range(shards)], CORPUS_SCHEMA, out)
    (out / "manifest.json").write_text(json.dumps({"rows": len(rows), "shards": shards}))
    return out


def _lesion_splits(lesions: list[str], fractions: tuple[float, float, float]) -> dict[str, str]:
    n_test = max(1, int(round(fractions[2] * len(lesions))))
    n_val = max(1, int(round(fractions[1] * len(lesions))))
    return {lid: "test" if i < n_test else "val" if i < n_test + n_val else "train" for i, lid in enumerate(lesions)}


def build_split_corpus(ham_dir: Path, out: Path, per_class: int | None = None, seed: int = 0,
                       fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> Path:
    """Up to `per_class` lesions of each diagnosis (None: all), split by lesion and stratified by
    diagnosis, as the curate stage splits (built here so evaluate is testable on its own)."""
    rng = np.random.default_rng(seed)
    by_dx: dict[str, list[dict]] = {}
    for meta in read_metadata(ham_dir):
        by_dx.setdefault(meta["dx"], []).append(meta)
    rows = []
    for dx, members in sorted(by_dx.items()):
        lesions = sorted({m["lesion_id"] for m in members})
        rng.shuffle(lesions)
        split_of = _lesion_splits(lesions[:per_class], fractions)
        rows += [corpus_row(ham_dir, m, split_of[m["lesion_id"]]) for m in members if m["lesion_id"] in split_of]
    write_shards(chunks(rows, 2000), CORPUS_SCHEMA, out)
    (out / "manifest.json").write_text(json.dumps({"rows": len(rows), "built_by": __name__}))
    return out


def build_class_corpus(ham_dir: Path, out: Path, per_label: dict[str, int], test_per_label: int = 1) -> Path:
    """`per_label[dx]` train rows, then `test_per_label` test rows, of each listed diagnosis (file order)."""
    taken: dict[str, int] = {}
    rows = []
    for meta in pick(ham_dir, {dx: n + test_per_label for dx, n in per_label.items()}):
        dx = meta["dx"]
        taken[dx] = taken.get(dx, 0) + 1
        rows.append(corpus_row(ham_dir, meta, "train" if taken[dx] <= per_label[dx] else "test"))
    return write_shards([rows], CORPUS_SCHEMA, out)


def captioned_row(ham_dir: Path, meta: dict[str, str], split: str) -> dict:
    """A CAPTION_SCHEMA row whose caption is a plain sentence from the metadata (label and site)."""
    row = corpus_row(ham_dir, meta, split)
    where = f" on the {row['site']}" if row["site"] else ""
    return {
        **row, "attributes_json": json.dumps({"label": row["label"], "site": row["site"]}),
        "caption": f"dermoscopic image of a {DIAGNOSIS_NAMES[row['label']][0]}{where}",
        "caption_writer": "template", "caption_flags": [],
    }


def build_captioned_set(ham_dir: Path, out: Path, n_train: int, n_test: int, shard_rows: int = 64) -> Path:
    """`out/shards/part-*.parquet` with the first n_train + n_test rows by image id; enough for the
    transformer to learn a label/site-conditioned distribution."""
    metas = read_metadata(ham_dir, by_image_id=True)[: n_train + n_test]
    rows = [captioned_row(ham_dir, meta, "train" if i < n_train else "test") for i, meta in enumerate(metas)]
    return write_shards(chunks(rows, shard_rows), CAPTION_SCHEMA, out)


def build_ham_folder(ham_dir: Path, out: Path, per_class: int = 6) -> Path:
    """A HAM10000-layout folder (metadata CSV + images/) with the first `per_class` images of each
    diagnosis by image id."""
    return write_ham_folder(ham_dir, out, pick(ham_dir, per_class, by_image_id=True))


def write_ham_folder(ham_dir: Path, out: Path, rows: list[dict[str, str]]) -> Path:
    """A HAM10000-layout folder holding `rows` (metadata rows of `ham_dir`) and copies of their images;
    returns `out`. Tests that edit or break inputs do it here, never in the shared data."""
    (out / "images").mkdir(parents=True)
    for meta in rows:
        shutil.copyfile(image_path(ham_dir, meta), out / "images" / image_path(ham_dir, meta).name)
    with open(out / METADATA, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def perturb(img: Image.Image, rng: np.random.Generator, size: int = 128) -> Image.Image:
    """A heavy, visible change: blur, rotation, colour shift, noise (no longer a near-copy)."""
    img = img.resize((size, size)).filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(2.0, 4.0))))
    img = img.rotate(float(rng.choice([90, 180, 270])) + float(rng.uniform(-20, 20)))
    arr = np.asarray(img, dtype=np.float32)
    arr = arr * rng.uniform(0.8, 1.2, size=3) + rng.normal(0, 12, size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def synthetic_row(index: int, label: str, img: Image.Image, prompt: str, job: str = "standin") -> dict:
    return {
        "id": f"synthetic:{job}:{label}:{index}", "image": _png(img), "image_format": "PNG",
        "width": img.width, "height": img.height, "label": label, "malignant": taxonomy.is_malignant(label),
        "split": "synthetic", "prompt": prompt, "attributes_json": None, "seed": index, "adapter": None,
        "num_inference_steps": None, "guidance_scale": None,
    }


def _planted_copy(row: dict, how: str) -> Image.Image:
    img = Image.open(io.BytesIO(row["image"])).convert("RGB")
    if how == "resized_jpeg":
        buf = io.BytesIO()
        img.resize((96, 96), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=70)
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return img


def build_stand_in_synthetic(corpus: Path, out: Path, per_image: float = 1.0, seed: int = 0,
                             planted: dict[str, str] | None = None, per_label: int | None = None) -> Path:
    """A stand-in for a synthetic set: the corpus's *train* images, heavily perturbed (it exercises
    the plumbing and is reported as a stand-in wherever it is used). `planted` maps corpus ids to
    how an undisguised copy is added: "exact" (same pixels) or "resized_jpeg" (96 px, JPEG q=70, back to PNG).
    `per_label`: that many images of each diagnosis instead (balanced over classes, as `generate
    --per-class` makes them) rather than `per_image` per train image at the corpus's mix."""
    rng = np.random.default_rng(seed)
    table = pq.read_table(sorted((corpus / "shards").glob("*.parquet"))).to_pylist()
    train = [r for r in table if r["split"] == "train"]
    count = int(round(per_image * len(train)))
    picks = rng.choice(len(train), size=count, replace=count > len(train))
    if per_label is not None:
        by_label: dict[str, list[int]] = {}
        for k, r in enumerate(train):
            by_label.setdefault(r["label"], []).append(k)
        picks = np.concatenate([rng.choice(ks, size=per_label, replace=per_label > len(ks))
                                for _, ks in sorted(by_label.items())])
        count = len(picks)
    rows = []
    for i, idx in enumerate(picks):
        r = train[idx]
        img = Image.open(io.BytesIO(r["image"])).convert("RGB")
        where = f" on the {r['site']}" if r["site"] else ""
        prompt = f"dermoscopy image of a {r['label']} lesion{where} (stand-in: perturbed real image)"
        rows.append(synthetic_row(i, r["label"], perturb(img, rng), prompt))
    by_id = {r["id"]: r for r in table}
    for j, (cid, how) in enumerate((planted or {}).items()):
        copy = _planted_copy(by_id[cid], how)
        rows.append(synthetic_row(count + j, by_id[cid]["label"], copy, f"planted {how} copy of {cid}", job="planted"))
    write_shards(chunks(rows, 2000), SYNTHETIC_SCHEMA, out)
    (out / "manifest.json").write_text(json.dumps({"rows": len(rows), "stand_in": True}))
    return out
