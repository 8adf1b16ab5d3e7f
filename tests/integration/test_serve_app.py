"""The real Serve application on loopback (tiny preset, two LoRAs), called over HTTP."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from dermaflux.testing.serve import tiny_service

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def service(ray_local, tiny_config, dermaflux_cache, tmp_path_factory):
    with tiny_service(tiny_config.model, dermaflux_cache, tmp_path_factory.mktemp("serve"), ["lora_a", "lora_b"],
                      shard_size=4, batch_size=4, job_max_retries=6, num_inference_steps=4,
                      max_adapters_per_replica=1) as service:  # two adapters, room for one: switching evicts
        yield service


def decode(item) -> np.ndarray:
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(item["png_base64"])))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB")).astype(np.int16)


def images(service, **body) -> list[np.ndarray]:
    response = service.client.post("/v1/images", json=body)
    assert response.status_code == 200, response.text
    return [decode(item) for item in response.json()["images"]]


def test_health_readiness_and_openapi(service):
    assert service.client.get("/healthz").json() == {"status": "ok"}
    assert sorted(service.client.get("/readyz").json()["adapters"]) == ["lora_a", "lora_b"]
    paths = service.client.get("/openapi.json").json()["paths"]
    assert {"/v1/images", "/v1/augmentations", "/v1/augmentations/{job_id}", "/healthz", "/readyz"} <= set(paths)


def test_images_decode_at_the_requested_size(service):
    response = service.client.post("/v1/images", json={
        "attributes": {"diagnosis": "mel", "colours": ["black", "blue_grey"], "site": "back"},
        "count": 2, "seed": 3, "width": 96, "height": 48,
    })
    assert response.status_code == 200, response.text
    body = response.json()
    assert "melanoma" in body["prompt"] and body["attributes"]["diagnosis"] == "mel"
    assert [im["seed"] for im in body["images"]] == [3, 4]
    arrays = [decode(im) for im in body["images"]]
    assert all(a.shape == (48, 96, 3) for a in arrays)
    assert np.abs(arrays[0] - arrays[1]).mean() > 5


def test_reproducible_and_adapters_switch_without_touching_the_base(service):
    ask = {"prompt": "a dermoscopic image of a benign nevus", "seed": 21}
    base_before = images(service, **ask)[0]
    lora_a = images(service, **ask, adapter="lora_a")[0]
    lora_b = images(service, **ask, adapter="lora_b")[0]
    lora_a_again = images(service, **ask, adapter="lora_a")[0]
    base_after = images(service, **ask)[0]
    assert np.abs(lora_a - lora_b).mean() > 5 and np.abs(lora_a - base_before).mean() > 5
    # Alone or batched with other callers' requests: equal up to one grey level (float32 GEMM order).
    assert np.abs(lora_a - lora_a_again).max() <= 1
    assert np.abs(base_before - base_after).max() <= 1
    # Serve multiplexing with room for one adapter: b evicted a, a evicted b; the base loaded once.
    replica = service.client.get("/v1/adapters").json()["replica"]
    assert replica["base_loads"] == 1 and replica["max_loaded"] == 1
    assert replica["loaded"] == ["lora_a"]
    assert replica["loads"]["lora_a"] >= 2 and replica["unloads"]["lora_a"] >= 1 and replica["unloads"]["lora_b"] >= 1


@pytest.mark.parametrize(
    "path, body, status, says",
    [
        ("/v1/images", {"prompt": "a nevus", "width": 72}, 422, "multiple of 16"),
        ("/v1/images", {"prompt": "a nevus", "count": 9}, 422, "limit of 8"),
        ("/v1/images", {"prompt": "a nevus", "adapter": "nope"}, 404, "unknown adapter"),
        ("/v1/images", {"prompt": "melanoma " * 200}, 422, "token"),
        ("/v1/images", {"attributes": {"diagnosis": "wart"}}, 422, "unknown diagnosis"),
        ("/v1/augmentations", {"job_id": "bad1", "class_targets": {"wart": 3}}, 422, "unknown class"),
        ("/v1/augmentations", {"job_id": "bad2", "class_targets": {"mel": 200_000}}, 422, "limit"),
        ("/v1/augmentations", {"job_id": "bad3", "class_targets": {"mel": 1}, "height": 40}, 422, "multiple of 16"),
        ("/v1/augmentations", {"job_id": "bad4", "class_targets": {"mel": 1}, "adapter": "x"}, 404, "unknown adapter"),
        ("/v1/augmentations", {"job_id": "bad5", "bring_to": 10, "corpus": "/nonexistent"}, 422, "synth.corpus_root"),
        ("/v1/augmentations", {"job_id": "bad 6", "class_targets": {"mel": 1}}, 422, "job_id"),
    ],
)
def test_bad_input_gets_a_4xx_and_writes_nothing(service, path, body, status, says):
    if path == "/v1/augmentations":
        body = {**body, "out": f"bad/{body['job_id']}"}
    response = service.client.post(path, json=body)
    assert response.status_code == status, response.text
    assert says in response.text
    assert not (service.root / "jobs" / "bad").exists()


def test_malformed_json_and_unknown_job(service):
    response = service.client.post("/v1/images", content=b'{"prompt": "a nevus",', headers={"content-type": "application/json"})
    assert response.status_code == 422 and "json" in response.text.lower()
    assert service.client.get("/v1/augmentations/never-started").status_code == 404


def test_concurrent_requests_for_different_adapters_do_not_mix(service):
    """Mixed adapters from concurrent clients, room for one adapter per replica: eviction while
    other adapters' batches run. Every image must equal the one its (adapter, seed) gives alone."""
    import httpx

    asks = [{"prompt": "a dermoscopic image of a melanoma", "seed": seed, "adapter": adapter}
            for seed in (30, 31, 32) for adapter in (None, "lora_a", "lora_b")]
    alone = [images(service, **ask)[0] for ask in asks]
    url = f"http://127.0.0.1:{service.port}/v1/images"

    def one(ask):
        with httpx.Client(timeout=120) as client:
            response = client.post(url, json=ask)
        assert response.status_code == 200, response.text
        return decode(response.json()["images"][0])

    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
        together = list(pool.map(one, asks * 2))
    for i, image in enumerate(together):
        assert np.abs(image - alone[i % len(asks)]).max() <= 1, asks[i % len(asks)]
    replica = service.client.get("/v1/adapters").json()["replica"]
    assert len(replica["loaded"]) <= 1 and replica["base_loads"] == 1


