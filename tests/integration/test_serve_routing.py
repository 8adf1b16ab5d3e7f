"""Serve multiplexing across replicas: requests go to the replica that already holds their adapter."""

from __future__ import annotations

import time

import pytest

from dermaflux.testing.serve import tiny_service

pytestmark = pytest.mark.integration


def test_two_replicas_each_keep_one_adapter(ray_local, tiny_config, dermaflux_cache, tmp_path):
    synth = {"max_adapters_per_replica": 1, "num_inference_steps": 2, "width": 32, "height": 32,
             "autoscaling": {"min_replicas": 2, "max_replicas": 2}}
    with tiny_service(tiny_config.model, dermaflux_cache, tmp_path, ["a", "b"], **synth) as service:
        # /readyz needs one replica; routing needs both running (a busy machine starts them apart).
        deadline = time.time() + 120
        while running_replicas(service.cfg.synth.app_name) < 2:
            assert time.time() < deadline, "second replica not running after 120 s"
            time.sleep(0.5)
        # Alternate adapters, one request at a time. Room for one adapter per replica: if requests
        # were spread without regard to adapters, every switch on a replica would evict and reload
        # (about one load per request; checked by removing the routing).
        for i in range(16):
            response = service.client.post("/v1/images", json={"prompt": "a nevus", "seed": i, "adapter": "ab"[i % 2]})
            assert response.status_code == 200, response.text
        replicas: dict[str, dict] = {}
        deadline = time.time() + 60
        while len(replicas) < 2:  # /v1/adapters answers from either replica
            assert time.time() < deadline, replicas
            info = service.client.get("/v1/adapters").json()["replica"]
            replicas[info["replica"]] = info
    loads = sum(sum(r["loads"].values()) for r in replicas.values())
    assert sorted(a for r in replicas.values() for a in r["loaded"]) == ["a", "b"], replicas
    assert loads <= 4, replicas  # each adapter found its replica within the first few requests
    assert all(r["base_loads"] == 1 for r in replicas.values())


def running_replicas(app_name: str) -> int:
    from ray import serve

    from dermaflux.synth.serve_model import SYNTH_DEPLOYMENT

    app = serve.status().applications.get(app_name)
    if app is None or SYNTH_DEPLOYMENT not in app.deployments:
        return 0
    return app.deployments[SYNTH_DEPLOYMENT].replica_states.get("RUNNING", 0)
