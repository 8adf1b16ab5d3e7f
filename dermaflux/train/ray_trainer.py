"""Ray Train driver: each worker runs a `Trainer`, the rectified-flow step under a training strategy.

Everything model-specific is in flow.py / model_setup.py; how the step is distributed is the strategy's
(`train.strategy`: DeepSpeed ZeRO or FSDP2, train/strategy/); what a checkpoint folder holds is
checkpointing.py's and the validation grid validation.py's. This module owns the loop: the data position
per rank, checkpoints through ray.train.report, and restart after a lost worker. `run_training` (the
driver side) starts the TorchTrainer whose train function is `train_worker`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dermaflux.train.checkpointing import Checkpointer
from dermaflux.train.config import TrainConfig, may_train_in_process
from dermaflux.train.strategy import STRATEGIES, strategy_class
from dermaflux.train.validation import ValidationRenderer

if TYPE_CHECKING:
    from dermaflux.config import DermaFluxConfig

log = logging.getLogger(__name__)


def _peak_memory_mb(device) -> float:
    """Peak accelerator memory on GPU; peak resident set size of this worker process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Trainer:
    """One Ray Train worker's run, read top to bottom as torchtitan's Trainer:
    `train()` -> `train_step()` -> `forward_backward_step()`, then `report()` -> `checkpoint()`, which hands the
    folder to the `Checkpointer` and the `ValidationRenderer`. The strategy (`self.strategy`) wraps the model and
    runs backward, step, save, load and the gathering of the trained weights.

    `hooks` are callables `hook(trainer, step)` run after every optimizer step, before its report;
    tests pass them (e.g. a worker that dies once) through `run_training(..., hooks=...)`.
    """

    def __init__(self, loop_cfg: dict):
        import ray.train
        from diffusers import FluxTransformer2DModel

        from dermaflux.config import DermaFluxConfig
        from dermaflux.model.loading import resolve_pretrained
        from dermaflux.train.strategy.base import use_bf16

        self.cfg = DermaFluxConfig.model_validate(loop_cfg["cfg"])
        tc = self.cfg.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.hooks = list(loop_cfg.get("hooks", ()))
        # launch local (Ray Train's local mode): this process is the one rank; checkpoints are written to their
        # folder here (local mode keeps only a reference) and the trackers are called here (no controller).
        self.local_dir = Path(loop_cfg["local_checkpoints"]) if loop_cfg.get("local_checkpoints") else None
        self.tracking = loop_cfg.get("tracking")
        if not tc.use_gpu:
            torch.set_num_threads(max(tc.cpus_per_worker, 1))
        if tc.use_gpu and self.local_dir is not None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
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
        self.checkpointer = Checkpointer(self.strategy, self.tc, self.cfg.model, self.base_dir, self.rank, self.vae,
                                         self.text_tokens)
        self.validator = ValidationRenderer(self.tc, self.cfg.model, self.base_dir, self.vae, self.validation) \
            if self.validation is not None else None
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
        shards = self.world if strategy_class(tc.strategy).shards_parameters(tc) else 1
        picked = pick_micro_batch(free_gib, size_class(self.transformer.config), tokens, shards)
        micro_batch, checkpointing = picked or (1, tc.gradient_checkpointing)
        if self.rank == 0:
            free = "no GPU" if free_gib is None else f"{free_gib:.0f} GiB free"
            print(f"train.micro_batch auto: {micro_batch}, gradient checkpointing {checkpointing} "
                  f"({free}, {tokens} tokens per sample)", flush=True)
        return tc.model_copy(update={"micro_batch": micro_batch, "gradient_checkpointing": checkpointing})

    def _build_engine(self) -> None:
        """The trainable transformer (LoRA or full), optionally compiled, wrapped by the `train.strategy`."""
        from dermaflux.train.flow import train_guidance_for
        from dermaflux.train.model_setup import prepare_transformer

        tc = self.tc
        torch.manual_seed(tc.seed)  # identical LoRA init on every rank
        prepare_transformer(self.transformer, tc)
        self.guidance = train_guidance_for(self.transformer.config, self.cfg.model)
        self.strategy = strategy_class(tc.strategy)(tc, self.device, self.dtype, self.world)
        self.compiled = self._compile() if tc.compile else False
        self.strategy.wrap(self.transformer)

    def _compile(self) -> bool:
        """Compile the repeated blocks, probed by one forward + backward at the training shape before the strategy
        wraps the model (so the probe leaves no state); False (eager, one warning) when that fails."""
        from dermaflux.model.compile import compile_blocks
        from dermaflux.train.flow import flow_matching_loss

        if self.strategy.shards_parameters(self.tc):
            if self.rank == 0:
                log.warning("train.compile: not with sharded parameters (ZeRO-3's parameter hooks break compiled "
                            "graphs; not tried under FSDP2); training runs eager")
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
        with checkpoint.as_directory() as ckpt_dir:
            step, history = self.checkpointer.restore(Path(ckpt_dir), checkpoint.path)
        log.info("rank %d: resumed at step %d from %s", self.rank, step, checkpoint.path)
        return step, history

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
        # the lr this step runs at (the scheduler steps with the optimizer)
        lr = self.strategy.scheduler.get_last_lr()[0]
        micro_losses = [self.forward_backward_step(self.step * tc.grad_accum + micro) for micro in range(tc.grad_accum)]
        self.step += 1
        loss = torch.stack(micro_losses).mean().reshape(1)
        dist.all_reduce(loss)
        elapsed = time.perf_counter() - started
        if self.state_mb is None:  # fixed once AdamW has built its state: no walk over the parameters every step
            self.state_mb = self.strategy.rank_state_mb()
        record = {"step": self.step, "loss": float(loss) / self.world, "lr": lr,
                  "samples_per_s": tc.micro_batch * tc.grad_accum * self.world / elapsed,
                  "peak_mem_mb": _peak_memory_mb(self.device), "rank_state_mb": self.state_mb}
        self.history.append(record)
        return record

    def forward_backward_step(self, micro_step: int) -> torch.Tensor:
        """Loss of this rank's micro-batch `micro_step`, back-propagated; the strategy steps the optimizer at the
        accumulation boundary (its step() is called after every micro-batch)."""
        from dermaflux.train.flow import flow_matching_loss

        batch, gen = self._micro_batch(micro_step)
        loss = flow_matching_loss(self.strategy.model, batch, self.tc, self.guidance, gen)
        self.strategy.backward(loss)
        self.strategy.step()
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
            self._report(metrics)

    def _report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        """ray.train.report; under launch local the checkpoint folder is first moved to its place among the run's
        checkpoints (train.checkpoints_kept of them kept) and the trackers see the metrics."""
        import ray.train

        name = f"step-{self.step:06d}"
        if checkpoint_dir is not None and self.local_dir is not None:
            checkpoint_dir = keep_local_checkpoint(checkpoint_dir, self.local_dir / name, self.tc.checkpoints_kept)
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)
        if self.tracking is not None:
            self.tracking.after_report(None, [metrics], checkpoint)
        if checkpoint_dir is not None and self.local_dir is None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # Ray Train copied it to the run's storage

    def checkpoint(self, metrics: dict, save: bool, render: bool) -> None:
        """Report `metrics` with a checkpoint folder: the strategy's state (all ranks), the adapter and loss curve
        (rank 0) when `save`; the validation grid (rank 0) when `render`."""
        ckpt_dir = Path(tempfile.mkdtemp(prefix=f"dfx-step{self.step}-r{self.rank}-"))
        state, checksum = self.checkpointer.snapshot()  # collective under sharding strategies: every rank joins
        model = None
        if self.rank == 0:
            metrics["weights_checksum"] = checksum
            model = self.checkpointer.trained_model(self.transformer, state, self.device, self.dtype)
        if save:
            self.checkpointer.save(ckpt_dir, self.step, self.history, state, checksum, model)
        if render and self.rank == 0:
            self.validator.render(ckpt_dir, model, self.step)
        if model is self.transformer:
            self.transformer.train()
        del state, model
        self._report(metrics, ckpt_dir)


