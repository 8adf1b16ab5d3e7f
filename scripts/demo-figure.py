"""The README's picture of a demo run: one real corpus image (top) and one synthetic image (bottom) per class.

    .venv/bin/python scripts/demo-figure.py runs/demo docs/tiny-demo-output.png
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

TILE = 96


def first_per_label(folder: Path, split: str | None) -> dict[str, bytes]:
    table = pa.concat_tables([pq.read_table(p, columns=["id", "label", "split", "image"])
                              for p in sorted((folder / "shards").glob("*.parquet"))])
    if split is not None:
        table = table.filter(pa.compute.equal(table["split"], split))
    chosen: dict[str, bytes] = {}
    for row in table.sort_by("id").to_pylist():
        chosen.setdefault(row["label"], row["image"])
    return chosen


def tile(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB").resize((TILE, TILE), Image.Resampling.BICUBIC)


def main(run: Path, out: Path) -> None:
    real = first_per_label(run / "corpus", "test")
    synthetic = first_per_label(run / "synthetic", None)
    labels = sorted(set(real) & set(synthetic))
    label_h, gap = 16, 4
    sheet = Image.new("RGB", (len(labels) * (TILE + gap) - gap, label_h + 2 * TILE + gap), "white")
    draw = ImageDraw.Draw(sheet)
    for column, label in enumerate(labels):
        x = column * (TILE + gap)
        draw.text((x + 4, 2), label, fill="black")
        sheet.paste(tile(real[label]), (x, label_h))
        sheet.paste(tile(synthetic[label]), (x, label_h + TILE + gap))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.quantize(colors=256).save(out, optimize=True)  # a palette: a third of the bytes, no visible loss at this size
    print(f"{out}: {len(labels)} classes, {out.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
