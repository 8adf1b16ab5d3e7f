"""`train.strategy: deepspeed`: DeepSpeed ZeRO 0-3 (the default). The only module that touches DeepSpeed's engine;
its config is built in `train/ds_config.py`."""

from __future__ import annotations

from pathlib import Path

import torch

from dermaflux.train.config import TrainConfig
from dermaflux.train.model_setup import trainable_state_dict
from dermaflux.train.strategy.base import TrainingStrategy, optimizer_and_schedule

DS_TAG = "state"  # DeepSpeed's checkpoint tag: <folder>/state/


class DeepSpeedStrategy(TrainingStrategy):
    name = "deepspeed"

    @staticmethod
    def shards_parameters(train_cfg: TrainConfig) -> bool:
        return train_cfg.zero_stage == 3

    def wrap(self, transformer: torch.nn.Module) -> None:
        import deepspeed

        from dermaflux.train.ds_config import deepspeed_config, skip_unused_op_builds

        self.transformer = transformer
        optimizer, scheduler = optimizer_and_schedule([p for p in transformer.parameters() if p.requires_grad],
                                                      self.tc)
        skip_unused_op_builds()
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=transformer, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(self.tc), dist_init_required=False,
        )

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)  # DeepSpeed scales by 1/grad_accum itself

    def step(self) -> None:
        self.model.step()  # called after every micro-batch: DeepSpeed steps at the accumulation boundary

    def save(self, folder: Path, client_state: dict) -> None:
        # LoRA: without the frozen base (24 GB for FLUX.1-dev, per checkpoint), which resuming loads from the
        # base model anyway.
        self.model.save_checkpoint(str(folder), tag=DS_TAG, client_state=client_state,
                                   exclude_frozen_parameters=self.tc.mode == "lora")

    def load(self, folder: Path) -> dict:
        # LoRA checkpoints hold no frozen base weights: not strict about their keys (the restored trainable
        # weights are checked against the checksum saved with them instead).
        _, client = self.model.load_checkpoint(str(folder), tag=DS_TAG, load_module_strict=self.tc.mode != "lora")
        return client

    def gather_trainable(self) -> dict[str, torch.Tensor]:
        """ZeRO-3 shards are empty until gathered (a collective); below it every rank holds whole weights."""
        import deepspeed

        if self.tc.zero_stage == 3:
            params = [p for p in self.transformer.parameters() if p.requires_grad or self.tc.mode == "full"]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return trainable_state_dict(self.transformer, self.tc)
        return trainable_state_dict(self.transformer, self.tc)

    def rank_state_mb(self) -> float:
        """What ZeRO partitions: optimizer state (ZeRO-1/2 also the fp32 master copy), ZeRO-3 the parameters."""
        held = 0
        for p in self.model.module.parameters():
            local = getattr(p, "ds_tensor", p)  # ZeRO-3: the rank's own shard
            held += local.numel() * local.element_size()
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        for state in inner.state.values():
            held += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
        for group in getattr(self.optimizer, "single_partition_of_fp32_groups", []) or []:
            if group.data_ptr() != next(self.model.module.parameters()).data_ptr():
                held += group.numel() * group.element_size()  # ZeRO-1/2 master copy of this rank's partition
        return held / 2**20