def synth_replicas() -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA") and "SynthesisModel" in a["name"]]


def test_bulk_job_survives_a_killed_replica_and_never_duplicates(service):
    import ray

    out = service.root / "jobs" / "jobs-out" / "kill1"  # `out` is relative to the service's jobs root
    job = {"job_id": "kill1", "class_targets": {"mel": 6, "nv": 6, "bcc": 4}, "seed": 5, "out": "jobs-out/kill1",
           "adapter": "lora_b"}  # routed by adapter; the replacement replica loads it on demand
    response = service.client.post("/v1/augmentations", json=job)
    assert response.status_code == 202, response.text
    assert response.json()["total"] == 16 and response.json()["out"] == "jobs-out/kill1"

    deadline = time.time() + 120
    while service.client.get("/v1/augmentations/kill1").json()["shards_done"] < 1:
        assert time.time() < deadline
        time.sleep(0.05)
    [replica] = synth_replicas()
    ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)
    at_kill = service.client.get("/v1/augmentations/kill1").json()
    assert at_kill["state"] == "running" and at_kill["done"] < 16  # killed mid-job

    while (status := service.client.get("/v1/augmentations/kill1").json())["state"] == "running":
        assert time.time() < deadline + 120, status
        time.sleep(0.5)
    assert status["state"] == "done", status
    assert synth_replicas() != [replica]  # Serve replaced the killed replica
    table = pq.read_table(out / "shards")
    labels = table["label"].to_pylist()
    assert {c: labels.count(c) for c in set(labels)} == {"mel": 6, "nv": 6, "bcc": 4}
    assert len(set(table["id"].to_pylist())) == 16
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"bcc": 4, "mel": 6, "nv": 6}
    assert {image["adapter"] for image in manifest["images"]} == {"lora_b"}
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.parquet")}

    again = service.client.post("/v1/augmentations", json=job)  # the same job id again: nothing new
    assert again.status_code == 202 and again.json()["state"] == "done" and again.json()["done"] == 16
    time.sleep(1)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.parquet")} == stamps
    assert pq.read_table(out / "shards").num_rows == 16

    changed = service.client.post("/v1/augmentations", json={**job, "class_targets": {"mel": 7}})
    assert changed.status_code == 409  # same id, other spec: refused, not mixed
    assert "other targets or settings" in changed.text and "--force" not in changed.text  # the API has no --force


def test_bounded_load_zero_failures(service):
    import httpx

    clients, requests_total = 16, 48
    url = f"http://127.0.0.1:{service.port}/v1/images"

    def one(i: int) -> tuple[int, float]:
        start = time.perf_counter()
        with httpx.Client(timeout=120) as client:
            response = client.post(url, json={"prompt": f"a dermoscopic image of a nevus {i % 10}", "seed": i})
        return response.status_code, time.perf_counter() - start

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests_total)))
    wall = time.perf_counter() - start
    failed = [code for code, _ in results if code != 200]
    latencies = np.array([t for _, t in results])
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    print(f"\nload: {clients} clients, {requests_total} requests in {wall:.1f}s ({requests_total / wall:.2f} img/s), "
          f"failed {len(failed)}, latency p50 {p50:.2f}s p95 {p95:.2f}s p99 {p99:.2f}s")
    assert failed == []
