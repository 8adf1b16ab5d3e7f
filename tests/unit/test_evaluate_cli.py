"""The evaluate entry of the stage table: the study's options exist, set real fields and say what they do."""

from dermaflux.cli import build_parser, flag_settings
from dermaflux.config import load_config
from dermaflux.stages import get_stage


def test_the_evaluate_cli_has_the_study_options():
    options = {o.flag: o for o in get_stage("evaluate").options}
    assert options["--controls"].fields == ("evaluate.controls",) and "real-extra" in options["--controls"].help
    assert options["--steps"].fields == ("evaluate.steps",) and "same for every cell" in options["--steps"].help
    assert "melanoma" in options["--task"].choices and "--primary-task" in options
    args = build_parser().parse_args(["evaluate", "--corpus", "c", "--out", "o", "--controls", "--steps", "50",
                                      "--task", "melanoma", "--task", "binary", "--primary-task", "binary"])
    ev = load_config("tiny", extra=flag_settings(args)).evaluate
    assert ev.controls is True and ev.steps == 50 and ev.tasks == ["melanoma", "binary"] and ev.main_task == "binary"


def test_the_presets_default_to_a_step_budget_and_flux_dev_to_ten_seeds():
    tiny, dev = load_config("tiny").evaluate, load_config("flux-dev").evaluate
    assert tiny.steps > 0 and dev.steps > 0 and dev.seeds >= 10 and dev.controls
    assert tiny.main_task == "binary" and dev.main_task == "binary" and "melanoma" in dev.tasks
