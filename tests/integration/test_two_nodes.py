"""Everything that needs a real two-node Ray cluster (loopback), in one module so the cluster starts once:

1. the fixture itself: both nodes register and a task lands on each;
2. ZeRO-3 LoRA training with two workers, encoding online: each worker streams only its own share of the
   caption shards; the saved LoRA is gathered (non-empty, equal to the trained weights) and loads into
   FluxPipeline from the tiny folder;
3. stages as Ray jobs through the Jobs API, curate -> caption -> train: the worker node is killed
   mid-training and the job still finishes from its checkpoint on a replacement node. It changes the
   cluster (the replacement node), so it runs last.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from dermaflux.testing.ham10000 import build_captioned_set, build_ham_folder

pytestmark = pytest.mark.integration


def test_two_nodes_run_tasks_on_both(ray_two_nodes):
    import ray

    assert ray_two_nodes.alive_nodes() == 2
    ray.init(address=ray_two_nodes.address)
    try:
        @ray.remote(num_cpus=2)
        def where():
            import time

            time.sleep(3)  # hold the node's CPUs so the second task must go to the other node
            return ray.get_runtime_context().get_node_id()

        # 2 CPUs each: two 2-CPU tasks in flight together must use both nodes.
        nodes = set(ray.get([where.remote() for _ in range(2)]))
        assert len(nodes) == 2
    finally:
        ray.shutdown()


DRIVER = """
import json, sys
import ray
from dermaflux.config import DermaFluxConfig
from dermaflux.train.ray_trainer import run_training
spec = json.load(open(sys.argv[1]))


class RecordShare:
    # Trainer hook (online): each rank appends its node and the ids its step trained on.

    def __call__(self, trainer, step):
        with open(spec["out"] + "/rows.jsonl", "a") as fh:
            fh.write(json.dumps({"rank": trainer.rank, "node": ray.get_runtime_context().get_node_id(),
                                 "ids": trainer.data.last_ids}) + "\\n")


ray.init()  # the job's cluster (RAY_ADDRESS)
nodes = len([n for n in ray.nodes() if n["Alive"]])
online = spec.get("encode") is not None
result = run_training(DermaFluxConfig.model_validate(spec["cfg"]), spec["cache"], None, spec["out"],
                      encode=spec.get("encode"), hooks=[RecordShare()] if online else [])
json.dump({"nodes": nodes, "error": None if result.error is None else repr(result.error),
           "metrics": result.metrics, "checkpoint": result.checkpoint.path if result.checkpoint else None},
          open(spec["out"] + "/result.json", "w"), default=str)
"""


@pytest.fixture(scope="module")
def captions_dir(tmp_path_factory, ham10000_dir):
    return build_captioned_set(ham10000_dir, tmp_path_factory.mktemp("captions"), n_train=32, n_test=0)


def run_driver_job(cluster, cfg, cache, out, encode=None) -> dict:
    """run_training as a submitted Ray job; its result.json. The driver runs on the head node as users' drivers do:
    a driver started here would join from this machine's non-loopback address, and Ray Train's controller,
    pinned to the driver's node, was then cancelled before it started (seen in the full suite)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    spec = out / "spec.json"
    spec.write_text(json.dumps({"cfg": cfg.model_dump(mode="json"), "cache": str(cache), "out": str(out),
                                "encode": encode}))
    (out / "driver.py").write_text(DRIVER)
    client = JobSubmissionClient(cluster.dashboard_url)
    job = client.submit_job(
        entrypoint=f"{sys.executable} {out / 'driver.py'} {spec}",
        runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
                                  "DERMAFLUX_CACHE": os.environ.get("DERMAFLUX_CACHE", "")}},
    )
    deadline = time.time() + 600
    while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, client.get_job_logs(job)[-4000:]
        time.sleep(2)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, client.get_job_logs(job)[-4000:]
    return json.loads((out / "result.json").read_text())


def test_zero3_lora_online_on_two_nodes(ray_two_nodes, captions_dir, tmp_path, tiny_model_dir):
    """ZeRO-3 LoRA with train.encode online across the two nodes: one worker per node, each streaming and
    encoding only its share (row i of the sorted train ids to rank i % 2), none of the other's; the gathered
    adapter is whole and loads in plain diffusers."""
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    from dermaflux.config import load_config
    from dermaflux.model.adapters import LORA_FILE
    from dermaflux.train.precompute import train_rows
    from dermaflux.train.stage import _encode_plan

    captions = captions_dir
    cfg = load_config("tiny", extra={"train": {
        "captions": str(captions), "out": str(tmp_path), "mode": "lora", "zero_stage": 3, "workers": 2,
        "cpus_per_worker": 2,  # 2 CPUs per node: one worker on each node
        "steps": 3, "micro_batch": 4, "lr": 1e-2, "warmup_steps": 0, "checkpoint_every": 3, "log_every": 1,
        "lora": {"rank": 4}, "vae_fit": {"enabled": False}, "encode": "online"}})
    plan = _encode_plan(cfg, None)
    assert plan["mode"] == "online" and plan["rows"] == 32
    empty = tmp_path / "no-cache"
    empty.mkdir()
    result = run_driver_job(ray_two_nodes, cfg, empty, tmp_path, encode=plan)
    assert result["nodes"] == 2
    assert result["error"] is None and result["metrics"]["step"] == 3
    assert not list(empty.iterdir())  # nothing cached
    lines = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    nodes = {r["rank"]: {line["node"] for line in lines if line["rank"] == r["rank"]} for r in lines}
    assert len(nodes[0] | nodes[1]) == 2 and len(nodes[0]) == len(nodes[1]) == 1  # one worker on each node
    ids = train_rows(cfg)["id"].to_pylist()
    for rank in (0, 1):
        seen = [i for line in lines if line["rank"] == rank for i in line["ids"]]
        assert len(seen) == 12 == len(set(seen))  # 3 steps x 4, none twice (16 rows in each share)
        assert set(seen) <= set(ids[rank::2])  # its own share only

    saved = load_file(f"{result['checkpoint']}/adapter/{LORA_FILE}")
    adapter_dir = str(tmp_path / "adapter")
    shutil.copytree(f"{result['checkpoint']}/adapter", adapter_dir)
    assert saved and all(t.numel() > 0 for t in saved.values())  # the ZeRO-3 trap: empty shards
    assert any(k.endswith("lora_B.weight") for k in saved)
    # lora_B starts at zero: non-zero values mean these are the trained, gathered weights
    assert all(float(t.abs().sum()) > 0 for k, t in saved.items() if k.endswith("lora_B.weight"))
    checksum = sum(float(t.double().abs().sum()) for t in saved.values())
    assert checksum == pytest.approx(result["metrics"]["weights_checksum"], rel=1e-6)

    pipe = FluxPipeline.from_pretrained(tiny_model_dir)

    def render():
        return pipe("dermoscopic image of a melanoma", height=64, width=64, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    before = render()
    pipe.load_lora_weights(adapter_dir, weight_name=LORA_FILE)
    assert abs(render() - before).mean() > 1e-3


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
