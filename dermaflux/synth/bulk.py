"""Bulk augmentation jobs: a deterministic plan, shard-by-shard atomic writes, resume, manifest.

A job is fixed by its spec (job id, per-class targets, settings, seed, shard size, model and
adapter). Image `i` of class `c` always gets the same seed, attributes and prompt, and lands in
the same shard; a shard is written atomically and then marked done. So a repeated or restarted
job skips finished shards and never writes an image twice, and a crash mid-shard loses only
that shard's work. Both the Serve bulk endpoint and `dermaflux generate` run jobs through here.
Pure python + pyarrow: the caller passes the function that turns requests into PNG bytes.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dermaflux.core import artifacts
from dermaflux.lesion.attributes import ABCD_COLOURS, LesionAttributes
from dermaflux.lesion.captions import caption_from_attributes
from dermaflux.lesion import taxonomy
from dermaflux.synth.requests import SampleRequest, Settings, derive_seed
from dermaflux.synth.schema import SYNTHETIC_SCHEMA

log = logging.getLogger(__name__)

STAGE = "synth"
SPEC_FILE = "job.json"
MANIFEST_FILE = "manifest.json"
SHARD_DIR = "shards"

# HAM10000 `localization` values in caption words: where synthetic lesions are placed.
_SITES = ("back", "lower extremity", "trunk", "upper extremity", "abdomen", "face", "chest", "foot", "neck",
          "scalp", "hand", "ear")
_CLASS_COLOURS = {  # colours a class plausibly shows (ABCD rule), sampled from
    "vasc": ("red", "blue_grey", "dark_brown"),
    "df": ("white", "light_brown", "dark_brown"),
    "bcc": ("white", "red", "light_brown", "blue_grey"),
    "akiec": ("white", "red", "light_brown"),
}


def sample_attributes(label: str, seed: int) -> LesionAttributes:
    """Plausible attributes for a class: malignant lesions lean asymmetric, irregular, many-coloured."""
    rng = random.Random(seed)
    malignant = taxonomy.is_malignant(label)
    colours = _CLASS_COLOURS.get(label, ABCD_COLOURS[1:] if malignant else ("light_brown", "dark_brown", "black"))
    n_colours = rng.randint(2, min(4, len(colours))) if malignant else rng.randint(1, 2)
    return LesionAttributes(
        diagnosis=label,
        asymmetry_axes=rng.choices((0, 1, 2), weights=(1, 3, 6) if malignant else (6, 3, 1))[0],
        border_irregularity=round(rng.uniform(0.3, 0.9) if malignant else rng.uniform(0.0, 0.4), 2),
        colours=rng.sample(list(colours), n_colours),
        diameter_mm=round(rng.uniform(6, 20) if malignant else rng.uniform(2, 8), 1),
        site=rng.choice(_SITES),
        age=float(rng.randint(25, 85) if malignant else rng.randint(10, 70)),
        sex=rng.choice(("male", "female")),
    )


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    targets: dict[str, int]  # taxonomy code -> synthetic images, sorted by code
    settings: Settings
    seed: int
    shard_size: int
    model: str  # model.pretrained the images come from
    adapter_path: str | None = None  # the adapter folder behind settings.adapter

    def to_dict(self) -> dict:
        return {
            "job_id": self.job_id, "targets": self.targets, "settings": self.settings.__dict__, "seed": self.seed,
            "shard_size": self.shard_size, "model": self.model, "adapter_path": self.adapter_path,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "JobSpec":
        return cls(**{**data, "settings": Settings(**data["settings"])})

    @property
    def total(self) -> int:
        return sum(self.targets.values())

    def fingerprint(self) -> str:
        return artifacts.fingerprint(self.to_dict())


@dataclass(frozen=True)
class WorkItem:
    label: str
    index: int
    seed: int
    attributes_json: str
    prompt: str

    def image_id(self, job_id: str) -> str:
        return f"synthetic:{job_id}:{self.label}:{self.index:06d}"


def plan_items(spec: JobSpec) -> list[WorkItem]:
    items = []
    for label, count in spec.targets.items():
        for index in range(count):
            seed = derive_seed(spec.seed, label, index)
            attrs = sample_attributes(label, seed)
            items.append(WorkItem(label, index, seed, attrs.to_json(), caption_from_attributes(attrs, seed)))
    return items


def plan_shards(spec: JobSpec) -> list[list[WorkItem]]:
    items = plan_items(spec)
    return [items[i : i + spec.shard_size] for i in range(0, len(items), spec.shard_size)]


def sample_request(item: WorkItem, spec: JobSpec) -> SampleRequest:
    return SampleRequest(item.prompt, item.seed, spec.settings)


def shard_name(index: int) -> str:
    return f"part-{index:05d}"


def corpus_class_counts(corpus_dir: str | Path, split: str = "train") -> dict[str, int]:
    """Images per label in a corpus split, counted from its shards (the manifest's source of truth)."""
    import pyarrow.dataset as ds

    shards = Path(corpus_dir) / "shards"
    if not shards.is_dir() or not any(shards.glob("*.parquet")):
        raise FileNotFoundError(f"{corpus_dir}: not a corpus folder (no shards/*.parquet)")
    table = ds.dataset(str(shards), format="parquet").to_table(columns=["label", "split"])
    counts: dict[str, int] = {}
    for label, row_split in zip(table["label"].to_pylist(), table["split"].to_pylist()):
        if row_split == split:
            counts[label] = counts.get(label, 0) + 1
    return counts


def bring_to_targets(corpus_dir: str | Path, bring_to: int) -> dict[str, int]:
    """Synthetic images per class so every class of the corpus' train split reaches `bring_to`."""
    counts = corpus_class_counts(corpus_dir)
    return {code: max(0, bring_to - counts[code]) for code in sorted(counts)}


def prepare_job(out_dir: str | Path, spec: JobSpec) -> bool:
    """Claim `out_dir` for this spec (True: resuming it). A different spec there raises OutputConflict."""
    resumed = artifacts.claim_output(out_dir, STAGE, spec.fingerprint())
    if not resumed:
        artifacts.atomic_write_json(Path(out_dir) / SPEC_FILE, spec.to_dict())
    return resumed


def read_spec(out_dir: str | Path) -> JobSpec:
    return JobSpec.from_dict(artifacts.read_json(Path(out_dir) / SPEC_FILE))


def write_shard(out_dir: Path, index: int, spec: JobSpec, items: list[WorkItem], pngs: list[bytes], sizes) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "id": item.image_id(spec.job_id), "image": png, "image_format": "png", "width": w, "height": h,
            "label": item.label, "malignant": taxonomy.is_malignant(item.label), "split": "synthetic",
            "prompt": item.prompt, "attributes_json": item.attributes_json, "seed": item.seed,
            "adapter": spec.settings.adapter, "num_inference_steps": spec.settings.num_inference_steps,
            "guidance_scale": spec.settings.guidance_scale,
        }
        for item, png, (w, h) in zip(items, pngs, sizes)
    ]
    table = pa.Table.from_pylist(rows, schema=SYNTHETIC_SCHEMA)
    with artifacts.atomic_path(out_dir / SHARD_DIR / f"{shard_name(index)}.parquet") as tmp:
        pq.write_table(table, tmp)
    labels: dict[str, int] = {}
    for item in items:
        labels[item.label] = labels.get(item.label, 0) + 1
    artifacts.mark_done(out_dir, shard_name(index), {"count": len(items), "labels": labels})


