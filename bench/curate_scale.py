"""Curation at the reference work's scale: a written N-image corpus of small JPEGs, curated end to end.

    .venv/bin/python bench/curate.py --scale 20000 [--workers 2]

Writes four sources in their publishers' layouts (issue 20): `slice` (ISIC 2024: train-metadata.csv
+ train-image.hdf5, 0.1 % malignant, ~75 % of the rows), `isic2020` (ground-truth CSV + JPEG folder),
`isic2019` (a generic CSV; 40 % of its images re-packaged ISIC 2020 ones) and `kaggle` (folders
train|test/benign|malignant; half of it copies of isic2019 images, so some copies are copies of copies).
Every copy is resized and re-encoded (a near-duplicate, not a byte copy). Then `curate` runs once, in
this process as its driver, and the table gives seconds per step (from the manifest), the driver's
and the largest Ray worker's peak RSS (sampled every 0.2 s), and duplicates found vs planted (a
dropped row whose kept row shows the same original image counts as found).
Writes bench/results/curate-scale-<N>.json, and at N = 500,000 also bench/reference/curate-500k.json.

Measured 2026-12-06 on this 2-core machine, nothing else running (bench/reference/curate-500k.json): 500,000
rows curate in 590 s (scan 433, write 102, plan 40, dedup 33, index 11); driver peak 2.66 GB, largest worker
0.55 GB; 28,500 of 28,500 planted near-copies found, none unplanted. Writing the data took another 225 s.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import platform
import shutil
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

SHARES = {"slice": 0.75, "isic2020": 0.12, "isic2019": 0.08, "kaggle": 0.05}
NESTED = {"isic2019": ("isic2020", 0.4), "kaggle": ("isic2019", 0.5)}  # source: (copied from, share of its rows)


def lesion_jpeg(rng: np.random.Generator, side: int) -> bytes:
    """Random colour texture at several scales (amplitude falling with frequency, as in photographs):
    distinct images sit about half the hash bits apart, a resized re-encode stays close."""
    pixels = np.full((side, side, 3), 128.0)
    for cells, amplitude in ((4, 60.0), (8, 35.0), (16, 20.0)):
        field = rng.normal(0.0, amplitude, (cells, cells, 3))
        layer = np.stack([np.asarray(Image.fromarray(field[..., c].astype(np.float32), mode="F").resize(
            (side, side), Image.BICUBIC)) for c in range(3)], axis=-1)
        pixels += layer
    return _encode(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), 90)


def near_copy(data: bytes) -> bytes:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return _encode(image.resize((image.width - 8, image.height - 8), Image.BILINEAR), 75)


def _encode(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _images(name: str, count: int, rng, pool: dict, roots: dict) -> list[tuple[str, bytes, bool]]:
    """(id, JPEG, malignant) for one source; copies of `pool[copied-from]` where the source nests one."""
    copied_from, share = NESTED.get(name, (None, 0.0))
    copies = int(count * share)
    malignant_rate = 0.001 if name == "slice" else 0.1
    out = []
    for k in range(count):
        image_id = f"{name}_{k:07d}"
        if k < copies:
            source_id, data, malignant = pool[copied_from][k % len(pool[copied_from])]
            roots[f"{name}:{image_id}"] = roots[f"{copied_from}:{source_id}"]
            out.append((image_id, near_copy(data), malignant))
        else:
            roots[f"{name}:{image_id}"] = f"{name}:{image_id}"
            out.append((image_id, lesion_jpeg(rng, 48 if name == "slice" else 64), bool(rng.random() < malignant_rate)))
    return out


def write_dataset(root: Path, rows: int, seed: int = 0) -> tuple[list[str], dict[str, str]]:
    """The four sources under `root`; returns their --source specs and each corpus id's original image."""
    rng = np.random.default_rng(seed)
    pool: dict = {}
    roots: dict[str, str] = {}
    for name in ("isic2020", "isic2019", "kaggle", "slice"):
        pool[name] = _images(name, max(1, int(rows * SHARES[name])), rng, pool, roots)
    _write_slice(root / "isic-2024-challenge", pool["slice"])
    _write_isic2020(root / "isic2020", pool["isic2020"])
    folder = root / "isic2019" / "ISIC_2019_Training_Input"
    folder.mkdir(parents=True)
    table = []
    for image_id, data, malignant in pool["isic2019"]:
        (folder / f"{image_id}.jpg").write_bytes(data)
        table.append({"image": image_id, "dx": "mel" if malignant else "nv", "lesion_id": ""})
    _write_csv(root / "isic2019" / "labels.csv", table)
    for k, (image_id, data, malignant) in enumerate(pool["kaggle"]):
        path = root / "kaggle" / ("test" if k % 5 == 0 else "train") / ("malignant" if malignant else "benign")
        path.mkdir(parents=True, exist_ok=True)
        (path / f"{image_id}.jpg").write_bytes(data)
    specs = [f"isic2024={root / 'isic-2024-challenge'},name=slice", f"isic2020={root / 'isic2020'}",
             f"csv={root / 'isic2019' / 'labels.csv'},images={folder},id=image,label=dx,lesion=lesion_id,name=isic2019",
             f"folders={root / 'kaggle'},name=kaggle"]
    # Kaggle keys its ids by path under the folder: re-key the roots the same way.
    for k, (image_id, _, malignant) in enumerate(pool["kaggle"]):
        relative = f"{'test' if k % 5 == 0 else 'train'}/{'malignant' if malignant else 'benign'}/{image_id}"
        roots[f"kaggle:{relative}"] = roots.pop(f"kaggle:{image_id}")
    return specs, roots


