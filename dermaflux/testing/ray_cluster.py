"""A real multi-node Ray cluster on this machine: `ray start --block` processes on loopback.

Each node is its own process group, so a test can kill one node (a lost worker machine) and
stopping the cluster never touches Ray instances of other processes (no global `ray stop`).

Nodes take the address 127.0.0.2. `ray start` replaces 127.0.0.1 (and `localhost`) with the machine's
routable address, for `--node-ip-address` and `--address` alike, so a cluster "on 127.0.0.1" really ran on
the machine's network address, with its dashboard and runtime-env agents listening there. Any other
127.x address is loopback too and is taken as given. What remains: Ray 2.60 binds its gRPC servers (GCS,
raylets, workers) to all interfaces unless the node address is exactly 127.0.0.1, which it allows only for a
single-node instance (`core.runtime` starts those on loopback alone), and it has no setting for the bind address.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dermaflux.core.runtime import free_port

RAY_BIN = str(Path(sys.executable).with_name("ray"))
NODE_IP = "127.0.0.2"


class LocalRayCluster:
    def __init__(self, head_cpus: int = 2, env: dict | None = None):
        # Short temp dir: Ray's socket paths must stay under ~107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
        self.port = free_port()
        self.dashboard_port = free_port()
        # A stopped node drains first (30 s by default): nothing here needs its tasks moved elsewhere.
        # A killed node is declared dead after 3 missed 1 s health checks (default 5 x 3 s).
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "1",
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                    **(env or {})}
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: dict[str, subprocess.Popen] = {}
        self._start("head", [
            "--head", f"--port={self.port}", f"--num-cpus={head_cpus}", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--temp-dir={self.temp_dir}", f"--ray-client-server-port={free_port()}",
        ])
        self._wait_for_dashboard()

    @property
    def address(self) -> str:
        return f"{NODE_IP}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str]) -> None:
        log = open(Path(self.temp_dir) / f"{name}.log", "w")
        self.nodes[name] = subprocess.Popen(
            # Every node its own agent HTTP port: the default (52365) is shared by all Ray nodes on the
            # machine, so a second node's agent fails to bind and the Jobs API finds no agent.
            [RAY_BIN, "start", "--block", f"--node-ip-address={NODE_IP}", "--disable-usage-stats",
             f"--dashboard-agent-listen-port={free_port()}", *args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def add_worker(self, name: str = "worker", num_cpus: int = 2, resources: str | None = None) -> None:
        args = [f"--address={self.address}", f"--num-cpus={num_cpus}"]
        if resources:
            args.append(f"--resources={resources}")
        self._start(name, args)
        self.wait_for_nodes(len(self.nodes))

    def _wait_for_dashboard(self, timeout: float = 120) -> None:
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.nodes["head"].poll() is not None:
                raise RuntimeError(f"ray head exited: {self.log('head')}")
            try:
                urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2)
                return
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"ray dashboard did not come up: {self.log('head')}")

    def alive_nodes(self) -> int:
        import json
        import urllib.request

        with urllib.request.urlopen(f"{self.dashboard_url}/nodes?view=summary", timeout=5) as resp:
            summary = json.load(resp)["data"]["summary"]
        return sum(1 for n in summary if n["raylet"]["state"] == "ALIVE")

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if self.alive_nodes() >= count:
                    return
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(1)
        raise TimeoutError(f"{count} Ray nodes not alive after {timeout}s")

    def kill_node(self, name: str) -> None:
        """SIGKILL the node's whole process group: the machine is gone."""
        proc = self.nodes.pop(name)
        _signal_group(proc, signal.SIGKILL)
        proc.wait(timeout=30)

    def log(self, name: str) -> str:
        path = Path(self.temp_dir) / f"{name}.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def shutdown(self) -> None:
        """SIGTERM every node at once, then SIGKILL the process groups of those still up after 20 s."""
        procs = list(self.nodes.values())
        self.nodes.clear()
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.time() + 20
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)  # stragglers a node left in its group
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
