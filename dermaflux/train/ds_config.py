"""The DeepSpeed config built from ours (pure; the one place DeepSpeed keys are spelled), and the DeepSpeed ops
our training leaves unbuilt."""

from __future__ import annotations

from dermaflux.train.config import TrainConfig
from dermaflux.train.strategy.base import use_bf16


def deepspeed_config(train_cfg: TrainConfig) -> dict:
    zero: dict = {"stage": train_cfg.zero_stage}
    if train_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": train_cfg.use_gpu}
    if train_cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": train_cfg.use_gpu}
    if train_cfg.zero_stage == 3:
        # Small models: do not keep whole layers resident; gathering for saves is done explicitly.
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": False})
    return {
        "train_micro_batch_size_per_gpu": train_cfg.micro_batch,
        "gradient_accumulation_steps": train_cfg.grad_accum,
        "gradient_clipping": train_cfg.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16(train_cfg)},
        # Our torch AdamW is passed in; DeepSpeed's CPU Adam would need a compiled op.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


# Ops DeepSpeed would JIT-compile that our training never calls. Its TorchBackend builds the
# shared-memory all-reduce op on the CPU accelerator at every `deepspeed.initialize`, but only its
# inference all-reduce (AutoTP) uses it; ZeRO training reduces through torch.distributed (gloo on
# CPU). The build needs a C++ compiler and took ~190 s on a loaded 2-core machine.
UNUSED_OPS = ("deepspeed_shm_comm",)


def skip_unused_op_builds() -> None:
    """Mark UNUSED_OPS as not buildable here, so DeepSpeed neither compiles nor loads them; call in the worker
    before `deepspeed.initialize`. (DeepSpeed keeps one `__compatible_ops__` dict per process; edits persist.)"""
    import deepspeed.ops

    compatible = deepspeed.ops.__compatible_ops__
    for name in UNUSED_OPS:
        compatible[name] = False
