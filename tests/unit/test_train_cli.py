"""`dermaflux train` flags map onto the typed `train` section; both presets validate it."""

from __future__ import annotations

import pytest

from dermaflux.cli import build_parser, flag_settings
from dermaflux.config import ConfigError, load_config


def test_flags_map_to_config():
    args = build_parser().parse_args(
        ["train", "--preset", "tiny", "--captions", "c", "--out", "o", "--steps", "7", "--workers", "2",
         "--zero-stage", "3", "--resume"]
    )
    cfg = load_config(args.preset, args.config, args.overrides, extra=flag_settings(args))
    assert (cfg.train.captions, cfg.train.out, cfg.train.steps, cfg.train.workers, cfg.train.zero_stage) == (
        "c", "o", 7, 2, 3)
    assert cfg.train.resume is True
    assert load_config("tiny").train.resume is False


def test_presets():
    tiny, dev = load_config("tiny").train, load_config("flux-dev").train
    assert tiny.mode == "full" and tiny.vae_fit.enabled and tiny.precision == "auto"
    assert dev.mode == "lora" and dev.lora.rank == 16 and dev.use_gpu and not dev.vae_fit.enabled
    assert "attn.to_q" in dev.lora.targets
    assert load_config("flux-dev").model.train_guidance == 1.0


def test_invalid_combination_names_the_field():
    with pytest.raises(ConfigError, match="train"):
        load_config("tiny", overrides=["train.offload_params=true", "train.zero_stage=2"])
    with pytest.raises(ConfigError, match="train.zero_stage"):
        load_config("tiny", overrides=["train.zero_stage=5"])
