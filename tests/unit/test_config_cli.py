"""Typed config with presets and overrides; the CLI, the jobs and the pipeline come from the stage table."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dermaflux.config import ConfigError, load_config
from dermaflux.core.artifacts import save_effective_config
from dermaflux.core.config import available_presets
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
    from dermaflux.commands import COMMANDS
    from dermaflux.config import DermaFluxConfig

    for option in [o for command in COMMANDS for o in command.options]:
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


def test_the_command_table_the_cli_and_the_jobs_agree():
    """litgpt's `_check_commands`: one table; each row is a subcommand and a jobs/<name>.py, and nothing else is."""
    import argparse

    from dermaflux.cli import build_parser
    from dermaflux.commands import COMMANDS

    names = [command.name for command in COMMANDS]
    assert names == [spec.name for spec in STAGES] + ["pipeline"]
    for job, tools in ((False, {"model"}), (True, set())):
        sub = next(a for a in build_parser(job=job)._actions if isinstance(a, argparse._SubParsersAction))
        assert set(sub.choices) == set(names) | tools
    jobs = sorted((ROOT / "jobs").glob("*.py"))
    assert sorted(path.stem for path in jobs) == sorted(names)
    for path in jobs:  # every job is the CLI's main under its file's name
        assert "from dermaflux.cli import main" in path.read_text() and "job=True" in path.read_text(), path


def test_the_stage_sections_are_the_tables_sections(tmp_path):
    """`pipeline.stage_settings` is checked against the root config's own sections, then by the planner
    against the pipeline stages' sections; the table must agree with the root config."""
    from dermaflux.config import stage_sections
    from dermaflux.pipeline import plan
    from dermaflux.stages import STAGES

    assert stage_sections() == sorted({spec.section for spec in STAGES})
    with pytest.raises(ConfigError, match=r"pipeline\.stage_settings: .*unknown sections \['trian'\]"):
        load_config("tiny", None, ["pipeline.stage_settings.trian.steps=3"])
    assert plan(load_config("tiny", None, ["pipeline.stage_settings.synth.seed=5", f"pipeline.out={tmp_path}",
                                           "pipeline.stages=[generate]"])).cfg.synth.seed == 5


def test_a_job_is_the_cli_with_one_json_result_line(tmp_path):
    missing = tmp_path / "none.yaml"
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "curate.py"), "--config", str(missing)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "stage": "curate", "status": "failed", "error": f"config file {missing} does not exist"}
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "pipeline.py")], capture_output=True, text=True)
    assert proc.returncode == 2 and "--config" in proc.stderr and "jobs/pipeline.py" in proc.stderr


@pytest.mark.parametrize("stages, needle", [(["train", "trian"], r"unknown stage\(s\) \['trian'\]"),
                                             (["train", "train"], "listed twice")])
def test_pipeline_stages_are_checked_against_the_table(tmp_path, stages, needle):
    from dermaflux.pipeline import plan

    cfg = load_config("tiny", extra={"pipeline": {"out": str(tmp_path), "stages": stages}})
    with pytest.raises(ConfigError, match=f"pipeline.stages: .*{needle}"):
        plan(cfg)


def test_one_parser_per_spec_string():
    """The stage table reads paths out of specs with the parsers the stages use."""
    from dermaflux.corpus.config import SourceSpec
    from dermaflux.stages import adapter_path, source_path
    from dermaflux.synth.config import adapter_entry

    assert source_path("csv = /d/labels.csv ,images=/d/img") == SourceSpec.parse("csv = /d/labels.csv ,images=/d/img").path
    with pytest.raises(ValueError, match="READER=PATH"):
        source_path("ham10000")
    assert adapter_entry("skin=/runs/a") == ("skin", "/runs/a") and adapter_path("skin=/runs/a") == "/runs/a"
    for folder in ("/runs/lr=1e-4/final", "s3://bucket/run=2/final", "runs/final/"):
        assert adapter_path(folder) == folder and adapter_entry(folder)[0] == Path(folder.rstrip("/")).name
