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
# Ray Train's controller polls its worker group every 2 s (start, each report, the end, a restart): a test's
# short run waited on that poll several times. 0.5 s cut a 2-step, 2-worker run from ~21 s to ~17 s here.
# Set before any Ray starts, so the raylets and the controllers they start inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


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


class _SharedRay:
    """The local Ray instance `ray_local` started, kept from one module to the next while they all use it: a
    start and stop cost ~4.5 s here, for 16 modules. A module that does not use it stops it first (it may start
    a Ray of its own, a cluster, or need none running), and the session stops it at the end."""

    started = False

    @classmethod
    def ensure(cls):
        import ray

        from dermaflux.core.runtime import loopback_node

        if cls.started and ray.is_initialized():
            return ray
        if ray.is_initialized():  # someone else's (a test's own ray.init): not ours to reuse
            ray.shutdown()
        with loopback_node():
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
        cls.started = True
        return ray

    @classmethod
    def stop(cls):
        if cls.started:
            import ray

            if ray.is_initialized():
                ray.shutdown()
            cls.started = False


@pytest.fixture(scope="module", autouse=True)
def _ray_between_modules(request):
    """Stops the shared local Ray before a module whose tests do not ask for it (all of them: `fixturenames`
    holds every fixture a test needs, directly or through other fixtures)."""
    module_items = [item for item in request.session.items if item.module is request.module]
    if not any("ray_local" in getattr(item, "fixturenames", ()) for item in module_items):
        _SharedRay.stop()
    yield


@pytest.fixture(scope="session", autouse=True)
def _ray_stopped_at_the_end():
    yield
    _SharedRay.stop()


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray instance on loopback, as the product starts its own; kept for the next module if that one
    uses it too (`_SharedRay`)."""
    return _SharedRay.ensure()


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
