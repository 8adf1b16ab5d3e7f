"""The `ray` section and starting or joining Ray the same way for every stage.

With no address: inside a Ray job (RAY_ADDRESS set) join that cluster; otherwise start a new
local instance (never silently join a stray `ray start` cluster on the same machine).

A local instance is made unambiguous for its own processes too. Ray code running inside workers
finds "the" cluster without an address: Ray Train's PlacementGroupCleaner polls the State API
through `ray.util.state.get_actor()`, which reads RAY_ADDRESS, else the address the last
`ray start` wrote to <temp>/ray/ray_current_cluster, else any GCS process it sees in `ps`
(`services.get_ray_address_from_environment`). With other instances on the machine that was a
`ConnectionError: Found multiple active Ray instances` traceback, or, after a `ray start`, a query
to that other cluster: it does not know our controller, so the cleaner took it for dead and quit
(had it registered our placement group by then, it would have removed it). So the local instance
gets a GCS port chosen here and its workers RAY_ADDRESS pointing at it; the State API (the
dashboard process) is kept, or the cleaner would warn every second that it cannot reach it.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket

from pydantic import Field

from dermaflux.core.config import ConfigModel


class RayConfig(ConfigModel):
    address: str | None = Field(
        None, description="cluster address; None uses RAY_ADDRESS when set (Ray jobs), else a new local instance"
    )
    num_cpus: int | None = Field(None, description="CPUs of the local instance (None: all)")
    num_gpus: int | None = None


# Its own generator: a test or library seeding `random` must not make two processes pick alike.
_PORT_RANDOM = random.SystemRandom()
_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A port free on every interface now, outside the kernel's ephemeral range (32768+) and Ray's worker
    ports (10002-19999), so no process binding port 0 takes it before the GCS does. Never the same port twice
    in one process: the ports of one Ray node are picked before any is bound, so a repeat would collide."""
    for _ in range(200):
        port = _PORT_RANDOM.randint(20000, 32000)
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("", port))
            except OSError:
                continue
            _PORTS_GIVEN.add(port)
            return port
    raise RuntimeError("no free port in 20000-32000 for the local Ray instance")


def _with_env_vars(runtime_env: dict | None, env_vars: dict) -> dict:
    runtime_env = dict(runtime_env or {})
    runtime_env["env_vars"] = {**env_vars, **runtime_env.get("env_vars", {})}
    return runtime_env


@contextlib.contextmanager
def loopback_node():
    """Ray's own switch for a one-machine instance, held while it starts: its node address is then 127.0.0.1,
    and Ray binds the GCS, raylet and workers to loopback alone. Without it Ray takes the machine's routable
    address (also for an explicit `_node_ip_address="127.0.0.1"`) and its gRPC servers listen on every
    interface: a demo on a laptop opened Ray's code-running API to its network."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # read by services.get_node_ip_address, for this process
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def _start_local(ray, options: dict) -> None:
    """`ray.init(address="local")` on loopback, on a GCS port picked here; its workers' RAY_ADDRESS names it."""
    with loopback_node():
        _start_local_instance(ray, options)


def _start_local_instance(ray, options: dict) -> None:
    port = free_port()
    own_address = f"{ray.util.get_node_ip_address()}:{port}"
    # RAY_TRAIN_ENABLE_PRINT_PATCH=0: Ray Train turns print() on its workers into a logger call that also
    # echoes to stdout when stdout is Ray's own stream (always, on a worker): every line came out twice.
    options["runtime_env"] = _with_env_vars(options.get("runtime_env"),
                                            {"RAY_ADDRESS": own_address, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"})
    options.setdefault("include_dashboard", True)  # the State API the Ray Train cleaner polls
    options.setdefault("dashboard_port", free_port())
    saved = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by the head node as it starts
    try:
        ray.init(**options)
    finally:
        if saved is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = saved
    actual = ray.get_runtime_context().gcs_address
    if actual != own_address:
        raise RuntimeError(f"the local Ray instance runs at {actual}, not at {own_address} as its workers were told")


def init_ray(ray_cfg: RayConfig | None = None, **kwargs):
    """Start or join Ray once per process (later calls return the running context); under the CLI its
    output then goes where `core.progress` says."""
    import ray

    from dermaflux.core.progress import attach_to_ray

    if not ray.is_initialized():
        attach_to_ray()  # Ray's loggers first: ray.init logs too
        _init(ray, ray_cfg or RayConfig(), kwargs)
    attach_to_ray()  # then the workers' output, which exists once Ray runs
    return ray.get_runtime_context()


def _init(ray, ray_cfg: RayConfig, kwargs: dict) -> None:
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS") or "local"
    options: dict = {"address": address, "log_to_driver": True, **kwargs}
    if address != "local":
        ray.init(**options)
        return
    if ray_cfg.num_cpus is not None:
        options["num_cpus"] = ray_cfg.num_cpus
    if ray_cfg.num_gpus is not None:
        options["num_gpus"] = ray_cfg.num_gpus
    _start_local(ray, options)
