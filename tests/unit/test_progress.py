"""The CLI's output session (dermaflux.core.progress): bars, the run log, worker lines. No Ray instance."""

from __future__ import annotations

import logging
import re
import time

import pytest

from dermaflux.core import progress

LINE_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d) ")


@pytest.fixture
def fast_bars(monkeypatch):
    """Bars that may print every 0.1 s with at least 0.5 s between lines (the product: 30 s and 10 s)."""
    monkeypatch.setenv("DERMAFLUX_PROGRESS_INTERVAL", "0.1")
    monkeypatch.setattr(progress, "MIN_GAP_S", 0.5)


def test_nothing_happens_outside_a_session(tmp_path):
    assert not progress.active()
    assert progress.open_run_log(tmp_path, "train") is None
    assert not (tmp_path / progress.LOG_DIR).exists()
    with progress.bar("train", "train", 3, "steps") as shown:
        shown.update(3)
    assert shown.tqdm is None


def test_run_log_holds_what_came_before_it_opened(tmp_path, capsys):
    logger = logging.getLogger("dermaflux.test")
    with progress.session():
        logger.info("before the run folder exists")
        logging.getLogger("some.library").warning("library chatter")
        path = progress.open_run_log(tmp_path / "run", "pipeline")
        assert progress.open_run_log(tmp_path / "elsewhere", "train") == path  # one log per command
        logger.info("after")
    err = capsys.readouterr().err
    text = path.read_text()
    assert path.parent == tmp_path / "run" / progress.LOG_DIR and path.name.startswith("pipeline-")
    assert "before the run folder exists" in text and "after" in text and "library chatter" in text
    assert "library chatter" not in err  # other libraries' warnings: the log only
    assert err.count("log of this run:") == 1 and "before the run folder exists" in err
    assert not any(isinstance(h, (progress.RunLogHandler, progress.ConsoleHandler)) for h in logging.getLogger().handlers)
    assert not progress.active()


def test_bar_lines_are_spaced_and_end_with_a_summary(fast_bars, capsys):
    with progress.session(), progress.bar("caption", "caption", 40, "images") as shown:
        for _ in range(40):
            shown.update(1)
            time.sleep(0.05)
        time.sleep(0.6)  # the summary, too, keeps its distance from the last line
    lines = [line for line in capsys.readouterr().err.splitlines() if " caption: " in line]
    assert 2 <= len(lines) <= 6, lines  # 2 s of updates, a line at most every 0.5 s
    assert re.search(r"caption: \d+/40 images \(\d+%\), [\d.]+ images/s, ETA \d+s$", lines[0]), lines[0]
    assert re.search(r"caption: 40/40 images in \d+s$", lines[-1]), lines[-1]


def test_worker_lines_feed_bars_and_go_to_the_log(tmp_path, fast_bars, capsys):
    with progress.session():
        path = progress.open_run_log(tmp_path, "train")
        with progress.bar("train", "train", 10, "steps") as shown:
            batch = {"pid": 123, "actor_name": "RayTrainWorker",
                     "lines": ["dermaflux progress: train 4/10 | loss 0.5", "DeepSpeed info line"]}
            progress._on_worker_output(progress._session, batch, ray_printer=None)
            assert (shown.done, shown.note) == (4, "loss 0.5")
    err = capsys.readouterr().err
    text = path.read_text()
    assert "(RayTrainWorker pid=123) DeepSpeed info line" in text and "DeepSpeed info line" not in err
    assert "(RayTrainWorker pid=123) dermaflux progress: train 4/10 | loss 0.5" in text


def test_a_local_rank_reports_like_a_worker(tmp_path, capsys):
    """train.launch local: the rank's progress sets the bar in this process; its stdout (prints, a library handler
    made on stdout meanwhile, as DeepSpeed's is) goes to the run log with the rank's prefix, not to the console."""
    import sys

    with progress.session():
        path = progress.open_run_log(tmp_path, "train")
        with progress.bar("train", "train", 10, "steps") as shown:
            with progress.worker_output_in_run_log("local rank 0"):
                progress.report_progress("train", 6, 10, "loss 0.4")
                print("train.micro_batch auto: 8")
                library = logging.getLogger("test.stdout.library")
                library.propagate = False
                library.addHandler(logging.StreamHandler(sys.stdout))
                library.warning("Setting accelerator to CPU")
            assert (shown.done, shown.note) == (6, "loss 0.4")
        print("after the rank: stdout again")
    captured = capsys.readouterr()
    text = path.read_text()
    assert re.search(r"^\(local rank 0 pid=\d+\) train.micro_batch auto: 8$", text, re.MULTILINE)
    assert re.search(r"^\(local rank 0 pid=\d+\) Setting accelerator to CPU$", text, re.MULTILINE)
    assert "micro_batch" not in captured.out + captured.err and "accelerator" not in captured.out + captured.err
    assert "dermaflux progress" not in captured.out  # the bar was set, no line to parse
    assert "after the rank: stdout again" in captured.out


def test_report_progress_is_one_parseable_stdout_line(capsys):
    progress.report_progress("vae-fit", 3, 150, "mse 0.0911")
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    match = progress.PROGRESS_LINE.match(out.strip())
    assert match and (match["key"], match["done"], match["total"], match["note"]) == ("vae-fit", "3", "150", "mse 0.0911")


def test_shown_paths_are_relative_inside_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert progress.shown(tmp_path / "runs" / "demo") == "runs/demo"
    assert progress.shown("/elsewhere/x") == "/elsewhere/x"
    assert progress.shown("s3://bucket/run") == "s3://bucket/run"


def test_verbose_shows_everything_on_the_console(tmp_path, capsys):
    with progress.session(verbose=True):
        progress.open_run_log(tmp_path, "curate")
        logging.getLogger("some.library").warning("library chatter")
        logging.getLogger("dermaflux.test").debug("a debug detail")
        batch = {"pid": 7, "task_name": "scan", "lines": ["a worker line"]}
        shown = []
        progress._on_worker_output(progress._session, batch, ray_printer=shown.append)
    err = capsys.readouterr().err
    assert "library chatter" in err and "a debug detail" in err
    assert shown == [batch]  # Ray's own printer gets the worker's lines
