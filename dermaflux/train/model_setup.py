"""Which transformer weights train: a peft LoRA adapter, or all of them (pure torch/peft)."""

from __future__ import annotations

import torch

from dermaflux.train.config import TrainConfig


def prepare_transformer(transformer, train_cfg: TrainConfig):
    """Set requires_grad, add the LoRA adapter when mode is lora; returns the trainable parameters."""
    if train_cfg.mode == "lora":
        from peft import LoraConfig

        transformer.requires_grad_(False)
        lora = train_cfg.lora
        transformer.add_adapter(
            LoraConfig(
                r=lora.rank,
                lora_alpha=lora.alpha if lora.alpha is not None else lora.rank,
                lora_dropout=lora.dropout,
                init_lora_weights="gaussian",  # as diffusers' Flux LoRA trainer: B starts at zero
                target_modules=list(lora.targets),
            )
        )
    else:
        transformer.requires_grad_(True)
    if train_cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"train.lora.targets {train_cfg.lora.targets} matched no module of the transformer")
    return params


def trainable_state_dict(transformer, train_cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Detached CPU copies of what the run trains (LoRA layers in peft naming, or the full state dict)."""
    if train_cfg.mode == "lora":
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(transformer)
    else:
        state = transformer.state_dict()
    return {k: v.detach().to("cpu", copy=True).float() for k, v in state.items()}


def state_checksum(state: dict[str, torch.Tensor]) -> float:
    """A cheap fingerprint of weights (sum of absolute values), to compare saved against trained."""
    return float(sum(t.double().abs().sum().item() for t in state.values()))


def lr_scheduler(optimizer, train_cfg: TrainConfig):
    """diffusers' schedule `train.lr_scheduler` over `train.steps` optimizer steps (a LambdaLR: DeepSpeed saves
    and restores its position with the engine state).

    Optimizer step k (from 1) runs at lr * factor(k - 1): with a warm-up the first step's factor is 0,
    as in diffusers' trainers. Extending a run (more `train.steps`) stretches the decaying schedules.
    """
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        train_cfg.lr_scheduler, optimizer, step_rules=train_cfg.lr_step_rules,
        num_warmup_steps=train_cfg.warmup_steps, num_training_steps=train_cfg.steps,
        num_cycles=train_cfg.lr_num_cycles, power=train_cfg.lr_power,
    )
