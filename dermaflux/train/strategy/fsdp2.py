"""`train.strategy: fsdp2`: PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`), each repeated transformer block
its own all-gather group, then the root (as torchtitan's Flux trainer shards it). Saving and loading go through
torch.distributed.checkpoint (DCP): each rank writes its own shards, as DeepSpeed does, and Ray Train merges the
ranks' folders into one checkpoint. The process group is Ray Train's (NCCL on GPU, gloo on CPU)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from dermaflux.train.config import TrainConfig
from dermaflux.train.strategy.base import TrainingStrategy, optimizer_and_schedule

CLIENT_FILE = "client.pt"  # step, loss history, checksum and the schedule's position (rank 0 writes it)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _repeated_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks diffusers compiles regionally (Flux: FluxTransformerBlock, FluxSingleTransformerBlock)."""
    kinds = set(getattr(transformer, "_repeated_blocks", None) or ())
    blocks = [m for m in transformer.modules() if type(m).__name__ in kinds]
    if not blocks:
        raise ValueError(f"train.strategy fsdp2: {type(transformer).__name__} names no repeated blocks to shard")
    return blocks


class Fsdp2Strategy(TrainingStrategy):
    name = "fsdp2"

    @staticmethod
    def shards_parameters(train_cfg: TrainConfig) -> bool:
        return True

    def wrap(self, transformer: torch.nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))  # over Ray Train's default process group
        # bf16: the sharded float32 weights stay the optimizer's master copy; forward and backward run in bf16 and
        # gradients reduce in float32 (DeepSpeed's bf16 keeps an fp32 master copy likewise).
        mp_policy = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32) \
            if self.dtype != torch.float32 else MixedPrecisionPolicy()
        if any(p.dtype != torch.float32 for p in transformer.parameters()):
            raise ValueError("train.strategy fsdp2: the transformer must be loaded in float32 (the master weights)")
        transformer.to(self.device)
        for block in _repeated_blocks(transformer):
            fully_shard(block, mesh=mesh, mp_policy=mp_policy)
        fully_shard(transformer, mesh=mesh, mp_policy=mp_policy)
        self.model = transformer
        # fully_shard replaced the parameters by DTensor shards: the optimizer is built over those.
        self.params = [p for p in transformer.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = optimizer_and_schedule(self.params, self.tc)
        self.micro_steps = 0

    def backward(self, loss: torch.Tensor) -> None:
        grad_accum = self.tc.grad_accum
        self.micro_steps += 1
        # Reduce-scatter gradients only on the accumulation boundary; the mean over micro-batches, as DeepSpeed.
        self.model.set_requires_gradient_sync(self.micro_steps % grad_accum == 0)
        (loss / grad_accum).backward()

    def step(self) -> None:
        if self.micro_steps % self.tc.grad_accum:
            return
        if self.tc.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.tc.max_grad_norm)  # the global norm over all shards
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _options(self, **extra):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # LoRA: without the frozen base (24 GB for FLUX.1-dev, per checkpoint), which resuming loads from the base
        # model anyway; the restored adapter is checked against its saved checksum instead of strict keys.
        lora = self.tc.mode == "lora"
        return StateDictOptions(ignore_frozen_params=lora, strict=not lora, **extra)

    def save(self, folder: Path, client_state: dict) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self._options())
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder))
        if dist.get_rank() == 0:
            torch.save({**client_state, "scheduler": self.scheduler.state_dict()}, Path(folder) / CLIENT_FILE)

    def load(self, folder: Path) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self._options())
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=self._options())
        client = torch.load(Path(folder) / CLIENT_FILE, weights_only=True)
        self.scheduler.load_state_dict(client.pop("scheduler"))
        return client

    def gather_trainable(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if self.tc.mode == "full":
            state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        else:
            from peft.utils import get_peft_model_state_dict

            # Only the adapter's parameters are all-gathered (in the same order on every rank): gathering the
            # frozen base as well would assemble the whole model on each rank.
            adapter = {name: p.full_tensor() for name, p in self.model.named_parameters() if p.requires_grad}
            state = get_peft_model_state_dict(self.model, state_dict=adapter)
        return {k: v.detach().to("cpu", copy=True).float() for k, v in state.items()}

    def rank_state_mb(self) -> float:
        """This rank's parameter shards and the AdamW state of its trainable shards."""
        held = sum(_local(p).numel() * p.element_size() for p in self.model.parameters())
        for state in self.optimizer.state.values():
            held += sum(_local(t).numel() * t.element_size() for t in state.values()
                        if torch.is_tensor(t) and t.dim() > 0)
        return held / 2**20