def job_status(out_dir: str | Path) -> dict:
    """Progress from the done markers alone: any process can report it, during or after the run."""
    out = Path(out_dir)
    spec = read_spec(out)
    done = artifacts.done_names(out)
    shards = plan_shards(spec)
    finished = [i for i in range(len(shards)) if shard_name(i) in done]
    images_done = sum(len(shards[i]) for i in finished)
    by_label: dict[str, int] = {label: 0 for label in spec.targets}
    for i in finished:
        for item in shards[i]:
            by_label[item.label] += 1
    complete = (out / MANIFEST_FILE).exists()
    return {
        "job_id": spec.job_id, "out": str(out), "state": "done" if complete else "running",
        "total": spec.total, "done": images_done, "shards_total": len(shards), "shards_done": len(finished),
        "targets": spec.targets, "done_by_class": by_label,
    }


def write_manifest(out_dir: Path, spec: JobSpec, extra: dict | None = None) -> dict:
    """Counts read back from the shards themselves, so the manifest cannot claim what is not there."""
    import pyarrow.dataset as ds

    table = ds.dataset(str(out_dir / SHARD_DIR), format="parquet").to_table(
        columns=["id", "label", "seed", "prompt", "attributes_json", "adapter"]
    )
    counts: dict[str, int] = {}
    for label in table["label"].to_pylist():
        counts[label] = counts.get(label, 0) + 1
    if counts != {k: v for k, v in spec.targets.items() if v} or len(set(table["id"].to_pylist())) != table.num_rows:
        raise RuntimeError(f"{out_dir}: shards hold {counts} ({table.num_rows} rows), expected {spec.targets}")
    images = [
        {"id": r["id"], "label": r["label"], "seed": r["seed"], "prompt": r["prompt"],
         "attributes": json.loads(r["attributes_json"]), "adapter": r["adapter"]}
        for r in table.to_pylist()
    ]
    manifest = {
        "job_id": spec.job_id, "counts": counts, "total": table.num_rows, "settings": spec.settings.__dict__,
        "seed": spec.seed, "model": spec.model, "adapter": spec.settings.adapter, "adapter_path": spec.adapter_path,
        "shards": sorted(p.name for p in (out_dir / SHARD_DIR).glob("*.parquet")), "finished": time.time(),
        **(extra or {}), "images": images,
    }
    artifacts.atomic_write_json(out_dir / MANIFEST_FILE, manifest)
    return manifest


