"""Generation targets over label x subgroup: `--targets "mel:skin_tone=brown:200,nv:300"` and
`--balance skin_tone` (pure python; reading a corpus' subgroups needs pyarrow, and measuring a skin tone
the caption extractor).

A cell is (label, attribute, value, count): the first `count` images of that label in the job's plan
request that subgroup (the rest of the label's images keep the sampled attributes), so a cell's
images keep their ids, seeds and shards across resumes. The request reaches the image through the
caption the adapter was trained with: `caption_from_attributes` says "brown skin" for skin_tone=brown,
as the caption stage writes it for a training image whose measured ITA category is brown.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from dermaflux.lesion.attributes import LesionAttributes
from dermaflux.lesion.skin_tone import ITA_CATEGORIES
from dermaflux.synth.requests import RequestError

SUBGROUP_ATTRIBUTES = ("skin_tone", "sex", "site")
Cell = tuple[str, str, str, int]  # (label, attribute, value, count)
_TARGET = re.compile(r"^(?P<label>[A-Za-z]+)(?::(?P<attribute>[a-z_]+)=(?P<value>[A-Za-z0-9 _-]+))?:(?P<count>\d+)$")


def parse_targets(text: str, field: str = "synth.targets") -> tuple[dict[str, int], list[Cell]]:
    """"mel:skin_tone=brown:200,nv:300" -> ({mel: 200, nv: 300}, [(mel, skin_tone, brown, 200)])."""
    plain: dict[str, int] = {}
    cells: list[Cell] = []
    for i, part in enumerate(p.strip() for p in text.split(",") if p.strip()):
        match = _TARGET.match(part)
        if not match:
            raise RequestError(f"{field}[{i}]", f"{part!r}: expected LABEL:COUNT or LABEL:ATTRIBUTE=VALUE:COUNT "
                               "(e.g. mel:skin_tone=brown:200)")
        label, count = match["label"].lower(), int(match["count"])
        if match["attribute"] is None:
            plain[label] = plain.get(label, 0) + count
        else:
            cells.append(check_cell(label, match["attribute"], match["value"].strip(), count, f"{field}[{i}]"))
    return plain, cells


def check_cell(label: str, attribute: str, value: str, count: int, field: str) -> Cell:
    if attribute not in SUBGROUP_ATTRIBUTES:
        raise RequestError(field, f"attribute {attribute!r}: a target may name {', '.join(SUBGROUP_ATTRIBUTES)}")
    try:  # the same validation a request's attributes get (skin tone category, sex words)
        LesionAttributes(diagnosis=label, **{attribute: value})
    except ValueError as err:
        raise RequestError(field, f"{label}:{attribute}={value}: {str(err).splitlines()[-1].strip()}") from None
    return (label, attribute, value, count)


def label_totals(plain: dict[str, int], cells: list[Cell]) -> dict[str, int]:
    """Images per label: its plain count plus its cells'."""
    totals = dict(plain)
    for label, _, _, count in cells:
        totals[label] = totals.get(label, 0) + count
    return dict(sorted(totals.items()))


def cell_at(cells: list[Cell] | tuple, label: str, position: int) -> tuple[str, str] | None:
    """(attribute, value) image `position` of `label` is asked for, or None: the label's cells occupy
    its first positions, in the order given."""
    first = 0
    for cell_label, attribute, value, count in cells:
        if cell_label != label:
            continue
        if first <= position < first + count:
            return attribute, value
        first += count
    return None


def apply_cell(cells: list[Cell] | tuple, label: str, position: int, attrs: LesionAttributes) -> LesionAttributes:
    asked = cell_at(cells, label, position)
    if asked is None:
        return attrs
    return LesionAttributes.model_validate({**attrs.model_dump(exclude_none=True), asked[0]: asked[1]})


def cell_counts(cells: list[Cell] | tuple, images: list[dict]) -> dict[str, dict]:
    """The manifest's per-cell counts: asked for, and written (images whose attributes say that subgroup)."""
    written = Counter()
    for image in images:
        for attribute in {c[1] for c in cells}:
            if image["attributes"].get(attribute) is not None:
                written[f"{image['label']}:{attribute}={image['attributes'][attribute]}"] += 1
    asked = Counter()
    for label, attribute, value, count in cells:
        asked[f"{label}:{attribute}={value}"] += count
    return {key: {"asked": asked[key], "written": written[key]} for key in sorted(asked)}


def corpus_subgroups(corpus_dir: str | Path, attribute: str, split: str = "train") -> dict[str, Counter]:
    """{label: Counter(subgroup value)} over a corpus split. Skin tone: the `skin_tone` of a captioned
    corpus' attributes, else measured from the image (caption.extract, about 0.2 s per 224 px image)."""
    import pyarrow.parquet as pq

    counts: dict[str, Counter] = {}
    for shard in sorted((Path(corpus_dir) / "shards").glob("*.parquet")):
        table = pq.read_table(shard)
        for row in table.to_pylist():
            if row["split"] != split or row.get("label") is None:
                continue
            value = _skin_tone(row) if attribute == "skin_tone" else row.get(attribute)
            if value:
                counts.setdefault(row["label"], Counter())[value] += 1
    return counts


def _skin_tone(row: dict) -> str | None:
    if row.get("attributes_json"):
        return json.loads(row["attributes_json"]).get("skin_tone")
    from dermaflux.caption.extract import decode_image, measure_lesion
    from dermaflux.lesion.skin_tone import ita_category

    ita = measure_lesion(decode_image(row["image"])).ita
    return None if ita is None else ita_category(ita)


def balance_cells(counts: dict[str, Counter], attribute: str) -> list[Cell]:
    """Per label, every subgroup its real images show, topped up to the label's best-represented one.
    A subgroup the label has no real image of is not invented here (ask for it with --targets)."""
    order = {v: i for i, v in enumerate(ITA_CATEGORIES)} if attribute == "skin_tone" else {}
    cells = []
    for label in sorted(counts):
        best = max(counts[label].values())
        for value in sorted(counts[label], key=lambda v: (order.get(v, len(order)), v)):
            if best - counts[label][value] > 0:
                cells.append((label, attribute, value, best - counts[label][value]))
    return cells
