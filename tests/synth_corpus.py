"""A small corpus in CORPUS_SCHEMA from real HAM10000 images (for `bring_to` targets)."""

from __future__ import annotations

import csv
from pathlib import Path


def build_small_corpus(ham_dir: Path, out: Path, per_label: dict[str, int], test_per_label: int = 1) -> Path:
    """`per_label[dx]` train rows (+ `test_per_label` test rows) of each listed diagnosis."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dermaflux.lesion import taxonomy
    from dermaflux.corpus.schema import CORPUS_SCHEMA

    wanted = {dx: n + test_per_label for dx, n in per_label.items()}
    rows = []
    with open(ham_dir / "HAM10000_metadata.csv", newline="") as fh:
        for meta in csv.DictReader(fh):
            dx = meta["dx"]
            image = ham_dir / "images" / f"{meta['image_id']}.jpg"
            if wanted.get(dx, 0) == 0 or not image.exists():
                continue
            wanted[dx] -= 1
            rows.append({
                "id": f"ham10000:{meta['image_id']}", "source": "ham10000", "original_id": meta["image_id"],
                "image": image.read_bytes(), "image_format": "jpeg", "width": 224, "height": 224, "label": dx,
                "source_label": dx, "malignant": taxonomy.is_malignant(dx), "lesion_id": meta["lesion_id"],
                "split": "test" if wanted[dx] < test_per_label else "train", "split_origin": "dermaflux",
                "sex": meta["sex"], "site": meta["localization"],
            })
    (out / "shards").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=CORPUS_SCHEMA), out / "shards" / "part-00000.parquet")
    return out
