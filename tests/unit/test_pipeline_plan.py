"""The pipeline's plan: which stages run, how their folders chain, what the demo sizes are."""

from __future__ import annotations

from pathlib import Path

import pytest

from dermaflux.config import ConfigError, load_config
from dermaflux.pipeline import discover_sources, format_summary, plan


def test_stages_chain_through_the_run_folder(tmp_path, ham10000_dir):
    cfg = load_config("tiny", None, extra={"pipeline": {"out": str(tmp_path / "run"), "data": str(ham10000_dir.parent)}})
    planned = plan(cfg)
    stage_cfg, runnable, skipped = planned.cfg, planned.stages, planned.skipped
    run = tmp_path / "run"
    assert runnable == ["curate", "caption", "train", "generate", "evaluate"] and skipped == {}
    assert stage_cfg.curate.sources == [f"ham10000={ham10000_dir.resolve()}"]
    assert stage_cfg.curate.out == stage_cfg.caption.corpus == stage_cfg.evaluate.corpus == str(run / "corpus")
    assert stage_cfg.train.captions == stage_cfg.caption.out == str(run / "captions")
    assert stage_cfg.synth.adapters == [str(run / "train" / "final")]
    assert stage_cfg.evaluate.synthetic == stage_cfg.synth.out == str(run / "synthetic")
    # The demo sizes of the pipeline section reach the stages; the stages' own defaults stay for single runs.
    assert stage_cfg.train.steps == cfg.pipeline.stage_settings["train"]["steps"] != cfg.train.steps


def test_user_paths_win_and_a_stage_without_its_input_is_blocked(tmp_path):
    cfg = load_config("tiny", None, [f"evaluate.corpus={tmp_path}/mine"],
                      extra={"pipeline": {"out": str(tmp_path / "run"), "stages": ["train", "evaluate"]}})
    planned = plan(cfg)
    stage_cfg, runnable, skipped = planned.cfg, planned.stages, planned.skipped
    assert runnable == ["evaluate"] and skipped == {"train": "blocked: needs the output of caption"}
    assert stage_cfg.evaluate.corpus == f"{tmp_path}/mine"
    assert stage_cfg.evaluate.synthetic is None  # generate is not in this run: the real-only grid


def test_stage_settings_that_do_not_fit_name_the_field(tmp_path):
    cfg = load_config("tiny", None, ["pipeline.stage_settings.train.stepz=3"],
                      extra={"pipeline": {"out": str(tmp_path), "stages": ["evaluate"]}})
    with pytest.raises(ConfigError, match="stepz"):
        plan(cfg)
    with pytest.raises(ConfigError, match="pipeline.stage_settings"):
        load_config("tiny", None, ["pipeline.stage_settings.trian.steps=3"])


def test_flux_dev_keeps_the_stages_own_sizes():
    cfg = load_config("flux-dev")
    assert cfg.pipeline.stage_settings == {}


def test_discover_sources_maps_folders_to_readers(tmp_path):
    for name in ("ham10000-224", "PAD-UFES-20", "dermamnist", "notes"):
        (tmp_path / name).mkdir()
    (tmp_path / "README.md").write_text("not a dataset")
    specs = discover_sources(tmp_path)
    readers = sorted(s.split("=", 1)[0] for s in specs)
    assert "ham10000" in readers and "dermamnist" in readers and len(specs) == 3
    assert all(Path(s.split("=", 1)[1]).is_dir() for s in specs)


def test_summary_points_to_the_report():
    summary = {"out": "/r", "report": "/r/report/report.html",
               "stages": {"curate": {"status": "succeeded", "seconds": 3.0, "out": "/r/corpus"},
                          "caption": {"status": "not available (dermaflux.caption.stage is not installed)"}}}
    text = format_summary(summary)
    assert "report: /r/report/report.html" in text and "not available" in text and "/r/corpus" in text


def test_every_problem_of_a_pipeline_is_reported_before_it_starts(tmp_path):
    from dermaflux.checks import check_stages_in_order

    cfg = load_config("tiny", None, [f"train.captions={tmp_path}/nope", f"evaluate.corpus={tmp_path}/gone"],
                      extra={"pipeline": {"out": str(tmp_path / "run"), "stages": ["train", "evaluate"]}})
    planned = plan(cfg)
    with pytest.raises(ConfigError) as err:
        check_stages_in_order(planned.cfg, planned.stages)
    assert "2 problems" in str(err.value) and "nope does not exist" in str(err.value) and "gone does not exist" in str(err.value)
