"""Ray Train driver: each worker runs a `Trainer`, the rectified-flow step under DeepSpeed ZeRO.

Everything model-specific is in flow.py / model_setup.py; this module owns distribution:
DeepSpeed init, the data position per rank, checkpoints through ray.train.report (DeepSpeed
engine state + a loadable adapter + validation grid), and restart after a lost worker.
`run_training` (the driver side) starts the TorchTrainer whose train function is `train_worker`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dermaflux.train.config import TrainConfig

if TYPE_CHECKING:
    from dermaflux.config import DermaFluxConfig

log = logging.getLogger(__name__)

DS_TAG = "state"


def _inference_transformer(base_dir: str, train_cfg: TrainConfig, state: dict, dtype):
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


def _gather_trainable(engine, transformer, train_cfg: TrainConfig) -> dict:
    """Trained weights as full CPU tensors on every rank (ZeRO-3 shards are empty until gathered)."""
    import deepspeed

    from dermaflux.train.model_setup import trainable_state_dict

    if train_cfg.zero_stage == 3:
        params = [p for p in transformer.parameters() if p.requires_grad or train_cfg.mode == "full"]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return trainable_state_dict(transformer, train_cfg)
    return trainable_state_dict(transformer, train_cfg)


class Trainer:
    """One Ray Train worker's run, read top to bottom as torchtitan's Trainer:
    `train()` -> `train_step()` -> `forward_backward_step()`, then `report()` -> `checkpoint()` -> `save()` / `validate()`.

    `hooks` are callables `hook(trainer, step)` run after every optimizer step, before its report;
    tests pass them (e.g. a worker that dies once) through `run_training(..., hooks=...)`.
    """

    def __init__(self, loop_cfg: dict):
        import ray.train
        from diffusers import FluxTransformer2DModel

        from dermaflux.config import DermaFluxConfig
        from dermaflux.model.loading import resolve_pretrained
        from dermaflux.train.ds_config import use_bf16

        self.cfg = DermaFluxConfig.model_validate(loop_cfg["cfg"])
        tc = self.cfg.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.hooks = list(loop_cfg.get("hooks", ()))
        if not tc.use_gpu:
            torch.set_num_threads(max(tc.cpus_per_worker, 1))
        self.device = ray.train.torch.get_device() if tc.use_gpu else torch.device("cpu")
        if self.device.type == "cuda":
            # cuDNN's SDPA backward failed on Flux's joint attention on an H200 (torch 2.11 + cu130, issue 11);
            # the flash and memory-efficient kernels run it.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.dtype = torch.bfloat16 if use_bf16(tc) else torch.float32
        self.base_dir = resolve_pretrained(self.cfg.model)
        self.state_mb: float | None = None  # measured once per process, see train_step
        self._load_data(Path(loop_cfg["cache_dir"]), loop_cfg.get("vae_dir"), loop_cfg.get("encode"))
        self.transformer = FluxTransformer2DModel.from_pretrained(self.base_dir, subfolder="transformer")
        self.tc = self._resolve_batch(tc)  # ints from here on: micro_batch "auto" measured once
        self._build_engine()
        self.step, self.history = self._resume(loop_cfg.get("resume_from"))

    def _resolve_batch(self, tc: TrainConfig) -> TrainConfig:
        """`train.micro_batch: auto`: micro-batch and gradient checkpointing from the free GPU memory (before the
        transformer moves there) and this cache's tokens per sample; without CUDA, 1 and the configured value."""
        from dermaflux.train.memory import pick_micro_batch, size_class

        latent_shape, self.text_tokens = self.data.sample_shapes()
        if tc.micro_batch != "auto":
            return tc
        free_gib = torch.cuda.mem_get_info(self.device)[0] / 2**30 if self.device.type == "cuda" else None
        tokens = (latent_shape[-2] // 2) * (latent_shape[-1] // 2) + self.text_tokens
        shards = self.world if tc.zero_stage == 3 else 1
        picked = pick_micro_batch(free_gib, size_class(self.transformer.config), tokens, shards)
        micro_batch, checkpointing = picked or (1, tc.gradient_checkpointing)
        if self.rank == 0:
            free = "no GPU" if free_gib is None else f"{free_gib:.0f} GiB free"
            print(f"train.micro_batch auto: {micro_batch}, gradient checkpointing {checkpointing} "
                  f"({free}, {tokens} tokens per sample)", flush=True)
        return tc.model_copy(update={"micro_batch": micro_batch, "gradient_checkpointing": checkpointing})

    def _build_engine(self) -> None:
        import deepspeed

        from dermaflux.train.ds_config import deepspeed_config, skip_unused_op_builds
        from dermaflux.train.flow import train_guidance_for
        from dermaflux.train.model_setup import lr_scheduler, prepare_transformer

        tc = self.tc
        torch.manual_seed(tc.seed)  # identical LoRA init on every rank
        params = prepare_transformer(self.transformer, tc)
        self.guidance = train_guidance_for(self.transformer.config, self.cfg.model)
        self.compiled = self._compile() if tc.compile else False
        optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
        skip_unused_op_builds()
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.transformer, optimizer=optimizer, lr_scheduler=lr_scheduler(optimizer, tc),
            config=deepspeed_config(tc), dist_init_required=False,
        )

    def _compile(self) -> bool:
        """Compile the repeated blocks, probed by one forward + backward at the training shape before DeepSpeed
        hooks the gradients (so the probe leaves no state); False (eager, one warning) when that fails."""
        from dermaflux.model.compile import compile_blocks
        from dermaflux.train.flow import flow_matching_loss

        if self.tc.zero_stage == 3:
            if self.rank == 0:
                log.warning("train.compile: not under ZeRO-3 (its parameter hooks break compiled graphs); "
                            "training runs eager")
            return False
        self.transformer.to(self.device, self.dtype)  # what DeepSpeed would do: compile for the real dtype

        def probe() -> None:
            try:
                batch, gen = self._micro_batch(0)
                flow_matching_loss(self.transformer, batch, self.tc, self.guidance, gen).backward()
            finally:
                self.transformer.zero_grad(set_to_none=True)

        return compile_blocks(self.transformer, probe)

    def _resume(self, resume_from: str | None) -> tuple[int, list[dict]]:
        """(step, loss history) of the checkpoint Ray restores after a lost worker, or of `resume_from`."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None and resume_from:
            checkpoint = ray.train.Checkpoint(resume_from)
        if checkpoint is None:
            return 0, []
        lora = self.tc.mode == "lora"
        with checkpoint.as_directory() as ckpt_dir:
            # LoRA checkpoints hold no frozen base weights (see `checkpoint`): not strict about their keys, so the
            # restored trainable weights are checked against the checksum saved with them instead.
            _, client = self.engine.load_checkpoint(os.path.join(ckpt_dir, "deepspeed"), tag=DS_TAG,
                                                    load_module_strict=not lora)
        self._check_restored(client, checkpoint.path)
        log.info("rank %d: resumed at step %d from %s", self.rank, client["step"], checkpoint.path)
        return int(client["step"]), list(client["history"])

    def _check_restored(self, client: dict, where: str) -> None:
        from dermaflux.train.model_setup import state_checksum

        saved = client.get("weights_checksum")
        if saved is None:  # a checkpoint written before the checksum was saved with it
            return
        restored = state_checksum(_gather_trainable(self.engine, self.transformer, self.tc))  # collective (ZeRO-3)
        if abs(restored - saved) > 1e-6 * max(abs(saved), 1.0):
            raise RuntimeError(f"checkpoint {where}: the restored trainable weights differ from the saved ones "
                               f"(checksum {restored} != {saved})")

    def _load_data(self, cache_dir: Path, vae_dir: str | None, encode: dict | None = None) -> None:
        """The sample source (`train.encode`): the mapped cache, or online the caption stream Ray Data feeds this
        rank and the frozen encoders that turn it into inputs; the validation prompts' embeddings either way."""
        from diffusers import AutoencoderKL

        from dermaflux.train.cache import load_cached_set
        from dermaflux.train.ray_online import OnlineData

        if encode is not None and encode["mode"] == "online":
            self.data = OnlineData(self.cfg, encode, self.rank, self.world, vae_dir, self.device)
        else:
            self.data = load_cached_set(cache_dir, "train", self.cfg.train.max_images)
        self.validation = torch.load(cache_dir / "validation.pt") if (cache_dir / "validation.pt").exists() else None
        self.empty_prompt = None
        if self.cfg.train.caption_dropout > 0:
            if self.validation is None or "empty_prompt_embeds" not in self.validation:
                raise ValueError(f"train.caption_dropout: {cache_dir}/validation.pt holds no empty-prompt embeddings "
                                 "(a cache from before caption dropout): remove the cache folder to re-encode")
            self.empty_prompt = (self.validation["empty_prompt_embeds"], self.validation["empty_pooled_prompt_embeds"])
        self.vae = None
        if self.rank == 0:  # only rank 0 renders and saves
            source = {"pretrained_model_name_or_path": vae_dir} if vae_dir else \
                {"pretrained_model_name_or_path": self.base_dir, "subfolder": "vae"}
            self.vae = AutoencoderKL.from_pretrained(**source).to(self.device, self.dtype)

    def train(self) -> None:
        while self.step < self.tc.steps:
            record = self.train_step()
            for hook in self.hooks:
                hook(self, self.step)
            self.report(record)

    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches; returns its record (also kept in the history)."""
        import torch.distributed as dist

        tc = self.tc
        started = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]  # the lr this step runs at (the scheduler steps with the optimizer)
        micro_losses = [self.forward_backward_step(self.step * tc.grad_accum + micro) for micro in range(tc.grad_accum)]
        self.step += 1
        loss = torch.stack(micro_losses).mean().reshape(1)
        dist.all_reduce(loss)
        elapsed = time.perf_counter() - started
        if self.state_mb is None:  # fixed once AdamW has built its state: no walk over the parameters every step
            self.state_mb = _rank_state_mb(self.engine, self.optimizer)
        record = {"step": self.step, "loss": float(loss) / self.world, "lr": lr,
                  "samples_per_s": tc.micro_batch * tc.grad_accum * self.world / elapsed,
                  "peak_mem_mb": _peak_memory_mb(self.device), "rank_state_mb": self.state_mb}
        self.history.append(record)
        return record

    def forward_backward_step(self, micro_step: int) -> torch.Tensor:
        """Loss of this rank's micro-batch `micro_step`, back-propagated; DeepSpeed steps the optimizer at the
        accumulation boundary (engine.step() is called after every micro-batch)."""
        from dermaflux.train.flow import flow_matching_loss

        batch, gen = self._micro_batch(micro_step)
        loss = flow_matching_loss(self.engine, batch, self.tc, self.guidance, gen)
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach().float()

    def _micro_batch(self, micro_step: int):
        """(FlowBatch, noise generator) of this rank's micro-batch `micro_step`: rows, their augmented views and
        the noise are functions of the data position, so a resumed run continues the same stream."""
        from dermaflux.train.cache import micro_batch_dropped, micro_batch_indices, micro_batch_views

        tc, n = self.tc, len(self.data)
        if getattr(self.data, "online", False):  # encoded now; views and caption dropout drawn per (epoch, row)
            latents, prompt_embeds, pooled = self.data.micro_batch(micro_step, tc.micro_batch)
            return self._flow_batch(micro_step, latents, prompt_embeds, pooled)
        position = (micro_step, self.rank, self.world, tc.micro_batch)
        idx = micro_batch_indices(n, tc.seed, *position)
        views = micro_batch_views(n, tc.seed, *position, self.data.views)
        latents, prompt_embeds, pooled = self.data.rows(idx, views)
        dropped = torch.from_numpy(micro_batch_dropped(n, tc.seed, *position, tc.caption_dropout))
        if dropped.any():  # train.caption_dropout: these samples learn the unconditional velocity
            prompt_embeds[dropped], pooled[dropped] = self.empty_prompt
        return self._flow_batch(micro_step, latents, prompt_embeds, pooled)

    def _flow_batch(self, micro_step: int, latents, prompt_embeds, pooled):
        from dermaflux.train.flow import FlowBatch

        batch = FlowBatch(latents, prompt_embeds, pooled).to(self.device, self.dtype)
        gen = torch.Generator().manual_seed(self.tc.seed * 1_000_003 + micro_step * 1_009 + self.rank)
        return batch, gen

    def report(self, record: dict) -> None:
        """Metrics to Ray Train every log_every steps; with a checkpoint on checkpoint/validation steps."""
        import ray.train

        tc, step = self.tc, self.step
        save = step % tc.checkpoint_every == 0 or step == tc.steps
        render = self.validation is not None and (step % tc.validate_every == 0 or (step == tc.steps and tc.validate_final))
        if not (save or render or step % tc.log_every == 0):
            return
        metrics = {**record, "epoch": step * tc.micro_batch * tc.grad_accum * self.world / len(self.data),
                   "micro_batch": tc.micro_batch, "gradient_checkpointing": int(tc.gradient_checkpointing),
                   "compiled": int(self.compiled), "text_tokens": self.text_tokens}
        if self.rank == 0:  # the driver's progress bar (Ray forwards worker stdout to the driver)
            from dermaflux.core.progress import report_progress

            report_progress("train", step, tc.steps, f"loss {record['loss']:.4f} lr {record['lr']:.2e} "
                            f"{record['samples_per_s']:.1f} samples/s epoch {metrics['epoch']:.2f}")
        if save or render:
            self.checkpoint(metrics, save=save, render=render)
        else:
            ray.train.report(metrics)

    def checkpoint(self, metrics: dict, save: bool, render: bool) -> None:
        """Report `metrics` with a checkpoint folder: DeepSpeed state (all ranks) when `save`; rank 0 adds the
        adapter and loss curve (`save`) and the validation grid (`render`)."""
        import ray.train

        from dermaflux.train.model_setup import state_checksum

        ckpt_dir = Path(tempfile.mkdtemp(prefix=f"dfx-step{self.step}-r{self.rank}-"))
        state = _gather_trainable(self.engine, self.transformer, self.tc)  # collective under ZeRO-3: every rank joins
        checksum = state_checksum(state)
        if save:
            # LoRA: without the frozen base (24 GB for FLUX.1-dev, per checkpoint), which resuming loads from the
            # base model anyway.
            self.engine.save_checkpoint(str(ckpt_dir / "deepspeed"), tag=DS_TAG,
                                        client_state={"step": self.step, "history": self.history,
                                                      "weights_checksum": checksum},
                                        exclude_frozen_parameters=self.tc.mode == "lora")
        if self.rank == 0:
            metrics["weights_checksum"] = checksum
            # Below ZeRO-3 every rank holds whole weights: use them in place. ZeRO-3 shards need a plain copy.
            model = self.transformer if self.tc.zero_stage < 3 else \
                _inference_transformer(self.base_dir, self.tc, state, self.dtype).to(self.device)
            if save:
                self.save(ckpt_dir, model, state, metrics["weights_checksum"])
            if render:
                self.validate(ckpt_dir, model)
            if model is self.transformer:
                self.transformer.train()
        del state
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt_dir)),
                         checkpoint_dir_name=f"step-{self.step:06d}")
        shutil.rmtree(ckpt_dir, ignore_errors=True)

    def save(self, ckpt_dir: Path, model, state: dict, checksum: float) -> None:
        """`adapter/` (loadable by FluxPipeline, with the fitted VAE) and `loss.csv`/`loss.png` (rank 0)."""
        from dermaflux.model.adapters import save_adapter
        from dermaflux.train.validation import write_loss_curve

        tc = self.tc
        save_adapter(ckpt_dir / "adapter", model, kind=tc.mode, base=self.cfg.model.pretrained, vae=self.vae,
                     lora_state_dict=state if tc.mode == "lora" else None,
                     meta={"step": self.step, "weights_checksum": checksum, "text_tokens": self.text_tokens,
                           "caption_style": tc.caption_style, "caption_dropout": tc.caption_dropout,
                           "sampling_guidance": tc.sampling_guidance, "train_guidance": self.cfg.model.train_guidance})
        write_loss_curve(self.history, ckpt_dir)

    def validate(self, ckpt_dir: Path, model) -> None:
        """`validation-<step>.png`: one row per validation prompt, one column per seed (rank 0)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        from dermaflux.model.compile import eager
        from dermaflux.train.prompts import guidance_arguments
        from dermaflux.train.validation import image_grid, render_validation, save_png

        tc, model_cfg = self.tc, self.cfg.model
        sched = FlowMatchEulerDiscreteScheduler.from_pretrained(self.base_dir, subfolder="scheduler")
        # As sampling applies guidance to this run's adapter (the negative prompt: the cached empty one).
        guidance = guidance_arguments({"sampling_guidance": tc.sampling_guidance,
                                       "train_guidance": model_cfg.train_guidance}, model_cfg.guidance_scale, 1)
        with eager():  # other shapes than training's: no recompilation of compiled blocks
            images = render_validation(model, self.vae, sched, self.validation, tc.validation_seeds,
                                       model_cfg.resolution, tc.validation_steps or model_cfg.num_inference_steps,
                                       guidance["guidance_scale"], guidance.get("true_cfg_scale"))
        save_png(image_grid(images, cols=len(tc.validation_seeds)), ckpt_dir / f"validation-{self.step:06d}.png")


