"""builtin:tiny-llama: a Llama-architecture chat model with random weights, built offline for tests.

Same classes as Llama 3.2 (LlamaForCausalLM, a fast BPE tokenizer with a chat template), saved in
the Hugging Face folder layout and loaded by path, so the llm writer takes one code path for both.
Its vocabulary is neutral description words, so what it babbles never names a diagnosis,
malignancy or colour: tests control which outputs pass validation through length and prompts.
"""

from __future__ import annotations

import os
from pathlib import Path

BUILTIN_TINY_LLAMA = "builtin:tiny-llama"
# A Llava (CLIP vision tower + Llama) of the same size, for the vision-language path of the llm writer.
BUILTIN_TINY_LLAVA = "builtin:tiny-llava"
IMAGE_TOKEN = "<image>"

_WORDS = """the a this of with and in on at shows appears looks lesion mole pattern network dots globules
structures area areas centre center edge periphery streaks lines regular visible pigment fine coarse reticular
homogeneous diffuse small large some few many several patchy clear faint dense sparse""".split()

# Content is a string (text chat) or a list of parts ({"type": "image"} / {"type": "text"}) as for VLMs.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}" + IMAGE_TOKEN + "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Word-level: every generated token is a whole neutral word, so outputs read as (odd) text.
    specials = ["<unk>", "<|begin|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
    words = sorted(set(_WORDS) | set(".,:;()"))
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin|>", eos_token="<|end|>", unk_token="<unk>", pad_token="<|end|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials[3:] + [IMAGE_TOKEN]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama(seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _build_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=1024,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return model, tokenizer


def build_tiny_llava(seed: int = 0):
    """LlavaForConditionalGeneration (tiny CLIP vision tower + the tiny Llama) and its LlavaProcessor."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    llama, tokenizer = build_tiny_llama(seed)
    image_side, patch = 32, 8
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_side, patch_size=patch, projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=llama.config, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_side}, crop_size={"height": image_side, "width": image_side}
        ),
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, which the "default" strategy drops
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor


def ensure_tiny_model(folder: str | os.PathLike, vision: bool = False) -> Path:
    """Build a tiny model into `folder` once (atomically: concurrent actors never see half a folder)."""
    from dermaflux.core.artifacts import atomic_dir

    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    model, tokenizer = build_tiny_llava() if vision else build_tiny_llama()
    try:
        with atomic_dir(folder) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    except OSError:
        if not (folder / "config.json").exists():  # another process won the rename: fine
            raise
    return folder


def resolve_chat_model(ref: str) -> str:
    """A local folder or hub id for `from_pretrained`; builds builtin:tiny-llama on first use."""
    if ref in (BUILTIN_TINY_LLAMA, BUILTIN_TINY_LLAVA):
        from dermaflux.model.config import cache_dir

        vision = ref == BUILTIN_TINY_LLAVA
        return str(ensure_tiny_model(cache_dir() / f"{ref.split(':')[1]}-v2", vision=vision))
    if ref.startswith("builtin:"):
        raise ValueError(f"unknown builtin model {ref!r}; known: {BUILTIN_TINY_LLAMA}, {BUILTIN_TINY_LLAVA}")
    return ref
