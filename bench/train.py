"""Training throughput and memory: the Ray Train loop under each strategy (DeepSpeed ZeRO-2 and ZeRO-3, FSDP2)
against a plain single-process PyTorch loop on the same tiny model and cached data; (`--full-size`, for the
GPU machine) one FLUX.1-dev-sized transformer with LoRA rank 16 + gradient checkpointing at 512 px; and
(`--gpu-product`, run by scripts/gpu-check.sh) the product's own trainer on a random FLUX.1-dev folder.

    .venv/bin/python bench/train.py [--quick] [--data DIR]
    .venv/bin/python bench/train.py --encode [--rows 1000,20000] [--encode-steps 12] [--cached-rows N]   (cached vs online)
    .venv/bin/python bench/train.py --sizing   (cache bytes per image and for 500,000 images, per preset)
    .venv/bin/python bench/train.py --startup [--peer train_dreambooth_lora_flux.py] [--rounds 2]   (a short run)
    .venv/bin/python bench/train.py --full-size [--layers N] [--resolution 512] [--steps 5]
    python3 bench/train.py --gpu-product --model DIR [--data DIR] [--steps 12] [--gpu-encode online] [--json FILE]

--encode (issue 21): on the tiny preset, for each corpus size in --rows (HAM10000's images, repeated under new ids
past 10,015), the train stage's steps after the VAE fit in both modes, interleaved: seconds from the start to the
first optimiser step (token count, cache sizing, pre-compute or not, Ray Train start, model load) and samples/s
of the steps after it; the ratio largest/smallest corpus per mode. The machine is shared: read the ratios.

--startup (issue 21 point 7): the wall time of a short run, `dermaflux train` as a user types it, beside diffusers'
train_dreambooth_lora_flux.py (the peer; --peer, or $DERMAFLUX_PEER_SCRIPT: it is not on PyPI, take the one of the
installed diffusers' release from github.com/huggingface/diffusers/tree/<tag>/examples/dreambooth) on the same 64
HAM10000 images and the tiny preset's folder: LoRA rank 16, batch 8, 60 steps, lr 1e-4, one thread
(OMP_NUM_THREADS=1), no validation render, VAE fit off (the peer trains on the model's VAE). Rounds interleave
DermaFlux's default launch (auto: one rank in the CLI's process), its worker group (train.launch workers) and the
peer. Fixed cost = wall - steps: DermaFlux's steps from its loss.csv (8 / samples/s per step), the peer's from the
rate its progress bar last printed. The figure to read is the ratio of fixed costs within a round.

--gpu-product: `dermaflux train` (flux-dev preset: micro_batch auto, compile, T5 length from the captions,
dihedral views; one worker, ZeRO-2, bf16) on captions in the caption template's wording, its samples/s
the median of its logged steps after the first two (compilation); then, in this process, plain eager
loops on random inputs of the same shapes: the same settings (micro-batch, checkpointing, text tokens,
compile), and diffusers' Flux LoRA script defaults (batch 4, no checkpointing, 512 tokens, eager). MFU:
forward + backward FLOPs per sample (torch.utils.flop_counter, no checkpointing: recompute not counted)
x the product's samples/s / 989 TFLOP/s (H100/H200 SXM dense bf16).

Tiny rows: samples/s is the median over steps of (samples in the step / step time), measured inside the
loop (start-up excluded; wall_s includes it). Every worker and the plain loop use one intra-op thread.
Peak memory: RSS of a worker process on CPU (mostly libraries at this size), max allocated on GPU;
state MB: parameters + optimizer state one rank holds, the part ZeRO and FSDP2 partition. Full-size FLOPs:
torch.utils.flop_counter over one executed step (so the gradient-checkpointing recompute counts), divided by
the median step time.
Writes bench/results/train.json (or train_full_size.json).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

RESULTS = ROOT / "bench" / "results"
# (workers, train.strategy, zero_stage) of the tiny Ray rows: both strategies side by side, sharded ones at 2 workers.
TINY_ROWS = [(1, "deepspeed", 2), (2, "deepspeed", 2), (2, "deepspeed", 3), (1, "fsdp2", 2), (2, "fsdp2", 2)]
STRATEGY_NAMES = {"deepspeed": "DeepSpeed", "fsdp2": "FSDP2"}
H100_BF16_DENSE_TFLOPS = 989.0  # H100/H200 SXM, dense bf16


def build_cache(data: Path, work: Path, cfg, n_train: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dermaflux.testing.ham10000 import build_captioned_set
    from dermaflux.train.cache import write_cache_shard
    from dermaflux.train.precompute import CAPTION_COLUMNS, caption_shards, encode_rows, load_text_and_vae

    captions = build_captioned_set(data, work / "captions", n_train=n_train, n_test=0)
    table = pa.concat_tables([pq.read_table(p, columns=CAPTION_COLUMNS) for p in caption_shards(captions)])
    rows = encode_rows(load_text_and_vae(cfg.model, None), table.to_pydict(), cfg.model.resolution,
                       cfg.model.max_sequence_length)
    cache = work / "cache"
    write_cache_shard(rows, cache / "shards" / "part-00000.arrow")
    return cache


def plain_loop(cfg, cache: Path, steps: int) -> dict:
    """The same step with torch.optim.AdamW in this process: no Ray, no DeepSpeed."""
    import resource

    import torch
    from diffusers import FluxTransformer2DModel

    from dermaflux.model.loading import resolve_pretrained
    from dermaflux.train.cache import load_cached_set, micro_batch_indices
    from dermaflux.train.flow import FlowBatch, flow_matching_loss, train_guidance_for
    from dermaflux.train.model_setup import prepare_transformer

    tc = cfg.train
    torch.set_num_threads(1)
    started = time.perf_counter()
    torch.manual_seed(tc.seed)
    transformer = FluxTransformer2DModel.from_pretrained(resolve_pretrained(cfg.model), subfolder="transformer")
    params = prepare_transformer(transformer, tc)
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    guidance = train_guidance_for(transformer.config, cfg.model)
    data = load_cached_set(cache, "train")
    rates, losses = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        idx = torch.from_numpy(micro_batch_indices(len(data), tc.seed, step, 0, 1, tc.micro_batch))
        batch = FlowBatch(*data.rows(idx))
        loss = flow_matching_loss(transformer, batch, tc, guidance, torch.Generator().manual_seed(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        opt.step()
        rates.append(tc.micro_batch / (time.perf_counter() - t0))
        losses.append(float(loss.detach()))
    state_bytes = sum(p.numel() * p.element_size() for p in transformer.parameters())
    state_bytes += sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if t.dim() > 0)
    return {"samples_per_s": statistics.median(rates[1:]), "wall_s": time.perf_counter() - started,
            "peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rank_state_mb": state_bytes / 2**20, "last_loss": losses[-1]}


def ray_loop(cfg, cache: Path, out: Path) -> dict:
    from dermaflux.train.ray_trainer import run_training

    started = time.perf_counter()
    result = run_training(cfg, cache, None, out)
    if result.error is not None:
        raise RuntimeError(result.error)
    with result.checkpoint.as_directory() as ckpt, open(Path(ckpt) / "loss.csv") as fh:
        rows = list(csv.DictReader(fh))
    return {"samples_per_s": statistics.median(float(r["samples_per_s"]) for r in rows[1:]),
            "wall_s": time.perf_counter() - started, "peak_mem_mb": max(float(r["peak_mem_mb"]) for r in rows),
            "rank_state_mb": max(float(r["rank_state_mb"]) for r in rows),
            "last_loss": float(rows[-1]["loss"])}


def tiny_bench(args) -> dict:
    import ray

    from dermaflux.config import load_config
    from dermaflux.core.runtime import init_ray

    steps = 15 if args.quick else 50
    base = {"mode": "full", "micro_batch": 8, "steps": steps, "checkpoint_every": steps, "validate_every": steps,
            "log_every": steps, "warmup_steps": 0, "max_failures": 0, "vae_fit": {"enabled": False}}
    cfg = load_config("tiny", extra={"train": base})
    rows = []
    with tempfile.TemporaryDirectory(prefix="dfx-bench-train-") as tmp:
        work = Path(tmp)
        cache = build_cache(Path(args.data), work, cfg, n_train=64)
        plain = plain_loop(cfg, cache, steps)
        rows.append({"loop": "plain torch", "workers": 1, "zero": "-", **plain})
        init_ray(cfg.ray.model_copy(update={"num_cpus": 4}), runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}},
                 log_to_driver=False)
        for workers, strategy, zero in TINY_ROWS:
            run_cfg = load_config("tiny", extra={"train": {**base, "workers": workers, "strategy": strategy,
                                                           "zero_stage": zero}})
            res = ray_loop(run_cfg, cache, work / f"ray-w{workers}-{strategy}-z{zero}")
            rows.append({"loop": f"Ray Train + {STRATEGY_NAMES[strategy]}", "workers": workers, "strategy": strategy,
                         "zero": zero if strategy == "deepspeed" else "-", **res})
        ray.shutdown()
        # The CPU is shared: run the baseline again after the Ray rows and keep its faster run (conservative ratio).
        again = plain_loop(cfg, cache, steps)
        if again["samples_per_s"] > plain["samples_per_s"]:
            plain = again
            rows[0].update(again)
    for row in rows:
        row["ratio_vs_plain"] = row["samples_per_s"] / plain["samples_per_s"]
    z2 = next(r for r in rows if r["workers"] == 2 and r["zero"] == 2)
    z3 = next(r for r in rows if r["workers"] == 2 and r["zero"] == 3)
    fsdp2 = next(r for r in rows if r["workers"] == 2 and r.get("strategy") == "fsdp2")
    return {"kind": "tiny", "steps": steps, "micro_batch": 8, "rows": rows,
            "overhead_ratio_1_worker": rows[1]["samples_per_s"] / plain["samples_per_s"],
            "zero3_vs_zero2_peak_mem": z3["peak_mem_mb"] / z2["peak_mem_mb"],
            "zero3_vs_zero2_rank_state": z3["rank_state_mb"] / z2["rank_state_mb"],
            "fsdp2_vs_zero3_samples_per_s": fsdp2["samples_per_s"] / z3["samples_per_s"],
            "fsdp2_vs_zero3_peak_mem": fsdp2["peak_mem_mb"] / z3["peak_mem_mb"],
            "fsdp2_vs_zero3_rank_state": fsdp2["rank_state_mb"] / z3["rank_state_mb"]}


def flux_dev_transformer(layers: int | None):
    """FLUX.1-dev's transformer architecture (random weights); `layers` shrinks the block counts to start on CPU."""
    from diffusers import FluxTransformer2DModel

    double, single = (19, 38) if layers is None else (layers, 2 * layers)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )


