"""`caption` stage: the captioned corpus from the curated one (see caption/schema.py for the layout).

One output shard per input shard, each written atomically with a done-marker, so a re-run skips
finished shards and a crashed run continues. The manifest reconciles input rows with captioned
and uncaptioned ones and summarises the measured attributes per label.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dermaflux.core import artifacts
from dermaflux.core.artifacts import parquet_shards
from dermaflux.caption.schema import CAPTION_SCHEMA
from dermaflux.caption.tone_summary import skin_tone_summary
from dermaflux.corpus.schema import with_melanoma

if TYPE_CHECKING:
    from dermaflux.config import DermaFluxConfig

log = logging.getLogger(__name__)

STAGE = "caption"
REQUIRED_COLUMNS = ("id", "image", "label")
# Settings that change neither captions nor attributes: a resume may change them.
RUNTIME_FIELDS = {"out", "force", "batch_size", "concurrency", "cpus_per_actor", "gpus_per_actor", "extract_cpus",
                  "extract_concurrency"}


def corpus_shards(corpus: Path) -> list[Path]:
    return parquet_shards(corpus, REQUIRED_COLUMNS, "corpus", "dermaflux curate")


def write_shard_output(out: Path, shard: Path, results: pd.DataFrame) -> dict:
    """Join the results onto the shard's own rows; write captions, uncaptioned reasons, then the marker."""
    table = with_melanoma(pq.read_table(shard))  # a corpus from before the melanoma column: from the label
    by_id = results.set_index("id")
    ids = table.column("id").to_pylist()
    missing = [i for i in ids if i not in by_id.index]
    if missing:
        raise RuntimeError(f"{shard}: no caption result for ids {missing[:5]}")
    rows = by_id.loc[ids]
    reasons = [r if isinstance(r, str) and r else None for r in rows["uncaptioned_reason"]]
    keep = np.array([r is None for r in reasons])
    captioned = table.filter(pa.array(keep))
    kept = rows[keep]
    for f in CAPTION_SCHEMA:
        if f.name not in captioned.column_names:
            if f.name in kept.columns:
                values = [list(v) for v in kept[f.name]] if f.name == "caption_flags" else list(kept[f.name])
                captioned = captioned.append_column(f, pa.array(values, type=f.type))
            else:  # a corpus column an older corpus lacks
                captioned = captioned.append_column(f, pa.nulls(len(captioned), type=f.type))
    captioned = captioned.select(CAPTION_SCHEMA.names).cast(CAPTION_SCHEMA)
    with artifacts.atomic_path(out / "shards" / shard.name) as tmp:
        pq.write_table(captioned, tmp)
    uncaptioned = [
        {"id": i, "shard": shard.name, "reason": r} for i, r in zip(ids, reasons) if r is not None
    ]
    artifacts.atomic_write_text(
        out / "uncaptioned" / f"{shard.stem}.jsonl", "".join(json.dumps(u) + "\n" for u in uncaptioned)
    )
    info = {"rows": len(ids), "captioned": int(keep.sum()), "uncaptioned": len(uncaptioned)}
    artifacts.mark_done(out, shard.stem, info)
    log.info("caption: %s done (%d captioned, %d uncaptioned)", shard.name, info["captioned"], info["uncaptioned"])
    return info


