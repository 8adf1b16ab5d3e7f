"""`dermaflux model random`: random-weight Flux pipelines that plain diffusers loads, streamed in shards."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dermaflux.cli import main
from dermaflux.core.artifacts import OutputConflict
from dermaflux.model.random_weights import (
    FLUX_DEV,
    MODELS,
    _check_free_space,
    plan_random_model,
    write_random_model,
)

GB = 10**9


def _files_of(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def test_tiny_random_model_loads_in_plain_diffusers_and_generates(tmp_path, capsys):
    from diffusers import FluxPipeline

    out = tmp_path / "tiny-random"
    assert main(["model", "random", "--like", "tiny", "--out", str(out), "--max-shard-size", "400KB"]) == 0
    assert "vae: 3.82 MB / 3.82 MB" in capsys.readouterr().out
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()

    pipe = FluxPipeline.from_pretrained(out)
    assert (pipe.tokenizer.model_max_length, pipe.tokenizer_2.model_max_length) == (77, 512)
    for folder in MODELS:  # every tensor came from our files: none missing, none left at its init
        loaded, written = getattr(pipe, folder).state_dict(), _files_of(out / folder)
        assert set(loaded) - set(written) <= {"encoder.embed_tokens.weight"}, folder  # tied to T5's `shared`
        for name, tensor in written.items():
            assert torch.equal(loaded[name], tensor), f"{folder}/{name}"
    assert torch.equal(pipe.text_encoder_2.encoder.embed_tokens.weight, pipe.text_encoder_2.shared.weight)

    image = pipe("a dermoscopic image of a melanoma", height=64, width=64, num_inference_steps=2,
                 max_sequence_length=64, generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all() and image.std() > 0


@pytest.fixture(scope="module")
def flux_dev_plan():
    return plan_random_model("flux-dev")  # meta device: shapes only, nothing written


def test_flux_dev_plan_has_flux_dev_sizes_and_configs(flux_dev_plan):
    plan = flux_dev_plan
    components = {c.folder: c for c in plan.components}
    # FLUX.1-dev's published sizes: 11.9B transformer, 4.76B T5-XXL encoder, 123M CLIP-L text, 84M VAE.
    expected = {"transformer": 11_901_408_320, "text_encoder_2": 4_762_310_656, "text_encoder": 123_060_480,
                "vae": 83_819_683}
    for folder, params in expected.items():
        model = components[folder].model
        assert components[folder].params == params == sum(p.numel() for p in model.parameters()), folder
        assert all(p.device.type == "meta" for p in model.parameters()), folder
    transformer = components["transformer"].model.config
    assert (transformer.num_layers, transformer.num_single_layers, transformer.in_channels) == (19, 38, 64)
    assert (transformer.joint_attention_dim, transformer.pooled_projection_dim, transformer.guidance_embeds) == \
        (4096, 768, True)
    vae = components["vae"].model.config
    assert (vae.latent_channels, vae.scaling_factor, vae.shift_factor) == (16, 0.3611, 0.1159)
    t5 = components["text_encoder_2"].model.config
    assert (t5.d_model, t5.d_ff, t5.num_layers, t5.num_heads, t5.is_gated_act) == (4096, 10240, 24, 64, True)
    clip = components["text_encoder"].model.config
    assert (clip.hidden_size, clip.num_hidden_layers, clip.vocab_size, clip.eos_token_id) == \
        (768, 12, 49408, plan.tokenizers["tokenizer"].eos_token_id)
    assert {k: plan.scheduler.config[k] for k in FLUX_DEV["scheduler"]} == FLUX_DEV["scheduler"]
    assert len(plan.tokenizers["tokenizer_2"]) <= t5.vocab_size  # every token id has an embedding row


def test_flux_dev_plan_shards_at_most_5_gb(flux_dev_plan):
    plan = flux_dev_plan
    assert (plan.dtype, plan.max_shard_bytes) == ("bfloat16", 5 * GB)
    assert plan.total_bytes == 2 * 16_870_599_139  # bf16: ~33.7 GB
    shard_counts = {c.folder: len(c.shards) for c in plan.components}
    assert shard_counts == {"transformer": 5, "text_encoder_2": 2, "text_encoder": 1, "vae": 1}
    for component in plan.components:
        sizes = [sum(t.numel for t in shard) * 2 for shard in component.shards]
        assert max(sizes) <= 5 * GB and sum(sizes) == component.params * 2
        assert [t for shard in component.shards for t in shard] == component.tensors  # in order, each once
        saved = component.model.state_dict()
        assert {t.name for t in component.tensors} == set(saved) - {"encoder.embed_tokens.weight"}
        for tensor in component.tensors:
            assert tensor.shape == tuple(saved[tensor.name].shape)
            assert tensor.fill != "normal" or 0.005 < tensor.std <= 0.2, tensor


def test_shards_hold_exactly_the_tensors_of_one_file(tmp_path):
    limit = 200_000  # bytes: above tiny's largest tensor (147 KB), far below its 1.9 MB transformer
    single = write_random_model(plan_random_model("tiny", seed=7), tmp_path / "single", echo=lambda line: None)
    sharded = plan_random_model("tiny", seed=7, max_shard_size=limit)
    write_random_model(sharded, tmp_path / "sharded", echo=lambda line: None)
    assert single["fingerprint"] == sharded.fingerprint()
    for component in sharded.components:
        one_file = _files_of(tmp_path / "single" / component.folder)
        folder = tmp_path / "sharded" / component.folder
        shards = sorted(folder.glob("*.safetensors"))
        assert len(shards) == len(component.shards) and len(list(one_file)) == len(component.tensors)
        for shard in shards:
            with safe_open(shard, framework="pt") as fh:
                assert sum(fh.get_tensor(name).nbytes for name in fh.keys()) <= limit, shard
        in_shards = _files_of(folder)
        assert in_shards.keys() == one_file.keys()
        assert all(torch.equal(in_shards[name], one_file[name]) for name in one_file), component.folder
        if len(shards) > 1:
            index = json.loads(next(folder.glob("*.index.json")).read_text())
            assert set(index["weight_map"]) == set(one_file)
            assert index["metadata"]["total_size"] == sum(t.nbytes for t in one_file.values())
    assert len(sharded.components[0].shards) > 1  # the transformer really was split
    other_seed = _files_of(tmp_path / "single" / "transformer")
    reseeded = plan_random_model("tiny", seed=8)
    write_random_model(reseeded, tmp_path / "seed8", echo=lambda line: None)
    changed = _files_of(tmp_path / "seed8" / "transformer")
    assert not torch.equal(changed["proj_out.weight"], other_seed["proj_out.weight"])


def test_output_folder_rules(tmp_path):
    plan = plan_random_model("tiny", seed=1)
    out = tmp_path / "model"
    assert write_random_model(plan, out, echo=lambda line: None)["written"] is True
    assert write_random_model(plan, out, echo=lambda line: None)["written"] is False  # the same model: kept
    other = plan_random_model("tiny", seed=2)
    with pytest.raises(OutputConflict, match="different random model"):
        write_random_model(other, out, echo=lambda line: None)
    assert write_random_model(other, out, force=True, echo=lambda line: None)["written"] is True
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputConflict, match="not written by dermaflux"):
        write_random_model(plan, foreign, force=True, echo=lambda line: None)
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="free"):
        _check_free_space(tmp_path / "huge", 10**18)
    assert not list(tmp_path.glob(".*"))  # no staging folder left behind
