"""Typed config with presets and overrides; the CLI lists every stage whose module exists."""

import subprocess
import sys

import pytest
import yaml

from dermaflux.cli import STAGES, available_stages
from dermaflux.config import ConfigError, available_presets, load_config, save_effective_config


def test_presets_differ_only_in_numbers_and_ids():
    tiny, dev = load_config("tiny"), load_config("flux-dev")
    assert {"tiny", "flux-dev"} <= set(available_presets())
    assert tiny.model.pretrained == "builtin:tiny" and tiny.model.dtype == "float32"
    assert dev.model.pretrained == "black-forest-labs/FLUX.1-dev" and dev.model.dtype == "bfloat16"
    assert dev.model.resolution == 512 and dev.model.train_guidance == 1.0 and dev.model.guidance_scale == 3.5


def test_yaml_then_overrides_take_precedence(tmp_path):
    user = tmp_path / "run.yaml"
    user.write_text(yaml.safe_dump({"preset": "flux-dev", "model": {"resolution": 256, "num_inference_steps": 10}}))
    cfg = load_config(None, user, ["model.resolution=1024"])
    assert cfg.preset == "flux-dev"
    assert cfg.model.resolution == 1024 and cfg.model.num_inference_steps == 10


@pytest.mark.parametrize(
    "overrides, needle",
    [(["model.resolutio=3"], "model.resolutio"), (["model.dtype=int8"], "model.dtype"), (["nonsense"], "KEY=VALUE")],
)
def test_bad_config_names_the_field(overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config("tiny", None, overrides)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="tiny"):
        load_config("sdxl")


def test_effective_config_round_trips(tmp_path):
    cfg = load_config("tiny", None, ["model.num_inference_steps=5"])
    path = save_effective_config(cfg, tmp_path)
    again = load_config(None, path)
    assert again == cfg


def test_help_lists_every_available_stage():
    out = subprocess.run([sys.executable, "-m", "dermaflux.cli", "--help"], capture_output=True, text=True, check=True)
    for name in available_stages():
        assert name in out.stdout
    assert set(available_stages()) <= set(STAGES)


def test_core_imports_no_ray():
    code = "import sys, dermaflux.config, dermaflux.artifacts, dermaflux.model.tiny; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