def full_size_bench(args) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dermaflux.config import load_config
    from dermaflux.train.flow import FlowBatch, flow_matching_loss
    from dermaflux.train.model_setup import prepare_transformer

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    if gpu and not args.cudnn_sdpa:
        # Seen on an H200 (torch 2.11 + cu130): cuDNN's SDPA backward fails ("mha_graph.execute ...
        # is_good()") on Flux's joint attention; the flash / mem-efficient kernels run it.
        torch.backends.cuda.enable_cudnn_sdp(False)
    tc = load_config("flux-dev").train.model_copy(update={"mode": "lora", "gradient_checkpointing": True})
    tc = tc.model_copy(update={"lora": tc.lora.model_copy(update={"rank": 16})})
    torch.manual_seed(0)
    with torch.device(device):
        transformer = flux_dev_transformer(args.layers).to(dtype)
    params = prepare_transformer(transformer, tc)
    opt = torch.optim.AdamW(params, lr=1e-4)
    side = args.resolution // 8  # FLUX.1-dev VAE: 8x down, 16 channels; packing makes 2x2 patches
    batch = FlowBatch(torch.randn(args.batch, 16, side, side), torch.randn(args.batch, args.text_tokens, 4096),
                      torch.randn(args.batch, 768)).to(device, dtype)
    n_params = sum(p.numel() for p in transformer.parameters())
    n_train = sum(p.numel() for p in params)

    def step():
        loss = flow_matching_loss(transformer, batch, tc, 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    counter = FlopCounterMode(display=False)
    with counter:
        step()  # also the warm-up step
    flops = counter.get_total_flops()
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tflops = flops / step_s / 1e12
    result = {
        "kind": "full-size", "device": torch.cuda.get_device_name() if gpu else platform.processor() or "cpu",
        "dtype": str(dtype), "double_blocks": 19 if args.layers is None else args.layers,
        "single_blocks": 38 if args.layers is None else 2 * args.layers, "params": n_params,
        "trainable_params": n_train, "resolution": args.resolution, "image_tokens": (side // 2) ** 2,
        "text_tokens": args.text_tokens, "batch": args.batch, "lora_rank": 16, "gradient_checkpointing": True,
        "step_s": step_s, "flops_per_step": flops, "achieved_tflops": tflops,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
    }
    if gpu:
        result["bf16_peak_tflops"] = H100_BF16_DENSE_TFLOPS
        result["utilisation"] = tflops / H100_BF16_DENSE_TFLOPS
    return result


def template_captions(data: Path, out: Path, n: int) -> Path:
    """`build_captions` with the caption template's wording (the caption stage's, 60-100 T5 tokens) in place of
    its one-line captions, so the T5 length the trainer picks is the one real captions get."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dermaflux.lesion.attributes import COLOUR_WORDS, LesionAttributes
    from dermaflux.lesion.captions import caption_from_attributes
    from dermaflux.testing.ham10000 import build_captioned_set as build_captions

    captions = build_captions(data, out, n_train=n, n_test=0)
    colours = list(COLOUR_WORDS)
    for shard in sorted((captions / "shards").glob("*.parquet")):
        table = pq.read_table(shard)
        rows = table.to_pylist()
        for i, row in enumerate(rows):
            attrs = LesionAttributes(
                diagnosis=row["label"], asymmetry_axes=i % 3, border_irregularity=(i % 5) / 5,
                colours=colours[: 1 + i % 4], diameter_mm=3.0 + i % 7, site=row["site"], age=row["age"],
                sex=row["sex"] if row["sex"] in ("male", "female") else None)
            row["caption"] = caption_from_attributes(attrs, seed=i)
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), shard)
    return captions


def product_run(args, work: Path) -> dict:
    """`dermaflux train` through the stage entry (preflight, Ray, the stage) on the flux-dev preset."""
    from dermaflux.config import load_config
    from dermaflux.commands import run

    captions = template_captions(Path(args.data), work / "captions", args.images)
    cfg = load_config("flux-dev", overrides=[f"model.pretrained={args.model}"], extra={"train": {
        "captions": str(captions), "out": str(work / "run"), "workers": 1, "zero_stage": 2, "steps": args.steps,
        "checkpoint_every": args.steps, "validate_every": 10**6, "log_every": 1, "tracking": [],
        "validation_prompts": ["dermoscopic image of a melanoma"], "validation_seeds": [0], "validation_steps": 2,
        "precompute_workers": 1, "cpus_per_worker": 8, "encode": args.gpu_encode}})
    started = time.perf_counter()
    summary = run("train", cfg)
    with open(work / "run" / "loss.csv") as fh:
        rows = list(csv.DictReader(fh))
    steady = [float(r["samples_per_s"]) for r in rows[2:]] or [float(r["samples_per_s"]) for r in rows]
    return {"samples_per_s": statistics.median(steady), "wall_s": time.perf_counter() - started,
            "peak_gib": max(float(r["peak_mem_mb"]) for r in rows) / 1024, "steps": len(rows),
            **{k: summary["train"][k] for k in ("micro_batch", "gradient_checkpointing", "compiled", "text_tokens")},
            "caption_tokens": summary["encode"]["text_token_plan"], "encode": summary["encode"]["mode"]}


def plain_loops(args, product: dict) -> dict:
    """Eager reference (diffusers' defaults), FLOPs per sample, then the product's settings, in this process."""
    import torch
    from diffusers import FluxTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    from dermaflux.config import load_config
    from dermaflux.model.compile import compile_blocks
    from dermaflux.train.model_setup import prepare_transformer

    torch.backends.cuda.enable_cudnn_sdp(False)  # its SDPA backward failed on Flux's joint attention (H200)
    transformer = FluxTransformer2DModel.from_pretrained(args.model, subfolder="transformer",
                                                         torch_dtype=torch.bfloat16).to("cuda")
    tc = load_config("flux-dev").train.model_copy(update={"gradient_checkpointing": False, "micro_batch": 4})
    opt = torch.optim.AdamW(prepare_transformer(transformer, tc), lr=1e-4)
    step = _plain_step(transformer, opt, tc)
    side = 512 // 8
    with torch.compiler.set_stance("force_eager"):
        reference = _timed(step, 4, 512, side, args.plain_steps)
        counter = FlopCounterMode(display=False)
        with counter:
            step(product["micro_batch"], product["text_tokens"], side)
        flops_per_sample = counter.get_total_flops() / product["micro_batch"]
    if product["gradient_checkpointing"]:
        transformer.enable_gradient_checkpointing()
    compiled = bool(product["compiled"]) and compile_blocks(
        transformer, lambda: step(product["micro_batch"], product["text_tokens"], side))
    same = _timed(step, product["micro_batch"], product["text_tokens"], side, args.plain_steps)
    return {"reference_samples_per_s": reference, "plain_same_settings_samples_per_s": same,
            "plain_same_settings_compiled": compiled, "flops_per_sample": flops_per_sample}


def _plain_step(transformer, opt, tc):
    import torch

    from dermaflux.train.flow import FlowBatch, flow_matching_loss

    def step(batch: int, text_tokens: int, side: int) -> None:
        inputs = FlowBatch(torch.randn(batch, 16, side, side), torch.randn(batch, text_tokens, 4096),
                           torch.randn(batch, 768)).to("cuda", torch.bfloat16)
        loss = flow_matching_loss(transformer, inputs, tc, 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _timed(step, batch: int, text_tokens: int, side: int, steps: int) -> float:
    """Samples/s: the median step over `steps` after two warm-up steps."""
    import torch

    for _ in range(2):
        step(batch, text_tokens, side)
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(batch, text_tokens, side)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def gpu_product_bench(args) -> dict:
    import ray
    import torch

    work = Path(args.work or tempfile.mkdtemp(prefix="dfx-bench-gpu-"))
    product = product_run(args, work)
    ray.shutdown()  # the Ray Train worker (and its GPU memory) is gone; the plain loops get the whole GPU
    if args.gpu_encode == "online":  # its cost: compare with the cached bench-train.json of the same call
        return {"kind": "gpu-product-online", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "product": product}
    plain = plain_loops(args, product)
    result = {"kind": "gpu-product", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "product": product, **plain, "bf16_peak_tflops": H100_BF16_DENSE_TFLOPS}
    result["mfu"] = plain["flops_per_sample"] * product["samples_per_s"] / (H100_BF16_DENSE_TFLOPS * 1e12)
    result["vs_reference"] = product["samples_per_s"] / plain["reference_samples_per_s"]
    result["vs_plain_same_settings"] = product["samples_per_s"] / plain["plain_same_settings_samples_per_s"]
    return result


# --- issue 21: cached vs online encoding ------------------------------------------------------------------------

def sizing_rows() -> list[dict]:
    """Cached bytes per image and for 500,000 images, per preset, from the shapes (8 dihedral views)."""
    from dermaflux.config import load_config
    from dermaflux.train.encode_plan import RowShapes, row_shapes

    tiny = load_config("tiny")
    shapes = [("tiny", row_shapes(tiny.model, None, 8, 64))]
    # FLUX.1-dev at 512 px: its VAE (16 channels, 8x down) and transformer widths (T5 4096, pooled CLIP 768), bf16.
    shapes += [("flux-dev", RowShapes(16, 64, 8, tokens, 4096, 768, 2)) for tokens in (128, 512)]
    return [{"preset": name, "text_tokens": s.text_tokens, "bytes_per_image": s.bytes_per_row(),
             "bytes_500k": 500_000 * s.bytes_per_row()} for name, s in shapes]


def encode_corpus(data: Path, out: Path, rows: int) -> Path:
    """A captioned set of `rows` train rows: HAM10000's first images by id, repeated under new ids past 10,015."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dermaflux.caption.schema import CAPTION_SCHEMA
    from dermaflux.testing.ham10000 import build_captioned_set, read_metadata

    base = build_captioned_set(data, out, n_train=min(rows, len(read_metadata(data))), n_test=0, shard_rows=512)
    table = pa.concat_tables([pq.read_table(p) for p in sorted((base / "shards").glob("*.parquet"))])
    copy, shard = 1, len(list((base / "shards").glob("*.parquet")))
    while table.num_rows * copy < rows:
        extra = table.slice(0, rows - table.num_rows * copy)
        extra = extra.set_column(extra.schema.get_field_index("id"), "id",
                                 pa.array([f"{i}-copy{copy}" for i in extra["id"].to_pylist()]))
        for start in range(0, extra.num_rows, 512):
            pq.write_table(extra.slice(start, 512).cast(CAPTION_SCHEMA), base / "shards" / f"part-{shard:05d}.parquet")
            shard += 1
        copy += 1
    return base


class FirstStepTime:
    """Trainer hook: rank 0 writes the wall-clock time of its first optimiser step."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __call__(self, trainer, step: int) -> None:
        if trainer.rank == 0 and not self.path.exists():
            self.path.write_text(str(time.time()))


def encode_run(captions: Path, out: Path, mode: str, steps: int) -> dict:
    """The train stage's steps after the VAE fit (tiny preset, its random VAE): plan, pre-compute or not,
    Ray Train; seconds from the start to the first optimiser step, and samples/s of the steps after it."""
    from dermaflux.config import load_config
    from dermaflux.train.ray_precompute import encode_validation_prompts
    from dermaflux.train.ray_trainer import run_training
    from dermaflux.train.stage import _encode_plan, _precompute

    cfg = load_config("tiny", extra={"train": {
        "captions": str(captions), "out": str(out), "encode": mode, "steps": steps, "micro_batch": 8,
        "checkpoint_every": steps, "validate_every": 10**6, "validate_final": False, "log_every": 1,
        "warmup_steps": 0, "tracking": [], "max_failures": 0, "vae_fit": {"enabled": False}}})
    started = time.time()
    plan = _encode_plan(cfg, None)
    if plan["mode"] == "cached":
        _precompute(cfg, out / "cache", None)
    else:
        encode_validation_prompts(cfg, out / "cache", None, plan["text_tokens"])
    first = out / "first_step.txt"
    result = run_training(cfg, out / "cache", None, out, encode=plan, hooks=[FirstStepTime(first)])
    if result.error is not None:
        raise RuntimeError(result.error)
    with result.checkpoint.as_directory() as ckpt, open(Path(ckpt) / "loss.csv") as fh:
        rows = list(csv.DictReader(fh))
    return {"mode": plan["mode"], "first_step_s": float(first.read_text()) - started,
            "samples_per_s": statistics.median(float(r["samples_per_s"]) for r in rows[1:]),
            "cache_bytes": sum(f.stat().st_size for f in (out / "cache").rglob("*") if f.is_file())}


def encode_bench(args) -> dict:
    import ray

    from dermaflux.config import load_config
    from dermaflux.core.runtime import init_ray

    sizes = [int(n) for n in args.rows.split(",")]
    init_ray(load_config("tiny").ray.model_copy(update={"num_cpus": 4}),
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}}, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dfx-bench-encode-") as tmp:
        for n in sizes:
            captions = encode_corpus(Path(args.data), Path(tmp) / f"captions-{n}", n)
            for mode in ("cached", "online"):  # interleaved per size: the machine is shared
                if mode == "cached" and args.cached_rows is not None and n > args.cached_rows:
                    continue  # its pre-compute alone: ~11 rows/s on one CPU here, 30 min for 20,000
                rows.append({"rows": n, **encode_run(captions, Path(tmp) / f"{mode}-{n}", mode, args.encode_steps)})
    ray.shutdown()
    by = {(r["rows"], r["mode"]): r for r in rows}
    small, large = sizes[0], sizes[-1]
    return {"kind": "encode", "steps": args.encode_steps, "rows": rows, "sizing": sizing_rows(),
            "online_vs_cached_samples_per_s": by[(small, "online")]["samples_per_s"] / by[(small, "cached")]["samples_per_s"],
            "first_step_growth": {mode: by[(large, mode)]["first_step_s"] / by[(small, mode)]["first_step_s"]
                                  for mode in ("cached", "online") if (large, mode) in by and (small, mode) in by}}


STARTUP_IMAGES, STARTUP_STEPS = 64, 60


def startup_inputs(data: Path, work: Path) -> tuple[Path, Path, Path]:
    """(captions, image folder for the peer, tiny model folder): the first 64 HAM10000 images by id."""
    import pyarrow.parquet as pq

    from dermaflux.config import load_config
    from dermaflux.model.loading import resolve_pretrained
    from dermaflux.testing.ham10000 import build_captioned_set

    captions = build_captioned_set(data, work / "captions", n_train=STARTUP_IMAGES, n_test=0)
    images = work / "images"
    images.mkdir()
    for shard in sorted((captions / "shards").glob("*.parquet")):
        for row in pq.read_table(shard, columns=["id", "image"]).to_pylist():
            (images / f"{row['id']}.jpg").write_bytes(row["image"])
    return captions, images, Path(resolve_pretrained(load_config("tiny").model))


def _timed_command(cmd: list[str], log: Path) -> float:
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])}... exited {proc.returncode}; see {log}")
    return wall


def dermaflux_short_run(captions: Path, out: Path, launch: str) -> dict:
    cmd = [str(Path(sys.executable).with_name("dermaflux")), "train", "--preset", "tiny", "--captions", str(captions),
           "--out", str(out), "--steps", str(STARTUP_STEPS), "--mode", "lora",
           "--set", "train.vae_fit.enabled=false", "--set", "train.micro_batch=8", "--set", "train.lr=1e-4",
           "--set", "train.lora.rank=16", "--set", "train.validate_final=false", "--set", f"train.launch={launch}"]
    wall = _timed_command(cmd, out.with_suffix(".log"))
    rows = read_csv_rows(out / "loss.csv")
    steps_s = sum(8 / float(r["samples_per_s"]) for r in rows)
    return {"run": f"dermaflux train (launch {launch})", "wall_s": wall, "steps_s": steps_s, "fixed_s": wall - steps_s,
            "launch": json.loads((out / "summary.json").read_text())["train"].get("launch", launch)}


def read_csv_rows(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def peer_short_run(peer: Path, images: Path, model: Path, out: Path) -> dict:
    import re

    cmd = [sys.executable, str(peer), "--pretrained_model_name_or_path", str(model), "--instance_data_dir",
           str(images), "--instance_prompt", "dermoscopic image of a skin lesion", "--resolution", "64",
           "--train_batch_size", "8", "--rank", "16", "--max_train_steps", str(STARTUP_STEPS), "--output_dir", str(out),
           "--mixed_precision", "no", "--learning_rate", "1e-4", "--seed", "0", "--max_sequence_length", "64",
           "--checkpointing_steps", "1000000", "--dataloader_num_workers", "0", "--guidance_scale", "1"]
    log = out.with_suffix(".log")
    wall = _timed_command(cmd, log)
    rates = re.findall(r"(\d+(?:\.\d+)?)(it/s|s/it)", log.read_text())
    value, unit = rates[-1]
    step_s = 1 / float(value) if unit == "it/s" else float(value)
    return {"run": "diffusers train_dreambooth_lora_flux.py", "wall_s": wall, "steps_s": step_s * STARTUP_STEPS,
            "fixed_s": wall - step_s * STARTUP_STEPS}


def startup_bench(args) -> dict:
    peer = Path(args.peer or os.environ.get("DERMAFLUX_PEER_SCRIPT", "")) if (args.peer or
                                                                             os.environ.get("DERMAFLUX_PEER_SCRIPT")) else None
    if peer is not None and not peer.is_file():
        raise SystemExit(f"--peer {peer}: no such file")
    rounds = []
    with tempfile.TemporaryDirectory(prefix="dfx-bench-startup-") as tmp:
        captions, images, model = startup_inputs(Path(args.data), Path(tmp))
        for n in range(args.rounds):
            runs = [dermaflux_short_run(captions, Path(tmp) / f"auto-{n}", "auto")]
            if peer is not None:
                runs.append(peer_short_run(peer, images, model, Path(tmp) / f"peer-{n}"))
            runs.append(dermaflux_short_run(captions, Path(tmp) / f"workers-{n}", "workers"))
            rounds.append(runs)
    # the peer by name and content (not by where it lay on the measuring machine)
    named = {"script": peer.name, "sha256": hashlib.sha256(peer.read_bytes()).hexdigest()} if peer else None
    result = {"kind": "startup", "images": STARTUP_IMAGES, "steps": STARTUP_STEPS, "peer": named, "rounds": rounds}
    if peer is not None:
        result["fixed_vs_peer"] = {name: statistics.median(r[i]["fixed_s"] / r[1]["fixed_s"] for r in rounds)
                                   for i, name in ((0, "auto"), (2, "workers"))}
    return result


def print_sizing(sizing: list[dict]) -> None:
    print(f"{'preset':<10}{'T5 tokens':>10}{'per image':>12}{'500,000 images':>16}")
    for r in sizing:
        print(f"{r['preset']:<10}{r['text_tokens']:>10}{r['bytes_per_image'] / 2**20:>10.2f} MiB"
              f"{r['bytes_500k'] / 2**30:>12.0f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ham10000-224"))
    parser.add_argument("--full-size", action="store_true", help="FLUX.1-dev-sized transformer (GPU machine)")
    parser.add_argument("--layers", type=int, default=None, help="full-size: N double + 2N single blocks (CPU start)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="full-size: timed steps")
    parser.add_argument("--cudnn-sdpa", action="store_true", help="full-size: allow cuDNN attention (off by default)")
    parser.add_argument("--gpu-product", action="store_true", help="the product's trainer on --model (GPU machine)")
    parser.add_argument("--model", help="gpu-product: a `dermaflux model random --like flux-dev` folder")
    parser.add_argument("--images", type=int, default=48, help="gpu-product: captioned images to pre-compute")
    parser.add_argument("--plain-steps", type=int, default=8, help="gpu-product: timed steps of each plain loop")
    parser.add_argument("--work", help="gpu-product: work folder (default: a new temporary one)")
    parser.add_argument("--gpu-encode", choices=["cached", "online"], default="cached",
                        help="gpu-product: train.encode (online: the product run only, no plain loops)")
    parser.add_argument("--json", help="where to write the result (default bench/results/<kind>.json)")
    parser.add_argument("--sizing", action="store_true", help="print the cache sizing table (from the shapes)")
    parser.add_argument("--encode", action="store_true", help="cached vs online: samples/s, time to first step")
    parser.add_argument("--rows", default="1000,20000", help="encode: corpus sizes for the time to first step")
    parser.add_argument("--encode-steps", type=int, default=12, help="encode: optimiser steps per run")
    parser.add_argument("--cached-rows", type=int, default=None,
                        help="encode: run the cached mode only on corpora of at most N rows (its pre-compute is slow here)")
    parser.add_argument("--startup", action="store_true", help="a short run's wall time beside diffusers' script")
    parser.add_argument("--peer", help="startup: diffusers' examples/dreambooth/train_dreambooth_lora_flux.py")
    parser.add_argument("--rounds", type=int, default=2, help="startup: interleaved rounds")
    args = parser.parse_args()
    if args.startup:
        result = startup_bench(args)
        print(f"{'round':>5}  {'run':<42}{'wall s':>8}{'steps s':>9}{'fixed s':>9}")
        for n, runs in enumerate(result["rounds"]):
            for r in runs:
                print(f"{n:>5}  {r['run']:<42}{r['wall_s']:>8.1f}{r['steps_s']:>9.1f}{r['fixed_s']:>9.1f}")
        if "fixed_vs_peer" in result:
            print("fixed cost / the peer's (median over rounds): " +
                  ", ".join(f"{k} {v:.2f}x" for k, v in result["fixed_vs_peer"].items()))
        path = Path(args.json or RESULTS / "train_startup.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**result, "host": platform.node()}, indent=2) + "\n")
        print(f"wrote {path}")
        return
    if args.sizing or args.encode:
        result = encode_bench(args) if args.encode else {"kind": "sizing", "sizing": sizing_rows()}
        print_sizing(result["sizing"])
        if args.encode:
            print(f"\n{'rows':>7}{'mode':>8}{'first step s':>14}{'samples/s':>11}{'cache MiB':>11}")
            for r in result["rows"]:
                print(f"{r['rows']:>7}{r['mode']:>8}{r['first_step_s']:>14.1f}{r['samples_per_s']:>11.1f}"
                      f"{r['cache_bytes'] / 2**20:>11.1f}")
            print(f"online / cached samples/s: {result['online_vs_cached_samples_per_s']:.2f}; time to first step, "
                  f"largest / smallest corpus: " + ", ".join(f"{m} {g:.2f}x" for m, g in result["first_step_growth"].items()))
        path = Path(args.json or RESULTS / f"train_{result['kind']}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**result, "host": platform.node()}, indent=2) + "\n")
        print(f"wrote {path}")
        return
    if args.gpu_product:
        os.environ["DS_ACCELERATOR"] = "cuda"  # before Ray starts: its workers inherit it (the default above is cpu)
        args.steps = args.steps if args.steps != 5 else 12
        result = gpu_product_bench(args)
        path = Path(args.json or RESULTS / "train_gpu_product.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        print(f"wrote {path}")
        return
    if not args.full_size:
        # Ray sets this in its workers; the plain loop must run under the same threading to compare fairly.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.full_size:
        result = full_size_bench(args)
        print(f"{'device':<28}{'blocks':>8}{'tokens':>12}{'step s':>10}{'TFLOP/s':>10}{'util':>8}{'peak GiB':>10}")
        util = f"{result['utilisation']:.1%}" if "utilisation" in result else "-"
        mem = f"{result['peak_mem_gib']:.1f}" if result["peak_mem_gib"] is not None else "-"
        print(f"{result['device'][:27]:<28}{result['double_blocks']:>3}+{result['single_blocks']:<4}"
              f"{result['image_tokens']:>6}+{result['text_tokens']:<5}{result['step_s']:>10.3f}"
              f"{result['achieved_tflops']:>10.2f}{util:>8}{mem:>10}")
        path = RESULTS / "train_full_size.json"
    else:
        result = tiny_bench(args)
        print(f"{'loop':<24}{'workers':>8}{'zero':>6}{'samples/s':>11}{'x plain':>9}{'peak MB':>9}{'state MB':>9}{'wall s':>8}")
        for r in result["rows"]:
            print(f"{r['loop']:<24}{r['workers']:>8}{r['zero']!s:>6}{r['samples_per_s']:>11.1f}"
                  f"{r['ratio_vs_plain']:>9.2f}{r['peak_mem_mb']:>9.0f}{r['rank_state_mb']:>9.2f}{r['wall_s']:>8.1f}")
        print(f"FSDP2 / ZeRO-3 at 2 workers: samples/s x{result['fsdp2_vs_zero3_samples_per_s']:.2f}, "
              f"peak MB x{result['fsdp2_vs_zero3_peak_mem']:.2f}, "
              f"rank state MB x{result['fsdp2_vs_zero3_rank_state']:.2f}")
        path = RESULTS / "train.json"
    result["host"] = platform.node()
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
