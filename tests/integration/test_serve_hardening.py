"""The real Serve application hardened (issue 14): a bearer token, one jobs root, bounded bodies,
prompts, queues and jobs, cancel, true job state and the point-7 messages, all over HTTP on loopback."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import pyarrow.parquet as pq
import pytest

from dermaflux.testing.serve import tiny_service

pytestmark = pytest.mark.integration

TOKEN = "hardening-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def service(ray_local, tiny_config, dermaflux_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    (root / "token").write_text(TOKEN + "\n")
    synth = {"shard_size": 2, "batch_size": 2, "num_inference_steps": 2, "width": 32, "height": 32,
             "job_max_retries": 0, "auth": {"token_file": str(root / "token")},
             "limits": {"max_queued_images": 2, "max_running_jobs": 2}}
    with tiny_service(tiny_config.model, dermaflux_cache, root, [], **synth) as service:
        service.api = httpx.Client(base_url=f"http://127.0.0.1:{service.port}", headers=AUTH, timeout=120)
        service.jobs = root / "jobs"
        yield service
        service.api.close()


def wait_for(service, job_id: str, states: set[str], timeout_s: float = 240) -> dict:
    deadline = time.time() + timeout_s
    while (status := service.api.get(f"/v1/augmentations/{job_id}").json())["state"] not in states:
        assert time.time() < deadline, status
        time.sleep(0.2)
    return status


def wait_no_runners(timeout_s: float = 30) -> None:
    import ray

    deadline = time.time() + timeout_s
    while any(a["namespace"].startswith("dermaflux-jobs") for a in ray.util.list_named_actors(all_namespaces=True)):
        assert time.time() < deadline, "job runners still alive"
        time.sleep(0.2)


def test_every_v1_route_needs_the_token_and_health_does_not(service):
    anonymous = service.client  # no Authorization header
    assert anonymous.get("/healthz").status_code == 200 and anonymous.get("/readyz").status_code == 200
    calls = [("POST", "/v1/images", {"prompt": "a nevus"}),
             ("POST", "/v1/augmentations", {"job_id": "anon", "class_targets": {"mel": 1}}),
             ("GET", "/v1/augmentations/anon", None), ("DELETE", "/v1/augmentations/anon", None),
             ("GET", "/v1/adapters", None)]
    for method, path, body in calls:
        for headers in ({}, {"Authorization": "Bearer not-the-token-but-long-enough"}, {"Authorization": TOKEN}):
            response = anonymous.request(method, path, json=body, headers=headers)
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
    assert not (service.jobs / "anon").exists()
    assert service.api.get("/v1/adapters").status_code == 200


def test_out_stays_inside_the_jobs_root(service):
    outside = service.root / "outside"
    outside.mkdir()
    (service.jobs / "escape").symlink_to(outside)
    for out, says in (("../outside/job", "'..'"), ("../../../../../../../" + str(outside / "deep").lstrip("/"), "'..'"),
                      (str(outside / "abs"), "absolute path"), ("escape/job", "outside the jobs root")):
        response = service.api.post("/v1/augmentations", json={"job_id": "esc", "class_targets": {"mel": 1}, "out": out})
        assert response.status_code == 422, response.text
        detail = response.json()["detail"][0]
        assert detail["loc"] == ["out"] and says in detail["msg"]
    assert list(outside.iterdir()) == []
    (service.jobs / "a-file").write_text("not a folder")
    response = service.api.post("/v1/augmentations", json={"job_id": "f", "class_targets": {"mel": 1}, "out": "a-file"})
    assert response.status_code == 409 and response.json()["detail"][0]["loc"] == ["out"], response.text
    assert service.api.get("/v1/augmentations/esc").status_code == 404  # refused jobs leave no record


def test_a_10mb_prompt_gets_a_fast_413_while_healthz_answers(service):
    body = json.dumps({"prompt": "melanoma " * 1_200_000}).encode()  # 10.8 MB
    result: dict = {}

    def post():
        started = time.perf_counter()
        response = httpx.post(f"http://127.0.0.1:{service.port}/v1/images", content=body, timeout=120,
                              headers={**AUTH, "content-type": "application/json"})
        result.update(status=response.status_code, text=response.text, seconds=time.perf_counter() - started)

    sender = threading.Thread(target=post)
    sender.start()
    health = []
    while sender.is_alive() or len(health) < 5:
        started = time.perf_counter()
        assert service.client.get("/healthz").status_code == 200
        health.append(time.perf_counter() - started)
        time.sleep(0.02)
    sender.join()
    assert result["status"] == 413 and "synth.limits.max_body_bytes" in result["text"], result
    assert result["seconds"] < 5, result["seconds"]
    assert max(health) < 1.0, health
    # Under the body cap, over the prompt limit: refused by length, before the tokenizer runs.
    started = time.perf_counter()
    response = service.api.post("/v1/images", json={"prompt": "melanoma " * 6000})
    assert response.status_code == 422 and "characters exceeds the limit" in response.text
    assert time.perf_counter() - started < 2


def test_a_job_id_names_one_output_for_life_even_under_concurrent_posts(service):
    job = {"job_id": "twice", "class_targets": {"mel": 2}, "out": "first"}
    assert service.api.post("/v1/augmentations", json=job).status_code == 202
    other = service.api.post("/v1/augmentations", json={**job, "out": "second"})
    assert other.status_code == 409 and "one output for life" in other.text, other.text
    assert other.json()["detail"][0]["loc"] == ["out"] and "--force" not in other.text
    assert not (service.jobs / "second").exists()
    race = {"job_id": "race", "class_targets": {"nv": 3}, "out": "team/race"}

    def post(_):
        with httpx.Client(timeout=120, headers=AUTH) as client:
            response = client.post(f"http://127.0.0.1:{service.port}/v1/augmentations", json=race)
        return response.status_code, response.text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, range(8)))
    assert [code for code, _ in answers] == [202] * 8, answers
    assert wait_for(service, "twice", {"done", "failed"})["state"] == "done"
    status = wait_for(service, "race", {"done", "failed"})
    assert (status["state"], status["done"], status["out"]) == ("done", 3, "team/race")
    assert pq.read_table(service.jobs / "team" / "race" / "shards").num_rows == 3


def test_a_job_of_zero_images_succeeds_with_an_empty_set(service):
    response = service.api.post("/v1/augmentations", json={"job_id": "zeros", "class_targets": {"mel": 0, "nv": 0}})
    assert response.status_code == 202, response.text
    status = wait_for(service, "zeros", {"done", "failed"})
    assert (status["state"], status["total"], status["error"]) == ("done", 0, None)
    assert json.loads((service.jobs / "zeros" / "manifest.json").read_text())["counts"] == {}


def test_a_100k_job_is_bounded_cancellable_and_its_status_fast(service):
    wait_no_runners()
    big = {"job_id": "big", "class_targets": {"nv": 100_000}}
    started = time.perf_counter()
    response = service.api.post("/v1/augmentations", json=big)
    assert response.status_code == 202 and time.perf_counter() - started < 5, response.text
    reads = []
    for _ in range(5):
        started = time.perf_counter()
        status = service.api.get("/v1/augmentations/big").json()
        reads.append(time.perf_counter() - started)
    assert status["total"] == 100_000 and status["state"] == "running" and max(reads) < 1.0, reads
    assert service.api.post("/v1/augmentations", json={**big, "job_id": "big2"}).status_code == 202
    third = service.api.post("/v1/augmentations", json={**big, "job_id": "big3"})  # max_running_jobs: 2
    assert third.status_code == 429 and third.headers["retry-after"] == "2" and "max_running_jobs" in third.text
    for job_id in ("big", "big2"):
        cancel = service.api.delete(f"/v1/augmentations/{job_id}")
        assert cancel.status_code == 202 and cancel.json()["cancel_requested"], cancel.text
    for job_id in ("big", "big2"):
        status = wait_for(service, job_id, {"cancelled", "done", "failed"}, timeout_s=60)
        assert status["state"] == "cancelled" and status["done"] < 100_000 and not status["cancel_requested"]
    assert service.api.delete("/v1/augmentations/nope").status_code == 404
    resumed = service.api.post("/v1/augmentations", json=big)  # a cancelled job resumes on re-POST
    assert resumed.status_code == 202 and resumed.json()["state"] == "running"
    service.api.delete("/v1/augmentations/big")
    assert wait_for(service, "big", {"cancelled", "done", "failed"}, timeout_s=60)["state"] == "cancelled"
    wait_no_runners()


def test_a_flood_beyond_the_queue_limit_gets_429_with_retry_after(service):
    url = f"http://127.0.0.1:{service.port}/v1/images"

    def one(i: int):
        with httpx.Client(timeout=120, headers=AUTH) as client:
            response = client.post(url, json={"prompt": f"a dermoscopic image of a nevus {i}", "seed": i})
        return response.status_code, response.headers.get("retry-after")

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(36)))
    codes = [code for code, _ in results]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(429) > 0 and codes.count(200) > 0, codes
    assert {after for code, after in results if code == 429} == {"2"}


@pytest.mark.parametrize("body, field", [
    (b'{"prompt": "a nevus", "guidance_scale": NaN}', "guidance_scale"),
    (b'{"prompt": "a nevus", "guidance_scale": Infinity}', "guidance_scale"),
    (b'{"prompt": "a nevus", "count": "2"}', "count"),
    (b'{"prompt": "a nevus", "count": 1.0}', "count"),
    (b'{"prompt": "a nevus", "count": true}', "count"),
    (b'{"prompt": "a nevus", "seed": 9223372036854775807, "count": 2}', "seed"),
])
def test_point7_inputs_get_a_422_naming_the_field(service, body, field):
    response = service.api.post("/v1/images", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert field in response.json()["detail"][0]["loc"], response.text


def test_serve_on_a_busy_port_is_one_clear_line(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "dermaflux.cli", "serve", "--preset", "tiny", "--port", str(port)],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert "serving on" not in run.stdout and "Traceback" not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("dermaflux serve: error:")]
    assert errors == [f"dermaflux serve: error: synth.port: cannot listen on 127.0.0.1:{port} (Address already in use); "
                      "stop what holds it or choose another --port"], run.stderr