def train_worker(loop_cfg: dict) -> None:
    """The function Ray Train runs on each worker."""
    trainer = Trainer(loop_cfg)
    trainer.train()
    getattr(trainer.data, "close", lambda: None)()  # online: end the stream while Ray is up (no teardown noise)


def latest_checkpoint(storage_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run (one holding a saved adapter and a strategy's state)."""
    found = sorted(Path(storage_dir).glob("*/step-*"))
    done = [p for p in found if (p / "adapter").exists() and any((p / name).exists() for name in STRATEGIES)]
    return max(done, key=lambda p: p.name) if done else None


def keep_local_checkpoint(staged: Path, target: Path, kept: int) -> Path:
    """Move a checkpoint folder written by launch local to `target` (renamed into place: a reader sees it whole or
    not at all) and delete the oldest `step-*` folders beyond `kept`: only folders this launcher wrote, in the
    run's own checkpoint folder, as Ray Train's CheckpointConfig(num_to_keep) does for workers."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.move(str(staged), partial)
    if target.exists():  # the same step written again (a resumed run re-reaching it): replace
        shutil.rmtree(target)
    partial.rename(target)
    written = sorted(p for p in target.parent.glob("step-*") if p.is_dir() and (p / "adapter").exists())
    for old in written[:-kept]:
        shutil.rmtree(old)
    return target


def launches_locally(tc: TrainConfig, encode: dict | None, storage: str) -> bool:
    """train.launch: local runs the one rank in this process (Ray Train's local mode), auto does so for a short
    one-worker run from the cache on a local storage path, in a process that has the device it trains on (the gain: no worker process to start, import and stop,
    ~10-15 s; the loss: no restart after a failure, which a short run barely needs: a re-run resumes)."""
    online = (encode or {}).get("mode") == "online"
    if tc.launch == "workers":
        return False
    if tc.launch == "local":
        if online:
            raise ValueError("train.launch local trains from the cache; online encoding streams through Ray Data "
                             "into worker processes: set train.launch to workers or auto, or train.encode to cached")
        if "://" in storage:
            raise ValueError(f"train.launch local writes checkpoints to a local folder; storage_path is {storage}")
        if tc.use_gpu and not torch.cuda.is_available():
            raise ValueError("train.launch local trains in this process, which sees no GPU (a CPU-only head node?); "
                             "train.use_gpu needs launch workers")
        return True
    # A driver without the GPU the run asks for (a CPU-only head node) hands it to a worker on a GPU node.
    has_device = not tc.use_gpu or torch.cuda.is_available()
    return may_train_in_process(tc) and not online and "://" not in storage and has_device


@contextlib.contextmanager
def _local_rank():
    """What launch local needs in this process: a process group of one over loopback, made on first use and kept
    for the life of the process (DeepSpeed keeps groups it derives from it, so a second run in the same process
    needs the same one), and the rank variables DeepSpeed reads, put back afterwards (torch's thread count:
    ray_local.fit_in_this_process). Not torchrun's full set, so Ray Train's local controller leaves the group to us."""
    import os

    import torch.distributed as dist

    from dermaflux.core.runtime import free_port

    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise RuntimeError(f"train.launch local: this process is already in a process group of "
                           f"{dist.get_world_size()}; launch workers instead")
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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

    from dermaflux.core.runtime import init_ray
    from dermaflux.train.ray_tracking import TrackingCallback, check_trackers

    tc = cfg.train
    check_trackers(tc.tracking)
    run_dir = Path(run_dir).resolve()
    storage = tc.storage_path or str(run_dir / "ray")
    # --resume looks for local checkpoints; on remote storage Ray Train restores the run by its name itself.
    resume_from = latest_checkpoint(storage) if resume and "://" not in storage else None
    if resume_from is not None:
        log.info("resuming from %s", resume_from)
    loop_cfg = {
        "cfg": cfg.model_dump(mode="json"), "cache_dir": str(Path(cache_dir).resolve()),
        "vae_dir": str(vae_dir) if vae_dir else None, "resume_from": str(resume_from) if resume_from else None,
        "hooks": list(hooks), "encode": encode,
    }
    tracking = TrackingCallback(tc.tracking, run_dir, tc.mlflow_tracking_uri, _flat_params(cfg)) if tc.tracking else None
    if launches_locally(tc, encode, storage):
        log.info("train.launch: local (one rank in this process, Ray Train's local mode)")
        from dermaflux.train.ray_local import fit_in_this_process

        with _local_rank():
            return fit_in_this_process(train_worker, {**loop_cfg, "local_checkpoints": str(Path(storage) / "train"),
                                                      "tracking": tracking}, "local rank 0")
    init_ray(cfg.ray)  # not started yet when the run looked short enough for this process (stages.py)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=loop_cfg,
        **_online_inputs(cfg, encode),
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=tc.workers, use_gpu=tc.use_gpu, resources_per_worker={"CPU": tc.cpus_per_worker}
        ),
        run_config=RunConfig(
            name="train", storage_path=storage,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.checkpoints_kept),
            callbacks=[tracking] if tracking else [],
        ),
    )
    return trainer.fit()