def pending_shards(out_dir: str | Path, spec: JobSpec) -> list[tuple[int, list[WorkItem]]]:
    done = artifacts.done_names(out_dir)
    return [(i, items) for i, items in enumerate(plan_shards(spec)) if shard_name(i) not in done]


GenerateFn = Callable[[list[SampleRequest]], list[bytes]]


def run_job(
    out_dir: str | Path, spec: JobSpec, generate: GenerateFn, *, max_retries: int = 0, retry_wait_s: float = 1.0,
    extra_manifest: dict | None = None,
) -> dict:
    """Generate every pending shard (retrying a failed shard `max_retries` times), then the manifest."""
    out = Path(out_dir)
    pending = pending_shards(out, spec)
    log.info("job %s: %d of %d shards to do", spec.job_id, len(pending), len(plan_shards(spec)))
    for index, items in pending:
        for attempt in range(max_retries + 1):
            try:
                pngs = generate([sample_request(item, spec) for item in items])
                break
            except Exception as err:  # a replica died, a node went away: the shard is redone whole
                if attempt == max_retries:
                    raise
                wait = retry_wait_s * 2**attempt
                log.warning("job %s shard %d attempt %d failed (%s); retrying in %.0fs", spec.job_id, index,
                            attempt + 1, err, wait)
                time.sleep(wait)
        sizes = [(spec.settings.width, spec.settings.height)] * len(items)
        write_shard(out, index, spec, items, pngs, sizes)
        log.info("job %s: shard %d done (%d images)", spec.job_id, index, len(items))
    if not (out / MANIFEST_FILE).exists():
        write_manifest(out, spec, extra_manifest)
    return job_status(out)
