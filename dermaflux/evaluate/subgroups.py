"""Results by subgroup: for whom do the added images help (pure numpy + pyarrow, no Ray, no torch).

Every test image gets its subgroups: skin tone (the ITA category measured from its pixels, see
lesion/skin_tone.py), Fitzpatrick type (where the source labels it), body site, sex, age band,
source and modality. Then, from the saved per-image predictions of the grid:

- per cell group and test set, AUROC and balanced accuracy (at the cell's validation threshold) in
  each subgroup, the mean over seeds (`levels`);
- per paired comparison of the synthetic arm (with vs without added images), the difference in each
  subgroup with its paired-bootstrap CI over test images within class and seeds (paired.compare_pair,
  the same procedure as the whole test set), unadjusted: these are descriptive, not a test family;
- per comparison and attribute, the worst resolvable subgroup's AUROC without added images and its
  change.

A subgroup with fewer than `evaluate.subgroup_min_per_class` test images of some class is marked
"not resolvable" and carries its counts only: an AUROC over a handful of positives has a CI too wide
to say anything, and printing it would invite reading noise as a disparity.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from dermaflux.core.artifacts import atomic_write_json, read_json
from dermaflux.corpus.config import DEFAULT_MAX_PIXELS
from dermaflux.evaluate import paired
from dermaflux.evaluate.config import EvaluateConfig
from dermaflux.evaluate.data import INTERNAL
from dermaflux.evaluate.metrics import PAIRED_METRICS
from dermaflux.lesion.skin_tone import ITA_CATEGORIES

log = logging.getLogger(__name__)

ATTRIBUTES = ("skin_tone", "fitzpatrick", "site", "sex", "age_band", "source", "modality")
ATTRIBUTE_NAMES = {"skin_tone": "skin tone (ITA)", "fitzpatrick": "Fitzpatrick type", "site": "body site",
                   "sex": "sex", "age_band": "age band", "source": "source", "modality": "modality"}
UNKNOWN = "unknown"
AGE_BANDS = ((30, "<30"), (45, "30-44"), (60, "45-59"), (75, "60-74"), (200, "75+"))
# Imaging modality of the sources DermaFlux reads; a corpus row may also say it in metadata_json.
MODALITY_BY_SOURCE = {"ham10000": "dermoscopic", "isic": "dermoscopic", "dermamnist": "dermoscopic",
                      "pad-ufes-20": "clinical", "ddi": "clinical"}
CACHE_FILE = "subgroup_attributes.json"


def age_band(age) -> str:
    if age is None or not np.isfinite(age):
        return UNKNOWN
    return next(name for upper, name in AGE_BANDS if age < upper)


def _modality(row: dict) -> str:
    try:
        stated = json.loads(row.get("metadata_json") or "{}").get("modality")
    except ValueError:
        stated = None
    return str(stated) if stated else MODALITY_BY_SOURCE.get(str(row.get("source")).lower(), UNKNOWN)


def _measured_tone(row: dict, max_pixels: int) -> str:
    """The ITA category: from a captioned corpus' attributes when present, else measured here."""
    from dermaflux.caption.extract import decode_image, measure_lesion
    from dermaflux.lesion.skin_tone import ita_category

    if row.get("attributes_json"):
        tone = json.loads(row["attributes_json"]).get("skin_tone")
        return tone or UNKNOWN
    try:
        ita = measure_lesion(decode_image(row["image"], max_pixels)).ita
    except Exception as err:  # an unreadable image was already refused by read_corpus; be safe anyway
        log.warning("subgroups: no skin tone for %s (%s)", row.get("id"), err)
        return UNKNOWN
    return UNKNOWN if ita is None else ita_category(ita)


def caption_tones(captions: Path | None, ids: set[str]) -> dict[str, str]:
    """{image id: ITA category} that the caption stage measured (its attributes), for the `ids` it has."""
    tones: dict[str, str] = {}
    for shard in sorted((Path(captions) / "shards").glob("*.parquet")) if captions else []:
        table = pq.read_table(shard, columns=["id", "attributes_json"])
        for row_id, attributes in zip(table.column("id").to_pylist(), table.column("attributes_json").to_pylist()):
            if row_id in ids:
                tones[row_id] = json.loads(attributes or "{}").get("skin_tone") or UNKNOWN
    return tones


