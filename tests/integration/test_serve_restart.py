"""Job state survives a restart of the service and its Ray instance: an unfinished job says
`interrupted` (not `running` forever) and a re-POST resumes it without duplicating an image."""

from __future__ import annotations

import time

import httpx
import pyarrow.parquet as pq
import pytest

from dermaflux.testing.ray_cluster import free_port

pytestmark = pytest.mark.integration


def start(cfg) -> httpx.Client:
    import ray

    from dermaflux.synth.serve_app import start_service

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    start_service(cfg, access_log=False)
    client = httpx.Client(base_url=f"http://127.0.0.1:{cfg.synth.port}", timeout=120)
    deadline = time.time() + 120
    while client.get("/readyz").status_code != 200:
        assert time.time() < deadline, "service not ready after 120 s"
        time.sleep(0.5)
    return client


def test_a_job_interrupted_by_a_restart_says_so_and_resumes(tiny_config, dermaflux_cache, tmp_path):
    import ray

    from dermaflux.config import load_config

    if ray.is_initialized():
        ray.shutdown()
    cfg = load_config("tiny", extra={"model": {"cache_dir": str(dermaflux_cache)}, "synth": {
        "port": free_port(), "jobs_root": str(tmp_path / "jobs"), "shard_size": 2, "batch_size": 2,
        "num_inference_steps": 4, "width": 32, "height": 32, "job_max_retries": 5}})
    job = {"job_id": "restarted", "class_targets": {"mel": 30, "nv": 30}, "seed": 3}
    client = start(cfg)
    try:
        assert client.post("/v1/augmentations", json=job).status_code == 202
        deadline = time.time() + 180
        while (status := client.get("/v1/augmentations/restarted").json())["shards_done"] < 1:
            assert time.time() < deadline, status
            time.sleep(0.1)
    finally:
        client.close()
        ray.shutdown()  # the service, its runner and Ray go away at once, as when the process dies
    client = start(cfg)
    try:
        status = client.get("/v1/augmentations/restarted").json()
        assert status["state"] == "interrupted" and 0 < status["done"] < 60, status
        resumed = client.post("/v1/augmentations", json=job)
        assert resumed.status_code == 202 and resumed.json()["state"] == "running", resumed.text
        deadline = time.time() + 300
        while (status := client.get("/v1/augmentations/restarted").json())["state"] == "running":
            assert time.time() < deadline, status
            time.sleep(0.5)
        assert (status["state"], status["done"]) == ("done", 60), status
    finally:
        client.close()
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    table = pq.read_table(tmp_path / "jobs" / "restarted" / "shards")
    assert table.num_rows == 60 and len(set(table["id"].to_pylist())) == 60
