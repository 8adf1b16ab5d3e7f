"""The local Ray instance the product starts listens on loopback alone."""

from __future__ import annotations

import ipaddress

import psutil


def _listening(pids: set[int]) -> list[tuple[int, str, int]]:
    sockets = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            sockets.append((conn.pid, conn.laddr.ip, conn.laddr.port))
    return sockets


def test_local_instance_listens_on_loopback_only():
    import ray

    from dermaflux.core.runtime import RayConfig, init_ray

    if ray.is_initialized():
        ray.shutdown()
    context = init_ray(RayConfig(num_cpus=1))
    try:
        @ray.remote
        def node_address() -> str:
            return ray.util.get_node_ip_address()

        assert ray.get(node_address.remote()) == "127.0.0.1"
        assert context.gcs_address.startswith("127.0.0.1:")
        ours = {child.pid for child in psutil.Process().children(recursive=True)}
        sockets = _listening(ours)
        assert len(sockets) >= 3, sockets  # the GCS, the raylet and the dashboard at least
        exposed = [s for s in sockets if not ipaddress.ip_address(s[1].removeprefix("::ffff:")).is_loopback]
        assert not exposed, f"listening beyond loopback (pid, address, port): {exposed}"
    finally:
        ray.shutdown()
    from ray._private import ray_constants

    assert ray_constants.ENABLE_RAY_CLUSTER  # the switch was held only while Ray started
