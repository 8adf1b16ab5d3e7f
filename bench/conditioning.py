"""Does the tiny generator respond to its prompt? Train variants of the tiny preset, generate per class, score.

    .venv/bin/python bench/conditioning.py --corpus RUN/corpus --captions RUN/captions --work DIR \
        [--variants demo,chosen] [--per-class 16] [--classifier-epochs 15]

RUN is a pipeline run folder holding curate + caption output, e.g. made once by
`dermaflux pipeline --preset tiny --data ../shared/data --out RUN --stages curate,caption`.

1. The judge: a timm resnet18 trained once on the REAL train split of the corpus (dermaflux.evaluate's
   classifier code, class-balanced sampler), cached in <work>/judge. Its per-class recall on the real
   test split is the ceiling a perfect generator could reach; so is its recall on the same test images
   after a round trip through the run's fitted VAE (every synthetic image is a VAE decode).
2. Each variant: `dermaflux train` (the product's own stage: VAE fit, pre-compute, Ray Train) with the
   tiny preset, the demo's pipeline.stage_settings and the variant's overrides. Wall seconds and the
   CPU-seconds of the whole process tree (the CLI and its Ray processes, polled) are recorded, with the
   1-minute load average meanwhile and each phase's seconds. A VAE fit reused from DERMAFLUX_CACHE (same
   images and settings) is not in wall_s (phases_s says "reused"): to time the demo as a first run does,
   point DERMAFLUX_CACHE at a folder without vae-fit/.
3. Generation through the product's sampling core (`AdapterPool` + `generate_images`), with the
   prompts the generate stage writes (`caption_from_attributes(sample_attributes(label, seed), seed)`),
   `--per-class` images of every corpus class, image i of every class with seed i.
4. Scores: the judge's accuracy at "the requested class" (chance: 1/k, k classes requested equally),
   per-class recall, and the mean absolute grey-level difference between prompts at one seed against
   between seeds at one prompt (the figures issue 13 quotes from the validation grid).
Prints a table; writes bench/results/conditioning.json (and <work>/results.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = ROOT / "bench" / "results"
JUDGE_SIZE = 32  # the evaluate stage's classifier side (evaluate.image_size)

# Training runs: `--set` overrides of `dermaflux train --preset tiny`. "demo-issue13" is the demo as issue 13
# measured it; "preset" is what presets/tiny.yaml gives `dermaflux pipeline` now (read from the file, one
# source of truth); the others change one thing of "preset".
DEMO_ISSUE13 = {"train.steps": 120, "train.checkpoint_every": 40, "train.validate_every": 120,
                "train.max_images": 1024, "train.vae_fit.steps": 150, "train.vae_fit.max_images": 1024}


def preset_train_settings() -> dict:
    """presets/tiny.yaml pipeline.stage_settings.train as flat `train.x.y` overrides."""
    from dermaflux.config import load_config

    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}", inner)
        else:
            flat[prefix] = value

    walk("train", load_config("tiny").pipeline.stage_settings["train"])
    return flat


RUNS: dict[str, dict] = {
    "demo-issue13": DEMO_ISSUE13,
    "preset": {},  # filled from the preset in main()
    "preset-captions": {"train.caption_style": "caption"},
    "preset-logit0": {"train.logit_mean": 0.0},
    "steps1000": {"train.steps": 1000, "train.validate_every": 1000},
    "preset-lr2e3": {"train.lr": 2e-3},
}
# Variants: a training run and the sampling settings (guidance_scale: model.guidance_scale unless given;
# for a true_cfg adapter it is the classifier-free guidance scale, 1.0 = none).
VARIANTS: dict[str, dict] = {
    "demo-issue13": {"run": "demo-issue13", "sample": {}},
    "preset": {"run": "preset", "sample": {}},
    "preset-noCFG": {"run": "preset", "sample": {"guidance_scale": 1.0}},
    "preset-CFG6": {"run": "preset", "sample": {"guidance_scale": 6.0}},
    "preset-CFG9": {"run": "preset", "sample": {"guidance_scale": 9.0}},
    "steps1000": {"run": "steps1000", "sample": {}},
    "steps1000-CFG6": {"run": "steps1000", "sample": {"guidance_scale": 6.0}},
    "preset-lr2e3": {"run": "preset-lr2e3", "sample": {}},
    "preset-lr2e3-CFG6": {"run": "preset-lr2e3", "sample": {"guidance_scale": 6.0}},
    "preset-lr2e3-CFG9": {"run": "preset-lr2e3", "sample": {"guidance_scale": 9.0}},
    "preset-captions": {"run": "preset-captions", "sample": {}},
    "preset-logit0": {"run": "preset-logit0", "sample": {}},
}


# --- the judge ------------------------------------------------------------------------------------

def train_judge(corpus: Path, work: Path, epochs: int) -> dict:
    """resnet18 on the real train split (cached in <work>/judge); its real-test scores."""
    import torch

    from dermaflux.config import load_config
    from dermaflux.evaluate.classifier import TrainSettings, create_classifier, predict_proba, train_classifier
    from dermaflux.evaluate.data import class_names, read_corpus, targets
    from dermaflux.evaluate.metrics import classification_metrics

    folder = work / "judge"
    real = read_corpus(corpus, JUDGE_SIZE)
    classes = class_names(real, "multiclass")
    if (folder / "judge.json").exists():
        info = json.loads((folder / "judge.json").read_text())
        model, _ = create_classifier(info["model"], len(classes), JUDGE_SIZE, pretrained=False)
        model.load_state_dict(torch.load(folder / "judge.pt"))
        return {**info, "net": model, "real": real}
    ev = load_config("tiny").evaluate.model_copy(update={
        "steps": 0, "epochs": epochs, "patience": 4, "image_size": JUDGE_SIZE, "balancing": "sampler", "cpus_per_cell": 1})
    settings = TrainSettings.from_config(ev, "resnet18")
    y = targets(real, "multiclass", classes)
    tr, va, te = (real.split == s for s in ("train", "val", "test"))
    started = time.process_time()
    model, fit = train_classifier(real.images[tr], y[tr], real.images[va], y[va], classes, settings, seed=0)
    test = classification_metrics(y[te], predict_proba(model, real.images[te], JUDGE_SIZE), classes)
    info = {"model": "resnet18", "image_size": JUDGE_SIZE, "classes": list(classes), "epochs_run": fit["epochs_run"],
            "best_epoch": fit["best_epoch"], "cpu_s": round(time.process_time() - started, 1),
            "real_test": {k: test[k] for k in ("accuracy", "balanced_accuracy", "macro_auroc", "per_class_recall", "n")}}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "judge.pt")
    (folder / "judge.json").write_text(json.dumps(info, indent=2))
    return {**info, "net": model, "real": real}


def judge_scores(judge: dict, images: np.ndarray, requested: list[str]) -> dict:
    """Accuracy at the requested class against chance 1/k, per-class recall, the confusion counts."""
    from dermaflux.evaluate.classifier import predict_proba

    classes = judge["classes"]
    asked = sorted(set(requested), key=classes.index)
    pred = predict_proba(judge["net"], images, JUDGE_SIZE).argmax(axis=1)
    hit = np.array([classes[p] == r for p, r in zip(pred, requested)])
    recall = {c: float(hit[[r == c for r in requested]].mean()) for c in asked}
    confusion = {c: {d: int(sum(1 for p, r in zip(pred, requested) if r == c and classes[p] == d)) for d in classes}
                 for c in asked}
    n, acc = len(hit), float(hit.mean())
    # Normal-approximation binomial interval: n >= 100 in every run of this bench.
    half = 1.96 * np.sqrt(acc * (1 - acc) / n)
    return {"accuracy": acc, "ci95": [round(float(acc - half), 3), round(float(acc + half), 3)], "chance": 1 / len(asked), "n": n,
            "per_class_recall": recall, "confusion": confusion}


# --- the prompt-vs-seed difference ----------------------------------------------------------------

def grey(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def prompt_seed_difference(images: np.ndarray, n_prompts: int, n_seeds: int) -> dict:
    """Mean |grey a - grey b| (0-255) between prompts at one seed and between seeds at one prompt.

    `images` are ordered prompt-major: image (p, s) at p * n_seeds + s, seed s the same for every p."""
    g = grey(images).reshape(n_prompts, n_seeds, -1)
    between_prompts = [np.abs(g[a, s] - g[b, s]).mean()
                       for s in range(n_seeds) for a, b in itertools.combinations(range(n_prompts), 2)]
    between_seeds = [np.abs(g[p, a] - g[p, b]).mean()
                     for p in range(n_prompts) for a, b in itertools.combinations(range(n_seeds), 2)]
    return {"between_prompts": float(np.mean(between_prompts)), "between_seeds": float(np.mean(between_seeds))}


# --- training a variant through the product -------------------------------------------------------

class TreeCpu:
    """CPU-seconds of a process and all its descendants (Ray's raylet and workers included), polled:
    getrusage(RUSAGE_CHILDREN) misses Ray workers, which are not waited for by the CLI."""

    def __init__(self, pid: int, every_s: float = 0.5):
        import psutil

        self.root, self.every_s, self.seen, self.loads = psutil.Process(pid), every_s, {}, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            self.loads.append(os.getloadavg()[0])
            for proc in procs:
                try:
                    times = proc.cpu_times()
                    self.seen[(proc.pid, proc.create_time())] = times.user + times.system
                except psutil.NoSuchProcess:
                    pass
            self.stop.wait(self.every_s)

    def total(self) -> float:
        self.stop.set()
        self.thread.join()
        return sum(self.seen.values())


def run_stage(args: list[str], log_path: Path) -> dict:
    """`python -m dermaflux.cli ARGS`, its wall seconds and process-tree CPU-seconds."""
    started = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dermaflux.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        cpu = TreeCpu(proc.pid)
        code = proc.wait()
    seconds = {"wall_s": round(time.time() - started, 1), "cpu_s": round(cpu.total(), 1)}
    # The machine is shared: the 1-minute load average while the stage ran says how much of it this run had.
    seconds["load_1m"] = {"mean": round(float(np.mean(cpu.loads)), 2), "max": round(float(np.max(cpu.loads)), 2)}
    if code:
        raise RuntimeError(f"dermaflux {' '.join(args[:1])} exited {code}; see {log_path}")
    return seconds


def phase_seconds(out: Path, started: float) -> dict:
    """Wall seconds of the train stage's phases, from when each wrote its output: VAE fit, pre-compute
    (the cache), then Ray Train to the final adapter."""
    ends = {"vae_fit": out / "vae", "precompute": out / "cache" / "validation.pt", "train": out / "final"}
    phases, previous = {}, started
    for name, path in ends.items():
        end = path.stat().st_mtime
        if end < started:  # the VAE fit reused from DERMAFLUX_CACHE (same images and settings): not in wall_s
            phases[name] = "reused"
            continue
        phases[name], previous = round(end - previous, 1), end
    return phases


def train_run(name: str, captions: Path, work: Path) -> dict:
    """`dermaflux train` with run `name`'s settings (skipped when already done): wall and CPU seconds."""
    out = work / "runs" / name
    record = out / "bench-train.json"
    if record.exists():
        return json.loads(record.read_text())
    settings = RUNS[name] if name == "demo-issue13" else {**preset_train_settings(), **RUNS[name]}
    overrides = [item for key, value in settings.items() for item in ("--set", f"{key}={json.dumps(value)}")]
    started = time.time()
    seconds = run_stage(["train", "--preset", "tiny", "--captions", str(captions), "--out", str(out), *overrides],
                        work / f"train-{name}.log")
    summary = json.loads((out / "summary.json").read_text())
    seconds["phases_s"] = phase_seconds(out, started)
    result = {**seconds, "settings": settings, "loss": summary["train"]["loss"],
              "text_tokens": summary["precompute"]["text_tokens"]["length"]}
    record.write_text(json.dumps(result, indent=2))
    return result


# --- generation and scoring ------------------------------------------------------------------------

def requested(classes: list[str], per_class: int) -> list[tuple[str, int, str]]:
    """(class, seed, prompt) in class-major order: the generate stage's prompt for (class, seed), seed i for
    image i of every class, so images at one seed differ only in their prompt."""
    from dermaflux.lesion.captions import caption_from_attributes
    from dermaflux.synth.bulk import sample_attributes

    return [(code, seed, caption_from_attributes(sample_attributes(code, seed), seed))
            for code in classes for seed in range(per_class)]


def generate(adapter: Path, plan: list[tuple[str, int, str]], sample: dict) -> tuple[np.ndarray, float]:
    """Images (N, 64, 64, 3) uint8 through the product's sampling core, and the CPU-seconds it took."""
    import torch

    from dermaflux.config import load_config
    from dermaflux.synth.adapter_pool import AdapterPool
    from dermaflux.synth.requests import SampleRequest, Settings
    from dermaflux.synth.sampling import generate_images

    torch.set_num_threads(1)
    cfg = load_config("tiny", overrides=[f"synth.adapters=[{adapter}]"])
    pool = AdapterPool.from_config(cfg, preload=[adapter.name])
    settings = Settings(cfg.model.resolution, cfg.model.resolution,
                        sample.get("num_inference_steps", cfg.model.num_inference_steps),
                        sample.get("guidance_scale", cfg.model.guidance_scale), adapter.name)
    started = time.process_time()
    images = generate_images(pool, [SampleRequest(prompt, seed, settings) for _, seed, prompt in plan],
                             max_sequence_length=cfg.model.max_sequence_length, max_batch_size=16)
    return np.stack([np.asarray(img.convert("RGB")) for img in images]), time.process_time() - started


def vae_ceiling(judge: dict, corpus: Path, vae_dir: Path) -> dict:
    """The judge on the real test images at 64 px as training decodes them, and after a round trip through
    the run's fitted VAE (the most a synthetic image could show, since every one is a VAE decode)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from diffusers import AutoencoderKL

    from dermaflux.evaluate.classifier import predict_proba
    from dermaflux.evaluate.metrics import classification_metrics
    from dermaflux.train.encode import decode_images
    from dermaflux.train.vae_fit import reconstruct

    table = pa.concat_tables([pq.read_table(p, columns=["id", "split", "label", "image"])
                              for p in sorted((corpus / "shards").glob("*.parquet"))])
    table = table.filter(pa.compute.equal(table["split"], "test")).sort_by("id")
    classes = tuple(judge["classes"])
    y = np.array([classes.index(label) for label in table["label"].to_pylist()])
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    blobs = table["image"].to_pylist()
    scores = {}
    with torch.no_grad():
        for name, through_vae in (("real_64px", False), ("through_vae", True)):
            batches = []
            for i in range(0, len(blobs), 64):
                images = decode_images(blobs[i : i + 64], 64)
                batches.append(reconstruct(vae, images) if through_vae else images)
            pixels = ((torch.cat(batches).permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
            scored = classification_metrics(y, predict_proba(judge["net"], pixels, JUDGE_SIZE), classes)
            scores[name] = {k: scored[k] for k in ("accuracy", "balanced_accuracy", "per_class_recall")}
    return scores


# --- the run ---------------------------------------------------------------------------------------

def score_variant(name: str, variant: dict, judge: dict, work: Path, per_class: int) -> dict:
    """Generate with the variant's final adapter and score; the row of the table."""
    classes = judge["classes"]
    plan = requested(classes, per_class)
    images, gen_cpu = generate(work / "runs" / variant["run"] / "final", plan, variant["sample"])
    np.save(work / f"images-{name}.npy", images)
    scores = judge_scores(judge, images, [code for code, _, _ in plan])
    scores.update(prompt_seed_difference(images, len(classes), per_class))
    return {**scores, "generate_cpu_s": round(gen_cpu, 1)}


def format_table(rows: list[dict]) -> str:
    classes = list(rows[0]["per_class_recall"]) if rows else []
    head = (f"{'variant':<22} {'wall s':>7} {'CPU s':>7} {'acc':>6} {'95% CI':>13} {'chance':>6} "
            + " ".join(f"{c:>5}" for c in classes) + f" {'prompt':>7} {'seed':>6}")
    lines = [head, "-" * len(head)]
    for row in rows:
        recall = " ".join(f"{row['per_class_recall'][c]:>5.2f}" for c in classes)
        lines.append(f"{row['variant']:<22} {row['train']['wall_s']:>7.0f} {row['train']['cpu_s']:>7.0f} "
                     f"{row['accuracy']:>6.3f} {str(row['ci95']):>13} {row['chance']:>6.3f} {recall} "
                     f"{row['between_prompts']:>7.1f} {row['between_seeds']:>6.1f}")
    lines.append("acc: the judge says the requested class; recall per requested class; prompt/seed: mean |grey "
                 "difference| (0-255) between prompts at one seed / between seeds at one prompt")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True, help="curated corpus (the judge trains on its train split)")
    parser.add_argument("--captions", type=Path, required=True, help="captioned corpus (dermaflux caption output)")
    parser.add_argument("--work", type=Path, required=True, help="folder for the judge, the runs and their images")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--per-class", type=int, default=16, help="images generated per class")
    parser.add_argument("--classifier-epochs", type=int, default=15)
    args = parser.parse_args()
    names = [n for n in args.variants.split(",") if n]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    judge = train_judge(args.corpus.resolve(), args.work, args.classifier_epochs)
    rows = []
    for name in names:
        train = train_run(VARIANTS[name]["run"], args.captions.resolve(), args.work)
        row = {"variant": name, "run": VARIANTS[name]["run"], "train": train, "sample": VARIANTS[name]["sample"],
               **score_variant(name, VARIANTS[name], judge, args.work, args.per_class)}
        rows.append(row)
        print(format_table([row]).splitlines()[-2], flush=True)
    first_run = VARIANTS[names[0]]["run"]
    ceiling = vae_ceiling(judge, args.corpus.resolve(), args.work / "runs" / first_run / "vae")
    print(format_table(rows))
    print(f"judge on real test: balanced accuracy {judge['real_test']['balanced_accuracy']:.3f} at 64 px, "
          f"{ceiling['through_vae']['balanced_accuracy']:.3f} through the fitted VAE of run {first_run} (the ceiling)")
    result = {"bench": "conditioning", "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                   "load_avg_1m": os.getloadavg()[0]},
              "judge": {k: v for k, v in judge.items() if k not in ("net", "real")}, "vae_ceiling": ceiling,
              "captions": str(args.captions), "per_class": args.per_class, "rows": rows}
    for path in (RESULTS / "conditioning.json", args.work / "results.json"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
