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
    (root / "corpora").mkdir()
    synth = {"shard_size": 2, "batch_size": 2, "num_inference_steps": 2, "width": 32, "height": 32,
             "job_max_retries": 0, "auth": {"token_file": str(root / "token")}, "corpus_root": str(root / "corpora"),
             "limits": {"max_queued_images": 2, "max_running_jobs": 2, "max_open_requests": 16, "body_timeout_s": 3,
                        "max_request_pixel_steps": 100_000, "max_job_pixel_steps": 10**9}}
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
    # Issue 25.2: a refused job claims nothing, so its `out` stays free for whoever is admitted later.
    for i in range(5):
        refused = service.api.post("/v1/augmentations", json={**big, "job_id": f"refused{i}", "out": f"later/{i}"})
        assert refused.status_code == 429, refused.text
    assert not (service.jobs / "big3").exists() and not (service.jobs / "later").exists()
    assert not any((service.jobs / ".jobs").glob("refused*")) and not (service.jobs / ".jobs" / "big3.json").exists()
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


# --- issue 25: what a hostile client and a careless user still broke ------------------------------


def test_a_job_cannot_nest_inside_or_around_another(service):
    wait_no_runners()
    assert service.api.post("/v1/augmentations", json={"job_id": "vic", "class_targets": {"mel": 2}}).status_code == 202
    for job_id, out, says in (("nest", "vic/shards/x", "inside the folder of job 'vic'"),
                              ("nest2", "vic/deeper/still", "inside the folder of job 'vic'"),
                              ("wrap", "team", "contains the folder of job 'race'")):  # team/race: an earlier test's
        response = service.api.post("/v1/augmentations", json={"job_id": job_id, "class_targets": {"mel": 1},
                                                                "out": out})
        assert response.status_code == 409, response.text
        detail = response.json()["detail"][0]
        assert detail["loc"] == ["out"] and says in detail["msg"], detail
        assert service.api.get(f"/v1/augmentations/{job_id}").status_code == 404
    assert wait_for(service, "vic", {"done", "failed"})["state"] == "done"
    assert not (service.jobs / "vic" / "shards" / "x").exists() and not (service.jobs / "vic" / "deeper").exists()


SURROGATE = "\\ud800"  # a lone UTF-16 surrogate, as JSON spells it: valid JSON, not encodable text