def image_groups(corpus: Path, ids: set[str], cache: Path | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, captions: Path | None = None,
                 measure_tone: bool = True) -> dict[str, dict[str, str]]:
    """{image id: {attribute: subgroup}} for the `ids` of the corpus; unknowns are "unknown". The
    skin tone comes from `captions` where it holds the image, else it is measured once per image
    (not at all unless `measure_tone`) and kept in `cache` (a later report reuses it)."""
    known = read_json(cache) if cache is not None and cache.exists() else {}
    captioned = caption_tones(captions, ids)
    to_measure = len(set(ids) - set(known) - set(captioned)) if measure_tone else 0
    if to_measure:
        log.info("subgroups: measuring the skin tone of %d test images on the driver (about 0.15 s each; "
                 "evaluate.captions gives the caption stage's measurements instead)", to_measure)
    out: dict[str, dict[str, str]] = {}
    for shard in sorted((Path(corpus) / "shards").glob("*.parquet")):
        table = pq.read_table(shard)
        id_column = table.column("id").to_pylist()
        keep = [i for i, row_id in enumerate(id_column) if row_id in ids]
        for row in table.take(keep).to_pylist() if keep else []:
            if row["id"] in known:
                out[row["id"]] = known[row["id"]]
                continue
            out[row["id"]] = {
                "skin_tone": captioned.get(row["id"])
                or (_measured_tone(row, max_pixels) if measure_tone else UNKNOWN),
                "fitzpatrick": row.get("skin_type") or UNKNOWN,
                "site": row.get("site") or UNKNOWN,
                "sex": row.get("sex") if row.get("sex") in ("male", "female") else UNKNOWN,
                "age_band": age_band(row.get("age")),
                "source": row.get("source") or UNKNOWN,
                "modality": _modality(row),
            }
    if cache is not None:
        atomic_write_json(cache, {**known, **out})
    return out


def _subset(arm: paired.Arm, keep: np.ndarray) -> paired.Arm:
    return paired.Arm(arm.ids[keep], arm.targets[keep], arm.probs[keep], arm.threshold)


def _counts(arm: paired.Arm, classes: list[str]) -> dict[str, int]:
    return {name: int((arm.targets == k).sum()) for k, name in enumerate(classes)}


def _level(arms: list[paired.Arm]) -> dict:
    """AUROC and balanced accuracy on these images, mean over the seeds' arms."""
    ones = np.ones((1, len(arms[0].targets)))
    return {m.key: float(np.mean([m.weighted(a.targets, paired._scores(a, m.paired_input), ones)[0] for a in arms]))
            for m in PAIRED_METRICS}


def _values(groups: dict[str, dict[str, str]], ids: np.ndarray, attribute: str) -> np.ndarray:
    return np.array([groups.get(i, {}).get(attribute, UNKNOWN) for i in ids], dtype=object)


def _order(attribute: str, values) -> list[str]:
    rank = {c: i for i, c in enumerate(ITA_CATEGORIES)} if attribute == "skin_tone" else {}
    return sorted(set(values), key=lambda v: (v == UNKNOWN, rank.get(v, len(rank)), str(v)))


def subgroup_rows(key: dict, base: list[paired.Arm], treated: list[paired.Arm] | None, classes: list[str],
                  groups: dict[str, dict[str, str]], cfg: EvaluateConfig) -> list[dict]:
    """One row per (attribute, subgroup) of one comparison (or of one real-only cell group when
    `treated` is None): counts always; metrics, and with `treated` the paired differences, only
    when every class has at least `subgroup_min_per_class` test images in the subgroup."""
    rows = []
    for attribute in cfg.subgroup_attributes:
        values = _values(groups, base[0].ids, attribute)
        for value in _order(attribute, values):
            keep = values == value
            sub_base = [_subset(a, keep) for a in base]
            counts = _counts(sub_base[0], classes)
            row = {**key, "attribute": attribute, "subgroup": value, "images": int(keep.sum()), "per_class": counts,
                   "resolvable": min(counts.values()) >= cfg.subgroup_min_per_class}
            if row["resolvable"]:
                row["without"] = _level(sub_base)
                if treated is not None:
                    sub_treated = [_subset(a, keep) for a in treated]
                    row["with"] = _level(sub_treated)
                    row.update({m: v for m, v in paired.compare_pair(sub_base, sub_treated, cfg).items()
                                if m in {pm.key for pm in PAIRED_METRICS}})
            rows.append(row)
    return rows


