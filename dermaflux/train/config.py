"""The `train` config section. Defaults are the tiny preset's; flux-dev differences live in presets/flux-dev.yaml."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dermaflux.core.config import ConfigModel
from dermaflux.train.prompts import CaptionStyle

# diffusers.optimization.get_scheduler's names (its piecewise_constant takes `lr_step_rules`).
LrSchedulerName = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "piecewise_constant"
]

# As in diffusers' train_dreambooth_lora_flux.py (its default --lora_layers).
DEFAULT_LORA_TARGETS = [
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
]


class LoraConfigSection(ConfigModel):
    rank: int = Field(16, ge=1)
    alpha: float | None = Field(None, description="LoRA alpha; None uses the rank (scale 1), as diffusers does")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: list[str] = Field(default_factory=lambda: list(DEFAULT_LORA_TARGETS), description="module name suffixes")


class VaeFitConfig(ConfigModel):
    """Fitting the tiny preset's random VAE to the corpus before the transformer trains."""

    enabled: bool = Field(True, description="fit the VAE (needed for builtin:tiny; off for pretrained VAEs)")
    # The demo's settings are the defaults, so `dermaflux train --preset tiny` and `dermaflux pipeline` on the
    # same captions fit the same VAE and the second finds it in $DERMAFLUX_CACHE (issue 21: a plain train run
    # used to refit for ~12 s because 300 steps on all images differed from the demo's 150 on 1,024).
    steps: int = Field(150, ge=0)
    batch_size: int = Field(16, ge=1, description="images per worker per step")
    lr: float = 1e-3
    kl_weight: float = Field(1e-6, description="KL term weight, small as in SD/Flux VAE training")
    workers: int = Field(1, ge=1)
    max_images: int | None = Field(1024, description="train images used (None: all)")
    eval_images: int = Field(64, ge=1, description="test-split images for the PSNR report")


