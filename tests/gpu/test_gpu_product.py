"""The product's own paths on a GPU, through the CLI, on a FLUX.1-dev-shaped model with random weights:
`dermaflux train` (Ray Train + DeepSpeed ZeRO-2 and ZeRO-3, bf16, NCCL, one worker) with a checkpoint and a
`--resume`, its LoRA loading in plain diffusers, `dermaflux generate` with that LoRA fused, and `dermaflux
serve` with one GPU replica answering /v1/images and finishing a small /v1/augmentations job.

Run by `scripts/gpu-check.sh` on the lent GPU machine; skipped without CUDA. Inputs from the environment:
- DFX_GPU_MODEL: a folder written by `dermaflux model random --like flux-dev` (the script writes it once;
  without it the module writes one under the test's temporary folder: ~34 GB).
- DERMAFLUX_DATA: a folder holding ham10000-224/ (the script carries a few dozen images).
- DFX_GPU_RESULTS: where each test appends its measurements (JSON lines) for bench/reference.
- DFX_GPU_WORK: a folder for the ZeRO-2 run that later calls reuse (see `zero2_run`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dermaflux.testing.ham10000 import build_captioned_set as build_captions

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the lent GPU machine)")]

ROOT = Path(__file__).resolve().parents[2]
TRAIN_IMAGES = int(os.environ.get("DFX_GPU_TRAIN_IMAGES", "32"))
# Small but real: two optimizer steps and a checkpoint, then one more after --resume; one short render.
TRAIN_SETTINGS = ["train.checkpoint_every=2", "train.validate_every=1000", "train.log_every=1",
                  "train.validation_prompts=[dermoscopic image of a melanoma]", "train.validation_seeds=[0]",
                  "train.validation_steps=4", "train.lr=0.001", "train.warmup_steps=0", "train.precompute_workers=1",
                  "train.cpus_per_worker=8", "train.encode=cached"]  # the cached path (bench-online times online)


def record(section: str, values: dict) -> None:
    """Append this test's figures for scripts/gpu-check.sh (a JSON line per record)."""
    path = os.environ.get("DFX_GPU_RESULTS")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"section": section, **values}) + "\n")