def train_worker(loop_cfg: dict) -> None:
    """The function Ray Train runs on each worker."""
    trainer = Trainer(loop_cfg)
    trainer.train()
    getattr(trainer.data, "close", lambda: None)()  # online: end the stream while Ray is up (no teardown noise)


def latest_checkpoint(storage_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run (one holding a saved adapter and DeepSpeed state)."""
    found = sorted(Path(storage_dir).glob("*/step-*"))
    done = [p for p in found if (p / "adapter").exists() and (p / "deepspeed").exists()]
    return max(done, key=lambda p: p.name) if done else None


def _flat_params(cfg: DermaFluxConfig) -> dict[str, str]:
    """The model and train sections as flat `section.key` strings (a tracker's run parameters)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}", inner)
        else:
            flat[prefix] = str(value)[:500]

    for section in ("model", "train"):
        walk(section, getattr(cfg, section).model_dump(mode="json"))
    return flat


def _online_inputs(cfg: DermaFluxConfig, encode: dict | None) -> dict:
    """TorchTrainer arguments of online encoding: a dataset per rank and their DataConfig (none when cached)."""
    if encode is None or encode["mode"] != "online":
        return {}
    from dermaflux.train.precompute import train_rows
    from dermaflux.train.ray_online import online_datasets

    ids = train_rows(cfg)["id"].to_pylist()
    if len(ids) != encode["rows"]:
        raise ValueError(f"{cfg.train.captions}: {len(ids)} train rows, but the run was planned on {encode['rows']} "
                         "(the captions changed under a started run?)")
    datasets, data_config = online_datasets(cfg, ids, cfg.train.workers)
    return {"datasets": datasets, "dataset_config": data_config}


def run_training(cfg: DermaFluxConfig, cache_dir: str | Path, vae_dir: str | None, run_dir: str | Path,
                 resume: bool = False, hooks: Sequence[Callable[[Trainer, int], None]] = (), encode: dict | None = None):
    """Start the TorchTrainer; returns the Ray Train result. Checkpoints land in <run_dir>/ray/train/step-*.

    `hooks` (picklable; Ray ships them to the workers) run after every step, see `Trainer`. `encode`: the stage's
    plan (train/encode_plan.py); None or mode cached trains from the shards in `cache_dir`, mode online streams
    the caption shards into the workers (ray_online.py) and uses `cache_dir` for validation.pt only.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dermaflux.train.ray_tracking import TrackingCallback, check_trackers

    tc = cfg.train
    check_trackers(tc.tracking)
    run_dir = Path(run_dir).resolve()
    storage = tc.storage_path or str(run_dir / "ray")
    # --resume looks for local checkpoints; on remote storage Ray Train restores the run by its name itself.
    resume_from = latest_checkpoint(storage) if resume and "://" not in storage else None
    if resume_from is not None:
        log.info("resuming from %s", resume_from)
    data = _online_inputs(cfg, encode)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"), "cache_dir": str(Path(cache_dir).resolve()),
            "vae_dir": str(vae_dir) if vae_dir else None, "resume_from": str(resume_from) if resume_from else None,
            "hooks": list(hooks), "encode": encode,
        },
        **data,
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=tc.workers, use_gpu=tc.use_gpu, resources_per_worker={"CPU": tc.cpus_per_worker}
        ),
        run_config=RunConfig(
            name="train", storage_path=storage,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.checkpoints_kept),
            callbacks=[TrackingCallback(tc.tracking, run_dir, tc.mlflow_tracking_uri, _flat_params(cfg))]
            if tc.tracking else [],
        ),
    )
    return trainer.fit()
