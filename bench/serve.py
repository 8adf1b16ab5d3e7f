"""Synthesis throughput: the Serve app (batched vs unbatched, 1 vs 2 replicas, adapters) vs a direct loop.

    .venv/bin/python bench/serve.py [--quick]                 # tiny preset, CPU, over HTTP on loopback
    .venv/bin/python bench/serve.py --full-size [--layers N]  # FLUX.1-dev transformer shape, random bf16 weights

Tiny mode: every row makes the same images (same prompts and seeds) with the same tiny model.
"direct" rows call `sampling.generate_images` in this process (no Ray, no HTTP) with the threads
of one replica (`synth.cpus_per_replica`); "serve" rows
send single-image POST /v1/images requests from `--clients` concurrent clients. The overhead
ratio is direct img/s over service img/s at the same batch size and one replica. The adapter
rows cycle requests over two random LoRAs with room for both per replica (each loads once) and
room for one (Serve's multiplexer evicts on every switch): the cost of LoRA vs base, and of reloads.
The bounded-flood row sets `synth.limits.max_queued_images` (`--flood-limit`) and floods one
replica with `--flood-clients` concurrent clients: accepted requests' p50/p99 latency against
the single-client latency of the same service (target: p99 within 2x), the count refused with
429/503 (Retry-After) and any other failure (target: none).
The slow-client row opens `--slow-clients` connections (600) that send a POST's headers and then
1 byte of body every 3 s, and probes `/healthz` meanwhile (target: every probe 200 within 1 s; the
slow bodies end with a 408 at `synth.limits.body_timeout_s` or a 429 beyond `max_open_requests`).

Full-size mode: a FluxPipeline whose transformer has the FLUX.1-dev architecture (19 double +
38 single blocks, 3072 wide; `--layers N` keeps N of each to smoke-test on a CPU) with random
bf16 weights, the full-size Flux VAE (random), and random prompt embeddings of the real T5-XXL /
CLIP-L shapes in place of the text encoders (their cost, once per prompt, is not timed).
Seconds per image and images/s at each `--batch-sizes`.
Writes bench/results/serve.json (sections "tiny" and "full_size").
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = ROOT / "bench" / "results" / "serve.json"
PROMPTS = [
    "A dermoscopic image of a melanoma, malignant, asymmetric along both axes, with an irregular border.",
    "Dermoscopy photo of a benign melanocytic nevus, symmetric in shape, with uniform light brown colour.",
    "A dermoscopic image of a basal cell carcinoma, malignant, with a jagged, irregular border.",
    "Close-up dermoscopic image showing a dermatofibroma, a benign lesion.",
]


def start_bench_service(cfg, synth: dict) -> str:
    """Start the service with `cfg` and the `synth` section settings (nested, merged and validated as the
    pipeline merges its stage settings) on a free loopback port; return its URL once /readyz answers."""
    import httpx

    from dermaflux.config import DermaFluxConfig
    from dermaflux.core.config import deep_merge
    from dermaflux.core.runtime import free_port
    from dermaflux.synth.serve_app import start_service

    run_cfg = DermaFluxConfig.model_validate(
        deep_merge(cfg.model_dump(mode="json"), {"synth": {**synth, "port": free_port()}}))
    start_service(run_cfg, access_log=False)
    url = f"http://127.0.0.1:{run_cfg.synth.port}"
    with httpx.Client(base_url=url, timeout=300) as client:
        while client.get("/readyz").status_code != 200:
            time.sleep(0.5)
    return url


def requests_for(n: int, cfg):
    from dermaflux.synth.requests import SampleRequest, Settings

    settings = Settings(cfg.model.resolution, cfg.model.resolution, cfg.model.num_inference_steps,
                        cfg.model.guidance_scale, None)
    return [SampleRequest(PROMPTS[i % len(PROMPTS)], i, settings) for i in range(n)]


def direct_loop(cfg, n: int, batch_size: int) -> dict:
    from dermaflux.synth.adapter_pool import AdapterPool
    from dermaflux.synth.sampling import encode_png, generate_images

    import torch

    # The resources of one replica: Ray pins a 1-CPU worker to one thread (OMP_NUM_THREADS=1).
    torch.set_num_threads(max(1, int(cfg.synth.cpus_per_replica)))
    pipe = AdapterPool.from_config(cfg)
    requests = requests_for(n, cfg)
    options = {"max_batch_size": batch_size, "max_sequence_length": cfg.model.max_sequence_length}  # as the service
    generate_images(pipe, requests[:batch_size], **options)  # warm-up
    started = time.perf_counter()
    for i in range(0, n, batch_size):
        for image in generate_images(pipe, requests[i : i + batch_size], **options):
            encode_png(image)  # the service encodes too
    seconds = time.perf_counter() - started
    return {"mode": "direct", "replicas": 0, "batch_size": batch_size, "images": n, "seconds": seconds,
            "img_per_s": n / seconds}


def serve_run(cfg, n: int, batch_size: int, replicas: int, clients: int, adapters=(None,), max_adapters: int = 4) -> dict:
    import httpx
    import numpy as np
    from ray import serve

    url = start_bench_service(cfg, {"batch_size": batch_size, "max_adapters_per_replica": max_adapters,
                                    "autoscaling": {"min_replicas": replicas, "max_replicas": replicas}})
    requests = requests_for(n, cfg)

    def one(i: int) -> tuple[int, float]:
        started = time.perf_counter()
        with httpx.Client(timeout=600) as client:
            response = client.post(f"{url}/v1/images", json={"prompt": requests[i].prompt, "seed": requests[i].seed,
                                                             "adapter": adapters[i % len(adapters)]})
        return response.status_code, time.perf_counter() - started

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(min(n, clients))))  # warm-up: every replica has run once
        started = time.perf_counter()
        results = list(pool.map(one, range(n)))
    seconds = time.perf_counter() - started
    replica = httpx.get(f"{url}/v1/adapters").json()["replica"]
    serve.shutdown()
    latencies = np.array([t for _, t in results])
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    return {"mode": "serve", "replicas": replicas, "batch_size": batch_size, "images": n, "seconds": seconds,
            "img_per_s": n / seconds, "failed": sum(code != 200 for code, _ in results), "clients": clients,
            "p50_s": p50, "p95_s": p95, "p99_s": p99, "adapters": list(adapters), "max_adapters": max_adapters,
            "adapter_loads": sum(replica["loads"].values())}


def flood_run(cfg, n: int, clients: int, limit: int, batch_size: int, honour_retry_after: bool = True) -> dict:
    """More concurrent clients than the queue limit admits: what is accepted stays fast, the rest is refused.
    A refused client waits `Retry-After` before its next request, unless `honour_retry_after` is False."""
    import httpx
    import numpy as np
    from ray import serve

    url = start_bench_service(cfg, {"batch_size": batch_size, "limits": {"max_queued_images": limit}})
    requests = requests_for(n, cfg)
    # One keep-alive connection per client thread, made outside the timed call: building an httpx
    # client costs tens of ms of CPU (its SSL context), which a burst of 16 turns into false latency.
    local = threading.local()

    def one(i: int) -> tuple[int, float, str | None]:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=600)
        started = time.perf_counter()
        response = local.client.post(f"{url}/v1/images", json={"prompt": requests[i].prompt, "seed": requests[i].seed})
        seconds, after = time.perf_counter() - started, response.headers.get("retry-after")
        if after is not None and honour_retry_after:
            time.sleep(float(after))
        return response.status_code, seconds, after

    def connect(barrier: threading.Barrier) -> None:
        local.client = httpx.Client(timeout=600)
        local.client.get(f"{url}/healthz")
        barrier.wait()  # every worker thread holds one connection: the flood starts from connected clients

    for i in range(2):
        one(i)  # warm-up
    single = [one(i)[1] for i in range(16)]  # one client, one request at a time
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        barrier = threading.Barrier(clients)
        list(pool.map(lambda _: connect(barrier), range(clients)))
        started = time.perf_counter()
        results = list(pool.map(one, range(n)))
    seconds = time.perf_counter() - started
    serve.shutdown()
    accepted = np.array([t for code, t, _ in results if code == 200])
    refused = [after for code, _, after in results if code in (429, 503)]
    single_p50 = float(np.median(single))
    p50, p99 = np.percentile(accepted, [50, 99]) if len(accepted) else (float("nan"), float("nan"))
    return {"mode": "flood", "replicas": 1, "batch_size": batch_size, "requests": n, "clients": clients,
            "honour_retry_after": honour_retry_after,
            "queue_limit": limit, "seconds": seconds, "single_p50_s": single_p50, "accepted": len(accepted),
            "p50_s": p50, "p99_s": p99, "p99_over_single": p99 / single_p50, "refused": len(refused),
            "refused_with_retry_after": sum(after is not None for after in refused),
            "failed": sum(code not in (200, 429, 503) for code, _, _ in results)}


def print_flood(row: dict) -> None:
    print(f"\nbounded flood: {row['clients']} clients, {row['requests']} single-image requests, "
          f"synth.limits.max_queued_images={row['queue_limit']}, 1 replica, batch {row['batch_size']}, refused "
          f"clients {'wait Retry-After' if row['honour_retry_after'] else 'retry at once'}")
    print(f"{'single p50 s':>12} {'accepted':>8} {'p50 s':>7} {'p99 s':>7} {'p99/single':>10} {'refused':>7} "
          f"{'w/ Retry-After':>14} {'failed':>6}")
    print(f"{row['single_p50_s']:12.3f} {row['accepted']:8d} {row['p50_s']:7.3f} {row['p99_s']:7.3f} "
          f"{row['p99_over_single']:10.2f} {row['refused']:7d} {row['refused_with_retry_after']:14d} "
          f"{row['failed']:6d}")


def slow_clients_run(cfg, clients: int, seconds: float, trickle_s: float = 3.0) -> dict:
    """`clients` slow-body connections against one service while /healthz is probed every 0.25 s."""
    import httpx
    import numpy as np
    from ray import serve

    from dermaflux.testing.serve import open_slow_bodies

    url = start_bench_service(cfg, {})
    sockets = open_slow_bodies(int(url.rsplit(":", 1)[1]), clients, {}, body_bytes=10_000)
    stop = threading.Event()

    def trickle() -> None:  # 1 byte every `trickle_s` on each connection the service has not closed
        while not stop.wait(trickle_s):
            for sock in sockets:
                try:
                    sock.send(b" ")
                except OSError:
                    pass

    threading.Thread(target=trickle, daemon=True).start()
    probes = []  # (status, seconds, when: seconds since the slow connections were opened)
    opened = time.perf_counter()
    with httpx.Client(timeout=30) as client:
        deadline = opened + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            status = client.get(f"{url}/healthz").status_code
            probes.append((status, time.perf_counter() - started, started - opened))
            time.sleep(0.25)
    stop.set()
    answers: dict[str, int] = {}
    answered_by = time.perf_counter() + 2.0  # one wait for all: a service that never answers costs 2 s, not 600 x
    for sock in sockets:
        sock.settimeout(max(answered_by - time.perf_counter(), 0.001))
        try:
            line = sock.recv(64).split(b"\r\n", 1)[0].decode(errors="replace")
            status = line.split(" ")[1] if line.startswith("HTTP/") else "closed"
        except OSError:
            status = "none yet"
        answers[status] = answers.get(status, 0) + 1
        sock.close()
    serve.shutdown()
    latencies = np.array([t for _, t, _ in probes])
    slowest = max(probes, key=lambda probe: probe[1])
    return {"mode": "slow-clients", "clients": clients, "trickle_s": trickle_s, "seconds": seconds,
            "probes": len(probes), "healthz_200": sum(code == 200 for code, _, _ in probes),
            "healthz_p50_s": float(np.median(latencies)), "healthz_max_s": float(latencies.max()),
            "healthz_max_at_s": slowest[2], "healthz_over_1s": sum(t > 1.0 for _, t, _ in probes),
            # getattr: the row also runs against a checkout from before these limits existed
            "slow_answers": answers, "body_timeout_s": getattr(cfg.synth.limits, "body_timeout_s", float("inf")),
            "max_open_requests": cfg.synth.limits.max_open_requests}


def print_slow(row: dict) -> None:
    print(f"\nslow clients: {row['clients']} POSTs sending 1 body byte every {row['trickle_s']:g} s for "
          f"{row['seconds']:g} s (body_timeout_s {row['body_timeout_s']:g}, max_open_requests "
          f"{row['max_open_requests']}); /healthz probed every 0.25 s")
    print(f"{'probes':>6} {'200':>5} {'p50 s':>7} {'max s':>7} {'max at s':>8} {'> 1 s':>5}  slow bodies answered")
    print(f"{row['probes']:6d} {row['healthz_200']:5d} {row['healthz_p50_s']:7.3f} {row['healthz_max_s']:7.3f} "
          f"{row['healthz_max_at_s']:8.1f} {row['healthz_over_1s']:5d}  {row['slow_answers']}")


def slow_bench(args) -> dict:
    from dermaflux.config import load_config
    from dermaflux.core.runtime import init_ray

    os.environ.setdefault("DERMAFLUX_CACHE", str(Path(tempfile.gettempdir()) / "dermaflux-bench-cache"))
    cfg = load_config("tiny")
    init_ray(cfg.ray, log_to_driver=False)
    row = slow_clients_run(cfg, args.slow_clients, args.slow_seconds or (12 if args.quick else 30))
    print_slow(row)
    return {"mode": "tiny-slow-clients", "slow": row}


def flood_bench(args) -> dict:
    from dermaflux.config import load_config
    from dermaflux.core.runtime import init_ray

    os.environ.setdefault("DERMAFLUX_CACHE", str(Path(tempfile.gettempdir()) / "dermaflux-bench-cache"))
    cfg = load_config("tiny")
    init_ray(cfg.ray, log_to_driver=False)
    requests = args.flood_requests or 4 * args.flood_clients
    row = flood_run(cfg, requests, args.flood_clients, args.flood_limit, args.batch, not args.flood_ignore_retry_after)
    print_flood(row)
    return {"mode": "tiny-flood", "flood": row, "resolution": cfg.model.resolution,
            "steps": cfg.model.num_inference_steps}


def tiny_bench(args) -> dict:
    from dermaflux.config import load_config
    from dermaflux.core.runtime import init_ray
    from dermaflux.testing.adapters import random_lora_adapter

    os.environ.setdefault("DERMAFLUX_CACHE", str(Path(tempfile.gettempdir()) / "dermaflux-bench-cache"))
    cfg = load_config("tiny")
    n = args.images or (16 if args.quick else 64)
    direct_before = [direct_loop(cfg, n, 1), direct_loop(cfg, n, args.batch)]
    init_ray(cfg.ray, log_to_driver=False)
    served = [serve_run(cfg, n, b, r, args.clients) for b, r in ((1, 1), (args.batch, 1), (args.batch, 2))]
    # Direct rows again after the service rows, keeping the faster pass: on a shared machine the
    # load drifts over minutes, and this brackets the service rows instead of preceding them.
    # Adapter multiplexing: requests cycle over two LoRAs. Room for both: each loads once; room
    # for one: every switch evicts and reloads (the worst case of `max_adapters_per_replica`).
    with tempfile.TemporaryDirectory() as tmp:
        loras = [str(random_lora_adapter(cfg.model, Path(tmp) / f"lora{i}", seed=i)) for i in (1, 2)]
        lora_cfg = cfg.model_copy(deep=True)
        lora_cfg.synth.adapters = loras
        names = [Path(p).name for p in loras]
        multiplexed = [serve_run(lora_cfg, n, args.batch, 1, args.clients, names, max_adapters=m) for m in (2, 1)]
    flood = flood_run(cfg, args.flood_requests or 4 * args.flood_clients, args.flood_clients, args.flood_limit,
                      args.batch, not args.flood_ignore_retry_after)
    slow = slow_clients_run(cfg, args.slow_clients, args.slow_seconds or (12 if args.quick else 30))
    direct_after = [direct_loop(cfg, n, 1), direct_loop(cfg, n, args.batch)]
    rows = [max(a, b, key=lambda r: r["img_per_s"]) for a, b in zip(direct_before, direct_after)] + served + multiplexed
    by_key = {(r["mode"], r["replicas"], r["batch_size"]): r for r in rows if r.get("adapters", [None]) == [None]}
    ratios = {
        "batched_over_unbatched_serve": by_key[("serve", 1, args.batch)]["img_per_s"] / by_key[("serve", 1, 1)]["img_per_s"],
        "two_over_one_replica": by_key[("serve", 2, args.batch)]["img_per_s"] / by_key[("serve", 1, args.batch)]["img_per_s"],
        "overhead_direct_over_serve_batch1": by_key[("direct", 0, 1)]["img_per_s"] / by_key[("serve", 1, 1)]["img_per_s"],
        f"overhead_direct_over_serve_batch{args.batch}":
            by_key[("direct", 0, args.batch)]["img_per_s"] / by_key[("serve", 1, args.batch)]["img_per_s"],
        "two_loras_cached_over_base": multiplexed[0]["img_per_s"] / by_key[("serve", 1, args.batch)]["img_per_s"],
        "two_loras_evicting_over_cached": multiplexed[1]["img_per_s"] / multiplexed[0]["img_per_s"],
        "flood_p99_over_single_client": flood["p99_over_single"],
    }
    print(f"\ntiny preset: {cfg.model.resolution}px, {cfg.model.num_inference_steps} steps, {n} images per row, "
          f"{args.clients} clients, {os.cpu_count()} CPUs")
    print(f"{'mode':8} {'replicas':>8} {'batch':>5} {'adapters':>13} {'img/s':>8} {'p50 s':>7} {'p95 s':>7} "
          f"{'p99 s':>7} {'failed':>6} {'loads':>5}")
    for r in rows:
        lat = " ".join(f"{r[k]:7.2f}" if k in r else f"{'-':>7}" for k in ("p50_s", "p95_s", "p99_s"))
        held = f"2 LoRA, room {r['max_adapters']}" if r.get("adapters", [None]) != [None] else "base"
        print(f"{r['mode']:8} {r['replicas']:8d} {r['batch_size']:5d} {held:>13} {r['img_per_s']:8.2f} {lat} "
              f"{r.get('failed', 0):6d} {r.get('adapter_loads', 0):5d}")
    print_flood(flood)
    print_slow(slow)
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    return {"mode": "tiny", "rows": rows, "flood": flood, "slow": slow, "ratios": ratios,
            "direct_passes": direct_before + direct_after,
            "resolution": cfg.model.resolution,
            "steps": cfg.model.num_inference_steps}


FLUX_DEV_TRANSFORMER = dict(  # black-forest-labs/FLUX.1-dev transformer/config.json
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_DEV_VAE = dict(  # black-forest-labs/FLUX.1-dev vae/config.json
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=16, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False,
)


def full_size_bench(args) -> dict:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    layers = {"num_layers": args.layers or 19, "num_single_layers": 2 * args.layers if args.layers else 38}
    torch.manual_seed(0)
    started = time.perf_counter()
    # Random init straight on the device and in bf16: 12B params never touch host RAM, and no
    # float32 copy (48 GB) is ever made.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(**{**FLUX_DEV_TRANSFORMER, **layers}).to(dtype)
            vae = AutoencoderKL(**FLUX_DEV_VAE).to(dtype)
    finally:
        torch.set_default_dtype(default_dtype)
    params = sum(p.numel() for p in transformer.parameters())
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    build_seconds = time.perf_counter() - started
    rows = []
    for batch in args.batch_sizes:
        embeds = torch.randn(batch, 512, 4096, device=device, dtype=dtype)  # T5-XXL, 512 tokens
        pooled = torch.randn(batch, 768, device=device, dtype=dtype)  # CLIP-L pooled

        def call():
            with torch.inference_mode():
                pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=args.resolution, width=args.resolution,
                     num_inference_steps=args.steps, guidance_scale=3.5, output_type="pil",
                     generator=[torch.Generator("cpu").manual_seed(i) for i in range(batch)])
            if device == "cuda":
                torch.cuda.synchronize()

        call()  # warm-up (kernels, allocator)
        started = time.perf_counter()
        for _ in range(args.repeats):
            call()
        seconds = (time.perf_counter() - started) / args.repeats
        rows.append({"batch_size": batch, "seconds_per_call": seconds, "seconds_per_image": seconds / batch,
                     "img_per_s": batch / seconds})
    adapters = adapter_timings(args, pipe, device, rows[0]["seconds_per_call"] / rows[0]["batch_size"]) \
        if args.lora_rank else None
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    print(f"\nfull-size Flux transformer ({params / 1e9:.2f}B params, {layers['num_layers']}+{layers['num_single_layers']} "
          f"blocks, bf16, random) on {gpu or 'cpu'}: {args.resolution}px, {args.steps} steps; built in {build_seconds:.0f}s"
          + (f", peak {peak:.1f} GiB" if peak else ""))
    print(f"{'batch':>5} {'s/image':>9} {'img/s':>8}")
    for r in rows:
        print(f"{r['batch_size']:5d} {r['seconds_per_image']:9.3f} {r['img_per_s']:8.3f}")
    if adapters:
        print(f"\nLoRA r{args.lora_rank} adapters through AdapterPool (what a replica does on multiplexed load/evict):")
        for key in ("load_s", "switch_s", "unload_s", "fuse_s", "seconds_per_image_base", "seconds_per_image_lora",
                    "seconds_per_image_fused"):
            print(f"  {key:24} {adapters[key]:9.3f}")
        if adapters.get("base_load_s"):
            print(f"  base transformer load    {adapters['base_load_s']:9.3f}   ({adapters['base_load_over_lora_load']:.0f}x a LoRA load)")
        print(f"  LoRA load in images:     {adapters['load_in_images']:9.2f}   (unfused LoRA image cost x "
              f"{adapters['lora_over_base_image']:.3f}; fused x {adapters['fused_over_base_image']:.3f})")
    return {"mode": "full-size", "rows": rows, "adapters": adapters, "device": gpu or "cpu", "params": params, **layers,
            "resolution": args.resolution, "steps": args.steps, "peak_gib": peak,
            "text_encoders": "skipped: random prompt embeddings of T5-XXL (512x4096) and CLIP-L (768) shapes",
            "vae": "full-size Flux VAE config, random weights"}


def adapter_timings(args, pipe, device: str, base_image_s: float) -> dict:
    """Seconds to load, switch to and unload a rank-r LoRA on the full-size transformer, and the
    per-image cost with it active, through the same AdapterPool the Serve replica uses."""
    import torch

    from dermaflux.config import load_config
    from dermaflux.synth.adapter_pool import AdapterPool
    from dermaflux.testing.adapters import random_lora_adapter

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    model_cfg = load_config("flux-dev").model
    with tempfile.TemporaryDirectory() as tmp:
        folders = {f"lora{i}": str(random_lora_adapter(model_cfg, Path(tmp) / f"lora{i}", seed=i, rank=args.lora_rank,
                                                         scale=0.01, transformer=pipe.transformer)) for i in (1, 2)}
        pool = AdapterPool(pipe, folders, dtype=torch.bfloat16, device=device)
        timings = {}
        for name in folders:
            started = time.perf_counter()
            pool.load(name)
            sync()
            timings[name] = time.perf_counter() - started
    embeds = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
    pooled = torch.randn(1, 768, device=device, dtype=torch.bfloat16)

    def image(adapter):
        with pool.lock:
            started = time.perf_counter()
            target = pool.pipeline_for(adapter)
            sync()
            switched = time.perf_counter() - started
            started = time.perf_counter()
            for _ in range(args.repeats):
                with torch.inference_mode():
                    target(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=args.resolution,
                           width=args.resolution, num_inference_steps=args.steps, guidance_scale=3.5,
                           output_type="pil", generator=torch.Generator("cpu").manual_seed(0))
            sync()
        return switched, (time.perf_counter() - started) / args.repeats

    image("lora1")  # warm-up with LoRA layers in the graph
    switch_s, lora_s = image("lora2")
    _, base_s = image(None)
    started = time.perf_counter()
    pool.unload("lora1")
    sync()
    unload_s = time.perf_counter() - started
    load_s = timings["lora2"]  # the second load: the first also pays peft's one-time wrapping of layers
    base_load_s = time_base_load(pipe.transformer, device) if args.time_base_load else None
    # `generate --fuse-lora`: the LoRA merged into the base weights, no LoRA matmuls per step.
    started = time.perf_counter()
    pool.fuse("lora2")
    sync()
    fuse_s = time.perf_counter() - started
    _, fused_s = image("lora2")
    return {"fuse_s": fuse_s, "seconds_per_image_fused": fused_s, "fused_over_base_image": fused_s / base_s,
            "base_load_s": base_load_s, "base_load_over_lora_load": base_load_s / load_s if base_load_s else None,
            "rank": args.lora_rank, "load_s": load_s, "first_load_s": timings["lora1"], "switch_s": switch_s,
            "unload_s": unload_s, "seconds_per_image_base": base_s, "seconds_per_image_lora": lora_s,
            "lora_over_base_image": lora_s / base_s, "load_in_images": load_s / base_image_s}


def time_base_load(transformer, device: str) -> float:
    """Seconds to load the base transformer from safetensors onto the device: what a reload on every
    adapter switch would cost. Saved just before, so it reads from the page cache (a lower bound)."""
    import torch
    from diffusers import FluxTransformer2DModel

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        # The base's own weights in the diffusers layout (peft renamed wrapped layers `base_layer`).
        state = {k.replace(".base_layer", ""): v.contiguous()
                 for k, v in transformer.state_dict().items() if "lora_" not in k}
        transformer.save_config(tmp)
        save_file(state, str(Path(tmp) / "diffusion_pytorch_model.safetensors"))
        del state
        started = time.perf_counter()
        loaded = FluxTransformer2DModel.from_pretrained(tmp, torch_dtype=torch.bfloat16).to(device)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    del loaded
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images (a smoke run)")
    parser.add_argument("--images", type=int, default=None, help="images per row (tiny mode)")
    parser.add_argument("--batch", type=int, default=4, help="batch size of the batched rows (tiny mode)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients (tiny mode)")
    parser.add_argument("--flood-clients", type=int, default=16, help="bounded flood: concurrent clients")
    parser.add_argument("--flood-limit", type=int, default=1,
                        help="bounded flood: synth.limits.max_queued_images (images in progress at the ingress)")
    parser.add_argument("--flood-requests", type=int, default=None,
                        help="bounded flood: requests (default 4 x clients)")
    parser.add_argument("--flood-only", action="store_true", help="tiny mode: only the bounded-flood row")
    parser.add_argument("--flood-ignore-retry-after", action="store_true",
                        help="bounded flood: refused clients retry at once (a hostile flood)")
    parser.add_argument("--slow-clients", type=int, default=600, help="slow-client row: slow-body connections")
    parser.add_argument("--slow-seconds", type=float, default=None, help="slow-client row: seconds of probing")
    parser.add_argument("--slow-only", action="store_true", help="tiny mode: only the slow-client row")
    parser.add_argument("--full-size", action="store_true", help="FLUX.1-dev-shaped transformer, random bf16 weights")
    parser.add_argument("--layers", type=int, default=None, help="full-size: N double + 2N single blocks (CPU smoke)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=2, help="full-size: timed calls per batch size")
    parser.add_argument("--time-base-load", action="store_true",
                        help="full-size: also time loading the base transformer from disk (writes ~24 GB to a temp dir)")
    parser.add_argument("--lora-rank", type=int, default=16, help="full-size: LoRA rank of the adapter timings (0: skip)")
    args = parser.parse_args()
    section = "full_size" if args.full_size else "flood" if args.flood_only else "slow" if args.slow_only else "tiny"
    bench = {"full_size": full_size_bench, "flood": flood_bench, "slow": slow_bench, "tiny": tiny_bench}[section]
    result = bench(args)
    result.update(host=platform.node(), cpus=os.cpu_count(), argv=sys.argv[1:], when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    # One file, one section per mode: the GPU run does not erase the CPU figures, nor the reverse.
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    existing[section] = result
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(existing, indent=2, default=float) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
