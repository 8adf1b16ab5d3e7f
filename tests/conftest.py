"""Shared fixtures: the real data, the tiny preset (built once), real Ray (local or a 2-node cluster)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DERMAFLUX_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _require_data(path: Path) -> Path:
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"shared data folder {path} is missing; CI requires the real data")
        pytest.skip(f"shared data folder {path} is missing")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data`: a failure in CI when missing, a skip on a developer machine."""
    return _require_data(SHARED_DATA)


@pytest.fixture(scope="session")
def ham10000_dir(shared_data) -> Path:
    return _require_data(shared_data / "ham10000-224")


@pytest.fixture(scope="session")
def dermaflux_cache(tmp_path_factory) -> Path:
    cache = Path(os.environ.get("DERMAFLUX_CACHE") or tmp_path_factory.mktemp("dermaflux-cache"))
    os.environ["DERMAFLUX_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_config(dermaflux_cache):
    from dermaflux.config import load_config

    return load_config("tiny")


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_config) -> Path:
    """The tiny Flux pipeline in the Hugging Face folder layout (built once per session)."""
    from dermaflux.model.loading import resolve_pretrained

    return Path(resolve_pretrained(tiny_config.model))


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray instance shared by one test module, on loopback as the product starts its own."""
    import ray

    from dermaflux.core.runtime import loopback_node

    if ray.is_initialized():
        ray.shutdown()
    with loopback_node():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_two_nodes():
    """A real two-node Ray cluster on 127.0.0.2 (head + one worker node), stopped afterwards."""
    from dermaflux.testing.ray_cluster import LocalRayCluster

    # Ray 2.60 turns token authentication on by default: the dashboard then answers 401 to the
    # fixture's and JobSubmissionClient's plain requests. A loopback test cluster needs none.
    cluster = LocalRayCluster(head_cpus=2, env={"DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled"})
    try:
        cluster.add_worker("worker", num_cpus=2)
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module: the CPU is shared with the Ray workers of other tests."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
