"""How the trainer distributes one training step: a named strategy (torchtitan's `parallelize_fn` is the model).

Each strategy wraps the transformer and owns the optimizer, the backward pass, the optimizer step, saving and
loading its state, and gathering the trained weights; the trainer (`train/ray_trainer.py`) knows none of them
by name. `deepspeed` (ZeRO 0-3, `strategy/deepspeed.py`) is the default; `fsdp2` is PyTorch's `fully_shard`
(`strategy/fsdp2.py`). Both run under Ray Train, which sets up the process group (NCCL on GPU, gloo on CPU).
"""

from __future__ import annotations

import importlib

from dermaflux.train.strategy.base import TrainingStrategy, optimizer_and_schedule

__all__ = ["STRATEGIES", "TrainingStrategy", "optimizer_and_schedule", "strategy_class"]

# train.strategy name -> "module:class"; imported only when used, so choosing fsdp2 never imports DeepSpeed.
# A strategy saves its state under <checkpoint>/<name>/.
STRATEGIES = {
    "deepspeed": "dermaflux.train.strategy.deepspeed:DeepSpeedStrategy",
    "fsdp2": "dermaflux.train.strategy.fsdp2:Fsdp2Strategy",
}


def strategy_class(name: str) -> type[TrainingStrategy]:
    if name not in STRATEGIES:
        raise ValueError(f"train.strategy: unknown strategy {name!r} (known: {', '.join(STRATEGIES)})")
    module, cls = STRATEGIES[name].split(":")
    return getattr(importlib.import_module(module), cls)
