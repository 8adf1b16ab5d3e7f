"""The rectified-flow core: packing as FluxPipeline does, the objective, LoRA/full setup, a few steps learn."""

from __future__ import annotations


import pytest
import torch

from dermaflux.train.flow import FlowBatch, flow_matching_loss, pack_latents, sample_sigmas, train_guidance_for, unpack_latents
from dermaflux.train.model_setup import prepare_transformer, trainable_state_dict


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The CPU is shared: two intra-op threads under contention run ~50x slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_config, tiny_model_dir):
    from dermaflux.model.loading import load_pipeline

    return load_pipeline(tiny_config.model)


def fresh_transformer(tiny_model_dir):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer")


def fixed_batch(tiny_pipe, n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    prompts = ["dermoscopic image of a melanoma on the back", "dermoscopic image of a melanocytic nevus on the face"]
    with torch.no_grad():
        embeds, pooled, _ = tiny_pipe.encode_prompt(prompts * (n // 2), max_sequence_length=32)
    latents = torch.randn(n, 4, 16, 16, generator=gen) * 0.5 + torch.linspace(-1, 1, 16).view(1, 1, 1, 16)
    return FlowBatch(latents, embeds, pooled)


def test_packing_matches_pipeline(tiny_pipe):
    # FluxPipeline.prepare_latents packs random latents and builds their ids: ours must agree exactly.
    height = width = 64
    packed_ref, ids_ref = tiny_pipe.prepare_latents(2, 4, height, width, torch.float32, torch.device("cpu"),
                                                    torch.Generator().manual_seed(3))
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    packed, ids = pack_latents(latents)
    assert packed.shape == (2, 64, 16)
    torch.testing.assert_close(packed, packed_ref)
    torch.testing.assert_close(ids, ids_ref)
    torch.testing.assert_close(unpack_latents(packed, 16, 16), latents)
    torch.testing.assert_close(unpack_latents(packed_ref, 16, 16),
                               tiny_pipe._unpack_latents(packed_ref, height, width, tiny_pipe.vae_scale_factor))


def test_timestep_densities(tiny_config):
    tc = tiny_config.train
    for name in ("logit_normal", "mode", "uniform"):
        s = sample_sigmas(tc.model_copy(update={"timestep_sampling": name}), 4000, torch.Generator().manual_seed(0))
        assert s.min() > 0 and s.max() < 1
    logit = sample_sigmas(tc.model_copy(update={"timestep_sampling": "logit_normal", "logit_mean": 1.0}), 4000)
    assert logit.median() > 0.65  # shifted towards noise, as the SD3 recipe's logit_mean does


def test_objective_target_is_velocity(tiny_model_dir, tiny_pipe, tiny_config):
    """Loss equals the mean squared error against noise - x0 at the sampled t, recomputed by hand."""
    transformer = fresh_transformer(tiny_model_dir).eval()
    batch = fixed_batch(tiny_pipe)
    tc = tiny_config.train
    guidance = train_guidance_for(transformer.config, tiny_config.model)
    assert guidance == 1.0  # the tiny transformer has a guidance embedding like FLUX.1-dev
    with torch.no_grad():
        loss = flow_matching_loss(transformer, batch, tc, guidance, torch.Generator().manual_seed(5))
        gen = torch.Generator().manual_seed(5)
        noise = torch.randn(batch.latents.shape, generator=gen)
        t = sample_sigmas(tc, 4, gen).view(-1, 1, 1, 1)
        x_t = (1 - t) * batch.latents + t * noise
        packed, ids = pack_latents(x_t)
        pred = transformer(hidden_states=packed, timestep=t.flatten(), guidance=torch.ones(4),
                           pooled_projections=batch.pooled_prompt_embeds, encoder_hidden_states=batch.prompt_embeds,
                           txt_ids=torch.zeros(batch.prompt_embeds.shape[1], 3), img_ids=ids).sample
        manual = ((unpack_latents(pred, 16, 16) - (noise - batch.latents)) ** 2).mean()
    torch.testing.assert_close(loss, manual)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_few_steps_reduce_loss(mode, tiny_model_dir, tiny_pipe, tiny_config):
    tc = tiny_config.train.model_copy(update={"mode": mode})
    transformer = fresh_transformer(tiny_model_dir)
    before = trainable_state_dict(transformer, tiny_config.train.model_copy(update={"mode": "full"}))
    params = prepare_transformer(transformer, tc)
    if mode == "lora":
        names = {n for n, p in transformer.named_parameters() if p.requires_grad}
        assert names and all("lora_" in n for n in names)
        assert any("single_transformer_blocks" in n for n in names) and any(".attn.to_q." in n for n in names)
    batch = fixed_batch(tiny_pipe)
    opt = torch.optim.AdamW(params, lr=3e-3 if mode == "lora" else 1e-3)

    def eval_loss():
        with torch.no_grad():  # same t and noise every time: a fair before/after comparison
            return float(flow_matching_loss(transformer, batch, tc, 1.0, torch.Generator().manual_seed(99)))

    first = eval_loss()
    for step in range(25):
        loss = flow_matching_loss(transformer, batch, tc, 1.0, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = eval_loss()
    assert last < 0.8 * first, (first, last)
    if mode == "lora":  # the base stayed frozen
        for name, p in transformer.named_parameters():
            if "lora_" not in name:
                key = name.replace(".base_layer", "")
                torch.testing.assert_close(p.detach(), before[key])
