"""train.micro_batch auto: the memory model reproduces the H200 measurements and picks the fastest setting
that fits; without a GPU or for an unmeasured model size it picks nothing (the configured values stay)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dermaflux.train.memory import SIZE_CLASSES, estimate_peak_gib, pick_micro_batch, size_class

IMAGE_TOKENS = 1024  # 512 px


@pytest.mark.parametrize("batch,text,checkpointing,measured_gib", [
    (4, 512, True, 30), (4, 512, False, 52), (4, 128, False, 45), (8, 128, False, 67),
])
def test_model_reproduces_the_h200_peaks(batch, text, checkpointing, measured_gib):
    peak = estimate_peak_gib(SIZE_CLASSES["flux-dev"], batch, IMAGE_TOKENS + text, checkpointing)
    assert peak == pytest.approx(measured_gib, abs=2.0)


def test_picks_the_largest_batch_without_checkpointing_that_fits():
    assert pick_micro_batch(139.0, "flux-dev", IMAGE_TOKENS + 128) == (8, False)  # the H200's fastest row
    assert pick_micro_batch(139.0, "flux-dev", IMAGE_TOKENS + 512) == (8, False)
    assert pick_micro_batch(79.0, "flux-dev", IMAGE_TOKENS + 512) == (7, False)  # an 80 GB H100 / A100
    assert pick_micro_batch(79.0, "flux-dev", IMAGE_TOKENS + 512, shards=1) != pick_micro_batch(73.0, "flux-dev", 1536)
    assert pick_micro_batch(40.0, "flux-dev", IMAGE_TOKENS + 512) == (1, False)
    assert pick_micro_batch(34.0, "flux-dev", IMAGE_TOKENS + 512) == (2, True)  # only with checkpointing
    assert pick_micro_batch(20.0, "flux-dev", IMAGE_TOKENS + 512) == (1, True)  # nothing fits: the smallest
    # ZeRO-3 over 4 GPUs holds a quarter of the weights per GPU
    assert pick_micro_batch(34.0, "flux-dev", IMAGE_TOKENS + 512, shards=4) == (3, False)


def test_nothing_to_go_by():
    assert pick_micro_batch(None, "flux-dev", 1152) is None  # CPU
    assert pick_micro_batch(139.0, None, 1152) is None  # a transformer size never measured


def test_size_class_from_the_transformer_config(tiny_config):
    from dermaflux.model.random_weights import FLUX_DEV

    assert size_class(SimpleNamespace(**FLUX_DEV["transformer"])) == "flux-dev"
    spec = tiny_config.model.tiny
    tiny = SimpleNamespace(num_layers=spec.double_blocks, num_single_layers=spec.single_blocks,
                           num_attention_heads=spec.heads, attention_head_dim=sum(spec.axes_dims_rope))
    assert size_class(tiny) is None


def test_micro_batch_setting(tiny_config):
    from dermaflux.config import ConfigError, load_config

    assert tiny_config.train.micro_batch == 8
    assert load_config("tiny", overrides=["train.micro_batch=auto"]).train.micro_batch == "auto"
    assert load_config("flux-dev").train.micro_batch == "auto"
    with pytest.raises(ConfigError, match="micro_batch"):
        load_config("tiny", overrides=["train.micro_batch=0"])


def test_readme_figures():
    """The per-GPU picks the README states (512 px, 128 text tokens unless said)."""
    assert pick_micro_batch(79.0, "flux-dev", IMAGE_TOKENS + 128) == (8, False)  # 80 GB
    assert pick_micro_batch(39.4, "flux-dev", IMAGE_TOKENS + 128) == (1, False)  # 40 GB
    assert estimate_peak_gib(SIZE_CLASSES["flux-dev"], 8, IMAGE_TOKENS + 128, False) == pytest.approx(66, abs=1)
