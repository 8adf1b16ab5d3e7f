"""The interface every training strategy provides (pure torch; no Ray, no DeepSpeed)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from dermaflux.train.config import TrainConfig
from dermaflux.train.model_setup import lr_scheduler


def use_bf16(train_cfg: TrainConfig) -> bool:
    if train_cfg.precision == "auto":
        return train_cfg.use_gpu  # bf16 on GPU; CPU runs stay fp32 (bf16 CPU matmuls are slow and lossy)
    return train_cfg.precision == "bf16"


def optimizer_and_schedule(params, train_cfg: TrainConfig):
    """torch AdamW over `params` and diffusers' `train.lr_scheduler` schedule, the same under every strategy."""
    optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    return optimizer, lr_scheduler(optimizer, train_cfg)


class TrainingStrategy:
    """One worker's side of a distribution strategy. The trainer calls, in this order:

    `wrap(transformer)` once (after `prepare_transformer`), then per micro-batch `model(...)` forward,
    `backward(loss)` and `step()` (the optimizer steps at the accumulation boundary); `save`, `load` and
    `gather_trainable` are collectives every rank joins.
    """

    name: ClassVar[str]
    model: torch.nn.Module  # what the forward pass calls
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def __init__(self, train_cfg: TrainConfig, device: torch.device, dtype: torch.dtype, world: int):
        self.tc, self.device, self.dtype, self.world = train_cfg, device, dtype, world

    @staticmethod
    def shards_parameters(train_cfg: TrainConfig) -> bool:
        """Whether each rank holds only a shard of the weights (memory planning; no whole-weight use in place)."""
        raise NotImplementedError

    @property
    def whole_weights_in_place(self) -> bool:
        """Whether the wrapped transformer holds whole, plain weights that rank 0 may save and render directly."""
        return not self.shards_parameters(self.tc)

    def wrap(self, transformer: torch.nn.Module) -> None:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def save(self, folder: Path, client_state: dict) -> None:
        """Model, optimizer and schedule state into `folder` (each rank its part), with `client_state`."""
        raise NotImplementedError

    def load(self, folder: Path) -> dict:
        """Restore what `save` wrote into `folder`; returns its `client_state`."""
        raise NotImplementedError

    def gather_trainable(self) -> dict[str, torch.Tensor]:
        """The trained weights as whole float32 CPU tensors on every rank (LoRA in peft naming, else all)."""
        raise NotImplementedError

    def rank_state_mb(self) -> float:
        """Parameters and optimizer state this rank holds (the part a sharding strategy splits), in MiB."""
        raise NotImplementedError
