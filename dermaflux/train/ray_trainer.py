"""Ray Train driver: the per-worker loop runs the rectified-flow step under DeepSpeed ZeRO.

Everything model-specific is in flow.py / model_setup.py; this module owns distribution:
DeepSpeed init, the data position per rank, checkpoints through ray.train.report (DeepSpeed
engine state + a loadable adapter + validation grid), and restart after a lost worker.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DS_TAG = "state"
FAULT_MARKER = ".fault-injected"  # testing hook: a worker exits hard once, then the marker stops it


def _inference_transformer(base_dir: str, train_cfg, state: dict, dtype):
    """A plain (un-wrapped) transformer holding the trained weights, for saving and validation renders."""
    from diffusers import FluxTransformer2DModel

    if train_cfg.mode == "full":
        model = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(base_dir, subfolder="transformer"))
        model.load_state_dict(state)
    else:
        from peft.utils import set_peft_model_state_dict

        from dermaflux.train.model_setup import prepare_transformer

        model = FluxTransformer2DModel.from_pretrained(base_dir, subfolder="transformer")
        prepare_transformer(model, train_cfg.model_copy(update={"gradient_checkpointing": False}))
        result = set_peft_model_state_dict(model, state)
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"LoRA keys not in the model: {result.unexpected_keys[:5]}")
    return model.to(dtype).eval()


def _peak_memory_mb(device) -> float:
    """Peak accelerator memory on GPU; peak resident set size of this worker process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _rank_state_mb(engine, optimizer) -> float:
    """Model + optimizer state this rank holds: what ZeRO partitions (ZeRO-3 also splits the parameters)."""
    held = 0
    for p in engine.module.parameters():
        local = getattr(p, "ds_tensor", p)  # ZeRO-3: the rank's own shard
        held += local.numel() * local.element_size()
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        held += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    for group in getattr(optimizer, "single_partition_of_fp32_groups", []) or []:
        if group.data_ptr() != next(engine.module.parameters()).data_ptr():
            held += group.numel() * group.element_size()  # ZeRO-1/2 master copy of this rank's partition
    return held / 2**20


def _gather_trainable(engine, transformer, train_cfg) -> dict:
    """Trained weights as full CPU tensors on every rank (ZeRO-3 shards are empty until gathered)."""
    import deepspeed

    from dermaflux.train.model_setup import trainable_state_dict

    if train_cfg.zero_stage == 3:
        params = [p for p in transformer.parameters() if p.requires_grad or train_cfg.mode == "full"]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return trainable_state_dict(transformer, train_cfg)
    return trainable_state_dict(transformer, train_cfg)


