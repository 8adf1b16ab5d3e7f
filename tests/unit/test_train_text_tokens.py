"""The T5 length comes from the captions: the smallest bucket holding every caption, recorded, and an error
naming the caption that does not fit (never a silent cut)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from dermaflux.config import load_config
from dermaflux.train.text_length import pick_text_tokens


def pairs(*counts):
    return [(f"row{i}", n) for i, n in enumerate(counts)]


def test_smallest_bucket_that_holds_every_caption():
    assert pick_text_tokens(pairs(10, 40, 63), limit=512)["length"] == 64
    assert pick_text_tokens(pairs(10, 65), limit=512)["length"] == 128
    assert pick_text_tokens(pairs(200, 130), limit=512) == {"length": 256, "max": 200, "p99": 200, "texts": 2}
    assert pick_text_tokens(pairs(300), limit=512)["length"] == 512
    assert pick_text_tokens(pairs(70), limit=100)["length"] == 100  # no bucket between 70 and the limit
    assert pick_text_tokens(pairs(*range(1, 101)), limit=512)["p99"] == 100
    assert pick_text_tokens(pairs(10, 40), limit=512, setting=300)["length"] == 300


def test_a_caption_that_does_not_fit_is_named():
    with pytest.raises(ValueError, match=r"row1 \(600 tokens\).*model.max_sequence_length"):
        pick_text_tokens(pairs(10, 600, 20), limit=512)
    with pytest.raises(ValueError, match=r"row0 \(90 tokens\).*train.text_tokens"):
        pick_text_tokens(pairs(90), limit=512, setting=64)
    with pytest.raises(ValueError, match="exceeds model.max_sequence_length"):
        pick_text_tokens(pairs(10), limit=128, setting=256)
    with pytest.raises(ValueError, match="and 2 more"):
        pick_text_tokens(pairs(*[999] * 7), limit=512)


def test_tiny_preset_counts_with_its_t5_tokenizer(tiny_model_dir, tiny_config):
    from transformers import AutoTokenizer

    from dermaflux.train.ray_precompute import text_token_plan
    from dermaflux.train.text_length import token_counts

    cfg = tiny_config
    captions = ["dermoscopic image of a melanoma on the back", "dermoscopic image of a nevus"]
    plan = text_token_plan(cfg, pa.table({"id": ["a", "b"], "caption": captions}))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer_2")
    expected = max(token_counts(tokenizer, captions + list(cfg.train.validation_prompts)))
    assert plan["max"] == expected and plan["length"] == 64 < cfg.model.max_sequence_length
    # the count includes T5's end-of-sequence token, as FluxPipeline encodes it
    assert token_counts(tokenizer, ["melanoma"])[0] == len(tokenizer("melanoma")["input_ids"])
    long = " ".join(["asymmetric irregular border"] * 60)
    assert token_counts(tokenizer, [long])[0] > cfg.model.max_sequence_length
    with pytest.raises(ValueError, match="caption row ham10000:LONG"):
        text_token_plan(cfg, pa.table({"id": ["a", "ham10000:LONG"], "caption": [captions[0], long]}))
    fixed = load_config("tiny", extra={"train": {"text_tokens": 128}})
    assert text_token_plan(fixed, pa.table({"id": ["a"], "caption": captions[:1]}))["length"] == 128
