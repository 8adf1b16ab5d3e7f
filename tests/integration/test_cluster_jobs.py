"""Stages as Ray jobs on a real two-node cluster (loopback): curate -> caption -> train, through the
Jobs API; the worker node is killed mid-training and the job still
finishes from its checkpoint on a replacement node."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from dermaflux.testing.ham10000 import build_ham_folder

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
IMAGES_PER_CLASS = 4


def write_config(path: Path, sections: dict) -> Path:
    path.write_text(yaml.safe_dump({"preset": "tiny", **sections}))
    return path


def submit(client, stage: str, config: Path, cache: Path) -> str:
    deadline = time.time() + 120
    while True:  # the head's job agent registers a little after the dashboard answers
        try:
            return _submit(client, stage, config, cache)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.time() > deadline:
                raise
            time.sleep(2)


def _submit(client, stage: str, config: Path, cache: Path) -> str:
    # The installed package, not a working_dir upload: both nodes share one machine and one
    # runtime_resources folder, and the second node's agent re-unpacks (briefly deletes) the
    # package under the running driver. On real clusters `--working-dir .` is the way (cluster/README.md).
    return client.submit_job(
        entrypoint=f"{sys.executable} {ROOT}/jobs/{stage}.py --config {config}",
        runtime_env={
            "env_vars": {"DS_ACCELERATOR": "cpu", "DERMAFLUX_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "false"},
        },
    )


def wait(client, job_id: str, timeout: float, until=None) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL or (until is not None and until()):
            return status
        time.sleep(1)
    raise TimeoutError(f"job {job_id} not done after {timeout}s:\n{client.get_job_logs(job_id)[-3000:]}")


def job_summary(client, job_id: str) -> dict:
    lines = [l for l in client.get_job_logs(job_id).splitlines() if l.startswith('{"stage"')]
    assert lines, client.get_job_logs(job_id)[-3000:]
    return json.loads(lines[-1])


def test_caption_and_train_jobs_survive_losing_the_worker_node(ray_two_nodes, ham10000_dir, tmp_path, dermaflux_cache):
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    from dermaflux.model.adapters import read_adapter
    from dermaflux.train.ray_trainer import latest_checkpoint

    client = JobSubmissionClient(ray_two_nodes.dashboard_url)
    data = build_ham_folder(ham10000_dir, tmp_path / "ham10000", per_class=IMAGES_PER_CLASS)
    corpus, captions, run = tmp_path / "corpus", tmp_path / "captions", tmp_path / "train"
    config = write_config(tmp_path / "run.yaml", {
        "curate": {"sources": [f"ham10000={data}"], "out": f"file://{corpus}"},
        "caption": {"corpus": str(corpus), "out": str(captions)},
        "train": {
            "captions": str(captions), "out": str(run), "steps": 16, "checkpoint_every": 4, "validate_every": 1000,
            "micro_batch": 4, "warmup_steps": 2, "max_failures": 2,
            # 2 workers x 2 CPUs on two 2-CPU nodes: one worker on each node, so losing a node loses a worker.
            "workers": 2, "cpus_per_worker": 2,
            "vae_fit": {"enabled": False},  # decoding quality is not what this test is about
        },
    })

    for stage, out in (("curate", corpus), ("caption", captions)):
        job_id = submit(client, stage, config, dermaflux_cache)
        status = wait(client, job_id, 300)
        assert status == "SUCCEEDED", client.get_job_logs(job_id)[-4000:]
        summary = job_summary(client, job_id)
        assert summary["status"] == "succeeded"
        assert sorted((out / "shards").glob("*.parquet")), f"{stage} wrote no shards"
    caption_rows = sum(pq.read_metadata(p).num_rows for p in (captions / "shards").glob("*.parquet"))
    assert caption_rows >= IMAGES_PER_CLASS

    job_id = submit(client, "train", config, dermaflux_cache)
    status = wait(client, job_id, 400, until=lambda: latest_checkpoint(run / "ray") is not None)
    assert status not in TERMINAL, f"training ended before its first checkpoint:\n{client.get_job_logs(job_id)[-4000:]}"
    checkpoint_before = latest_checkpoint(run / "ray")
    ray_two_nodes.kill_node("worker")  # the machine holding one training worker is gone
    ray_two_nodes.add_worker("worker2", num_cpus=2)  # the autoscaler's replacement node

    status = wait(client, job_id, 400)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-4000:]
    summary = job_summary(client, job_id)
    assert summary["train"]["steps"] == 16
    assert read_adapter(summary["final"]).kind == "full"
    assert latest_checkpoint(run / "ray").name > checkpoint_before.name
    # A training worker died with the node, so the run finished only through Ray Train's restart.
    dead = list_actors(address=ray_two_nodes.dashboard_url, filters=[("state", "=", "DEAD")], limit=1000)
    assert any("Worker" in (a.class_name or "") for a in dead), [a.class_name for a in dead]
