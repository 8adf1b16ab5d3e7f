"""Bulk augmentation jobs: a deterministic plan, shard-by-shard atomic writes, resume, manifest.

A job is fixed by its spec (job id, per-class targets, settings, seed, shard size, model and
adapter). Image `i` of class `c` always gets the same seed, attributes and prompt, and lands in
the same shard; a shard is written atomically and then marked done. So a repeated or restarted
job skips finished shards and never writes an image twice, and a crash mid-shard loses only
that shard's work. Both the Serve bulk endpoint and `dermaflux generate` run jobs through here.
`progress.json` is the job's state (running, done, failed, cancelled) and counts, rewritten after
every shard, so a status read costs one small file whatever the job's size.
Pure python + pyarrow: the caller passes the function that turns requests into PNG bytes.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from dermaflux.core import artifacts
from dermaflux.lesion.attributes import ABCD_COLOURS, LesionAttributes
from dermaflux.lesion.captions import caption_from_attributes
from dermaflux.lesion import taxonomy
from dermaflux.synth.requests import (
    AugmentationRequest,
    RequestError,
    SampleRequest,
    Settings,
    check_compute,
    check_labels,
    derive_seed,
    resolve_settings,
)
from dermaflux.synth import subgroup_targets
from dermaflux.synth.schema import SYNTHETIC_SCHEMA

if TYPE_CHECKING:
    from dermaflux.config import DermaFluxConfig

log = logging.getLogger(__name__)

STAGE = "synth"
SPEC_FILE = "job.json"
MANIFEST_FILE = "manifest.json"
PROGRESS_FILE = "progress.json"  # {state, done, shards_done, done_by_class, ...}: rewritten after every shard
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
    # (label, attribute, value, count): subgroup targets within `targets` (synth/subgroup_targets.py)
    cells: tuple[tuple[str, str, str, int], ...] = ()

    def to_dict(self) -> dict:
        # `cells` only when there are some: a job without them keeps the fingerprint it always had.
        return {
            "job_id": self.job_id, "targets": self.targets, "settings": self.settings.__dict__, "seed": self.seed,
            "shard_size": self.shard_size, "model": self.model, "adapter_path": self.adapter_path,
            **({"cells": [list(c) for c in self.cells]} if self.cells else {}),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "JobSpec":
        cells = tuple(tuple(c) for c in data.get("cells", ()))
        return cls(**{**data, "settings": Settings(**data["settings"]), "cells": cells})

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


def _label_ranges(spec: JobSpec) -> list[tuple[str, int, int]]:
    """(label, first, end) positions of each class in the plan: classes in code order, back to back."""
    ranges, first = [], 0
    for label, count in spec.targets.items():
        ranges.append((label, first, first + count))
        first += count
    return ranges


def shard_count(spec: JobSpec) -> int:
    return -(-spec.total // spec.shard_size)


def shard_labels(spec: JobSpec, index: int) -> dict[str, int]:
    """Images per label in shard `index`, by arithmetic alone (no attributes sampled, no captions)."""
    start, end = index * spec.shard_size, min((index + 1) * spec.shard_size, spec.total)
    overlaps = ((label, min(end, last) - max(start, first)) for label, first, last in _label_ranges(spec))
    return {label: n for label, n in overlaps if n > 0}


def shard_items(spec: JobSpec, index: int) -> list[WorkItem]:
    """The images of shard `index`: image `i` of class `c` always lands in the same shard."""
    start, end = index * spec.shard_size, min((index + 1) * spec.shard_size, spec.total)
    items = []
    for label, first, last in _label_ranges(spec):
        for position in range(max(start, first), min(end, last)):
            seed = derive_seed(spec.seed, label, position - first)
            attrs = subgroup_targets.apply_cell(spec.cells, label, position - first, sample_attributes(label, seed))
            items.append(WorkItem(label, position - first, seed, attrs.to_json(), caption_from_attributes(attrs, seed)))
    return items


def plan_shards(spec: JobSpec) -> list[list[WorkItem]]:
    return [shard_items(spec, i) for i in range(shard_count(spec))]


def plan_items(spec: JobSpec) -> list[WorkItem]:
    return [item for shard in plan_shards(spec) for item in shard]


def sample_request(item: WorkItem, spec: JobSpec) -> SampleRequest:
    return SampleRequest(item.prompt, item.seed, spec.settings)


def shard_name(index: int) -> str:
    return f"part-{index:05d}"


def corpus_class_counts(corpus_dir: str | Path, split: str = "train") -> dict[str, int]:
    """Images per diagnosis in a corpus split: its manifest's counts (the shards' when it has none)."""
    from dermaflux.corpus.schema import class_counts

    return class_counts(corpus_dir, split)


def bring_to_targets(corpus_dir: str | Path, bring_to: int) -> dict[str, int]:
    """Synthetic images per class so every class of the corpus' train split reaches `bring_to`."""
    counts = corpus_class_counts(corpus_dir)
    return {code: max(0, bring_to - counts[code]) for code in sorted(counts)}