@pytest.mark.parametrize("path, body, field", [
    ("/v1/images", f'{{"prompt": "a {SURROGATE} nevus"}}', "prompt"),
    ("/v1/images", f'{{"attributes": {{"diagnosis": "mel", "site": "{SURROGATE}"}}}}', "attributes"),
    ("/v1/augmentations", f'{{"job_id": "s1", "class_targets": {{"mel": 1}}, "out": "x{SURROGATE}"}}', "out"),
    ("/v1/augmentations", f'{{"job_id": "s2", "bring_to": 1, "corpus": "c{SURROGATE}"}}', "corpus"),
    ("/v1/augmentations", f'{{"job_id": "s3", "class_targets": {{"{SURROGATE}": 1}}}}', "class_targets"),
    ("/v1/augmentations", json.dumps({"job_id": "s4", "class_targets": {"mel": 1}, "out": "a" * 300}), "out"),
    ("/v1/augmentations", json.dumps({"job_id": "s5", "class_targets": {"mel": 1}, "out": "b/" + "c" * 300}), "out"),
    ("/v1/augmentations", json.dumps({"job_id": "s6", "class_targets": {"mel": 1}, "out": "d" * 512}), "out"),
    ("/v1/augmentations", json.dumps({"job_id": "s7", "bring_to": 1, "corpus": "/etc"}), "corpus"),
    ("/v1/augmentations", json.dumps({"job_id": "s8", "bring_to": 1, "corpus": "../hardening"}), "corpus"),
    ("/v1/augmentations", json.dumps({"job_id": "s9", "bring_to": 1, "corpus": "{corpora}/fake"}), "corpus"),
    ("/v1/augmentations", json.dumps({"job_id": "s11", "bring_to": 9, "corpus": "{root}/elsewhere"}), "corpus"),
    ("/v1/augmentations", json.dumps({"job_id": "s10", "bring_to": 1, "corpus": "nul\u0000"}), "corpus"),
])
def test_hostile_strings_get_a_422_naming_the_field_and_write_nothing(service, path, body, field):
    fake = service.root / "corpora" / "fake"
    fake.mkdir(exist_ok=True)
    (fake / "manifest.json").write_text("[1, 2, 3]")  # JSON, but not a corpus manifest
    elsewhere = service.root / "elsewhere"  # a corpus, outside synth.corpus_root
    elsewhere.mkdir(exist_ok=True)
    (elsewhere / "manifest.json").write_text(json.dumps({"by_split_label": {"train": {"mel": 3, "nv": 5}}}))
    body = body.replace("{corpora}", str(service.root / "corpora")).replace("{root}", str(service.root))
    before = sorted(p.name for p in service.jobs.iterdir())
    response = service.api.post(path, content=body.encode(), headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert field in response.json()["detail"][0]["loc"], response.text
    assert sorted(p.name for p in service.jobs.iterdir()) == before


def test_a_job_id_in_the_url_is_checked_against_its_pattern(service):
    for method in ("GET", "DELETE"):
        response = service.api.request(method, "/v1/augmentations/" + "j" * 300)
        assert response.status_code == 422 and "job_id" in response.json()["detail"][0]["loc"], response.text
        assert service.api.request(method, "/v1/augmentations/no-such-job").status_code == 404


def test_compute_is_bounded_per_request_and_per_job(service):
    # The fixture's budgets: 100,000 pixel-steps per request, 10**9 per job.
    costly = service.api.post("/v1/images", json={"prompt": "a nevus", "width": 64, "height": 64,
                                                   "num_inference_steps": 25})  # 64 x 64 x 25 = 102,400
    assert costly.status_code == 422 and "synth.limits.max_request_pixel_steps" in costly.text, costly.text
    assert service.api.post("/v1/images", json={"prompt": "a nevus", "width": 64, "height": 64,
                                                "num_inference_steps": 24}).status_code == 200
    job = {"job_id": "costly", "class_targets": {"nv": 3000}, "width": 64, "height": 64, "num_inference_steps": 100}
    response = service.api.post("/v1/augmentations", json=job)  # 3000 x 4096 x 100 = 1.2e9
    assert response.status_code == 422 and "synth.limits.max_job_pixel_steps" in response.text, response.text
    assert not (service.jobs / "costly").exists()


def test_writes_never_follow_a_job_folder_swapped_for_a_symlink(service):
    wait_no_runners()
    outside = service.root / "swap-target"
    outside.mkdir()
    assert service.api.post("/v1/augmentations", json={"job_id": "swap", "class_targets": {"nv": 400}}).status_code == 202
    deadline = time.time() + 120
    while service.api.get("/v1/augmentations/swap").json()["shards_done"] < 1:
        assert time.time() < deadline
        time.sleep(0.05)
    real, moved = service.jobs / "swap", service.jobs / "swap-moved"
    real.rename(moved)  # what a local user with write access to the jobs root could do mid-job
    real.symlink_to(outside, target_is_directory=True)
    wait_no_runners(timeout_s=60)  # the runner stops at its next write
    assert list(outside.iterdir()) == []
    status = service.api.get("/v1/augmentations/swap")
    assert status.status_code == 409 and status.json()["detail"][0]["loc"] == ["out"], status.text
    assert service.api.delete("/v1/augmentations/swap").status_code == 409 and list(outside.iterdir()) == []
    real.unlink()
    moved.rename(real)
    status = service.api.get("/v1/augmentations/swap").json()
    assert status["state"] in {"failed", "interrupted"} and status["done"] < 400, status


def test_health_answers_while_slow_bodies_hold_the_ingress(service):
    from dermaflux.testing.serve import open_slow_bodies

    # 40 clients that never finish their bodies: more than the 16 open requests the ingress holds
    # (synth.limits.max_open_requests) and the 32 Serve lets it hold with its queue.
    sockets = open_slow_bodies(service.port, 40, AUTH)
    try:
        time.sleep(0.5)
        for _ in range(5):
            started = time.perf_counter()
            assert service.client.get("/healthz").status_code == 200
            assert time.perf_counter() - started < 1.0
        refused = service.api.post("/v1/images", json={"prompt": "a nevus"})
        assert refused.status_code == 429 and "max_open_requests" in refused.text, refused.text
        time.sleep(3.5)  # synth.limits.body_timeout_s: 3 ends the slow bodies' hold
        answers = []
        for sock in sockets:
            sock.settimeout(5)
            answers.append(sock.recv(200).split(b"\r\n", 1)[0])
        assert set(answers) <= {b"HTTP/1.1 408 Request Timeout", b"HTTP/1.1 429 Too Many Requests"}, set(answers)
        assert b"HTTP/1.1 408 Request Timeout" in answers
    finally:
        for sock in sockets:
            sock.close()
    assert service.api.post("/v1/images", json={"prompt": "a nevus"}).status_code == 200


def test_headers_beyond_the_cap_get_a_431_even_on_healthz(service):
    response = service.client.get("/healthz", headers={"x-filler": "y" * 70_000})
    assert response.status_code == 431 and "synth.limits.max_header_bytes" in response.text, response.text
    assert service.client.get("/healthz", headers={"x-filler": "y" * 1000}).status_code == 200


def test_what_listens_beyond_loopback_is_what_the_readme_says(service):
    """Issue 25.6: the README's security section states what a local service listens on; this checks it
    against the sockets of every process of the module's Ray instance (the children of this process)."""
    from pathlib import Path

    import psutil

    from dermaflux.testing.serve import listening_sockets

    processes = {p.pid: " ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)}
    sockets = listening_sockets(list(processes))
    wide = {processes[pid]: [s for s in found if not is_loopback(s[0])] for pid, found in sockets.items()}
    wide = {name: found for name, found in wide.items() if found}
    # Every socket on a non-loopback address is a Serve replica's inter-deployment gRPC server on [::].
    assert sorted(name.split()[0] for name in wide) == ["ray::ServeReplica:dermaflux:SynthesisAPI",
                                                       "ray::ServeReplica:dermaflux:SynthesisModel"], wide
    assert all(address == "::" for found in wide.values() for address, _ in found), wide
    (proxy,) = [pid for pid, name in processes.items() if name.startswith("ray::ProxyActor")]
    assert ("127.0.0.1", service.port) in sockets[proxy]
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "each Serve replica's inter-deployment gRPC server on `[::]:0`" in readme


def is_loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)