class TrainConfig(ConfigModel):
    captions: str | None = Field(None, description="captioned corpus folder (CAPTION_SCHEMA shards)")
    out: str | None = Field(None, description="run folder; the final adapter goes to <out>/final")
    storage_path: str | None = Field(
        None, description="where Ray Train keeps checkpoints; default <out>/ray (multi-node: a shared path, NFS or s3://)"
    )
    mode: Literal["lora", "full"] = Field("full", description="full for the tiny preset (its base never trained)")
    lora: LoraConfigSection = Field(default_factory=LoraConfigSection)
    steps: int = Field(300, ge=1, description="optimizer steps")
    micro_batch: int | Literal["auto"] = Field(
        8, description="samples per worker per forward; auto: micro-batch and gradient checkpointing picked from "
        "the GPU memory free at start (train/memory.py; without CUDA: 1 and gradient_checkpointing as set)"
    )
    grad_accum: int = Field(1, ge=1)
    lr: float = 3e-4
    weight_decay: float = 1e-4
    lr_scheduler: LrSchedulerName = Field(
        "constant_with_warmup", description="diffusers.optimization.get_scheduler name, stepped once per optimizer step"
    )
    warmup_steps: int = Field(20, ge=0, description="learning-rate warm-up steps (every schedule but constant)")
    lr_num_cycles: int = Field(1, ge=1, description="cosine_with_restarts: hard restarts")
    lr_power: float = Field(1.0, gt=0, description="polynomial: decay power")
    lr_step_rules: str | None = Field(
        None, description="piecewise_constant: multipliers and their last steps, e.g. '1:100,0.1:200,0.01'"
    )
    max_grad_norm: float = 1.0
    seed: int = 0
    workers: int = Field(1, ge=1, description="Ray Train workers (one per GPU on a GPU cluster)")
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, ge=1)
    launch: Literal["auto", "workers", "local"] = Field(
        "auto", description="workers: a Ray Train worker group (a worker process per rank, restarted from the last "
        "checkpoint after a failure, max_failures); local: Ray Train's local mode, the one rank in this process "
        "(no worker start, ~10-15 s less fixed cost; a failed run stops and a re-run resumes from its last "
        "checkpoint); auto: local for a short run (workers 1, steps <= local_max_steps, cached encoding, checkpoints "
        "on a local path), else workers"
    )
    local_max_steps: int = Field(300, ge=0, description="launch auto: the longest run trained in this process")
    strategy: Literal["deepspeed", "fsdp2"] = Field(
        "deepspeed", description="how training is distributed over the workers (train/strategy/): deepspeed, "
        "DeepSpeed ZeRO at zero_stage; fsdp2, PyTorch's fully_shard (parameters, gradients and optimizer state "
        "sharded as ZeRO-3; zero_stage and the offload options do not apply)"
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="deepspeed: the ZeRO stage")
    offload_optimizer: bool = Field(False, description="ZeRO optimizer state offload to CPU")
    offload_params: bool = Field(False, description="ZeRO-3 parameter offload to CPU")
    gradient_checkpointing: bool = False
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    # The rectified-flow objective (names as in diffusers' SD3/Flux training scripts).
    weighting_scheme: Literal["logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap", "none"] = "none"
    timestep_sampling: Literal["logit_normal", "mode", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    max_images: int | None = Field(None, description="train images used (None: all); for quick runs")
    augment: Literal["dihedral", "none"] = Field(
        "dihedral", description="dihedral: each image is encoded in its 8 flips/90-degree rotations (dermoscopy has "
        "no up) and every sample draws one of them; none: the image as it is"
    )
    caption_style: CaptionStyle = Field(
        "caption", description="the prompt each caption row trains on (train/prompts.py): caption, the caption as "
        "written; diagnosis, only the diagnosis it names. Recorded in the adapter, so sampling styles prompts alike"
    )
    caption_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="fraction of samples trained with the empty prompt, so the model also "
        "learns the unconditional velocity that classifier-free guidance (synth true_cfg_scale) contrasts with"
    )
    sampling_guidance: Literal["embedding", "true_cfg"] = Field(
        "embedding", description="how sampling applies guidance_scale to what this run trains (recorded in the "
        "adapter): embedding, into the guidance embedding (FLUX.1-dev is guidance-distilled); true_cfg, classifier-"
        "free guidance against the empty prompt (two passes per step; needs caption_dropout > 0), the embedding "
        "then held at model.train_guidance as in training (a model trained from scratch never learned it)"
    )
    text_tokens: int | Literal["auto"] = Field(
        "auto", description="T5 tokens per caption; auto: the smallest of 64/128/256/512 that holds every caption "
        "(at most model.max_sequence_length). A longer caption is an error naming its id, never cut"
    )
    compile: bool = Field(False, description="torch.compile the transformer's repeated blocks (eager, with one "
                          "warning, when compilation fails or under ZeRO-3)")
    tracking: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="experiment trackers fed by Ray Train's report callback: tensorboard (<out>/tensorboard), mlflow",
    )
    mlflow_tracking_uri: str | None = Field(None, description="mlflow: tracking URI (default <out>/mlruns)")
    checkpoint_every: int = Field(100, ge=1)
    checkpoints_kept: int = Field(3, ge=1, description="newest checkpoints Ray Train keeps (older ones are deleted)")
    validate_every: int = Field(100, ge=1)
    validate_final: bool = Field(True, description="also render the validation grid at the last step (off: a short "
                                 "run skips the render; the final adapter is saved either way)")
    log_every: int = Field(10, ge=1)
    validation_prompts: list[str] = Field(
        default_factory=lambda: [
            "dermoscopic image of a melanoma, asymmetric, irregular border, dark brown and black",
            "dermoscopic image of a melanocytic nevus, symmetric, regular border, light brown",
            "dermoscopic image of a basal cell carcinoma on the face",
            "dermoscopic image of a vascular lesion, red",
        ]
    )
    validation_seeds: list[int] = Field(default_factory=lambda: [0, 1])
    validation_steps: int | None = Field(None, description="sampling steps (None: model.num_inference_steps)")
    encode: Literal["auto", "cached", "online"] = Field(
        "auto", description="cached: encode every image (its views) and caption once into <out>/cache, train from the "
        "mapped shards; online: no cache, each worker decodes its share of the caption shards (Ray Data), draws a "
        "dihedral view and encodes with the frozen VAE/CLIP/T5 it holds; auto: cached when the planned epochs are >= 2 "
        "and the cache (sized from the shapes) fits under cache_max_bytes, else online (train/encode_plan.py)"
    )
    cache_max_bytes: int = Field(256 * 2**30, ge=0, description="encode auto: the largest cache written (bytes)")
    online_shuffle_rows: int = Field(
        1024, ge=1, description="encode online: rows each worker shuffles over (Ray Data's local shuffle buffer)"
    )
    precompute_batch: int = Field(32, ge=1)
    precompute_workers: int = Field(1, ge=1)
    precompute_inline_rows: int = Field(
        256, ge=0, description="pre-compute at most this many rows in the driver process instead of a Ray Data job, "
        "whose actor start (a fresh process importing torch and diffusers: ~10 s on 2 cores) costs more than encoding "
        "a few hundred tiny rows; 0: always Ray Data. Not when use_gpu and the driver has no GPU"
    )
    vae_fit: VaeFitConfig = Field(default_factory=VaeFitConfig)
    max_failures: int = Field(2, ge=0, description="worker failures survived (restart from the last checkpoint)")
    resume: bool = Field(
        False, description="insist on continuing a stopped run (an error when `out` holds no checkpoint); "
        "re-running the same run continues it anyway"
    )

    @model_validator(mode="after")
    def _check(self):
        if self.launch == "local" and self.workers != 1:
            raise ValueError(f"train.launch local runs one rank in this process; workers is {self.workers}")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        if self.strategy != "deepspeed" and (self.offload_optimizer or self.offload_params):
            raise ValueError(f"offload_optimizer and offload_params are DeepSpeed options; strategy {self.strategy} "
                             "does not offload")
        if isinstance(self.micro_batch, int) and self.micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1 or auto, got {self.micro_batch}")
        if isinstance(self.text_tokens, int) and self.text_tokens < 1:
            raise ValueError(f"text_tokens must be >= 1 or auto, got {self.text_tokens}")
        if self.sampling_guidance == "true_cfg" and self.caption_dropout == 0:
            raise ValueError("sampling_guidance true_cfg needs caption_dropout > 0 (the unconditional velocity it "
                             "contrasts with is learned from the samples trained with the empty prompt)")
        if self.lr_scheduler == "piecewise_constant" and not self.lr_step_rules:
            raise ValueError("lr_scheduler piecewise_constant needs lr_step_rules (e.g. '1:100,0.1:200,0.01')")
        return self


def may_train_in_process(tc: TrainConfig) -> bool:
    """Whether train.launch may put this run in the driver's process (launch local; auto: one worker, at most
    local_max_steps, checkpoints on a local path); ray_trainer.launches_locally decides once the encode plan and the
    device are known. Such a run starts Ray only where it needs it (a VAE fit, a Ray Data pre-compute, workers)."""
    if tc.launch != "auto":
        return tc.launch == "local"
    return tc.workers == 1 and tc.steps <= tc.local_max_steps and "://" not in (tc.storage_path or "")