def _groups_to_score(cells: list[dict]) -> list[tuple[dict, list[tuple[dict, dict | None]]]]:
    """(key, [(baseline cell, treated cell or None) per seed]): the synthetic arm's pairs, and the
    real-only cell groups that have none (a grid without a synthetic set)."""
    out, paired_bases = [], set()
    for (task, model, size, arm, ratio, against), pairs in sorted(paired._pairs(cells).items(),
                                                                  key=lambda kv: str(kv[0])):
        if arm != "synthetic" or against != paired.REAL_ONLY:
            continue
        paired_bases.add((task, model, size))
        out.append(({"task": task, "model": model, "real_size": size, "ratio": ratio},
                    sorted(pairs, key=lambda bc: bc[0]["seed"])))
    alone: dict[tuple, list] = defaultdict(list)
    for c in cells:
        if c["ratio"] == 0 and not c["synthetic_only"] and c.get("arm", "synthetic") == "synthetic":
            if (c["task"], c["model"], c["real_size"]) not in paired_bases:
                alone[(c["task"], c["model"], c["real_size"])].append((c, None))
    for (task, model, size), pairs in sorted(alone.items(), key=lambda kv: str(kv[0])):
        out.append(({"task": task, "model": model, "real_size": size, "ratio": 0.0},
                    sorted(pairs, key=lambda bc: bc[0]["seed"])))
    return out


def worst_subgroups(rows: list[dict]) -> list[dict]:
    """Per comparison (or cell group), test set and attribute: the resolvable, known subgroup with the
    lowest AUROC without added images, and its change."""
    by_key: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["resolvable"] and r["subgroup"] != UNKNOWN:
            by_key[(r["task"], r["model"], r["real_size"], r["ratio"], r["test_set"], r["attribute"])].append(r)
    worst = []
    for members in by_key.values():
        if len(members) < 2:  # one subgroup: nothing to be worst among
            continue
        w = min(members, key=lambda r: r["without"]["auroc"])
        worst.append({k: w[k] for k in ("task", "model", "real_size", "ratio", "test_set", "attribute", "subgroup",
                                         "images", "per_class", "without")}
                     | ({"with": w["with"], "auroc": w["auroc"]} if "with" in w else {}))
    return worst


def analyse(cells: list[dict], predictions: dict[str, dict], groups: dict[str, dict[str, str]],
            cfg: EvaluateConfig) -> dict:
    """results.json's `subgroups`: every row, the worst subgroups, and how the test images spread."""
    rows, coverage = [], {}
    for key, pairs in _groups_to_score(cells):
        classes = list(pairs[0][0]["classes"])
        for test_set in sorted(pairs[0][0]["test_sets"], key=lambda name: (name != INTERNAL, name)):
            base = [paired.arm_of(b, predictions[b["id"]], test_set) for b, _ in pairs]
            treated = None if pairs[0][1] is None else [paired.arm_of(t, predictions[t["id"]], test_set)
                                                         for _, t in pairs]
            rows += subgroup_rows({**key, "test_set": test_set, "seeds": len(pairs)}, base, treated, classes,
                                  groups, cfg)
            coverage.setdefault(test_set, {a: {v: int((_values(groups, base[0].ids, a) == v).sum())
                                               for v in _order(a, _values(groups, base[0].ids, a))}
                                           for a in cfg.subgroup_attributes})
    return {"min_per_class": cfg.subgroup_min_per_class, "attributes": list(cfg.subgroup_attributes),
            "coverage": coverage, "rows": rows, "worst": worst_subgroups(rows)}


def scored_image_ids(cells: list[dict], predictions: dict[str, dict]) -> set[str]:
    return {i for c in cells for i, s in zip(predictions[c["id"]]["id"], predictions[c["id"]]["split"]) if s == "test"}
