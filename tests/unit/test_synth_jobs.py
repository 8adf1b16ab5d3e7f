"""The service's hardening without Ray: where jobs may write, job state and progress, request
limits, the token and the body cap (issue 14). The Serve-level checks are in
tests/integration/test_serve_hardening.py."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import time

import httpx
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel, ValidationError

from dermaflux.core.config import ConfigError
from dermaflux.synth.requests import RequestError

TOKEN = "s3cret-token-of-32-characters-ok"


def spec_for(targets, shard_size=2, seed=0, job_id="job"):
    from dermaflux.synth.bulk import JobSpec
    from dermaflux.synth.requests import Settings

    return JobSpec(job_id, targets, Settings(32, 32, 2, 3.5, None), seed, shard_size, "builtin:tiny")


def solid_pngs(samples) -> list[bytes]:
    """The caller-provided generate function of `bulk.run_job`: one small PNG per request."""
    from PIL import Image

    pngs = []
    for sample in samples:
        buffer = io.BytesIO()
        Image.new("RGB", (sample.settings.width, sample.settings.height), (sample.seed % 256, 0, 0)).save(buffer, "PNG")
        pngs.append(buffer.getvalue())
    return pngs


# --- where jobs may write ------------------------------------------------------------------------


@pytest.mark.parametrize("out, says", [
    ("../../../../../../srv/elsewhere/job", "'..'"),
    ("a/../../b", "'..'"),
    ("/srv/elsewhere/job", "absolute path"),
    (".jobs/x", "reserved"),
    ("", "relative path of 1 to"),
    ("a\0b", "relative path of 1 to"),
])
def test_out_outside_the_jobs_root_is_refused_naming_out(tmp_path, out, says):
    from dermaflux.synth.jobs import JobStore

    store = JobStore(tmp_path / "root")
    with pytest.raises(RequestError, match=says) as err:
        store.resolve_out(out, "j")
    assert err.value.field == "out" and 400 <= err.value.status < 500
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]  # nothing created outside


def test_out_resolves_inside_the_root_and_symlinks_out_of_it_are_refused(tmp_path):
    from dermaflux.synth.jobs import JobStore

    store = JobStore(tmp_path / "root")
    assert store.resolve_out(None, "j1") == ("j1", store.root / "j1")
    assert store.resolve_out("team/./a/", "j1") == ("team/a", store.root / "team" / "a")
    (tmp_path / "outside").mkdir()
    (store.root / "escape").symlink_to(tmp_path / "outside")
    with pytest.raises(RequestError, match="outside the jobs root") as err:
        store.resolve_out("escape/job", "j1")
    assert err.value.field == "out"
    (store.root / "inner").mkdir()
    (store.root / "alias").symlink_to(store.root / "inner")  # a link that stays inside is fine
    assert store.resolve_out("alias/job", "j1")[1] == store.root / "inner" / "job"


def test_out_naming_an_existing_file_is_a_409_naming_out(tmp_path):
    from dermaflux.synth.jobs import JobStore

    store = JobStore(tmp_path / "root")
    (store.root / "notes.txt").write_text("mine")
    for out in ("notes.txt", "notes.txt/job"):
        with pytest.raises(RequestError, match="'notes.txt' is an existing file") as err:
            store.resolve_out(out, "j")
        assert (err.value.field, err.value.status) == ("out", 409)


def test_the_jobs_lock_excludes_other_threads(tmp_path):
    import threading

    from dermaflux.synth.jobs import JobStore

    store = JobStore(tmp_path)
    inside, overlaps = [], []

    def hold():
        with store.lock():
            inside.append(1)
            overlaps.append(len(inside))
            time.sleep(0.05)
            inside.pop()

    threads = [threading.Thread(target=hold) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps == [1, 1, 1, 1]


# --- job state and progress ----------------------------------------------------------------------


def test_a_job_of_zero_images_succeeds_with_an_empty_set(tmp_path):
    from dermaflux.synth import bulk

    out = tmp_path / "empty"
    spec = spec_for({"mel": 0, "nv": 0})
    bulk.prepare_job(out, spec)
    status = bulk.run_job(out, spec, solid_pngs)
    assert (status["state"], status["total"], status["done"]) == ("done", 0, 0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {} and manifest["images"] == [] and manifest["total"] == 0
    assert bulk.job_status(out)["state"] == "done"


def test_cancel_stops_between_shards_and_a_rerun_resumes_without_duplicates(tmp_path):
    from dermaflux.synth import bulk

    out = tmp_path / "set"
    spec = spec_for({"mel": 3, "nv": 4}, shard_size=2)  # 4 shards
    bulk.prepare_job(out, spec)
    asked = []

    def stop_after_two() -> bool:
        asked.append(1)
        return len(asked) > 2

    status = bulk.run_job(out, spec, solid_pngs, should_stop=stop_after_two)
    assert (status["state"], status["shards_done"], status["done"]) == ("cancelled", 2, 4)
    assert bulk.job_status(out)["state"] == "cancelled" and not (out / "manifest.json").exists()
    assert bulk.run_job(out, spec, solid_pngs)["state"] == "done"
    table = pq.read_table(out / "shards")
    assert table.num_rows == 7 and len(set(table["id"].to_pylist())) == 7
    status = bulk.job_status(out)
    assert status["done_by_class"] == {"mel": 3, "nv": 4} and status["shards_done"] == 4


def test_a_failure_is_recorded_in_the_progress_record(tmp_path):
    from dermaflux.synth import bulk

    out = tmp_path / "set"
    spec = spec_for({"mel": 3})
    bulk.prepare_job(out, spec)

    def broken(samples):
        raise RuntimeError("replica lost")

    with pytest.raises(RuntimeError):
        bulk.run_job(out, spec, broken)
    status = bulk.job_status(out)
    assert status["state"] == "failed" and status["error"] == "RuntimeError: replica lost"


def test_status_of_a_100k_job_costs_no_plan(tmp_path):
    """Status used to rebuild the plan (attributes + caption per image: 20-27 s at 100,000 images)."""
    from dermaflux.synth import bulk

    out = tmp_path / "big"
    spec = spec_for({"mel": 60_000, "nv": 40_000}, shard_size=16)
    bulk.prepare_job(out, spec)
    started = time.perf_counter()
    status = bulk.job_status(out)  # no record yet: counted from the (empty) done markers
    assert time.perf_counter() - started < 1.0
    assert (status["total"], status["shards_total"], status["done"]) == (100_000, 6250, 0)
    bulk.set_state(out, "running")
    started = time.perf_counter()
    for _ in range(100):
        bulk.job_status(out)  # the progress record: one small file
    assert (time.perf_counter() - started) / 100 < 0.01
    # The shard layout is the one the full plan gives (labels straddling a shard boundary too).
    small = spec_for({"mel": 3, "nv": 4, "df": 0, "bcc": 2}, shard_size=4)
    plan = bulk.plan_items(small)
    for index in range(bulk.shard_count(small)):
        items = plan[index * 4 : (index + 1) * 4]
        assert bulk.shard_items(small, index) == items
        assert bulk.shard_labels(small, index) == {label: [i.label for i in items].count(label)
                                                   for label in {i.label for i in items}}


def test_the_service_and_generate_build_one_job_spec(tmp_path):
    from dermaflux.config import load_config
    from dermaflux.synth import bulk, stage
    from dermaflux.synth.requests import AugmentationRequest

    cfg = load_config("tiny", extra={"synth": {"out": str(tmp_path / "set"), "class_targets": {"mel": 2, "nv": 1},
                                               "seed": 9, "shard_size": 3}})
    request = AugmentationRequest(job_id="set", class_targets={"nv": 1, "mel": 2}, seed=9)
    assert stage.job_spec(cfg) == bulk.job_spec(cfg, request, {})
    cfg.synth.limits.max_images_per_job = 2
    for build in (lambda: stage.job_spec(cfg), lambda: bulk.job_spec(cfg, request, {})):
        with pytest.raises(RequestError, match="3 images exceeds the limit of 2 per job"):
            build()


# --- request checks -----------------------------------------------------------------------------


@pytest.mark.parametrize("fields", [
    {"guidance_scale": float("nan")}, {"guidance_scale": float("inf")},
    {"count": "2"}, {"count": 1.0}, {"count": True}, {"seed": "3"}, {"width": 64.0},
])
def test_non_finite_guidance_and_non_integer_counts_are_refused(fields):
    from dermaflux.synth.requests import AugmentationRequest, ImageRequest

    with pytest.raises(ValidationError):
        ImageRequest(prompt="a nevus", **fields)
    if "count" not in fields:
        with pytest.raises(ValidationError):
            AugmentationRequest(job_id="j", class_targets={"mel": 1}, **fields)
    with pytest.raises(ValidationError):
        AugmentationRequest(job_id="j", class_targets={"mel": True})


def test_seed_plus_count_stays_a_valid_seed_and_long_prompts_are_refused_before_tokenising():
    from dermaflux.config import load_config
    from dermaflux.synth.requests import ImageRequest, expand_image_request

    cfg = load_config("tiny")

    def tokenizer(text):
        raise AssertionError("the prompt reached the tokenizer")

    with pytest.raises(RequestError, match="exceeds 2\\*\\*63 - 1") as err:
        expand_image_request(ImageRequest(prompt="a nevus", seed=2**63 - 1, count=2), cfg, [], tokenizer)
    assert err.value.field == "seed"
    assert [s.seed for s in expand_image_request(ImageRequest(prompt="a", seed=2**63 - 2, count=2), cfg, [])] == [
        2**63 - 2, 2**63 - 1]
    prompt = "melanoma " * 1_200_000  # 10.8 MB
    started = time.perf_counter()
    with pytest.raises(RequestError, match="characters exceeds the limit of 4096") as err:
        expand_image_request(ImageRequest(prompt=prompt), cfg, [], tokenizer)
    assert err.value.field == "prompt" and time.perf_counter() - started < 1.0


# --- the token and the body cap ------------------------------------------------------------------


def test_a_token_is_required_beyond_loopback_and_read_from_env_or_file(tmp_path, monkeypatch):
    from dermaflux.synth.config import AuthConfig
    from dermaflux.synth.guard import auth_required, read_token

    auth = AuthConfig()
    assert [auth_required(auth, h) for h in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "10.1.2.3", None)] == [
        False, False, False, True, True, True]
    assert auth_required(AuthConfig(required=True), "127.0.0.1") and not auth_required(AuthConfig(required=False), None)
    monkeypatch.delenv("DERMAFLUX_API_TOKEN", raising=False)
    assert read_token(auth, required=False) is None
    with pytest.raises(ConfigError, match=r"\$DERMAFLUX_API_TOKEN .*synth.auth.token_file"):
        read_token(auth, required=True)
    monkeypatch.setenv("DERMAFLUX_API_TOKEN", TOKEN)
    assert read_token(auth, required=True) == TOKEN
    (tmp_path / "token").write_text("from-the-file-0123456789\n")
    assert read_token(AuthConfig(token_file=str(tmp_path / "token")), required=True) == "from-the-file-0123456789"
    with pytest.raises(ConfigError, match="synth.auth.token_file: .*does not exist"):
        read_token(AuthConfig(token_file=str(tmp_path / "missing")), required=True)
    monkeypatch.setenv("DERMAFLUX_API_TOKEN", "short")
    with pytest.raises(ConfigError, match="at least 16"):
        read_token(auth, required=False)


class EchoBody(BaseModel):
    text: str


def guarded_app(token: str | None, max_body_bytes: int = 2048):
    from fastapi import FastAPI

    from dermaflux.synth.guard import Guard, RequestGuard

    app = FastAPI()

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.post("/v1/echo")
    def echo(body: EchoBody):
        return {"chars": len(body.text)}

    guard = Guard(token, max_body_bytes)
    app.add_middleware(RequestGuard, guard=lambda: guard)
    return app


def call(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_v1_routes_need_the_bearer_token_and_health_stays_open():
    app = guarded_app(TOKEN)
    assert call(app, "GET", "/healthz").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
        refused = call(app, "POST", "/v1/echo", json={"text": "x"}, headers=headers)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert refused.json()["detail"][0]["loc"] == ["authorization"]
    assert call(app, "POST", "/v1/echo", json={"text": "x"}, headers={"Authorization": f"Bearer {TOKEN}"}).json() == {
        "chars": 1}
    assert call(guarded_app(None), "POST", "/v1/echo", json={"text": "x"}).status_code == 200  # loopback, no token


def test_bodies_over_the_cap_get_a_413_declared_or_streamed():
    app = guarded_app(None, max_body_bytes=2048)
    big = json.dumps({"text": "x" * 10_000}).encode()
    declared = call(app, "POST", "/v1/echo", content=big, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and "synth.limits.max_body_bytes" in declared.text

    async def chunks():
        for start in range(0, len(big), 1000):
            yield big[start : start + 1000]

    streamed = call(app, "POST", "/v1/echo", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and "synth.limits.max_body_bytes" in streamed.text
    assert call(app, "POST", "/v1/echo", json={"text": "x" * 1000}).status_code == 200


def test_a_busy_port_is_one_clear_error():
    from dermaflux.synth.serve_app import check_port_free

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ConfigError, match=f"synth.port: cannot listen on 127.0.0.1:{port}"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", port)  # free again


# --- the shipped cluster configs use the token ----------------------------------------------------


def test_cluster_configs_take_the_token_from_a_secret_never_from_yaml():
    from pathlib import Path

    import yaml

    from dermaflux.config import load_config
    from dermaflux.synth.serve_app import AppArgs, app

    cluster = Path(__file__).resolve().parents[2] / "cluster"
    cfg = load_config(None, cluster / "configs" / "flux-dev.yaml")
    assert cfg.synth.host == "0.0.0.0" and cfg.synth.auth.required is not False
    assert "token:" not in (cluster / "configs" / "flux-dev.yaml").read_text()
    doc = yaml.safe_load((cluster / "kuberay" / "rayservice-synth.yaml").read_text())
    spec = doc["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    for pod in pods:  # the ingress replica may land on any pod
        (container,) = pod["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env[cfg.synth.auth.token_env]["valueFrom"]["secretKeyRef"]["name"] == "dermaflux-api"
    with pytest.raises(ConfigError, match="needs a bearer token"):  # the RayService builder, without the secret
        app(AppArgs.model_validate({"config": str(cluster / "configs" / "flux-dev.yaml"),
                                    "set": ["synth.auth.token_env=DERMAFLUX_UNSET_X"]}))
