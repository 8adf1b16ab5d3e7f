"""Fitting the tiny preset's VAE with Ray Train: in this process (local mode) for one worker, else a DDP worker group
(the reconstruction + KL step of vae_fit.py)."""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dermaflux.train.config import VaeFitConfig

if TYPE_CHECKING:
    from dermaflux.config import DermaFluxConfig

log = logging.getLogger(__name__)


def _split_rows(captions_dir, split: str, limit: int | None) -> pa.Table:
    """(id, image) of a split, in the order the fit uses them: sorted by id, the first `limit`."""
    from dermaflux.train.precompute import caption_shards

    table = pa.concat_tables([pq.read_table(p, columns=["id", "split", "image"]) for p in caption_shards(captions_dir)])
    table = table.filter(pa.compute.equal(table["split"], split)).sort_by("id")
    if limit is not None:
        table = table.slice(0, limit)
    if table.num_rows == 0:
        raise ValueError(f"{captions_dir}: no rows of split {split!r} to fit/evaluate the VAE")
    return table


def load_split_images(captions_dir, split: str, resolution: int, limit: int | None) -> torch.Tensor:
    from dermaflux.train.encode import decode_images

    return decode_images(_split_rows(captions_dir, split, limit)["image"].to_pylist(), resolution)


def vae_worker(loop_cfg: dict) -> None:
    import ray.train
    import ray.train.torch
    from diffusers import AutoencoderKL

    from dermaflux.config import DermaFluxConfig
    from dermaflux.core.progress import report_progress
    from dermaflux.model.loading import resolve_pretrained
    from dermaflux.train.vae_fit import psnr, set_latent_factors, vae_loss

    cfg = DermaFluxConfig.model_validate(loop_cfg["cfg"])
    vc = cfg.train.vae_fit
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(cfg.train.cpus_per_worker, 1))
    vae = AutoencoderKL.from_pretrained(resolve_pretrained(cfg.model), subfolder="vae")
    images = load_split_images(cfg.train.captions, "train", cfg.model.resolution, vc.max_images)
    test_images = load_split_images(cfg.train.captions, "test", cfg.model.resolution, vc.eval_images) if rank == 0 else None
    psnr_before = psnr(vae, test_images) if rank == 0 else 0.0
    model = ray.train.torch.prepare_model(vae)
    inner = model.module if hasattr(model, "module") else model
    opt = torch.optim.AdamW(model.parameters(), lr=vc.lr)
    gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + rank)
    report_every = max(vc.steps // 10, 1)
    show_every = max(vc.steps // 50, 1)  # the driver's bar: at most ~50 lines into the run log
    mse_recent = []
    for step in range(1, vc.steps + 1):
        idx = torch.randint(0, len(images), (vc.batch_size,), generator=gen)
        # DDP wraps forward(); encode/decode are called on the inner module, so sync grads ourselves.
        loss, mse = vae_loss(inner, images[idx], vc.kl_weight, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            for p in inner.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world
        opt.step()
        mse_recent.append(float(mse.detach()))
        if rank == 0 and (step % show_every == 0 or step == vc.steps):
            report_progress("vae-fit", step, vc.steps, f"mse {mse_recent[-1]:.4f}")
        if step % report_every == 0 and step < vc.steps:
            ray.train.report({"step": step, "mse": sum(mse_recent) / len(mse_recent)})
            mse_recent = []
    inner.eval()
    # In this process (fits_locally) the VAE is saved where the driver asked; a worker's goes through a checkpoint.
    local_out = loop_cfg.get("local_out")
    out = Path(local_out) if local_out else Path(tempfile.mkdtemp(prefix="dfx-vae-"))
    metrics = {"step": vc.steps, "mse": sum(mse_recent) / max(len(mse_recent), 1)}
    if rank == 0:
        shift, scale = set_latent_factors(inner, images[: min(len(images), 256)])
        metrics.update({"psnr_before": psnr_before, "psnr_test": psnr(inner, test_images),
                        "shift_factor": shift, "scaling_factor": scale, "test_images": len(test_images)})
        inner.save_pretrained(out if local_out else out / "vae")
    if local_out:
        ray.train.report(metrics)
        return
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(out)) if rank == 0 else None,
                     checkpoint_dir_name="vae-fit")
    shutil.rmtree(out, ignore_errors=True)


def fits_locally(cfg: DermaFluxConfig) -> bool:
    """The fit runs in this process (Ray Train's local mode) unless it asks for several workers or train.launch
    is workers: it is a CPU job of a few minutes at most, for which a worker group's start and stop
    (~15-20 s here) is pure overhead, and a failed fit is simply re-run (no restarts either way)."""
    return cfg.train.vae_fit.workers == 1 and cfg.train.launch != "workers"


def run_vae_fit(cfg: DermaFluxConfig, run_dir: str | Path) -> tuple[Path, dict]:
    """Fit the VAE; returns (<run_dir>/vae, metrics incl. test PSNR before/after)."""
    from dermaflux.core.artifacts import atomic_dir

    run_dir = Path(run_dir).resolve()
    loop_cfg = {"cfg": cfg.model_dump(mode="json")}
    if fits_locally(cfg):
        from dermaflux.train.ray_local import fit_in_this_process

        log.info("VAE fit: in this process (Ray Train's local mode)")
        with atomic_dir(run_dir / "vae") as staging:
            result = fit_in_this_process(vae_worker, {**loop_cfg, "local_out": str(staging)}, "vae fit")
            if result.error is not None:
                raise result.error
    else:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from dermaflux.core.runtime import init_ray

        init_ray(cfg.ray)  # the train stage starts Ray where it needs it (see stages.py)
        trainer = TorchTrainer(
            vae_worker,
            train_loop_config=loop_cfg,
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ScalingConfig(num_workers=cfg.train.vae_fit.workers, use_gpu=False,
                                         resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
            run_config=RunConfig(name="vae-fit", storage_path=str(run_dir / "ray")),
        )
        result = trainer.fit()
        with result.checkpoint.as_directory() as ckpt, atomic_dir(run_dir / "vae") as staging:
            shutil.copytree(Path(ckpt) / "vae", staging, dirs_exist_ok=True)
    metrics = {k: result.metrics[k] for k in ("psnr_before", "psnr_test", "shift_factor", "scaling_factor", "test_images")}
    return run_dir / "vae", metrics


# Bump when the fit itself changes: VAEs cached by an older fit are then not reused.
VAE_FIT_VERSION = 1


def data_identity(captions_dir, vae_fit_cfg: VaeFitConfig) -> str:
    """The images the fit trains on and the PSNR is measured on: their ids and bytes."""
    digest = hashlib.sha256()
    for split, limit in (("train", vae_fit_cfg.max_images), ("test", vae_fit_cfg.eval_images)):
        table = _split_rows(captions_dir, split, limit)
        for image_id, image in zip(table["id"].to_pylist(), table["image"].to_pylist()):
            digest.update(f"{split}:{image_id}:".encode())
            digest.update(hashlib.sha256(image).digest())
    return digest.hexdigest()[:16]


def cache_key(cfg: DermaFluxConfig) -> str:
    """What the fitted VAE depends on: the starting VAE, the fit settings and seed, the images."""
    from dermaflux.core.artifacts import fingerprint
    from dermaflux.model.loading import BUILTIN_TINY

    model = cfg.model
    start = {"pretrained": model.pretrained, "revision": model.revision, "resolution": model.resolution,
             "tiny": model.tiny.model_dump(mode="json") if model.pretrained == BUILTIN_TINY else None}
    fit = cfg.train.vae_fit.model_dump(mode="json", exclude={"enabled"})
    images = data_identity(cfg.train.captions, cfg.train.vae_fit)
    return fingerprint(VAE_FIT_VERSION, start, fit, cfg.train.seed, images)


def cached_vae_fit(cfg: DermaFluxConfig, run_dir: str | Path) -> tuple[Path, dict]:
    """`run_vae_fit`, or the VAE a run on the same data and settings fitted before, from
    $DERMAFLUX_CACHE/vae-fit/<key>; the metrics say which (`cache`: "hit" or "stored")."""
    import json
    import time

    from dermaflux.core.artifacts import atomic_dir, atomic_write_json, read_json
    from dermaflux.core.progress import bar
    from dermaflux.model.config import cache_dir

    run_dir = Path(run_dir).resolve()
    key = cache_key(cfg)
    cached = cache_dir(cfg.model) / "vae-fit" / key
    if (cached / "metrics.json").exists():  # written last: the entry is complete
        metrics = read_json(cached / "metrics.json")
        with atomic_dir(run_dir / "vae") as staging:
            shutil.copytree(cached / "vae", staging, dirs_exist_ok=True)
        log.info("VAE fit: reusing the one fitted on the same images and settings (test PSNR %.2f dB, %s)",
                 metrics["psnr_test"], cached)
        return run_dir / "vae", {**metrics, "cache": "hit", "cache_key": key}
    started = time.time()
    with bar("vae-fit", "train: VAE fit", cfg.train.vae_fit.steps, "steps", stage="train"):
        vae_dir, metrics = run_vae_fit(cfg, run_dir)
    metrics = {**metrics, "fit_seconds": round(time.time() - started, 1)}
    with atomic_dir(cached) as staging:
        shutil.copytree(vae_dir, staging / "vae")
        atomic_write_json(staging / "metrics.json", metrics)
        (staging / "key.json").write_text(json.dumps({"key": key, "fitted_for": str(run_dir)}))
    return vae_dir, {**metrics, "cache": "stored", "cache_key": key}
