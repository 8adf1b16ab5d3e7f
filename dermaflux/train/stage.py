"""`dermaflux train`: VAE fit (tiny preset) -> pre-compute (Ray Data) -> fine-tune (Ray Train + DeepSpeed).

Each step leaves a done-marker in the run folder, so re-running skips finished steps, and training
continues from its last checkpoint (also with more `train.steps`); `train.resume` (`--resume`) insists
that there is a stopped run to continue.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from dermaflux.core.artifacts import (atomic_dir, atomic_write_json, claim_run, fingerprint, is_done, mark_done,
                                      marker_path, read_json)

if TYPE_CHECKING:
    from dermaflux.config import DermaFluxConfig

log = logging.getLogger(__name__)

# Fields that may change between a run and its resumption (how long, how wide, how it fails).
_RESUMABLE_FIELDS = {"out", "storage_path", "steps", "workers", "max_failures", "cpus_per_worker", "use_gpu", "resume",
                     "checkpoints_kept", "tracking", "mlflow_tracking_uri", "compile", "validate_final",
                     "launch", "local_max_steps", "precompute_inline_rows"}


def run_fingerprint(cfg: DermaFluxConfig) -> str:
    train = {k: v for k, v in cfg.train.model_dump(mode="json").items() if k not in _RESUMABLE_FIELDS}
    return fingerprint(cfg.model.model_dump(mode="json"), train)


def _finished(out: Path, steps: int) -> bool:
    return is_done(out, "train") and read_json(marker_path(out, "train")).get("steps") == steps


def run(cfg: DermaFluxConfig, hooks: Sequence[Callable] = ()) -> dict:
    """The train stage. `hooks`: per-step trainer hooks, passed to `run_training` (tests use them)."""
    from dermaflux.train.ray_trainer import latest_checkpoint

    tc = cfg.train
    out = Path(tc.out).resolve()
    if tc.resume and latest_checkpoint(tc.storage_path or out / "ray") is None:
        raise ValueError(f"--resume: {out} holds no training checkpoint to continue (check --out)")
    same_run = claim_run(cfg, out, "train", run_fingerprint(cfg))  # a different run's folder is refused here
    stopped = same_run and latest_checkpoint(tc.storage_path or out / "ray") is not None
    started = time.time()
    summary: dict = {"out": str(out)}

    vae_dir = None
    if tc.vae_fit.enabled:
        if not is_done(out, "vae_fit"):
            mark_done(out, "vae_fit", _vae_fit(cfg, out))
        vae_dir = str(out / "vae")
        summary["vae"] = _marker(out, "vae_fit")
    if not is_done(out, "encode"):  # decided once: a continued run keeps its data path (and its stream)
        mark_done(out, "encode", _encode_plan(cfg, vae_dir))
    plan = summary["encode"] = _marker(out, "encode")
    print(f"train.encode: {plan['mode']} ({plan['reason']})", flush=True)
    if plan["mode"] == "cached":
        if not is_done(out, "precompute"):
            mark_done(out, "precompute", _precompute(cfg, out / "cache", vae_dir))
        summary["precompute"] = _marker(out, "precompute")
    else:  # online: no cache; only the validation prompts' embeddings, which rank 0 renders with
        from dermaflux.train.ray_precompute import encode_validation_prompts

        encode_validation_prompts(cfg, out / "cache", vae_dir, plan["text_tokens"])
    if not _finished(out, tc.steps):
        # Re-running the same run continues it, as every stage does; --resume only insists that there is one.
        mark_done(out, "train", _train(cfg, out, vae_dir, resume=tc.resume or stopped, encode=plan, hooks=hooks))
    summary["train"] = _marker(out, "train")

    summary["final"] = str(out / "final")
    summary["wall_s"] = round(time.time() - started, 1)
    atomic_write_json(out / "summary.json", summary)
    return summary


def _marker(out: Path, step: str) -> dict:
    return {k: v for k, v in read_json(marker_path(out, step)).items() if k != "done"}


def _vae_fit(cfg: DermaFluxConfig, out: Path) -> dict:
    """Fit the tiny preset's random VAE to the corpus (Ray Train DDP) into <out>/vae, or reuse the one fitted
    before on the same images and settings; returns its metrics (test PSNR, cache hit or stored)."""
    from dermaflux.train.ray_vae_fit import cached_vae_fit

    return cached_vae_fit(cfg, out)[1]


def _encode_plan(cfg: DermaFluxConfig, vae_dir: str | None) -> dict:
    """`train.encode` decided from the planned epochs and the cache's size, computed from the shapes before
    anything is written; also the T5 length (one token-counting pass over the captions, both modes)."""
    from dermaflux.train.augment import VIEWS
    from dermaflux.train.encode_plan import encode_plan, planned_epochs, row_shapes
    from dermaflux.train.precompute import train_rows
    from dermaflux.train.ray_precompute import text_token_plan

    tc = cfg.train
    table = train_rows(cfg)
    tokens = text_token_plan(cfg, table)
    shapes = row_shapes(cfg.model, vae_dir, VIEWS[tc.augment], tokens["length"])
    epochs = planned_epochs(tc.steps, tc.micro_batch, tc.grad_accum, tc.workers, table.num_rows)
    plan = encode_plan(tc.encode, shapes, table.num_rows, epochs, tc.cache_max_bytes)
    log.debug("train.encode: %s (%s)", plan["mode"], plan["reason"])
    return {**plan, "text_token_plan": tokens}


def _precompute(cfg: DermaFluxConfig, cache_dir: Path, vae_dir: str | None) -> dict:
    """Latents and text embeddings (Ray Data) plus the validation prompts' embeddings, into `cache_dir`."""
    from dermaflux.train.ray_precompute import encode_validation_prompts, run_precompute

    # Only the train split feeds the transformer; val/test stay for the evaluate stage.
    info = run_precompute(cfg, cache_dir, vae_dir, max_images={"train": cfg.train.max_images, "val": 0, "test": 0})
    encode_validation_prompts(cfg, cache_dir, vae_dir, info["text_tokens"]["length"])
    return info


