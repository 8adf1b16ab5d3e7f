"""Experiment tracking: Ray Train's report callback writes each report's metrics as TensorBoard scalars."""

from __future__ import annotations

import importlib.util
import pickle

import pytest

from dermaflux.train.ray_tracking import TrackingCallback, check_trackers, read_scalars, scalar_metrics


def test_reports_become_tensorboard_scalars(tmp_path):
    callback = TrackingCallback(["tensorboard"], tmp_path, params={"train.lr": "0.001"})
    callback = pickle.loads(pickle.dumps(callback))  # as Ray ships it to the controller
    for step, loss in [(1, 0.9), (2, 0.7), (4, 0.5)]:
        worker_metrics = [{"step": step, "loss": loss, "lr": 1e-3 * step, "note": "text"}, {"step": step, "loss": 9.9}]
        callback.after_report(None, worker_metrics, checkpoint=None)
    callback.after_report(None, [{"epoch": 1.0}], checkpoint=None)  # no step: nothing to place it at
    scalars = read_scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(1, pytest.approx(0.9)), (2, pytest.approx(0.7)), (4, pytest.approx(0.5))]
    assert [s for s, _ in scalars["train/lr"]] == [1, 2, 4]
    assert "train/note" not in scalars and "train/step" not in scalars and "train/epoch" not in scalars
    pickle.dumps(callback)  # still picklable with its writer open


def test_scalar_metrics_keep_numbers_only():
    assert scalar_metrics({"step": 3, "loss": 1, "ok": True, "name": "x", "lr": 0.5}) == {"loss": 1.0, "lr": 0.5}


def test_missing_tracker_package_is_named_before_the_run():
    check_trackers(["tensorboard"])
    if importlib.util.find_spec("mlflow") is None:
        with pytest.raises(ValueError, match="mlflow is not installed"):
            check_trackers(["tensorboard", "mlflow"])