def check_corpus_classes(targets: dict[str, int], corpus_dir: str | Path, field: str = "class_targets") -> None:
    """Every class asked for (count > 0) is in the corpus' train split: a synthetic class the real
    training data lacks trains the classifier on something it is never scored on."""
    present = corpus_class_counts(corpus_dir)
    for code, count in targets.items():
        if count and code not in present:
            raise RequestError(f"{field}.{code}", f"class {code!r} is not in the train split of corpus {corpus_dir} "
                               f"(it has {', '.join(present) or 'no class'}); ask only for those")


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


def status_from_markers(out_dir: str | Path, spec: JobSpec) -> dict:
    """Progress counted from the done markers, by arithmetic over shard positions (no plan rebuilt)."""
    out = Path(out_dir)
    done = artifacts.done_names(out)
    finished = [i for i in range(shard_count(spec)) if shard_name(i) in done]
    by_label = {label: 0 for label in spec.targets}
    for index in finished:
        for label, n in shard_labels(spec, index).items():
            by_label[label] += n
    return {
        "job_id": spec.job_id, "state": "done" if (out / MANIFEST_FILE).exists() else "running", "error": None,
        "total": spec.total, "done": sum(by_label.values()), "shards_total": shard_count(spec),
        "shards_done": len(finished), "targets": spec.targets, "done_by_class": by_label,
    }


def write_progress(out_dir: str | Path, status: dict) -> dict:
    status = {k: v for k, v in status.items() if k != "out"}
    artifacts.atomic_write_json(Path(out_dir) / PROGRESS_FILE, {**status, "updated": time.time()})
    return status


def job_status(out_dir: str | Path) -> dict:
    """The progress record the runner rewrites after every shard (one small file: O(1) for any job
    size), else the progress counted from the done markers (a folder no runner has touched yet)."""
    out = Path(out_dir)
    record = out / PROGRESS_FILE
    status = artifacts.read_json(record) if record.exists() else status_from_markers(out, read_spec(out))
    return {**status, "out": str(out)}


def set_state(out_dir: str | Path, state: str, error: str | None = None) -> dict:
    """Record a state change (started, cancelled, ...) that happens outside `run_job`."""
    return write_progress(out_dir, {**job_status(out_dir), "state": state, "error": error})


def write_manifest(out_dir: Path, spec: JobSpec, extra: dict | None = None) -> dict:
    """Counts read back from the shards themselves, so the manifest cannot claim what is not there."""
    import pyarrow.dataset as ds

    columns = ["id", "label", "seed", "prompt", "attributes_json", "adapter"]
    (out_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)  # a job of zero images: an empty set
    if any((out_dir / SHARD_DIR).glob("*.parquet")):
        table = ds.dataset(str(out_dir / SHARD_DIR), format="parquet").to_table(columns=columns)
    else:
        table = SYNTHETIC_SCHEMA.empty_table().select(columns)
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
        **({"cells": subgroup_targets.cell_counts(spec.cells, images)} if spec.cells else {}),
        **(extra or {}), "images": images,
    }
    artifacts.atomic_write_json(out_dir / MANIFEST_FILE, manifest)
    return manifest


def pending_shards(out_dir: str | Path, spec: JobSpec) -> list[tuple[int, list[WorkItem]]]:
    done = artifacts.done_names(out_dir)
    return [(i, shard_items(spec, i)) for i in range(shard_count(spec)) if shard_name(i) not in done]


GenerateFn = Callable[[list[SampleRequest]], list[bytes]]