def _write_slice(folder: Path, images: list) -> None:
    import h5py

    folder.mkdir(parents=True)
    with h5py.File(folder / "train-image.hdf5", "w") as fh:
        for image_id, data, _ in images:
            fh.create_dataset(image_id, data=np.void(data))
    _write_csv(folder / "train-metadata.csv", [
        {"isic_id": image_id, "target": int(malignant), "patient_id": f"IP_{k // 20 + 1:06d}", "lesion_id": "",
         "iddx_full": "Malignant" if malignant else "Benign", "image_type": "TBP tile: close-up"}
        for k, (image_id, _, malignant) in enumerate(images)])


def _write_isic2020(folder: Path, images: list) -> None:
    (folder / "train").mkdir(parents=True)
    for image_id, data, _ in images:
        (folder / "train" / f"{image_id}.jpg").write_bytes(data)
    _write_csv(folder / "ISIC_2020_Training_GroundTruth.csv", [
        {"image_name": image_id, "patient_id": f"IP2020_{k // 8 + 1:05d}", "sex": "", "age_approx": "",
         "anatom_site_general_challenge": "", "diagnosis": "melanoma" if malignant else "unknown",
         "benign_malignant": "malignant" if malignant else "benign", "target": int(malignant)}
        for k, (image_id, _, malignant) in enumerate(images)])


class PeakRss:
    """Peak RSS of this process and of its largest descendant (Ray's workers), sampled in a thread."""

    def __init__(self, every: float = 0.2):
        import psutil

        self.me, self.every, self.driver, self.worker = psutil.Process(), every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.driver = max(self.driver, self.me.memory_info().rss)
                for child in self.me.children(recursive=True):
                    if "ray::" in " ".join(child.cmdline()[:1]) or "default_worker" in " ".join(child.cmdline()):
                        self.worker = max(self.worker, child.memory_info().rss)
            except Exception:  # a worker that exits between listing and reading
                pass
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def duplicates_found(out: Path, roots: dict[str, str]) -> dict:
    with open(out / "duplicates.csv", newline="") as fh:
        dropped = list(csv.DictReader(fh))
    found = sum(roots.get(d["dropped_id"]) == roots.get(d["kept_id"]) for d in dropped)
    planted = len(roots) - len(set(roots.values()))
    return {"planted": planted, "found": found, "unplanted": len(dropped) - found}


def run(rows: int, workers: int | None, root: Path, batch_size: int | None = None) -> int:
    from dermaflux.config import load_config
    from dermaflux.core.runtime import RayConfig, init_ray
    from dermaflux.corpus import stage
    from dermaflux.corpus.ray_pipeline import scan_batch_size

    work = Path(tempfile.mkdtemp(prefix="bench-curate-scale-"))
    try:
        started = time.perf_counter()
        # In a child process: the writer holds every image's bytes at once, and the driver peak
        # measured below must be curate's alone.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            specs, roots = pool.submit(write_dataset, work / "data", rows).result()
        written = time.perf_counter() - started
        print(f"wrote {len(roots)} images in {written:.0f}s under {work / 'data'}", flush=True)
        import ray

        init_ray(RayConfig(num_cpus=2), log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        curate = {"sources": specs, "out": str(work / "corpus"), "num_workers": workers}
        if batch_size is not None:
            curate["scan_batch"] = batch_size
        cfg = load_config("tiny", extra={"curate": curate})
        with PeakRss() as rss:
            started = time.perf_counter()
            summary = stage.run(cfg)
            seconds = time.perf_counter() - started
        scan_batch = scan_batch_size(len(roots), cfg.curate, ray.cluster_resources().get("CPU", 1.0))
        ray.shutdown()
        manifest = json.loads((work / "corpus" / "manifest.json").read_text())
        dups = duplicates_found(work / "corpus", roots)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"benchmark": "curate-scale", "rows": len(roots), "kept": summary["kept"], "seconds": round(seconds, 1),
              "seconds_by_step": manifest["seconds_by_step"], "driver_peak_rss_mb": round(rss.driver / 2**20),
              "worker_peak_rss_mb": round(rss.worker / 2**20), "duplicates": dups,
              "per_source": {k: {b: v[b] for b in ("input_rows", "kept", "duplicates", "quarantined", "capped")}
                             for k, v in manifest["per_source"].items()},
              "dataset_write_seconds": round(written, 1), "scan_batch": scan_batch, "cpus": os.cpu_count(),
              "machine": platform.machine(),
              "load_average_1min_at_end": os.getloadavg()[0], "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _print_table(report)
    out = root / "bench" / "results" / f"curate-scale-{len(roots)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    if rows == 500_000:  # the reference scale (issue 20): its figures are kept with the code
        reference = root / "bench" / "reference" / "curate-500k.json"
        shutil.copyfile(out, reference)
        print(f"wrote {reference}")
    return 0


def _print_table(report: dict) -> None:
    print(f"{'step':<10} {'seconds':>9} {'share':>7}")
    total = report["seconds"]
    for step, value in report["seconds_by_step"].items():
        print(f"{step:<10} {value:>9.1f} {value / total:>6.0%}")
    print(f"{'total':<10} {total:>9.1f}")
    print(f"rows {report['rows']}, kept {report['kept']}; driver peak {report['driver_peak_rss_mb']} MB, "
          f"largest worker peak {report['worker_peak_rss_mb']} MB; duplicates found {report['duplicates']['found']} "
          f"of {report['duplicates']['planted']} planted, {report['duplicates']['unplanted']} unplanted")
