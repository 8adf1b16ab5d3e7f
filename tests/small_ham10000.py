"""A HAM10000-layout folder holding a few real images per diagnosis, for jobs and pipeline tests."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path


def small_ham10000(ham_dir: Path, out: Path, per_class: int = 6) -> Path:
    """Copy the first `per_class` images of each diagnosis (by image id) to `out` (tmp, never the repo)."""
    with open(ham_dir / "HAM10000_metadata.csv") as fh:
        reader = csv.DictReader(fh)
        fields, rows = reader.fieldnames, sorted(reader, key=lambda r: r["image_id"])
    kept, per_dx = [], {}
    for row in rows:
        if per_dx.get(row["dx"], 0) < per_class:
            per_dx[row["dx"]] = per_dx.get(row["dx"], 0) + 1
            kept.append(row)
    (out / "images").mkdir(parents=True)
    for row in kept:
        shutil.copy2(ham_dir / "images" / f"{row['image_id']}.jpg", out / "images")
    with open(out / "HAM10000_metadata.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
    return out
