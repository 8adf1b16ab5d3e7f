"""train.launch: which runs train in the driver process (Ray Train's local mode), and the checkpoint folders that
launcher keeps."""

from __future__ import annotations

import pytest
import torch

from dermaflux.train.config import TrainConfig
from dermaflux.train.ray_trainer import keep_local_checkpoint, launches_locally

CACHED, ONLINE = {"mode": "cached"}, {"mode": "online"}


def test_auto_trains_a_short_one_worker_cached_run_locally():
    short = TrainConfig(steps=60, workers=1)
    assert launches_locally(short, CACHED, "/runs/x/ray")
    assert launches_locally(short, None, "/runs/x/ray")  # no plan: the cache
    assert launches_locally(TrainConfig(steps=300, workers=1), CACHED, "/r")  # local_max_steps is inclusive


@pytest.mark.parametrize("train, encode, storage", [
    ({"steps": 301}, CACHED, "/r"),  # longer than local_max_steps: a worker Ray Train restarts
    ({"steps": 60, "workers": 2}, CACHED, "/r"),
    ({"steps": 60}, ONLINE, "/r"),  # the stream feeds worker processes
    ({"steps": 60}, CACHED, "s3://bucket/runs"),  # checkpoints Ray Train uploads
    ({"steps": 60, "launch": "workers"}, CACHED, "/r"),
    ({"steps": 2000, "local_max_steps": 1000}, CACHED, "/r"),
    pytest.param({"steps": 60, "use_gpu": True}, CACHED, "/r", id="gpu run, driver without CUDA",
                 marks=pytest.mark.skipif("torch.cuda.is_available()")),
])
def test_auto_keeps_worker_processes_otherwise(train, encode, storage):
    assert not launches_locally(TrainConfig(**train), encode, storage)


def test_local_is_taken_at_its_word_where_it_can_run():
    assert launches_locally(TrainConfig(steps=5000, launch="local"), CACHED, "/r")
    with pytest.raises(ValueError, match="online encoding"):
        launches_locally(TrainConfig(launch="local"), ONLINE, "/r")
    with pytest.raises(ValueError, match="s3://b"):
        launches_locally(TrainConfig(launch="local"), CACHED, "s3://b")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no GPU"):
            launches_locally(TrainConfig(launch="local", use_gpu=True), CACHED, "/r")
    with pytest.raises(ValueError, match="workers is 2"):
        TrainConfig(launch="local", workers=2)


def test_kept_checkpoints_are_the_newest_of_those_written(tmp_path):
    runs = tmp_path / "ray" / "train"
    runs.mkdir(parents=True)
    (runs / "step-000000-notes").mkdir()  # not a checkpoint folder of this launcher: left alone
    (runs / "elsewhere.txt").write_text("kept")
    for step in (2, 4, 6):
        staged = tmp_path / f"staged-{step}"
        (staged / "adapter").mkdir(parents=True)
        (staged / "adapter" / "weights").write_text(str(step))
        placed = keep_local_checkpoint(staged, runs / f"step-{step:06d}", kept=2)
        assert placed == runs / f"step-{step:06d}" and not staged.exists()
    assert sorted(p.name for p in runs.iterdir()) == ["elsewhere.txt", "step-000000-notes", "step-000004", "step-000006"]
    again = tmp_path / "again"
    (again / "adapter").mkdir(parents=True)
    (again / "adapter" / "weights").write_text("6 again")  # a resumed run reaching step 6 once more
    keep_local_checkpoint(again, runs / "step-000006", kept=2)
    assert (runs / "step-000006" / "adapter" / "weights").read_text() == "6 again"
    assert not list(runs.glob(".*partial"))


def test_ray_starts_before_the_train_stage_only_when_the_run_cannot_train_in_this_process():
    from dermaflux.config import load_config
    from dermaflux.stages import get_stage

    train = get_stage("train")

    def starts_ray(**settings) -> bool:
        return train.starts_ray(load_config("tiny", extra={"train": settings}))

    assert not starts_ray(steps=60)  # Ray starts later only if the VAE fit, a large pre-compute or workers need it
    assert starts_ray(steps=60, workers=2) and starts_ray(steps=2000) and starts_ray(steps=60, launch="workers")
    assert starts_ray(steps=60, storage_path="s3://bucket/runs")
    assert all(stage.starts_ray is None for stage in map(get_stage, ("curate", "caption", "generate", "evaluate")))