def attribute_summary(out: Path) -> dict:
    """Per label: how often a lesion mask was found and the mean ABCD figures (the closing-note numbers)."""
    tables = [pq.read_table(p, columns=["label", "source", "attributes_json", "caption_writer", "caption_flags"])
              for p in sorted((out / "shards").glob("*.parquet"))]
    if not tables:
        return {}
    frame = pa.concat_tables(tables).to_pandas()
    per_label: dict[str, dict] = {}
    for label, group in frame.groupby("label"):
        attrs = [json.loads(a) for a in group["attributes_json"]]
        measured = [a for a in attrs if "asymmetry" in a]

        def mean(key, rows=measured):
            values = [r[key] for r in rows if r.get(key) is not None]
            return round(float(np.mean(values)), 4) if values else None

        per_label[label] = {
            "images": len(attrs),
            "mask_found_rate": round(len(measured) / len(attrs), 4),
            "mean_asymmetry": mean("asymmetry"),
            "mean_asymmetry_axes": mean("asymmetry_axes"),
            "mean_border_irregularity": mean("border_irregularity"),
            "mean_border_notches": mean("border_notches"),
            "mean_colour_count": round(float(np.mean([len(a.get("colours", [])) for a in measured])), 4) if measured else None,
            "colour_presence": {c: round(n / max(len(measured), 1), 4)
                                for c, n in Counter(c for a in measured for c in a.get("colours", [])).most_common()},
            "mean_diameter_px": mean("diameter_px"),
        }
    flags = Counter(f for row_flags in frame["caption_flags"] for f in row_flags)
    return {"per_label": per_label, "writers": dict(Counter(frame["caption_writer"])), "flags": dict(flags),
            "skin_tone": skin_tone_summary(frame)}


def finalize(out: Path, shards: list[Path], cfg: DermaFluxConfig) -> dict:
    lines = []
    for shard in shards:
        path = out / "uncaptioned" / f"{shard.stem}.jsonl"
        lines.extend(path.read_text().splitlines() if path.exists() else [])
    artifacts.atomic_write_text(out / "uncaptioned.jsonl", "".join(line + "\n" for line in lines))
    markers = {s.stem: artifacts.read_json(artifacts.marker_path(out, s.stem)) for s in shards}
    rows = sum(m["rows"] for m in markers.values())
    captioned = sum(m["captioned"] for m in markers.values())
    reasons = Counter(json.loads(line)["reason"].split(":")[0] for line in lines)
    manifest = {
        "stage": STAGE,
        "corpus": str(cfg.caption.corpus),
        "writer": cfg.caption.writer,
        "model": cfg.caption.model if cfg.caption.writer == "llm" else None,
        "shards": {s.name: markers[s.stem] for s in shards},
        "rows": rows,
        "captioned": captioned,
        "uncaptioned": len(lines),
        "uncaptioned_reasons": dict(reasons),
        **attribute_summary(out),
    }
    if rows != captioned + len(lines):
        raise RuntimeError(f"{out}: {rows} corpus rows but {captioned} captioned + {len(lines)} uncaptioned")
    artifacts.atomic_write_json(out / "manifest.json", manifest)
    return manifest


def run(cfg: DermaFluxConfig) -> dict:
    from dermaflux.caption.ray_pipeline import caption_shards

    ccfg = cfg.caption
    corpus, out = Path(ccfg.corpus), Path(ccfg.out)
    shards = corpus_shards(corpus)
    run_fingerprint = artifacts.fingerprint(
        ccfg.model_dump(exclude=RUNTIME_FIELDS), [(s.name, s.stat().st_size) for s in shards]
    )
    resumed = artifacts.claim_run(cfg, out, STAGE, run_fingerprint, force=ccfg.force, inputs=[corpus])
    pending = [s for s in shards if not artifacts.is_done(out, s.stem)]
    log.info("caption: %d corpus shards, %d to do (%s)", len(shards), len(pending), "resuming" if resumed else "fresh")
    if pending:
        caption_shards(ccfg, pending, lambda shard, results: write_shard_output(out, shard, results),
                       max_pixels=cfg.curate.max_pixels)
    manifest = finalize(out, shards, cfg)
    if manifest["rows"] and not manifest["captioned"]:
        reasons = ", ".join(f"{n} {why}" for why, n in manifest["uncaptioned_reasons"].items())
        raise artifacts.NothingKept(f"caption: none of {manifest['rows']} corpus images was captioned ({reasons}); "
                                    f"see {out / 'uncaptioned.jsonl'}")
    return {
        "out": str(out),
        "resumed": resumed,
        "shards": len(shards),
        "processed_shards": len(pending),
        "rows": manifest["rows"],
        "captioned": manifest["captioned"],
        "uncaptioned": manifest["uncaptioned"],
        "writers": manifest.get("writers", {}),
        "flags": manifest.get("flags", {}),
    }
