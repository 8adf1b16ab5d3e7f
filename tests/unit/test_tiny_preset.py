"""The tiny preset is a real Flux pipeline in the Hugging Face layout, loaded by plain diffusers."""

import json

import numpy as np
import torch


def test_folder_has_flux_layout(tiny_model_dir):
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["text_encoder"][1] == "CLIPTextModel" and index["text_encoder_2"][1] == "T5EncoderModel"
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (tiny_model_dir / part).is_dir(), part


def test_plain_diffusers_generates_deterministically(tiny_model_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_model_dir)
    assert pipe.tokenizer.model_max_length == 77

    def render(seed):
        return pipe(
            "a dermoscopic image of a melanoma, asymmetric, irregular border",
            height=64, width=64, num_inference_steps=3, guidance_scale=3.5, max_sequence_length=64,
            generator=torch.Generator().manual_seed(seed), output_type="np",
        ).images[0]

    a, b, c = render(0), render(0), render(1)
    assert a.shape == (64, 64, 3)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 1e-4


def test_tokenizers_know_the_caption_vocabulary(tiny_model_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_model_dir)
    text = "melanoma, asymmetric border; blue-grey and dark brown."
    clip_ids = pipe.tokenizer(text).input_ids
    t5_ids = pipe.tokenizer_2(text).input_ids
    assert pipe.tokenizer.unk_token_id not in clip_ids[1:-1]
    assert pipe.tokenizer_2.unk_token_id not in t5_ids
    assert pipe.tokenizer.decode(clip_ids, skip_special_tokens=True).replace(" ", "") == text.lower().replace(" ", "")


def test_every_build_gives_the_same_token_ids():
    """Two nodes building builtin:tiny must agree on token ids, or an adapter trained on one reads other
    embedding rows on the other (the trainers break ties in hash-map order)."""
    from dermaflux.model.config import TinyFluxSpec
    from dermaflux.model.tiny import _build_clip_tokenizer, _build_t5_tokenizer

    spec = TinyFluxSpec()
    builds = [(_build_clip_tokenizer(spec).get_vocab(), _build_t5_tokenizer(spec).get_vocab()) for _ in range(3)]
    assert builds[0] == builds[1] == builds[2]
    clip, t5 = builds[0]
    assert (clip["<|startoftext|>"], clip["<|endoftext|>"]) == (0, 1)
    assert (t5["<pad>"], t5["</s>"], t5["<unk>"]) == (0, 1, 2)
