"""Experiment tracking through Ray Train's own hook: a `ray.train.UserCallback` on the run's controller.

Ray Train v2 calls `after_report` on its controller once every worker has reported (the metrics the
Trainer sends every `train.log_every` steps); the callback writes rank 0's numbers to TensorBoard
event files (`<out>/tensorboard`, through tensorboardX, which ray[train] installs)
and/or an MLflow run (`train.mlflow_tracking_uri`, default `<out>/mlruns`; needs the mlflow package).
The workers stay free of tracking code. The controller runs on the driver's node, where `<out>` is.
After a restart from a checkpoint the redone steps are written again (TensorBoard shows the last).
"""

from __future__ import annotations

import importlib.util
import struct
import time
from pathlib import Path

from ray.train import UserCallback

TAG_PREFIX = "train/"


def check_trackers(trackers: list[str]) -> None:
    """An error naming the missing package before a run starts, not in the controller mid-run."""
    if "mlflow" in trackers and importlib.util.find_spec("mlflow") is None:
        raise ValueError("train.tracking: mlflow is not installed in this environment (pip install mlflow), "
                         "or drop it from train.tracking")
    if "tensorboard" in trackers and importlib.util.find_spec("tensorboardX") is None:
        raise ValueError("train.tracking: tensorboard needs the tensorboardX package (ray[train] installs it)")


def scalar_metrics(record: dict) -> dict[str, float]:
    """The numbers of one report, without the step itself."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class _TensorBoard:
    """Synchronous event-file writes: SummaryWriter queues events to a daemon thread, which dies with the
    controller process before writing the last ones."""

    def __init__(self, logdir: Path):
        from tensorboardX.event_file_writer import EventsWriter

        logdir.mkdir(parents=True, exist_ok=True)
        self.events = EventsWriter(str(logdir / "events"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=TAG_PREFIX + name, simple_value=value) for name, value in metrics.items()]
        self.events.write_event(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))
        self.events.flush()


class _Mlflow:
    def __init__(self, uri: str, run_name: str, params: dict):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("dermaflux-train")
        mlflow.start_run(run_name=run_name)
        mlflow.log_params(params)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.mlflow.log_metrics(metrics, step=step)


class TrackingCallback(UserCallback):
    """Writes rank 0's reported metrics to the trackers named in `train.tracking` (picklable until first use)."""

    def __init__(self, trackers: list[str], run_dir: str | Path, mlflow_uri: str | None = None,
                 params: dict | None = None):
        self.trackers = list(trackers)
        self.run_dir = Path(run_dir)
        self.mlflow_uri = mlflow_uri or str(self.run_dir / "mlruns")
        self.params = dict(params or {})
        self._writers: list | None = None

    def _open(self) -> list:
        writers = []
        if "tensorboard" in self.trackers:
            writers.append(_TensorBoard(self.run_dir / "tensorboard"))
        if "mlflow" in self.trackers:
            writers.append(_Mlflow(self.mlflow_uri, self.run_dir.name, self.params))
        return writers

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        record = metrics[0] if metrics else {}
        if "step" not in record:
            return
        if self._writers is None:
            self._writers = self._open()
        scalars = scalar_metrics(record)
        for writer in self._writers:
            writer.write(int(record["step"]), scalars)

    def __getstate__(self):
        return {**self.__dict__, "_writers": None}  # open writers stay with the process that opened them


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the TensorBoard event files in `logdir`, in file and write order."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            # TFRecord framing: u64 length, u32 length CRC, payload, u32 payload CRC.
            (length,) = struct.unpack_from("<Q", data, pos)
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return scalars
