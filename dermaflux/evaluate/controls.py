"""The built-in controls: synthetic-set stand-ins made from the real training pool.

- real-extra (positive control): real train images passed in as if they were synthetic. Adding
  real images of the same distribution must help; if the grid cannot see that, it cannot see a
  synthetic gain of that size either.
- shuffled (negative control): the same images with their labels permuted. Adding them must not
  help; a "gain" here is the harness's false-positive rate in person.
- matched (positive control at the synthetic set's class mix; only with a synthetic set): real-extra
  images drawn to the class counts the synthetic set gives the synthetic cell of the same seed, size
  and ratio. A synthetic set balanced over classes moves the training set's positive share (the
  melanoma task from 8 % to 14 % at 1:4), so part of a synthetic "gain" may be more positives rather
  than these images; the synthetic set's verdict is also stated against this control. Where a
  class's real pool runs out, its images are used again ("duplicated real", counted per cell): that
  share of the control shows the class mix alone, without new images.

A cell never receives a control image made from one of its own real images (`ImageTable.origin`,
checked in `data.assemble_cell`). Both sets are also written in the synthetic-set format
(`controls/<name>/shards/*.parquet` + `manifest.json` with the origin of every row), so they can
be inspected or passed to `--synthetic` like any other set.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dermaflux.core import artifacts
from dermaflux.evaluate.data import ImageTable, read_image_bytes
from dermaflux.lesion import taxonomy

MATCHED = "matched"


@dataclass(frozen=True)
class ControlArm:
    name: str
    label: str  # the added images, as the report names them
    role: str
    expected: int  # +1: must help (a positive control); 0: must not help (a negative control)
    needs_synthetic: bool = False  # the matched control copies the synthetic set's class mix

    @property
    def words(self) -> str:
        return f"{self.role} ({self.label})"


CONTROL_ARMS = (
    ControlArm("real-extra", "real-extra", "positive control", 1),
    ControlArm("shuffled", "shuffled", "negative control", 0),
    ControlArm(MATCHED, "matched real", "positive control at the synthetic set's class mix", 1, needs_synthetic=True),
)
BY_NAME = {arm.name: arm for arm in CONTROL_ARMS}
ARMS = tuple(arm.name for arm in CONTROL_ARMS)
SHUFFLE_SEED = 0  # one fixed permutation: every cell and seed sees the same wrong labels
ROWS_PER_SHARD = 1000


@dataclass(frozen=True)
class ControlSet:
    """Rows `index` of the real table, claimed to have `labels`."""

    name: str
    index: np.ndarray
    labels: np.ndarray


def control_arms(has_synthetic: bool) -> tuple[str, ...]:
    """The control arms a grid runs: the matched one only beside a synthetic set (no mix to copy otherwise)."""
    return tuple(arm.name for arm in CONTROL_ARMS if has_synthetic or not arm.needs_synthetic)


def build_controls(real: ImageTable) -> dict[str, ControlSet]:
    """real-extra and shuffled over the whole real train pool (cells exclude their own images); the
    matched control draws from the real-extra set, so it has no set of its own on disk."""
    pool = np.flatnonzero(real.split == "train")
    labels = real.labels[pool]
    shuffled = np.random.default_rng(SHUFFLE_SEED).permutation(labels)
    return {"real-extra": ControlSet("real-extra", pool, labels), "shuffled": ControlSet("shuffled", pool, shuffled)}


def control_id(name: str, corpus_id: str) -> str:
    return f"control:{name}:{corpus_id}"


def control_table(real: ImageTable, control: ControlSet) -> ImageTable:
    """The control as a synthetic ImageTable (split "synthetic"; origin = the corpus ids)."""
    rows = real.take(control.index)
    labels = np.array(control.labels, dtype=object)
    return ImageTable(
        ids=np.array([control_id(control.name, i) for i in rows.ids], dtype=object),
        images=rows.images, labels=labels,
        malignant=np.array([taxonomy.is_malignant(lab) for lab in labels], dtype=object),
        split=np.full(len(rows), "synthetic", dtype=object), phash=None, grey=rows.grey,
        captions=[_prompt(control.name, lab, i) for lab, i in zip(labels, rows.ids)],
        source=np.full(len(rows), f"control:{control.name}", dtype=object),
        attributes=[json.dumps({"diagnosis": lab}) for lab in labels],
        origin=rows.ids.copy(),
    )


def _prompt(name: str, label: str, corpus_id: str) -> str:
    return f"{label} (control {name}: real train image {corpus_id})"


def write_control_set(folder: Path, corpus: Path, real: ImageTable, control: ControlSet) -> Path:
    """`folder` as a synthetic set (SYNTHETIC_SCHEMA shards + manifest.json); skipped when done."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dermaflux.synth.schema import SYNTHETIC_SCHEMA

    if artifacts.is_done(folder, "control-set"):
        return folder
    table = control_table(real, control)
    blobs = read_image_bytes(corpus, set(table.origin.tolist()))
    rows = [_row(table, i, blobs[table.origin[i]]) for i in range(len(table))]
    for start in range(0, len(rows), ROWS_PER_SHARD):
        path = folder / "shards" / f"part-{start // ROWS_PER_SHARD:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        with artifacts.atomic_path(path) as tmp:
            pq.write_table(pa.Table.from_pylist(rows[start : start + ROWS_PER_SHARD], schema=SYNTHETIC_SCHEMA), tmp)
    counts: dict[str, int] = {}
    for label in table.labels:
        counts[label] = counts.get(label, 0) + 1
    artifacts.atomic_write_json(folder / "manifest.json", {
        "control": control.name, "stand_in": True, "generator": f"control {control.name}: real train images"
        + (" with permuted labels" if control.name == "shuffled" else ""), "counts": dict(sorted(counts.items())),
        "total": len(rows), "origin": dict(zip(table.ids.tolist(), table.origin.tolist())),
    })
    artifacts.mark_done(folder, "control-set", {"rows": len(rows)})
    return folder


def _row(table: ImageTable, i: int, data: bytes) -> dict:
    with Image.open(io.BytesIO(data)) as img:
        fmt, (width, height) = img.format, img.size
    return {
        "id": table.ids[i], "image": data, "image_format": fmt, "width": width, "height": height,
        "label": table.labels[i], "malignant": bool(table.malignant[i]), "split": "synthetic",
        "prompt": table.captions[i], "attributes_json": table.attributes[i], "seed": 0, "adapter": None,
        "num_inference_steps": None, "guidance_scale": None,
    }


def with_origin(table: ImageTable, manifest: dict) -> ImageTable:
    """A synthetic set read from disk whose manifest names each row's corpus image (a written
    control set) keeps that link, so a cell still never receives its own real images."""
    origin = manifest.get("origin")
    if origin:
        missing = [i for i in table.ids if i not in origin]
        if missing:
            raise ValueError(f"synthetic manifest.json: 'origin' lacks rows {missing[:3]}")
        table.origin = np.array([origin[i] for i in table.ids], dtype=object)
    return table
