"""Inputs for the evaluate tests and bench, built from real HAM10000 images in the shared schemas.

`build_corpus` writes a CORPUS_SCHEMA corpus with a split grouped by lesion_id and stratified by
diagnosis (what the curate stage does; built here so evaluate is testable on its own).
`build_stand_in_synthetic` writes a SYNTHETIC_SCHEMA set that is NOT Flux output: each image is
a real *train* image, heavily blurred, re-coloured, rotated and noised; it exists to exercise the
plumbing (and is reported as such wherever it is used).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageFilter

from dermaflux.corpus.schema import CORPUS_SCHEMA
from dermaflux.synth.schema import SYNTHETIC_SCHEMA

MALIGNANT = {"mel", "bcc", "akiec", "scc"}


def _metadata(ham_dir: Path) -> list[dict]:
    with open(ham_dir / "HAM10000_metadata.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if (ham_dir / "images" / f"{r['image_id']}.jpg").exists()]
    return rows


def _write_shards(rows: list[dict], schema: pa.Schema, folder: Path, rows_per_shard: int = 2000) -> None:
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    for i in range(0, max(1, len(rows)), rows_per_shard):
        table = pa.Table.from_pylist(rows[i : i + rows_per_shard], schema=schema)
        pq.write_table(table, folder / "shards" / f"part-{i // rows_per_shard:05d}.parquet")


def build_corpus(ham_dir: Path, out: Path, per_class: int | None = None, seed: int = 0,
                 fractions=(0.7, 0.15, 0.15)) -> Path:
    """Corpus of up to `per_class` images per diagnosis (None: all), split by lesion, stratified by dx."""
    rng = np.random.default_rng(seed)
    rows = _metadata(ham_dir)
    by_dx: dict[str, list[dict]] = {}
    for r in rows:
        by_dx.setdefault(r["dx"], []).append(r)
    out_rows = []
    for dx, members in sorted(by_dx.items()):
        lesions = sorted({m["lesion_id"] for m in members})
        rng.shuffle(lesions)
        if per_class is not None:
            lesions = lesions[:per_class]
        n = len(lesions)
        n_test = max(1, int(round(fractions[2] * n)))
        n_val = max(1, int(round(fractions[1] * n)))
        split_of = {lid: ("test" if i < n_test else "val" if i < n_test + n_val else "train") for i, lid in enumerate(lesions)}
        for m in members:
            if m["lesion_id"] not in split_of:
                continue
            data = (ham_dir / "images" / f"{m['image_id']}.jpg").read_bytes()
            out_rows.append({
                "id": f"ham10000:{m['image_id']}", "source": "ham10000", "original_id": m["image_id"],
                "image": data, "image_format": "JPEG", "width": 224, "height": 224, "label": dx,
                "source_label": dx, "malignant": dx in MALIGNANT, "lesion_id": m["lesion_id"], "patient_id": None,
                "split": split_of[m["lesion_id"]], "split_origin": "dermaflux", "phash": None,
                "age": float(m["age"]) if m["age"] else None, "sex": m["sex"], "site": m["localization"],
                "skin_type": None, "diagnosis_method": m["dx_type"], "mm_per_pixel": None,
                "metadata_json": json.dumps({"dataset": m["dataset"]}),
            })
    _write_shards(out_rows, CORPUS_SCHEMA, out)
    (out / "manifest.json").write_text(json.dumps({"rows": len(out_rows), "built_by": "tests/evaluate_inputs.py"}))
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
        "width": img.width, "height": img.height, "label": label, "malignant": label in MALIGNANT,
        "split": "synthetic", "prompt": prompt, "attributes_json": None, "seed": index, "adapter": None,
        "num_inference_steps": None, "guidance_scale": None,
    }


def build_stand_in_synthetic(corpus: Path, out: Path, per_image: float = 1.0, seed: int = 0,
                             planted: dict[str, str] | None = None) -> Path:
    """Stand-in set from the corpus's *train* images (perturbed); `planted` maps corpus ids to how
    an undisguised copy is added: "exact" (same pixels) or "resized_jpeg" (96 px, JPEG q=70, back to PNG)."""
    rng = np.random.default_rng(seed)
    table = pq.read_table(sorted((corpus / "shards").glob("*.parquet"))).to_pylist()
    train = [r for r in table if r["split"] == "train"]
    count = int(round(per_image * len(train)))
    rows = []
    for i, idx in enumerate(rng.choice(len(train), size=count, replace=count > len(train))):
        r = train[idx]
        img = Image.open(io.BytesIO(r["image"])).convert("RGB")
        prompt = f"dermoscopy image of a {r['label']} lesion on the {r['site']} (stand-in: perturbed real image)"
        rows.append(synthetic_row(i, r["label"], perturb(img, rng), prompt))
    by_id = {r["id"]: r for r in table}
    for j, (cid, how) in enumerate((planted or {}).items()):
        r = by_id[cid]
        img = Image.open(io.BytesIO(r["image"])).convert("RGB")
        if how == "resized_jpeg":
            buf = io.BytesIO()
            img.resize((96, 96), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=70)
            img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        rows.append(synthetic_row(count + j, r["label"], img, f"planted {how} copy of {cid}", job="planted"))
    _write_shards(rows, SYNTHETIC_SCHEMA, out)
    (out / "manifest.json").write_text(json.dumps({"rows": len(rows), "stand_in": True}))
    return out