def _generate_shard(spec: JobSpec, index: int, items: list[WorkItem], generate: GenerateFn, max_retries: int,
                    retry_wait_s: float) -> list[bytes]:
    for attempt in range(max_retries + 1):
        try:
            return generate([sample_request(item, spec) for item in items])
        except Exception as err:  # a replica died, a node went away: the shard is redone whole
            if attempt == max_retries:
                raise
            wait = retry_wait_s * 2**attempt
            log.warning("job %s shard %d attempt %d failed (%s); retrying in %.0fs", spec.job_id, index, attempt + 1,
                        err, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def run_job(
    out_dir: str | Path, spec: JobSpec, generate: GenerateFn, *, max_retries: int = 0, retry_wait_s: float = 1.0,
    extra_manifest: dict | None = None, should_stop: Callable[[], bool] | None = None,
    before_write: Callable[[], None] | None = None,
) -> dict:
    """Generate every pending shard (retrying a failed shard `max_retries` times), then the manifest.

    The progress record follows every shard (`job_status` reads it); `should_stop` is asked before
    each shard, and True ends the run as "cancelled" (finished shards stay; a re-run resumes).
    `before_write` is called before every write and raises when the folder may no longer be
    written (the service: it was swapped for a link leading out of the jobs root); nothing more
    is written then, not even the failure.
    """
    out = Path(out_dir)
    check = before_write or (lambda: None)
    check()
    status = write_progress(out, {**status_from_markers(out, spec), "state": "running"})
    done = artifacts.done_names(out)
    pending = [i for i in range(shard_count(spec)) if shard_name(i) not in done]
    log.info("job %s: %d of %d shards to do", spec.job_id, len(pending), shard_count(spec))
    try:
        for index in pending:
            if should_stop is not None and should_stop():
                check()
                return {**write_progress(out, {**status, "state": "cancelled"}), "out": str(out)}
            items = shard_items(spec, index)
            pngs = _generate_shard(spec, index, items, generate, max_retries, retry_wait_s)
            check()
            write_shard(out, index, spec, items, pngs, [(spec.settings.width, spec.settings.height)] * len(items))
            for label, n in shard_labels(spec, index).items():
                status["done_by_class"][label] += n
            status.update(done=status["done"] + len(items), shards_done=status["shards_done"] + 1)
            check()
            write_progress(out, status)
            log.info("job %s: shard %d done (%d images)", spec.job_id, index, len(items))
        check()
        if not (out / MANIFEST_FILE).exists():
            write_manifest(out, spec, extra_manifest)
    except Exception as err:
        if _writable(check):
            write_progress(out, {**status, "state": "failed", "error": f"{type(err).__name__}: {err}"})
        raise
    check()
    return {**write_progress(out, {**status, "state": "done"}), "out": str(out)}


def _writable(check: Callable[[], None]) -> bool:
    try:
        check()
    except Exception:
        return False
    return True


def job_spec(cfg: DermaFluxConfig, request: AugmentationRequest, adapters: dict[str, str]) -> JobSpec:
    """The one JobSpec builder: POST /v1/augmentations passes its body, `dermaflux generate` a
    request made from its config. Settings, targets and the per-job limit are checked here."""
    settings = resolve_settings(request, cfg, sorted(adapters))
    cells: list = []
    try:  # a missing corpus, or a manifest.json that is not a corpus manifest
        if request.targets is not None:
            plain, cells = subgroup_targets.parse_targets(request.targets, "targets")
            targets = check_labels(subgroup_targets.label_totals(plain, cells), "targets")
        elif request.class_targets is not None:
            targets = check_labels(request.class_targets)
            if request.corpus:
                check_corpus_classes(targets, request.corpus)
        else:
            targets = bring_to_targets(request.corpus, request.bring_to)
    except RequestError:
        raise
    except (OSError, ValueError) as err:
        raise RequestError("corpus", str(err)) from None
    total, limits = sum(targets.values()), cfg.synth.limits
    if total > limits.max_images_per_job:
        raise RequestError("class_targets", f"{total} images exceeds the limit of {limits.max_images_per_job} per job "
                            "(synth.limits.max_images_per_job)")
    check_compute(total, settings, limits.max_job_pixel_steps, "class_targets", "max_job_pixel_steps")
    return JobSpec(
        job_id=request.job_id, targets=targets, settings=settings, seed=request.seed, shard_size=cfg.synth.shard_size,
        model=cfg.model.pretrained, adapter_path=adapters.get(settings.adapter) if settings.adapter else None,
        cells=tuple(cells),
    )
