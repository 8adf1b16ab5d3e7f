"""The real synthesis service on loopback: tiny preset, random LoRAs, ready when yielded."""

from __future__ import annotations

from typing import TYPE_CHECKING

import contextlib
import time
from pathlib import Path
from types import SimpleNamespace

if TYPE_CHECKING:
    from dermaflux.model.config import ModelConfig


@contextlib.contextmanager
def tiny_service(model_cfg: ModelConfig, cache: Path, root: Path, adapters: list[str], **synth):
    """Yield (client, port, cfg, root) for a Serve app with one random LoRA per name in `adapters`."""
    import httpx
    from ray import serve

    from dermaflux.config import load_config
    from dermaflux.synth.serve_app import start_service
    from dermaflux.testing.adapters import random_lora_adapter
    from dermaflux.testing.ray_cluster import free_port

    loras = [random_lora_adapter(model_cfg, root / name, seed=i) for i, name in enumerate(adapters, 1)]
    port = free_port()
    cfg = load_config("tiny", extra={
        "model": {"cache_dir": str(cache)},
        "synth": {"adapters": [str(p) for p in loras], "port": port, "jobs_root": str(root / "jobs"), **synth},
    })
    start_service(cfg, access_log=False)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    try:
        deadline = time.time() + 120
        while client.get("/readyz").status_code != 200:
            assert time.time() < deadline, "service not ready after 120 s"
            time.sleep(0.5)
        yield SimpleNamespace(client=client, port=port, cfg=cfg, root=root)
    finally:
        client.close()
        serve.shutdown()


def open_slow_bodies(port: int, count: int, headers: dict[str, str], body_bytes: int = 1000) -> list:
    """`count` connections that each send a POST's headers and then the first byte of a
    `body_bytes`-byte body, and nothing more: clients that trickle their bodies (1 byte every few
    seconds, or never). The caller closes the sockets."""
    import socket

    lines = [f"POST /v1/images HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json",
             f"Content-Length: {body_bytes}", *(f"{k}: {v}" for k, v in headers.items())]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(head + b"{")
        sockets.append(sock)
    return sockets


def listening_sockets(pids: list[int]) -> dict[int, list[tuple[str, int]]]:
    """(address, port) of every TCP socket each process listens on."""
    import psutil

    found = {}
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.NoSuchProcess:  # a worker that ended meanwhile listens on nothing
            continue
        found[pid] = sorted({(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN})
    return found