def _train(cfg: DermaFluxConfig, out: Path, vae_dir: str | None, resume: bool, encode: dict | None = None,
           hooks: Sequence[Callable] = ()) -> dict:
    """Ray Train + DeepSpeed on the cache, then the final adapter from the last checkpoint; returns the marker fields."""
    from dermaflux.core.progress import bar
    from dermaflux.train.ray_trainer import launches_locally, run_training

    with bar("train", "train", cfg.train.steps, "steps"):
        result = run_training(cfg, out / "cache", vae_dir, out, resume=resume, encode=encode, hooks=hooks)
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}")
    with result.checkpoint.as_directory() as ckpt:
        _copy_final(Path(ckpt), out)
    metrics = result.metrics
    return {"steps": metrics.get("step"), "loss": metrics.get("loss"), "weights_checksum": metrics.get("weights_checksum"),
            "encode": (encode or {}).get("mode", "cached"),
            "launch": "local" if launches_locally(cfg.train, encode, cfg.train.storage_path or str(out / "ray")) else "workers",
            "checkpoint": str(result.checkpoint.path),
            **{k: metrics.get(k) for k in ("micro_batch", "gradient_checkpointing", "compiled", "text_tokens")}}


def _copy_final(ckpt: Path, out: Path) -> None:
    """<out>/final (the adapter), loss.csv/png and the last validation grid, from a checkpoint folder."""
    with atomic_dir(out / "final") as staging:
        shutil.copytree(ckpt / "adapter", staging, dirs_exist_ok=True)
    for name in ("loss.csv", "loss.png"):
        shutil.copy2(ckpt / name, out / name)
    grids = sorted(ckpt.glob("validation-*.png"))
    if grids:
        shutil.copy2(grids[-1], out / "validation.png")
