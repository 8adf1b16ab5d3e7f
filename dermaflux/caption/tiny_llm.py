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

_WORDS = """the a this of with and in on at shows appears looks lesion mole pattern network dots globules
structures area areas centre center edge periphery streaks lines regular visible pigment fine coarse reticular
homogeneous diffuse small large some few many several patchy clear faint dense sparse""".split()

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
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
    tokenizer.add_special_tokens({"additional_special_tokens": specials[3:]})
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


def ensure_tiny_llama(folder: str | os.PathLike) -> Path:
    """Build the tiny chat model into `folder` once (atomically: concurrent actors never see half a folder)."""
    from dermaflux.artifacts import atomic_dir

    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    model, tokenizer = build_tiny_llama()
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
    if ref == BUILTIN_TINY_LLAMA:
        from dermaflux.config import cache_dir

        return str(ensure_tiny_llama(cache_dir() / "tiny-llama-v1"))
    if ref.startswith("builtin:"):
        raise ValueError(f"caption.model: unknown builtin {ref!r}; known: {BUILTIN_TINY_LLAMA}")
    return ref
