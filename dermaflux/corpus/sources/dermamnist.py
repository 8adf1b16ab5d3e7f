"""MedMNIST DermaMNIST: one `.npz` with train/val/test `_images` (N,H,W,3 uint8) and `_labels` (N,1).

PATH is the .npz or a folder holding `dermamnist*.npz` (pick one with `size=28|64|128|224`).
The official splits are kept as published (`curate.official_splits: keep`), and audited: they are
reported to put one lesion in train and test (Abhishek et al. 2025, DermaMNIST-C/E).
Labels 0..6 in MedMNIST order: akiec, bcc, bkl, df, mel, nv, vasc.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from dermaflux.lesion import taxonomy
from dermaflux.corpus.sources import register
from dermaflux.corpus.sources.base import Reject, SourceError, SourceIndex, SourceRecord, SourceSpec

SPLITS = ("train", "val", "test")
NPZ_SEPARATOR = "::"


def find_npz(root: Path, size: str | None) -> Path:
    if root.is_file():
        return root
    hits = sorted(root.glob("dermamnist*.npz"))
    if size:
        suffix = "" if size == "28" else f"_{size}"
        hits = [p for p in hits if p.stem == f"dermamnist{suffix}"]
    if len(hits) != 1:
        found = ", ".join(p.name for p in sorted(root.glob("dermamnist*.npz"))) or "none"
        wanted = f"dermamnist{'' if size in (None, '28') else '_' + size}.npz" if size else "one dermamnist*.npz"
        raise SourceError(f"dermamnist: expected {wanted} under {root} (pick one with size=28|64|128|224); found: {found}")
    return hits[0]


def npz_locator(path: Path, array: str, index: int) -> str:
    return f"{path}{NPZ_SEPARATOR}{array}{NPZ_SEPARATOR}{index}"


@register("dermamnist")
def read(spec: SourceSpec) -> SourceIndex:
    path = find_npz(Path(spec.path), spec.options.get("size"))
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise SourceError(f"dermamnist: {path} is not a readable .npz ({err})") from err
    with archive:
        present = [s for s in SPLITS if f"{s}_images" in archive.files]
        if not present:
            raise SourceError(f"dermamnist: {path} has no train_images/val_images/test_images arrays "
                              f"(arrays: {', '.join(archive.files)})")
        labels = {}
        for split in present:
            if f"{split}_labels" not in archive.files:
                raise SourceError(f"dermamnist: {path} has {split}_images but no {split}_labels")
            labels[split] = np.asarray(archive[f"{split}_labels"]).reshape(-1)
    records, rejects, total = [], [], 0
    for split in present:
        for index, raw in enumerate(labels[split]):
            total += 1
            original_id = f"{split}_{index}"
            source_label = str(int(raw))
            label = taxonomy.map_label("dermamnist", source_label)
            if label is None:
                rejects.append(Reject(spec.name, f"{path}::{split}_labels", index, original_id,
                                      f"unknown label {source_label} (expected 0..6)"))
                continue
            records.append(SourceRecord(
                source=spec.name, original_id=original_id, file=f"{path}::{split}_labels", row=index,
                image_path=npz_locator(path, f"{split}_images", index), source_label=source_label, label=label,
                group_namespace=spec.name, official_split=split,
                metadata_json=json.dumps({"npz": path.name}),
            ))
    published = {split: len(labels[split]) for split in present}
    return SourceIndex(spec, records, rejects, total, [str(path)], published)