def train_worker(loop_cfg: dict) -> None:
    """The function Ray Train runs on each worker."""
    import deepspeed
    import ray.train
    import torch.distributed as dist
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from dermaflux.config import DermaFluxConfig
    from dermaflux.model.adapters import save_adapter
    from dermaflux.model.loading import resolve_pretrained
    from dermaflux.train.cache import load_cached_set, micro_batch_indices
    from dermaflux.train.ds_config import deepspeed_config, use_bf16
    from dermaflux.train.flow import FlowBatch, flow_matching_loss, train_guidance_for
    from dermaflux.train.model_setup import lr_schedule, prepare_transformer, state_checksum
    from dermaflux.train.validation import image_grid, render_validation, save_png, write_loss_curve

    cfg = DermaFluxConfig.model_validate(loop_cfg["cfg"])
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not tc.use_gpu:
        torch.set_num_threads(max(tc.cpus_per_worker, 1))
    device = ray.train.torch.get_device() if tc.use_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if use_bf16(tc) else torch.float32
    base_dir = resolve_pretrained(cfg.model)
    cache_dir, run_dir = Path(loop_cfg["cache_dir"]), Path(loop_cfg["run_dir"])

    torch.manual_seed(tc.seed)  # identical LoRA init on every rank
    transformer = FluxTransformer2DModel.from_pretrained(base_dir, subfolder="transformer")
    params = prepare_transformer(transformer, tc)
    guidance = train_guidance_for(transformer.config, cfg.model)
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(tc))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=transformer, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(tc),
        dist_init_required=False,
    )

    step, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and loop_cfg.get("resume_from"):
        checkpoint = ray.train.Checkpoint(loop_cfg["resume_from"])
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            _, client = engine.load_checkpoint(os.path.join(ckpt_dir, "deepspeed"), tag=DS_TAG)
        step, history = int(client["step"]), list(client["history"])
        log.info("rank %d: resumed at step %d from %s", rank, step, checkpoint.path)

    data = load_cached_set(cache_dir, "train", tc.max_images)
    validation = torch.load(cache_dir / "validation.pt") if (cache_dir / "validation.pt").exists() else None
    vae = None
    if rank == 0:  # only rank 0 renders and saves
        vae_source = {"pretrained_model_name_or_path": loop_cfg["vae_dir"]} if loop_cfg.get("vae_dir") else \
            {"pretrained_model_name_or_path": base_dir, "subfolder": "vae"}
        vae = AutoencoderKL.from_pretrained(**vae_source).to(device, dtype)
    fault_marker = run_dir / FAULT_MARKER

    while step < tc.steps:
        started = time.perf_counter()
        micro_losses = []
        for micro in range(tc.grad_accum):
            k = step * tc.grad_accum + micro  # the data position: a resumed run continues the same stream
            idx = torch.from_numpy(micro_batch_indices(len(data), tc.seed, k, rank, world, tc.micro_batch))
            batch = FlowBatch(*data.rows(idx)).to(device, dtype)
            gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + k * 1_009 + rank)
            loss = flow_matching_loss(engine, batch, tc, guidance, gen)
            engine.backward(loss)
            engine.step()
            micro_losses.append(loss.detach().float())
        step += 1
        loss_t = torch.stack(micro_losses).mean().reshape(1)
        dist.all_reduce(loss_t)
        elapsed = time.perf_counter() - started
        record = {"step": step, "loss": float(loss_t) / world, "lr": scheduler.get_last_lr()[0],
                  "samples_per_s": tc.micro_batch * tc.grad_accum * world / elapsed, "peak_mem_mb": _peak_memory_mb(device),
                  "rank_state_mb": _rank_state_mb(engine, optimizer)}
        history.append(record)

        if tc.fault_at_step is not None and rank == 1 and step == tc.fault_at_step and not fault_marker.exists():
            fault_marker.write_text(json.dumps({"step": step, "pid": os.getpid()}))
            log.warning("fault injection: rank 1 exits hard after step %d", step)
            os._exit(1)

        do_ckpt = step % tc.checkpoint_every == 0 or step == tc.steps
        do_val = validation is not None and (step % tc.validate_every == 0 or step == tc.steps)
        if not (do_ckpt or do_val or step % tc.log_every == 0):
            continue
        metrics = {**record, "epoch": step * tc.micro_batch * tc.grad_accum * world / len(data)}
        if rank == 0:  # the progress display: Ray forwards worker stdout to the driver
            print(f"train step {step}/{tc.steps} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                  f"{record['samples_per_s']:.1f} samples/s epoch {metrics['epoch']:.2f}", flush=True)
        if not (do_ckpt or do_val):
            ray.train.report(metrics)
            continue
        ckpt_dir = Path(tempfile.mkdtemp(prefix=f"dfx-step{step}-r{rank}-"))
        if do_ckpt:
            engine.save_checkpoint(str(ckpt_dir / "deepspeed"), tag=DS_TAG, client_state={"step": step, "history": history})
        state = _gather_trainable(engine, transformer, tc)  # collective under ZeRO-3: every rank joins
        if rank == 0:
            metrics["weights_checksum"] = state_checksum(state)
            # Below ZeRO-3 every rank holds whole weights: render in place. ZeRO-3 shards need a plain copy.
            model = transformer if tc.zero_stage < 3 else _inference_transformer(base_dir, tc, state, dtype).to(device)
            if do_ckpt:
                save_adapter(ckpt_dir / "adapter", model, kind=tc.mode, base=cfg.model.pretrained, vae=vae,
                             lora_state_dict=state if tc.mode == "lora" else None,
                             meta={"step": step, "weights_checksum": metrics["weights_checksum"]})
                write_loss_curve(history, ckpt_dir)
            if do_val:
                sched = FlowMatchEulerDiscreteScheduler.from_pretrained(base_dir, subfolder="scheduler")
                images = render_validation(model, vae, sched, validation, tc.validation_seeds,
                                           cfg.model.resolution, tc.validation_steps or cfg.model.num_inference_steps,
                                           cfg.model.guidance_scale)
                save_png(image_grid(images, cols=len(tc.validation_seeds)), ckpt_dir / f"validation-{step:06d}.png")
            if model is transformer:
                transformer.train()
        del state
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt_dir)),
                         checkpoint_dir_name=f"step-{step:06d}")
        shutil.rmtree(ckpt_dir, ignore_errors=True)


def latest_checkpoint(storage_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run (one holding a saved adapter and DeepSpeed state)."""
    found = sorted(Path(storage_dir).glob("*/step-*"))
    done = [p for p in found if (p / "adapter").exists() and (p / "deepspeed").exists()]
    return max(done, key=lambda p: p.name) if done else None


def run_training(cfg, cache_dir: str | Path, vae_dir: str | None, run_dir: str | Path, resume: bool = False):
    """Start the TorchTrainer; returns the Ray Train result. Checkpoints land in <run_dir>/ray/train/step-*."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dermaflux.train.cache import ensure_split_file

    tc = cfg.train
    run_dir = Path(run_dir).resolve()
    ensure_split_file(cache_dir, "train")  # once here, not raced by every worker
    storage = tc.storage_path or str(run_dir / "ray")
    # --resume looks for local checkpoints; on remote storage Ray Train restores the run by its name itself.
    resume_from = latest_checkpoint(storage) if resume and "://" not in storage else None
    if resume_from is not None:
        log.info("resuming from %s", resume_from)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"), "cache_dir": str(Path(cache_dir).resolve()),
            "vae_dir": str(vae_dir) if vae_dir else None, "run_dir": str(run_dir),
            "resume_from": str(resume_from) if resume_from else None,
        },
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=tc.workers, use_gpu=tc.use_gpu, resources_per_worker={"CPU": tc.cpus_per_worker}
        ),
        run_config=RunConfig(
            name="train", storage_path=storage,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=3),
        ),
    )
    return trainer.fit()
