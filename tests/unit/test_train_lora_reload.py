"""A saved LoRA reloads as trained: alpha != rank survives `save_adapter` into the project's loader (the
synthesis `AdapterPool`) and into plain `FluxPipeline.load_lora_weights`."""

from __future__ import annotations

import pytest
import torch

from dermaflux.config import load_config
from dermaflux.model.adapters import save_adapter
from dermaflux.train.model_setup import prepare_transformer, trainable_state_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def transformer_output(transformer) -> torch.Tensor:
    """The transformer on one fixed input (image tokens, text tokens, timestep, guidance)."""
    cfg = transformer.config
    gen = torch.Generator().manual_seed(11)
    tokens, text = 16, 8
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(2, tokens, cfg.in_channels, generator=gen),
            encoder_hidden_states=torch.randn(2, text, cfg.joint_attention_dim, generator=gen),
            pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=gen),
            timestep=torch.tensor([0.3, 0.7]), guidance=torch.tensor([1.0, 1.0]),
            img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"),
                                dim=-1).reshape(tokens, 3),
            txt_ids=torch.zeros(text, 3), return_dict=False,
        )[0]


def trained_lora(tiny_model_dir, rank: int, alpha: float):
    """The tiny transformer with the trainer's LoRA setup and random non-zero A and B (a trained LoRA's stand-in)."""
    from diffusers import FluxTransformer2DModel
    from peft.utils import set_peft_model_state_dict

    tc = load_config("tiny").train.model_copy(update={"mode": "lora"})
    tc = tc.model_copy(update={"lora": tc.lora.model_copy(update={"rank": rank, "alpha": alpha})})
    transformer = FluxTransformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer")
    prepare_transformer(transformer, tc)
    gen = torch.Generator().manual_seed(3)
    state = {k: torch.randn(v.shape, generator=gen) * 0.2 for k, v in trainable_state_dict(transformer, tc).items()}
    set_peft_model_state_dict(transformer, state)
    return transformer.eval(), tc


@pytest.mark.parametrize("rank,alpha", [(4, 16.0), (4, 4.0)])
def test_saved_lora_reloads_as_trained(tiny_model_dir, tiny_config, tmp_path, rank, alpha):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from dermaflux.synth.adapter_pool import AdapterPool

    transformer, tc = trained_lora(tiny_model_dir, rank, alpha)
    trained = transformer_output(transformer)
    base = transformer_output(FluxTransformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer").eval())
    assert (trained - base).abs().max() > 0.05  # the LoRA changes the output: the comparison below can fail
    folder = save_adapter(tmp_path / "adapter", transformer, kind="lora", base="builtin:tiny",
                          lora_state_dict=trainable_state_dict(transformer, tc))

    plain = FluxPipeline.from_pretrained(tiny_model_dir)
    plain.load_lora_weights(str(folder))
    torch.testing.assert_close(transformer_output(plain.transformer), trained, rtol=1e-4, atol=1e-5)

    pool = AdapterPool(FluxPipeline.from_pretrained(tiny_model_dir), {"lesions": str(folder)})
    with pool.lock:
        pool.load("lesions")
        pipe = pool.pipeline_for("lesions")
        torch.testing.assert_close(transformer_output(pipe.transformer), trained, rtol=1e-4, atol=1e-5)