def command_env() -> dict:
    # tests/conftest.py defaults DS_ACCELERATOR to cpu for the CPU suites: the GPU commands need cuda.
    return {**os.environ, "DS_ACCELERATOR": "cuda",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def dermaflux(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`dermaflux ARGS` from this checkout, as a user runs it; fails the test with the output's end."""
    env = command_env()
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dermaflux.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    done.wall_s = time.perf_counter() - started
    assert done.returncode == 0, f"dermaflux {' '.join(args)} failed:\n{(done.stdout + done.stderr)[-6000:]}"
    return done


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = os.environ.get("DFX_GPU_MODEL")
    if folder and Path(folder, "model_index.json").exists():
        return Path(folder)
    out = tmp_path_factory.mktemp("model") / "flux-dev-random"
    dermaflux("model", "random", "--like", "flux-dev", "--out", str(out), timeout=1800)
    return out


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    data = Path(os.environ.get("DERMAFLUX_DATA", ROOT.parent / "shared" / "data")) / "ham10000-224"
    if not data.exists():
        pytest.fail(f"{data}: no HAM10000 images (scripts/gpu-check.sh --prepare carries a few)")
    return build_captions(data, tmp_path_factory.mktemp("captions"), n_train=TRAIN_IMAGES, n_test=0)


def train_args(model_dir: Path, captions: Path, out: Path, zero: int, steps: int, *extra: str) -> list[str]:
    sets = [f"--set={s}" for s in [f"model.pretrained={model_dir}", *TRAIN_SETTINGS]]
    return ["train", "--preset", "flux-dev", "--captions", str(captions), "--out", str(out), "--workers", "1",
            "--zero-stage", str(zero), "--steps", str(steps), *sets, *extra]


def loss_rows(out: Path) -> list[dict]:
    import csv

    with open(out / "loss.csv") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def zero2_run(model_dir, captions, tmp_path_factory) -> Path:
    """ZeRO-2: 2 steps with a checkpoint, then `--resume` to 3 steps (the LoRA the other tests use).

    Under DFX_GPU_WORK the run folder outlives the pytest process: a later call (tests split over device
    calls with DFX_GPU_TESTS_K) reuses a finished run instead of training again."""
    work = os.environ.get("DFX_GPU_WORK")
    out = Path(work) / "train-zero2" if work else tmp_path_factory.mktemp("train-zero2") / "run"
    if (out / "summary.json").exists() and json.loads((out / "summary.json").read_text())["train"]["steps"] == 3:
        return out
    first = dermaflux(*train_args(model_dir, captions, out, 2, 2))
    resumed = dermaflux(*train_args(model_dir, captions, out, 2, 3, "--resume"))
    summary = json.loads((out / "summary.json").read_text())
    rows = loss_rows(out)
    record("train_zero2", {"out": str(out), "first_wall_s": first.wall_s, "resume_wall_s": resumed.wall_s, **summary["train"],
                           "text_tokens_stats": summary["precompute"]["text_tokens"],
                           "samples_per_s": [float(r["samples_per_s"]) for r in rows],
                           "peak_gib": max(float(r["peak_mem_mb"]) for r in rows) / 1024})
    return out


def test_train_zero2_checkpoint_and_resume(zero2_run):
    summary = json.loads((zero2_run / "summary.json").read_text())
    assert [int(r["step"]) for r in loss_rows(zero2_run)] == [1, 2, 3]  # resumed at 2, not restarted
    assert summary["train"]["steps"] == 3
    assert summary["precompute"]["views"] == 8
    assert summary["train"]["text_tokens"] == summary["precompute"]["text_tokens"]["length"] <= 512
    assert summary["train"]["micro_batch"] >= 1  # picked from the measured memory (micro_batch: auto)
    assert (zero2_run / "tensorboard").is_dir()
    checkpoints = sorted((zero2_run / "ray" / "train").glob("step-*"))
    assert [p.name for p in checkpoints][-1] == "step-000003"


def test_lora_loads_in_plain_diffusers(zero2_run, model_dir):
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    final = zero2_run / "final"
    saved = load_file(str(final / "pytorch_lora_weights.safetensors"))
    pipe = FluxPipeline.from_pretrained(model_dir, torch_dtype=torch.bfloat16).to("cuda")
    before = render(pipe)
    pipe.load_lora_weights(str(final))
    loaded = get_peft_model_state_dict(pipe.transformer)
    assert len(loaded) == len(saved)
    for key, value in saved.items():  # diffusers drops the "transformer." prefix and the adapter name
        name = key.removeprefix("transformer.")
        assert torch.equal(loaded[name].cpu().to(value.dtype), value), name
    assert (render(pipe) - before).abs().max() > 0  # the trained LoRA changes the image
    # the reference for the service's speed: a plain FluxPipeline call at batch 1, 20 steps, 512 px
    pipe("warm-up", height=512, width=512, num_inference_steps=20)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for seed in range(2):
        pipe("dermoscopic image of a melanoma", height=512, width=512, num_inference_steps=20,
             generator=torch.Generator("cuda").manual_seed(seed))
    torch.cuda.synchronize()
    record("serve_reference", {"s_per_image": (time.perf_counter() - started) / 2, "batch": 1, "lora": "unfused"})


def render(pipe) -> torch.Tensor:
    out = pipe("dermoscopic image of a melanoma", height=512, width=512, num_inference_steps=4,
               generator=torch.Generator("cuda").manual_seed(0), output_type="pt")
    return out.images.float().cpu()


def test_train_zero3(model_dir, captions, tmp_path):
    out = tmp_path / "run"
    done = dermaflux(*train_args(model_dir, captions, out, 3, 2))
    summary = json.loads((out / "summary.json").read_text())
    rows = loss_rows(out)
    record("train_zero3", {"wall_s": done.wall_s, **summary["train"],
                           "samples_per_s": [float(r["samples_per_s"]) for r in rows],
                           "peak_gib": max(float(r["peak_mem_mb"]) for r in rows) / 1024})
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert summary["train"]["compiled"] == 0  # train.compile is skipped under ZeRO-3, with a warning
    assert (out / "final" / "pytorch_lora_weights.safetensors").exists()


def test_generate_with_the_lora_fused(zero2_run, model_dir, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "synthetic"
    targets = {"mel": 12, "nv": 12, "bcc": 8}
    done = dermaflux("generate", "--preset", "flux-dev", f"--set=model.pretrained={model_dir}",
                     "--lora", str(zero2_run / "final"), "--fuse-lora", "--compile", "--out", str(out),
                     f"--set=synth.class_targets={json.dumps(targets)}", "--set=synth.generate_actors=1",
                     "--set=synth.batch_size=8")
    labels = pq.read_table(out / "shards")["label"].to_pylist()
    assert {c: labels.count(c) for c in set(labels)} == targets
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fuse_lora"] is True
    images = sum(targets.values())
    record("generate", {"images": images, "wall_s": done.wall_s, "s_per_image_with_startup": done.wall_s / images})


def test_serve_one_gpu_replica(zero2_run, model_dir, tmp_path):
    import base64
    import io

    import httpx
    from PIL import Image

    port = 8000 + os.getpid() % 1000
    env = command_env()
    server = subprocess.Popen(
        [sys.executable, "-m", "dermaflux.cli", "serve", "--preset", "flux-dev", f"--set=model.pretrained={model_dir}",
         "--lora", f"lesions={zero2_run / 'final'}", "--port", str(port), "--replicas", "1",
         # The fast path of issue 11: the one LoRA fused, the blocks compiled, 8 images per pipeline call.
         "--fuse-lora", "--compile", "--set=synth.batch_size=8",
         "--set=synth.gpus_per_replica=1", f"--set=synth.jobs_root={tmp_path / 'jobs'}"],
        cwd=ROOT, env=env, stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
    try:
        wait_ready(client, server, tmp_path / "serve.log")
        body = {"prompt": "dermoscopic image of a melanoma", "count": 8, "seed": 1, "adapter": "lesions"}
        client.post("/v1/images", json={**body, "count": 1})  # warm-up: loads the LoRA on the replica
        started = time.perf_counter()
        response = client.post("/v1/images", json=body)
        seconds = time.perf_counter() - started
        assert response.status_code == 200, response.text
        images = response.json()["images"]
        assert len(images) == 8
        first = Image.open(io.BytesIO(base64.b64decode(images[0]["png_base64"])))
        assert first.size == (512, 512) and images[0]["width"] == 512
        job = {"job_id": "gpu1", "class_targets": {"mel": 4, "nv": 4}, "adapter": "lesions"}
        assert client.post("/v1/augmentations", json=job).status_code == 202
        deadline = time.time() + 600
        while (status := client.get("/v1/augmentations/gpu1").json())["state"] == "running":
            assert time.time() < deadline, status
            time.sleep(1)
        assert status["state"] == "done" and status["done"] == 8, status
        record("serve", {"s_per_image_http": seconds / 8, "count": 8, "batch": 8, "fused": True, "compiled": True,
                         "job": status})
    finally:
        client.close()
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C, as a user stops it
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def wait_ready(client, server, log: Path, timeout: float = 900) -> None:
    import httpx

    deadline = time.time() + timeout
    while True:
        assert server.poll() is None, f"dermaflux serve exited:\n{log.read_text()[-6000:]}"
        assert time.time() < deadline, f"not ready after {timeout} s:\n{log.read_text()[-6000:]}"
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(2)
