"""Typed config with presets and overrides; the CLI, the jobs and the pipeline come from the stage table."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dermaflux.config import ConfigError, load_config
from dermaflux.core.config import available_presets, save_effective_config
from dermaflux.stages import STAGES

ROOT = Path(__file__).resolve().parents[2]


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


def test_help_lists_every_stage_and_each_has_a_job():
    out = subprocess.run([sys.executable, "-m", "dermaflux.cli", "--help"], capture_output=True, text=True, check=True)
    for spec in STAGES:
        assert spec.name in out.stdout
        assert (ROOT / "jobs" / f"{spec.name}.py").exists(), f"no Ray job entrypoint for {spec.name}"
    assert "pipeline" in out.stdout


def test_every_stage_flag_sets_a_real_config_field():
    """Each flag of the stage table names a field of the typed config (a typo would be a silent no-op)."""
    from dermaflux.cli import PIPELINE_OPTIONS
    from dermaflux.config import DermaFluxConfig

    for option in [o for spec in STAGES for o in spec.options] + list(PIPELINE_OPTIONS):
        assert option.help, f"{option.flag} has no help text"
        for path in option.fields:
            model = DermaFluxConfig
            for part in path.split("."):
                assert part in model.model_fields, f"{option.flag}: {path} is not a config field"
                model = model.model_fields[part].annotation


def test_set_errors_name_their_source(tmp_path):
    user = tmp_path / "run.yaml"
    user.write_text(yaml.safe_dump({"train": {"steps": 0}}))
    with pytest.raises(ConfigError, match=r"train\.steps: .*from file") as err:
        load_config("tiny", user)
    with pytest.raises(ConfigError, match=r"train\.lr: .*from --set train\.lr=fast"):
        load_config("tiny", user, ["train.lr=fast", "train.steps=4"])
    assert "train.steps" not in str(err.value).split("from file")[1]
