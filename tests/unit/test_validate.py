"""Config validation up front: wrong paths, unknown presets and unsatisfiable resources, named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dermaflux.config import ConfigError, load_config
from dermaflux.checks import check_config, resource_problems
from dermaflux.core.preflight import Capacity

ROOT = Path(__file__).resolve().parents[2]


def test_a_missing_input_folder_is_named_with_its_field(tmp_path):
    cfg = load_config("tiny", None, [f"train.captions={tmp_path}/no-such-captions", f"train.out={tmp_path}/run"])
    with pytest.raises(ConfigError, match=r"train\.captions: .*no-such-captions does not exist"):
        check_config(cfg, ["train"])


def test_an_unset_output_and_input_are_both_reported(tmp_path):
    cfg = load_config("tiny")
    with pytest.raises(ConfigError) as err:
        check_config(cfg, ["evaluate"])
    assert "evaluate.out: not set" in str(err.value) and "evaluate.corpus: not set" in str(err.value)


def test_inputs_made_earlier_in_the_same_run_need_not_exist_yet(tmp_path):
    cfg = load_config("tiny", None, [f"train.captions={tmp_path}/later", f"train.out={tmp_path}/run"])
    check_config(cfg, ["train"], produced={"caption"})


def test_a_missing_curate_source_folder_is_named(tmp_path):
    cfg = load_config("tiny", None, [f"curate.sources=[ham10000={tmp_path}/nowhere]", f"curate.out={tmp_path}/c"])
    with pytest.raises(ConfigError, match=r"curate\.sources\[0\]: .*nowhere does not exist"):
        check_config(cfg, ["curate"])


def test_unknown_preset_is_rejected_with_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'sdxl'.*flux-dev"):
        load_config("sdxl")
    cfg = load_config("tiny", None, [f"train.captions={tmp_path}", f"train.out={tmp_path}/run"])
    cfg.preset = "sdxl"  # e.g. a saved effective config from another version
    with pytest.raises(ConfigError, match="preset: unknown preset 'sdxl'"):
        check_config(cfg, ["train"])


def test_a_missing_local_model_folder_is_named(tmp_path):
    cfg = load_config("tiny", None, [f"model.pretrained={tmp_path}/flux", f"train.captions={tmp_path}",
                                     f"train.out={tmp_path}/run"])
    with pytest.raises(ConfigError, match=r"model\.pretrained: local model folder .*flux does not exist"):
        check_config(cfg, ["train"])


def test_gpu_count_no_node_can_satisfy(tmp_path):
    cfg = load_config("tiny", None, ["train.use_gpu=true", "train.workers=8", f"train.captions={tmp_path}",
                                     f"train.out={tmp_path}/run"])
    cpu_cluster = Capacity(largest_node={"CPU": 2.0}, total={"CPU": 4.0}, source="2 alive Ray nodes")
    with pytest.raises(ConfigError, match=r"train: train\.workers=8 .* needs 1 GPU on one node, but the largest node has 0"):
        check_config(cfg, ["train"], capacity=cpu_cluster)
    gpu_cluster = Capacity(largest_node={"CPU": 96.0, "GPU": 8.0}, total={"CPU": 96.0, "GPU": 4.0})
    assert any("needs 8 GPU at once" in p for p in resource_problems(cfg, ["train"], gpu_cluster))
    enough = Capacity(largest_node={"CPU": 96.0, "GPU": 8.0}, total={"CPU": 96.0, "GPU": 8.0})
    assert resource_problems(cfg, ["train"], enough) == []


def test_job_entrypoint_exits_2_with_the_problem_before_ray_starts(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"preset: tiny\ntrain:\n  captions: {tmp_path}/missing\n  out: {tmp_path}/run\n")
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "train.captions" in proc.stderr and "missing does not exist" in proc.stderr
    assert '"status": "failed"' in proc.stdout
    assert not (tmp_path / "run").exists()


def test_job_entrypoint_rejects_an_unknown_preset(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("preset: sdxl\n")
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "caption.py"), "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown preset 'sdxl'" in proc.stderr
