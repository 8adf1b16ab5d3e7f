"""A training checkpoint folder, whatever the strategy (pure torch; Ray Train reports and restores the folder):

    <name of the strategy>/   model, optimizer and schedule state, each rank its part (`TrainingStrategy.save`)
    adapter/                  the trained weights, loadable by FluxPipeline (rank 0)
    loss.csv, loss.png        the loss curve so far (rank 0)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dermaflux.train.config import TrainConfig
from dermaflux.train.model_setup import state_checksum
from dermaflux.train.strategy.base import TrainingStrategy

if TYPE_CHECKING:
    from dermaflux.model.config import ModelConfig


def inference_transformer(base_dir: str, train_cfg: TrainConfig, state: dict, dtype: torch.dtype):
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


class Checkpointer:
    """Writes and restores checkpoint folders through `strategy`; rank 0 also exports the adapter."""

    def __init__(self, strategy: TrainingStrategy, train_cfg: TrainConfig, model_cfg: ModelConfig, base_dir: str,
                 rank: int, vae=None, text_tokens: int | None = None):
        self.strategy, self.tc, self.model_cfg, self.base_dir = strategy, train_cfg, model_cfg, base_dir
        self.rank, self.vae, self.text_tokens = rank, vae, text_tokens

    def snapshot(self) -> tuple[dict[str, torch.Tensor], float]:
        """(trained weights, their checksum) on every rank: a collective under sharding strategies."""
        state = self.strategy.gather_trainable()
        return state, state_checksum(state)

    def trained_model(self, transformer, state: dict, device: torch.device, dtype: torch.dtype):
        """What rank 0 saves and renders: the training transformer itself where it holds whole weights, else a
        plain copy loaded with `state` (ZeRO-3 and FSDP2 hold shards)."""
        if self.strategy.whole_weights_in_place:
            return transformer
        return inference_transformer(self.base_dir, self.tc, state, dtype).to(device)

    def save(self, ckpt_dir: Path, step: int, history: list[dict], state: dict, checksum: float, model) -> None:
        """The strategy's state (every rank); rank 0 adds the adapter (`model`, `state`) and the loss curve."""
        self.strategy.save(ckpt_dir / self.strategy.name,
                           {"step": step, "history": history, "weights_checksum": checksum})
        if self.rank == 0:
            self.export(ckpt_dir, model, state, checksum, step, history)

    def export(self, ckpt_dir: Path, model, state: dict, checksum: float, step: int, history: list[dict]) -> None:
        """`adapter/` (loadable by FluxPipeline, with the fitted VAE) and `loss.csv`/`loss.png`."""
        from dermaflux.model.adapters import save_adapter
        from dermaflux.train.validation import write_loss_curve

        tc = self.tc
        save_adapter(ckpt_dir / "adapter", model, kind=tc.mode, base=self.model_cfg.pretrained, vae=self.vae,
                     lora_state_dict=state if tc.mode == "lora" else None,
                     meta={"step": step, "weights_checksum": checksum, "text_tokens": self.text_tokens,
                           "caption_style": tc.caption_style, "caption_dropout": tc.caption_dropout,
                           "sampling_guidance": tc.sampling_guidance,
                           "train_guidance": self.model_cfg.train_guidance})
        write_loss_curve(history, ckpt_dir)

    def restore(self, folder: Path, where: str) -> tuple[int, list[dict]]:
        """(step, loss history) after loading the checkpoint in `folder` (every rank); `where` names it in errors."""
        state_dir = Path(folder) / self.strategy.name
        if not state_dir.is_dir():
            written = sorted(p.name for p in Path(folder).iterdir() if p.is_dir() and p.name != "adapter")
            raise ValueError(f"checkpoint {where}: no {self.strategy.name}/ state to resume under train.strategy "
                             f"{self.strategy.name} (it holds {written or 'none'}: written under another strategy)")
        client = self.strategy.load(state_dir)
        self._check_restored(client, where)
        return int(client["step"]), list(client["history"])

    def _check_restored(self, client: dict, where: str) -> None:
        saved = client.get("weights_checksum")
        if saved is None:  # a checkpoint written before the checksum was saved with it
            return
        _, restored = self.snapshot()  # collective under sharding strategies
        if abs(restored - saved) > 1e-6 * max(abs(saved), 1.0):
            raise RuntimeError(f"checkpoint {where}: the restored trainable weights differ from the saved ones "
                               f"(checksum {restored} != {saved})")
